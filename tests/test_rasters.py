"""Rasters larger than memory: windows read from tiled and striped TIFFs, the tiles of dataset.layout=rasters in the
one class-statistics pass, and `segtrain.predict` streaming a GeoTIFF by rows of windows (docs/rasters.md)."""

import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

tifffile = pytest.importorskip("tifffile", reason="the raster extra: pip install -e '.[raster]'")
rasterio = pytest.importorskip("rasterio", reason="the georeference oracle of the dev extra")
from rasterio.transform import Affine  # noqa: E402

from segtrain.data import FolderDataset, make_dataset  # noqa: E402
from segtrain.data.folder import read_image  # noqa: E402
from segtrain.data.raster import RasterReader  # noqa: E402
from segtrain.data.scan import image_class_counts  # noqa: E402
from segtrain.inference.predictor import Predictor  # noqa: E402
from segtrain.inference.streaming import stream_probabilities, streamed_reader  # noqa: E402
from segtrain.inference.writers import PredictionWriter  # noqa: E402
from segtrain.predict import main  # noqa: E402


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """An RGB image with structure (a smooth ramp and discs) and noise, so a model's windows differ."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    base = (yy * 0.5 + xx * 0.3) % 200
    discs = sum(((yy - rng.integers(height)) ** 2 + (xx - rng.integers(width)) ** 2 < 15**2) * 80 for _ in range(6))
    image = base[..., None] + discs[..., None] + rng.normal(0, 12, (height, width, 3))
    return image.clip(0, 255).astype(np.uint8)


def _labels(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, (height // 8 + 1, width // 8 + 1)).repeat(8, 0).repeat(8, 1)[:height, :width]
    labels[rng.random((height, width)) < 0.02] = 255  # ignored pixels
    return labels.astype(np.uint8)


def _geotiff(path: Path, image: np.ndarray, block: int = 32) -> Path:
    """A tiled, deflate-compressed RGB GeoTIFF in UTM 33N, written by GDAL (rasterio), not by the code under test."""
    height, width = image.shape[:2]
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", height=height, width=width, count=3, dtype="uint8", crs="EPSG:32633",
                       transform=Affine(0.5, 0, 400000, 0, -0.5, 5000000), tiled=True, blockxsize=block,
                       blockysize=block, compress="deflate") as out:
        out.write(image.transpose(2, 0, 1))
    return path


LAYOUTS = {
    "tiled": dict(tile=(32, 48)),
    "striped": dict(rowsperstrip=7),
    "planes": dict(tile=(32, 32), planarconfig="separate"),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_windows_equal_the_whole_decode(tmp_path, layout):
    """Every window, edges and 1x1 included, is the same slice of tifffile.imread of the whole small file; grey and
    RGBA rasters convert to RGB and RGB to grey as read_image (Pillow) converts the whole file."""
    image = _image(100, 130)
    path = tmp_path / "a.tif"
    data = image.transpose(2, 0, 1) if layout == "planes" else image
    tifffile.imwrite(path, data, photometric="rgb", compression="zlib", **LAYOUTS[layout])
    whole = tifffile.imread(path)
    whole = whole.transpose(1, 2, 0) if layout == "planes" else whole
    with RasterReader(path) as raster:
        for y, x, h, w in [(0, 0, 100, 130), (13, 17, 50, 77), (99, 129, 1, 1), (32, 48, 32, 48), (31, 0, 2, 130)]:
            np.testing.assert_array_equal(raster.image(y, x, h, w), whole[y : y + h, x : x + w])
        np.testing.assert_array_equal(raster.image(5, 9, 40, 60, channels=1), read_image(path, 1)[5:45, 9:69])
    tifffile.imwrite(tmp_path / "grey.tif", image[..., 0], tile=(16, 16))
    tifffile.imwrite(tmp_path / "rgba.tif", np.dstack([image, image[..., :1]]), photometric="rgb", tile=(16, 16),
                     extrasamples=["unassalpha"])
    for name in ("grey.tif", "rgba.tif"):
        np.testing.assert_array_equal(RasterReader(tmp_path / name).image(3, 4, 50, 60),
                                      read_image(tmp_path / name)[3:53, 4:64])
    labels = (np.arange(100 * 130) % 700).astype(np.uint16).reshape(100, 130)
    tifffile.imwrite(tmp_path / "m.tif", labels, compression="zlib", **{**LAYOUTS[layout], "planarconfig": None})
    np.testing.assert_array_equal(RasterReader(tmp_path / "m.tif", "mask").labels(7, 8, 60, 70), labels[7:67, 8:78])


def test_a_window_decodes_only_the_segments_it_overlaps(tmp_path, monkeypatch):
    """A 4x4 grid of 32-pixel tiles: a window over rows 40..79 and columns 33..95 touches tile rows 1-2 and tile
    columns 1-2, i.e. tiles 5, 6, 9, 10 (row-major), and decodes those and no other."""
    tifffile.imwrite(tmp_path / "a.tif", _image(128, 128), tile=(32, 32), compression="zlib")
    decoded = []
    paste = RasterReader._paste
    monkeypatch.setattr(RasterReader, "_paste", lambda self, page, index, *a: (decoded.append(index),
                                                                               paste(self, page, index, *a)))
    RasterReader(tmp_path / "a.tif").image(40, 33, 40, 63)
    assert sorted(decoded) == [5, 6, 9, 10]


def _pairs(root: Path, sizes: list[tuple[int, int]]) -> Path:
    """Raster pairs (tiled image, striped mask) under root/{images,masks}/train."""
    for i, (height, width) in enumerate(sizes):
        for folder in ("images", "masks"):
            (root / folder / "train").mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(root / "images/train" / f"r{i}.tif", _image(height, width, i), tile=(16, 16),
                         compression="zlib")
        tifffile.imwrite(root / "masks/train" / f"r{i}.tif", _labels(height, width, i), rowsperstrip=5)
    return root


def _cut(root: Path, out: Path, starts: dict[int, tuple[list[int], list[int]]], tile: tuple[int, int]) -> Path:
    """The same pairs cut by hand into PNG tiles of the folder layout, named so that their sorted order is the
    rasters' tile order."""
    for folder in ("images", "masks"):
        (out / folder / "train").mkdir(parents=True)
    n = 0
    for i, (ys, xs) in starts.items():
        image, labels = (tifffile.imread(root / f"{folder}/train/r{i}.tif") for folder in ("images", "masks"))
        covered = np.zeros(labels.shape, dtype=bool)  # pixels an earlier tile (raster order) already holds
        for y in ys:
            for x in xs:
                window = np.s_[y : y + tile[0], x : x + tile[1]]
                Image.fromarray(image[window]).save(out / f"images/train/t{n:03d}.png")
                Image.fromarray(np.where(covered[window], 255, labels[window]).astype(labels.dtype)).save(
                    out / f"masks/train/t{n:03d}.png")
                covered[window] = True
                n += 1
    return out


