"""Render image | colour mask | overlay rows from a prediction folder, for the README.

    python -m segtrain.predict checkpoint=<best.pt> input=data/synthetic/images/val output=/tmp/pred save.overlay=true
    python scripts/render_prediction.py data/synthetic/images/val /tmp/pred --names val_00000 val_00007 \\
        --out docs/images/predict.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", type=Path, help="the folder predict read")
    parser.add_argument("predictions", type=Path, help="the folder predict wrote")
    parser.add_argument("--names", nargs="+", required=True, help="image keys (file names without suffix)")
    parser.add_argument("--scale", type=int, default=2, help="nearest-neighbour enlargement")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = []
    for name in args.names:
        image = next(p for p in args.images.glob(f"{name}.*"))
        tiles = [Image.open(image).convert("RGB"), Image.open(args.predictions / f"{name}_color.png").convert("RGB"),
                 Image.open(args.predictions / f"{name}_overlay.jpg").convert("RGB")]
        rows.append(np.concatenate([np.asarray(t) for t in tiles], axis=1))
    grid = np.concatenate(rows, axis=0)
    picture = Image.fromarray(grid).resize((grid.shape[1] * args.scale, grid.shape[0] * args.scale), Image.NEAREST)
    legend = Image.open(args.predictions / "legend.png")
    out = Image.new("RGB", (picture.width, picture.height + legend.height), (255, 255, 255))
    out.paste(picture, (0, 0))
    out.paste(legend, (0, picture.height))
    out.save(args.out)
    print(f"wrote {args.out} ({out.width}x{out.height})")


if __name__ == "__main__":
    main()
