"""Peak memory of ``segtrain.predict`` on a raster larger than memory, against a small raster of the same run.

A synthetic RGB GeoTIFF of ``--size`` x ``--size`` pixels (default 16000: 768 MB of pixels, 3 GB as float32), tiled
256x256, deflate, georeferenced in UTM zone 33N, is written tile by tile (never whole in memory) under ``--root``,
and a ``--small`` one (2048) beside it. A ``debug=fast`` checkpoint is trained there unless ``--checkpoint`` names
one. Each raster is predicted by ``python -m segtrain.predict`` in a child process (sliding windows of ``--tile``,
overlap ``--overlap``, on the CPU; both are streamed, being georeferenced), whose peak RSS comes from
``/usr/bin/time -v`` (else ``getrusage`` of the children). The output's georeference is compared with the input's:
the GeoTIFF tags as tifffile reads them, and the CRS and transform as rasterio (GDAL) reads them when installed.

    python scripts/bench_big_predict.py                          # 16000 and 2048, windows of 512
    python scripts/bench_big_predict.py --size 20000 --root /data/bench_big --checkpoint outputs/.../best.pt
"""

from __future__ import annotations

import argparse
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import segtrain  # noqa: F401  (import-time fixes run before torchvision loads)
from segtrain.data.raster import RasterReader, tifffile_module

TILE = 256
# UTM zone 33N (EPSG:32633), 0.5 m pixels: the GeoKeyDirectory GDAL writes for it, and its tie point and scale.
GEO_KEYS = (1, 1, 0, 4, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32633, 3076, 0, 1, 9001)
GEO_TAGS = [(33550, 12, 3, (0.5, 0.5, 0.0), True), (33922, 12, 6, (0.0, 0.0, 0.0, 400000.0, 5000000.0, 0.0), True),
            (34735, 3, len(GEO_KEYS), GEO_KEYS, True)]
LIMIT_MB = 1536  # the goal: the 16000x16000 prediction under 1.5 GB peak


def _tile(y0: int, x0: int) -> np.ndarray:
    """(256, 256, 3) uint8 of the scene at (y0, x0): fields, roads and noise, a function of the coordinates alone."""
    yy, xx = np.mgrid[y0 : y0 + TILE, x0 : x0 + TILE].astype(np.float32)
    fields = 90 + 60 * np.sin(xx / 310.0) * np.cos(yy / 270.0)
    roads = ((xx % 1500 < 12) | (yy % 1100 < 12)) * 90.0
    noise = np.random.default_rng(y0 * 100003 + x0).normal(0, 4, (TILE, TILE)).astype(np.float32)
    grey = fields + roads + noise
    return np.stack([grey, grey * 0.9 + 20, grey * 0.7 + 30], axis=-1).clip(0, 255).astype(np.uint8)


def write_scene(path: Path, size: int) -> None:
    """The synthetic GeoTIFF, one 256x256 tile at a time (tifffile pulls them from the generator)."""
    if path.is_file():
        return
    tiles = (_tile(y, x) for y in range(0, size, TILE) for x in range(0, size, TILE))
    tmp = path.with_suffix(".part.tif")
    with tifffile_module().TiffWriter(tmp, bigtiff=True) as out:
        out.write(tiles, shape=(size, size, 3), dtype=np.uint8, tile=(TILE, TILE), photometric="rgb",
                  compression="zlib", compressionargs={"level": 1}, extratags=GEO_TAGS)
    tmp.rename(path)


def _checkpoint(root: Path) -> Path:
    """A debug=fast model (4 steps) trained under root, once."""
    path = root / "run/checkpoints/last.pt"
    if not path.is_file():
        subprocess.run([sys.executable, "-m", "segtrain", "debug=fast", f"dataset.root={root / 'data'}",
                        "trainer.max_steps=4", f"hydra.run.dir={root / 'run'}"], check=True, capture_output=True)
    return path


def predict(checkpoint: Path, image: Path, out: Path, tile: int, overlap: float) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of one ``segtrain.predict`` child process."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "segtrain.predict", f"checkpoint={checkpoint}", f"input={image}",
               f"output={out}", "device=cpu", "progress=false", "inference.mode=slide", f"inference.tile={tile}",
               f"inference.overlap={overlap}"]
    timer = Path("/usr/bin/time")
    start = time.perf_counter()
    proc = subprocess.run(([str(timer), "-v"] if timer.is_file() else []) + command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    kib = int(found.group(1)) if found else resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return seconds, kib / 1024


def georeference_kept(source: Path, output: Path) -> str:
    """'yes' when the output has the input's GeoTIFF tags (and, with rasterio, its CRS and transform)."""
    with RasterReader(source) as a, RasterReader(output, "mask") as b:
        same = [t[:4] for t in a.geo_tags] == [t[:4] for t in b.geo_tags] and bool(a.geo_tags)
    try:
        import rasterio
    except ImportError:
        return "yes (tags)" if same else "NO"
    with rasterio.open(source) as a, rasterio.open(output) as b:
        same = same and a.crs == b.crs and a.transform == b.transform and a.crs is not None
        crs = a.crs.to_epsg()
    return f"yes (EPSG:{crs})" if same else "NO"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("/tmp/bench_big_predict"))
    parser.add_argument("--size", type=int, default=16000)
    parser.add_argument("--small", type=int, default=2048)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the rasters and outputs under --root")
    args = parser.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint or _checkpoint(args.root)
    rows = []
    for size in (args.small, args.size):  # the small one first: the reference of the ratio
        image = args.root / f"scene_{size}.tif"
        start = time.perf_counter()
        write_scene(image, size)
        written = time.perf_counter() - start
        seconds, peak = predict(checkpoint, image, args.root / f"pred_{size}", args.tile, args.overlap)
        rows.append((size, written, seconds, peak, georeference_kept(image, args.root / f"pred_{size}" / image.name)))
    small_peak = rows[0][3]
    print(f"checkpoint {checkpoint}, windows of {args.tile} (overlap {args.overlap}), cpu")
    print("| image | megapixels | written (s) | predicted (s) | peak RSS (MiB) | RSS ratio to small | georeference |")
    print("|---|---|---|---|---|---|---|")
    for size, written, seconds, peak, geo in rows:
        print(f"| {size}x{size} | {size * size / 1e6:.1f} | {written:.1f} | {seconds:.1f} | {peak:.0f} | "
              f"{peak / small_peak:.2f}x | {geo} |")
    big = rows[-1]
    print(f"pixels {args.size**2 / args.small**2:.1f}x, peak RSS {big[3] / small_peak:.2f}x; "
          f"{'under' if big[3] < LIMIT_MB else 'OVER'} the {LIMIT_MB} MiB goal")
    if not args.keep:
        shutil.rmtree(args.root, ignore_errors=True)


if __name__ == "__main__":
    main()