def test_tile_counts_equal_the_folder_counts_of_the_same_tiles(tmp_path, monkeypatch):
    """Rasters of 100x100 and 70x45 in 40-pixel tiles: starts 0, 40, 60 (the last moved back to the edge) on 100,
    0, 30 on 70, 0, 5 on 45. The one pass counts each tile's mask window as the folder layout counts the PNG cut from
    it; with another grid of as many tiles (50x40 tiles every 30 rows: rows 0, 30, 50 and 0, 20) the cached counts
    of the first grid are not reused."""
    root = _pairs(tmp_path / "rasters", [(100, 100), (70, 45)])
    tiles = make_dataset("rasters", root, "train", 3, tile_size=40)
    whole = []  # the pass checks each tile's image window, and never decodes a whole raster with Pillow (below)
    monkeypatch.setattr("segtrain.data.scan.check_image", lambda path: whole.append(path))
    assert len(tiles) == 9 + 4 and tiles.windows[:4] == [(0, 0, 0, 40, 40), (0, 0, 40, 40, 40), (0, 0, 60, 40, 40),
                                                         (0, 40, 0, 40, 40)]
    folder = FolderDataset(_cut(root, tmp_path / "cut40", {0: ([0, 40, 60], [0, 40, 60]), 1: ([0, 30], [0, 5])},
                                (40, 40)), "train", 3)
    expected = image_class_counts(folder, 3)
    np.testing.assert_array_equal(image_class_counts(tiles, 3), expected)
    np.testing.assert_array_equal(image_class_counts(tiles, 3), expected)  # from the cache
    for pair in range(2):  # each pixel counted once: a raster's tiles sum to its whole mask's counts
        rows = [k for k, window in enumerate(tiles.windows) if window[0] == pair]
        labels = tifffile.imread(root / f"masks/train/r{pair}.tif")
        np.testing.assert_array_equal(expected[rows].sum(0), np.bincount(labels[labels != 255].ravel(), minlength=3))
    other = make_dataset("rasters", root, "train", 3, tile_size=[50, 40], tile_stride=[30, 40])
    assert len(other) == len(tiles)
    folder = FolderDataset(_cut(root, tmp_path / "cut50", {0: ([0, 30, 50], [0, 40, 60]), 1: ([0, 20], [0, 5])},
                                (50, 40)), "train", 3)
    np.testing.assert_array_equal(image_class_counts(other, 3), image_class_counts(folder, 3))
    np.testing.assert_array_equal(image_class_counts(tiles, 3, num_workers=2, cache=False), expected)
    assert whole and {path.suffix for path in whole} == {".png"}  # the folder's PNGs went through it, no raster
    image, mask = tiles[4]
    assert image.shape == (3, 40, 40) and mask.shape == (40, 40)


