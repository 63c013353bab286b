"""Render a run's dashboard to one PNG, from its TensorBoard event files (no browser).

Left: validation Dice per class over the training steps, every class on one chart.
Right: the last evaluation's confusion matrix and first validation overlay, as logged.

    python scripts/render_dashboard.py outputs/2026-11-23/06-00-15 --out docs/images/dashboard.png

Needs matplotlib (a dev extra).
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from segtrain.visualize import class_palette  # noqa: E402


def _load(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def _last_image(acc: EventAccumulator, tag: str) -> Image.Image:
    return Image.open(io.BytesIO(acc.Images(tag)[-1].encoded_image_string))


def render(run_dir: Path, out: Path, metric: str = "dice") -> None:
    acc = _load(run_dir)
    prefix = f"val/{metric}/"
    # Class order and colours as in the logged overlays.
    names = json.loads((run_dir / "metrics.json").read_text())["class_names"]
    colours = dict(zip(names, class_palette(len(names)) / 255.0))
    tags = [f"{prefix}{name}" for name in names if f"{prefix}{name}" in acc.Tags()["scalars"]]
    if not tags:
        raise SystemExit(f"{run_dir / 'tensorboard'}: no '{prefix}<class>' scalars; is this a segtrain run directory?")
    fig = plt.figure(figsize=(13, 5.2), dpi=110)
    grid = fig.add_gridspec(2, 3, width_ratios=[1.5, 1, 1.6], height_ratios=[1, 0.08])
    ax = fig.add_subplot(grid[:, 0])
    for tag in tags:
        events = acc.Scalars(tag)
        name = tag[len(prefix):]
        ax.plot([e.step for e in events], [e.value for e in events], marker="o", label=name, color=colours[name])
    mean_tag = "val/mDice" if metric == "dice" else f"val/m{metric.upper() if metric == 'iou' else metric}"
    if mean_tag in acc.Tags()["scalars"]:
        events = acc.Scalars(mean_tag)
        ax.plot([e.step for e in events], [e.value for e in events], "k--", label=mean_tag)
    ax.set(xlabel="step", ylabel=metric, title=f"validation {metric} per class", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    for col, tag, title in ((1, "val/confusion_matrix", "confusion matrix (last evaluation)"),
                            (2, "val/samples/0", "image | truth | prediction")):
        axis = fig.add_subplot(grid[0, col])
        axis.imshow(_last_image(acc, tag))
        axis.set_title(title)
        axis.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path("docs/images/dashboard.png"))
    parser.add_argument("--metric", default="dice", choices=["dice", "iou", "precision", "recall"])
    args = parser.parse_args()
    render(args.run_dir, args.out, args.metric)


if __name__ == "__main__":
    main()