def test_training_on_raster_tiles_runs(tmp_path, compose_cfg):
    """dataset=rasters composes (layout, tile options), builds both splits and trains debug=fast's two steps."""
    from segtrain.train import train

    root = _pairs(tmp_path / "rasters", [(96, 80), (64, 64)])
    for folder in ("images", "masks"):
        (root / folder / "val").mkdir()
        (root / folder / "val" / "r0.tif").write_bytes((root / folder / "train" / "r0.tif").read_bytes())
    cfg = compose_cfg(["debug=fast", "dataset=rasters", f"dataset.root={root}", "dataset.num_classes=3",
                       "dataset.tile_size=32", "dataset.tile_stride=[32,16]"])
    train(cfg, tmp_path / "run")
    assert (tmp_path / "run/checkpoints/last.pt").is_file() and (tmp_path / "run/eval/val/report.md").is_file()


def _args(trained: Path, *extra: str) -> list[str]:
    return [f"checkpoint={trained / 'run/checkpoints/last.pt'}", "device=cpu", "progress=false",
            "inference.mode=slide", "inference.tile=64", *extra]


def _predictor(trained: Path, batch_size: int = 4) -> Predictor:
    return Predictor.from_checkpoint(trained / "run/checkpoints/last.pt", ["inference.mode=slide", "inference.tile=64",
                                                                           f"inference.batch_size={batch_size}"], "cpu")


def _streamed(predictor: Predictor, path: Path) -> torch.Tensor:
    """(K, H, W) probabilities of a raster, its bands put together."""
    with RasterReader(path) as raster:
        bands = stream_probabilities(predictor, lambda y, h: raster.image(y, 0, h, raster.width), raster.height,
                                     raster.width)
        return torch.cat([band for _, band in bands], dim=1)


def test_streaming_equals_the_in_memory_path_and_keeps_the_georeference(trained, tmp_path):
    """A 120x150 tiled GeoTIFF, windows of 64 every 32 (rows 0, 32, 56; columns 0, 32, 64, 86) in float32 on the CPU:
    the streamed probabilities are the in-memory predictor's (Pillow's decode of the whole file) bit for bit, with one
    window per forward pass (the same inputs, kernels and sums in the same order), and segtrain.predict's label file
    is their arg-max. The outputs keep the input's CRS and transform, as GDAL reads them."""
    path = _geotiff(tmp_path / "in/scene.tif", _image(120, 150))
    assert main(_args(trained, f"input={path}", f"output={tmp_path / 'out'}", "inference.batch_size=1")) == 0
    predictor = _predictor(trained, batch_size=1)
    probs = predictor(read_image(path))
    assert torch.equal(_streamed(predictor, path), probs)
    labels = tifffile.imread(tmp_path / "out/scene.tif")
    np.testing.assert_array_equal(labels, predictor.labels(probs).numpy())
    assert len(np.unique(labels)) > 1  # a model that predicts one class everywhere would prove little
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out/scene_color.tif"), labels)
    with rasterio.open(path) as source:
        for name in ("scene.tif", "scene_color.tif"):
            with rasterio.open(tmp_path / "out" / name) as out:
                assert out.crs == source.crs and out.transform == source.transform and out.shape == source.shape


def test_streaming_in_batches_of_windows(trained, tmp_path):
    """Three windows per forward pass: the two paths group other windows in their batches (rows of windows against
    the whole grid), and a CPU convolution may round differently with the batch's size: probabilities within 1e-6
    (float32 rounding of sums of a few O(1) terms), labels equal where the top two differ by more."""
    path = _geotiff(tmp_path / "scene.tif", _image(120, 150, seed=1))
    predictor = _predictor(trained, batch_size=3)
    probs, streamed = predictor(read_image(path)), _streamed(predictor, path)
    torch.testing.assert_close(streamed, probs, atol=1e-6, rtol=0)
    top2 = probs.topk(2, dim=0).values
    clear = top2[0] - top2[1] > 1e-6
    assert torch.equal(predictor.labels(streamed)[clear], predictor.labels(probs)[clear])


def test_a_crop_on_the_stride_grid_predicted_alone_equals_the_big_output_inside(trained, tmp_path):
    """Windows of 64 every 32 on a 192x224 image: a 128x160 crop at (32, 32) is covered by the big image's windows
    that start inside it, so at least 64 - 32 = 32 pixels from its borders (where no window from outside reaches)
    its probabilities, predicted in memory alone, are the streamed ones of the big image, bit for bit."""
    image = _image(192, 224, seed=3)
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, image, tile=(32, 32), photometric="rgb")
    predictor = _predictor(trained, batch_size=1)
    big, crop = _streamed(predictor, path), predictor(image[32:160, 32:192])
    assert torch.equal(big[:, 64:128, 64:160], crop[:, 32:96, 32:128])
    assert not torch.equal(big[:, 32:160, 32:192], crop)  # near the crop's borders, windows from outside count


def _streamed_peak(predictor: Predictor, path: Path, out: Path) -> int:
    """tracemalloc's peak while one raster streams into its tiled outputs (NumPy's buffers are traced, the model's
    torch tensors are not: they are one batch of windows, the same for any image height)."""
    writer = PredictionWriter(out, predictor.class_names, np.zeros((3, 3), np.uint8), ["color"])
    with RasterReader(path) as raster:
        bands = (predictor.labels(band).numpy() for _, band in stream_probabilities(
            predictor, lambda y, h: raster.image(y, 0, h, raster.width), raster.height, raster.width))
        tracemalloc.start()
        try:
            writer.write_raster(path.stem, raster.height, raster.width, bands)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()


def test_streamed_memory_does_not_grow_with_the_image_height(trained, tmp_path):
    """Peaks for 640 and 2560 rows of 64 (after a first run that pays the imports): the extra 1920 rows would take
    120 KiB as one uint8 label map, 1.4 MiB as the float32 sums of 3 classes; the peak grows by less than a quarter of
    the labels. What does grow with the height is a few bytes a row of windows (the grid's starts) and a few bytes a
    tile of the input's and the output's tile index, ~5 KiB here."""
    predictor = _predictor(trained)
    peaks = []
    for height in (64, 640, 2560):
        path = tmp_path / f"h{height}.tif"
        tifffile.imwrite(path, _image(height, 64), tile=(64, 64), photometric="rgb")
        peaks.append(_streamed_peak(predictor, path, tmp_path / "out"))
    assert peaks[2] - peaks[1] < 1920 * 64 / 4, peaks


def test_what_cannot_be_read_by_windows_is_named(tmp_path, monkeypatch):
    image = _image(40, 50)
    Image.fromarray(image).save(tmp_path / "a.png")
    with pytest.raises(OSError, match=r"a\.png: cannot read this image by windows.*tiled TIFF"):
        RasterReader(tmp_path / "a.png")
    tifffile.imwrite(tmp_path / "strip.tif", image)  # one strip of the whole image
    monkeypatch.setattr("segtrain.data.raster.MAX_SEGMENT_PIXELS", 1000)
    with pytest.raises(OSError, match=r"strip\.tif: one strip of 40x50 pixels.*tiled TIFF"):
        RasterReader(tmp_path / "strip.tif")
    tifffile.imwrite(tmp_path / "codec.tif", image, tile=(16, 16))
    with tifffile.TiffFile(tmp_path / "codec.tif", mode="r+") as tif:
        tif.pages[0].tags["Compression"].overwrite(60000)  # no codec has this number
    with pytest.raises(OSError, match=r"codec\.tif: cannot decode .*image data"):
        RasterReader(tmp_path / "codec.tif")
    tifffile.imwrite(tmp_path / "wide.tif", image.astype(np.uint16) * 16, tile=(16, 16))
    with pytest.raises(ValueError, match=r"wide\.tif: a raster of uint16.*8-bit"):
        RasterReader(tmp_path / "wide.tif")
    tifffile.imwrite(tmp_path / "float.tif", image[..., 0].astype(np.float32), tile=(16, 16))
    with pytest.raises(ValueError, match=r"float\.tif: a mask of 1 band\(s\) of float32; expected one band of integer"):
        RasterReader(tmp_path / "float.tif", "mask")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # a.png (2000 px) is now above Pillow's guard
    with pytest.raises(OSError, match=r"a\.png: cannot read image \(Image size .*a \.png file cannot be read by "
                                     r"windows: convert it to a tiled TIFF"):
        streamed_reader(tmp_path / "a.png")
    with pytest.raises(OSError, match=r"strip\.tif: one strip"):  # above the threshold: streamed or named
        streamed_reader(tmp_path / "strip.tif", stream_pixels=100)
    assert streamed_reader(tmp_path / "strip.tif") is None  # small: Pillow reads it whole


def test_pairs_of_other_sizes_and_missing_tiles_are_named(tmp_path):
    root = _pairs(tmp_path, [(40, 40)])
    with pytest.raises(ValueError, match=r"dataset\.tile_size=None: expected a size"):
        make_dataset("rasters", root, "train", 3)
    tifffile.imwrite(root / "masks/train/r0.tif", _labels(40, 41), tile=(16, 16))
    with pytest.raises(ValueError, match=r"masks/train/r0\.tif: mask size 41x40 differs from image r0\.tif size 40x40"):
        make_dataset("rasters", root, "train", 3, tile_size=16)
    labels = np.zeros((40, 40), np.uint8)
    labels[3:9, 20:25] = 7  # inside the second tile of the first row
    tifffile.imwrite(root / "masks/train/r0.tif", labels, tile=(16, 16))
    tiles = make_dataset("rasters", root, "train", 3, tile_size=16)
    with pytest.raises(ValueError, match=r"r0\.tif \(window y=0 x=16 16x16\): labels outside \[0, 3\).*7 \(30 px\)"):
        image_class_counts(tiles, 3, cache=False)
    tifffile.imwrite(root / "masks/train/r0.tif", np.zeros((40, 40), np.uint8), tile=(16, 16))
    with tifffile.TiffFile(root / "images/train/r0.tif") as tif:  # 16x16 deflate tiles: garble the fourth one
        offset = tif.pages[0].dataoffsets[3]
    with open(root / "images/train/r0.tif", "r+b") as f:
        f.seek(offset)
        f.write(b"garbage!" * 4)
    with pytest.raises(OSError, match=r"images/train/r0\.tif: cannot decode segment 3 of the image"):
        image_class_counts(make_dataset("rasters", root, "train", 3, tile_size=16), 3, cache=False)


def test_without_tifffile_tiffs_are_read_whole_and_windows_say_what_to_install(tmp_path, monkeypatch):
    """The core install has no tifffile: a small TIFF goes the whole-image way, a window read names the extra."""
    tifffile.imwrite(tmp_path / "a.tif", _image(40, 50), tile=(16, 16), photometric="rgb")
    monkeypatch.setitem(sys.modules, "tifffile", None)  # import tifffile now raises ImportError
    assert streamed_reader(tmp_path / "a.tif") is None
    with pytest.raises(ImportError, match=r"pip install 'segtrain\[raster\]'"):
        RasterReader(tmp_path / "a.tif")


def test_settings_that_need_the_whole_image(trained, tmp_path, monkeypatch, capsys):
    """Test-time scales resize the whole image: a small GeoTIFF is then predicted whole (PNG, as before streaming
    existed), a TIFF above the streaming threshold stops the run, naming the key to change."""
    path = _geotiff(tmp_path / "in/scene.tif", _image(120, 150))
    scales = "inference.tta.scales=[1.0,0.75]"
    assert main(_args(trained, f"input={path}", f"output={tmp_path / 'whole'}", scales)) == 0
    assert (tmp_path / "whole/scene.png").is_file() and not (tmp_path / "whole/scene.tif").exists()
    monkeypatch.setattr("segtrain.inference.streaming.STREAM_PIXELS", 100 * 100)
    assert main(_args(trained, f"input={path}", f"output={tmp_path / 'big'}", scales)) == 2
    assert "inference.tta.scales=[1.0, 0.75]: scales resize the whole image" in capsys.readouterr().err
    assert not list((tmp_path / "big").glob("scene*"))
