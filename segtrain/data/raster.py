"""Windows of TIFF / GeoTIFF rasters larger than memory: read a window, decoding only the tiles or strips it
overlaps, and write a tiled TIFF from rows given top to bottom.

    with RasterReader(path) as raster:                # header only: size, bands, tiles, georeference
        image = raster.image(y0, x0, h, w)            # (h, w, 3) uint8, as read_image converts a whole file
        labels = RasterReader(mask_path, "mask").labels(y0, x0, h, w)   # (h, w) integer labels, the file's dtype
    write_tiled(out_path, height, width, bands_of_rows, np.uint8, raster.geo_tags)

The first page of the file is read (a pyramid's full resolution). Tiled and striped pages are read by windows; a
page stored as one strip larger than ``MAX_SEGMENT_PIXELS`` is refused, since any window of it decodes it whole, as
is a PNG, a JPEG or a BMP (their decoders read the whole file) and a compression the codecs cannot decode. Images
follow ``segtrain.data.folder.read_image``: 8-bit only (a 16-bit or float raster is refused, not clipped), grey
repeated to RGB, RGB(A) cut to RGB or weighted to grey as Pillow converts. tifffile (and imagecodecs for LZW, JPEG,
WebP, ZSTD) is the optional extra ``segtrain[raster]`` (docs/rasters.md says why).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

# A segment (tile or strip) above this many pixels is refused: every window that touches it decodes all of it.
MAX_SEGMENT_PIXELS = 64 * 2**20
TIFF_SUFFIXES = (".tif", ".tiff")
# GeoTIFF: pixel scale, tie points, transformation matrix, geo keys and their double / ASCII parameters.
GEO_TAG_CODES = (33550, 33922, 34264, 34735, 34736, 34737)
_MINISWHITE, _MINISBLACK, _RGB, _YCBCR = 0, 1, 2, 6


def tifffile_module():
    """The ``tifffile`` module, or an ``ImportError`` that says how to install it."""
    try:
        import tifffile
    except ImportError:
        raise ImportError("reading rasters by windows needs tifffile: pip install 'segtrain[raster]'") from None
    return tifffile


class RasterReader:
    """A TIFF page opened for windowed reads (``what``: ``image`` or ``mask``, for the checks and the messages).

    The file handle is opened on first use in each process: a reader handed to DataLoader workers (forked or
    pickled) never shares a file offset with its parent.
    """

    def __init__(self, path: str | Path, what: str = "image") -> None:
        self.path, self.what = Path(path), what
        self.height = self.width = 0  # known once the header is read: a caller may tell a big file from a small one
        if self.path.suffix.lower() not in TIFF_SUFFIXES:
            raise OSError(f"{self.path}: cannot read this {what} by windows: a {self.path.suffix or 'suffix-less'} "
                          "file is decoded whole; convert it to a tiled TIFF (docs/rasters.md)")
        self._file, self._pid = None, None
        page = self._page()
        try:
            self._describe(page)
        finally:
            self.close()

    def _page(self) -> Any:
        if self._file is None or self._pid != os.getpid():
            tifffile = tifffile_module()
            try:
                self._file, self._pid = tifffile.TiffFile(self.path), os.getpid()
            except (OSError, ValueError, tifffile.TiffFileError) as err:
                raise OSError(f"{self.path}: cannot read {self.what} ({err})") from err
        if not self._file.pages:
            raise OSError(f"{self.path}: cannot read {self.what}: the TIFF has no page")
        return self._file.pages[0]

    def _describe(self, page: Any) -> None:
        """Size, bands and segment grid of ``page``; anything a window cannot be read from is refused here."""
        separate, depth, self.height, self.width, contig = page.shaped
        self.bands, self.separate = separate * contig, separate > 1
        self.dtype, self.photometric = page.dtype, int(page.photometric)
        if depth != 1:
            raise OSError(f"{self.path}: a volume of {depth} slices; expected a 2-D {self.what}")
        if page.is_tiled:
            self.segment = (page.tilelength, page.tilewidth)
        elif len(page.dataoffsets):
            self.segment = (min(page.rowsperstrip or self.height, self.height), self.width)
        else:
            raise OSError(f"{self.path}: the {self.what} page is neither tiled nor striped: it cannot be read by "
                          "windows; rewrite it as a tiled TIFF (docs/rasters.md)")
        if self.segment[0] * self.segment[1] > MAX_SEGMENT_PIXELS:
            raise OSError(f"{self.path}: one strip of {self.segment[0]}x{self.segment[1]} pixels: any window of it "
                          "decodes the whole strip; rewrite it as a tiled TIFF (docs/rasters.md)")
        try:
            page.decode(None, 0)  # the codec is looked up, nothing is decoded
        except (ValueError, NotImplementedError) as err:
            codec = getattr(page.compression, "name", f"compression {page.compression}")  # an enum if tifffile knows it
            raise OSError(f"{self.path}: cannot decode {codec} {self.what} data ({err}); "
                          "pip install 'segtrain[raster]' brings imagecodecs (LZW, JPEG, WebP, ZSTD)") from None
        self._check_values()
        self.geo_tags = [(tag.code, int(tag.dtype), tag.count, tag.value, True) for tag in page.tags.values()
                         if tag.code in GEO_TAG_CODES]

    def _check_values(self) -> None:
        if self.what == "mask":
            if self.dtype is None or self.dtype.kind not in "iu" or self.bands != 1:
                raise ValueError(f"{self.path}: a mask of {self.bands} band(s) of {self.dtype}; expected one band of "
                                 "integer labels")
        elif self.dtype != np.uint8:
            raise ValueError(f"{self.path}: a raster of {self.dtype} ({self.bands} bands); segtrain reads 8-bit "
                             "images (0..255) and would clip its values: convert it to 8 bits with the scaling right "
                             "for the data (e.g. a 12-bit camera's 0..4095: divide by 16)")
        elif self.photometric not in (_MINISWHITE, _MINISBLACK, _RGB, _YCBCR):
            raise ValueError(f"{self.path}: photometric {self.photometric} (palette, CMYK, ...); expected a grey or "
                             "RGB image")

    def __enter__(self) -> RasterReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None, "_pid": None}

    @property
    def pixels(self) -> int:
        return self.height * self.width

    def read(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """(h, w, bands) in the file's dtype: the window decoded from the segments it overlaps, and no other."""
        if h < 1 or w < 1 or y0 < 0 or x0 < 0 or y0 + h > self.height or x0 + w > self.width:
            raise ValueError(f"{self.path}: window y={y0} x={x0} {h}x{w} is outside the {self.height}x{self.width} "
                             f"{self.what}")
        page = self._page()
        out = np.zeros((h, w, self.bands), dtype=self.dtype)  # an empty segment (byte count 0) reads as 0
        for index in self._segments(y0, x0, h, w):
            self._paste(page, index, out, y0, x0)
        return out

    def _segments(self, y0: int, x0: int, h: int, w: int) -> Iterator[int]:
        """Indices (in the offsets tag) of the segments that overlap the window, plane by plane."""
        sh, sw = self.segment
        down, across = -(-self.height // sh), -(-self.width // sw)
        for plane in range(self.bands if self.separate else 1):
            for row in range(y0 // sh, (y0 + h - 1) // sh + 1):
                for col in range(x0 // sw, (x0 + w - 1) // sw + 1):
                    yield (plane * down + row) * across + col

    def _paste(self, page: Any, index: int, out: np.ndarray, y0: int, x0: int) -> None:
        count = page.databytecounts[index]
        if not count:
            return
        handle = self._file.filehandle
        handle.seek(page.dataoffsets[index])
        try:
            segment, (plane, _, sy, sx, _), _ = page.decode(handle.read(count), index, jpegtables=page.jpegtables)
        except Exception as err:  # the codecs raise their own types for broken data
            raise OSError(f"{self.path}: cannot decode segment {index} of the {self.what} ({err})") from err
        segment = segment[0]  # (rows, cols, samples)
        a, b = max(sy, y0), min(sy + segment.shape[0], y0 + out.shape[0])
        c, d = max(sx, x0), min(sx + segment.shape[1], x0 + out.shape[1])
        bands = slice(plane, plane + 1) if self.separate else slice(None)
        out[a - y0 : b - y0, c - x0 : d - x0, bands] = segment[a - sy : b - sy, c - sx : d - sx]

    def image(self, y0: int, x0: int, h: int, w: int, channels: int = 3) -> np.ndarray:
        """(h, w, channels) uint8 of the window, converted as ``read_image`` converts a whole file."""
        return as_channels(self.read(y0, x0, h, w), channels, self.photometric, self.path)

    def labels(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """(h, w) labels of the window, in the mask's own integer dtype."""
        return self.read(y0, x0, h, w)[..., 0]


def as_channels(array: np.ndarray, channels: int, photometric: int, path: Path) -> np.ndarray:
    """(h, w, bands) uint8 -> (h, w, channels) as Pillow converts: grey repeated to RGB, RGB(A) cut to RGB, RGB to
    grey by ITU-R 601-2 luma (Pillow's fixed-point rounding); other counts must equal ``channels``."""
    if photometric == _MINISWHITE:  # 0 is white: Pillow inverts it to grey
        array = 255 - array
    bands = array.shape[-1]
    rgb = photometric in (_RGB, _YCBCR) and bands >= 3
    if channels == 3 and (rgb or bands <= 2):
        return np.ascontiguousarray(array[..., :3] if rgb else np.repeat(array[..., :1], 3, axis=-1))
    if channels == 1 and (rgb or bands <= 2):
        if not rgb:
            return np.ascontiguousarray(array[..., :1])
        r, g, b = (array[..., i].astype(np.uint32) for i in range(3))
        return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)[..., None]
    if bands != channels:
        raise ValueError(f"{path}: a raster of {bands} bands; the model takes {channels} (model.in_channels)")
    return array


def grid_starts(size: int, tile: int, step: int) -> list[int]:
    """First pixel of each window along one axis, every ``step`` pixels, the last moved back to end at ``size`` (no
    pixel dropped, none padded); a ``size`` within one ``tile`` is one window. The grid of the sliding windows of
    inference and of the training tiles of large rasters."""
    if tile >= size:
        return [0]
    count = next(d for d in range(size) if d * step + tile >= size) + 1
    return [min(d * step, size - tile) for d in range(count)]


def is_tiff(path: str | Path) -> bool:
    return Path(path).suffix.lower() in TIFF_SUFFIXES


def write_tiled(path: str | Path, height: int, width: int, bands: Iterable[np.ndarray], dtype: Any,
                tags: Iterable[tuple] = (), colormap: np.ndarray | None = None, tile: int = 256) -> None:
    """A deflate-compressed tiled TIFF (BigTIFF when it could pass 4 GiB) of one band, from ``bands``: arrays
    (rows, width) top to bottom, of any heights adding up to ``height``; at most ``tile`` + one band of rows is held.
    ``tags`` are tifffile extra tags (``RasterReader.geo_tags``); ``colormap`` (3, 2**bits) uint16 makes it a
    palette image whose pixels are still the indices."""
    tifffile, dtype = tifffile_module(), np.dtype(dtype)

    def tiles() -> Iterator[np.ndarray]:
        pending, done = np.zeros((0, width), dtype), 0
        for band in bands:
            pending, done = np.concatenate([pending, band.astype(dtype, copy=False)]), done + len(band)
            while len(pending) >= tile or (done == height and len(pending)):
                rows, pending = pending[:tile], pending[tile:]
                yield from (rows[:, x : x + tile] for x in range(0, width, tile))
        if done != height:
            raise ValueError(f"{path}: {done} rows written, expected {height}")

    big = height * width * dtype.itemsize > 2**31  # deflate rarely grows data: raw size is a safe bound
    with tifffile.TiffWriter(path, bigtiff=big) as out:
        out.write(tiles(), shape=(height, width), dtype=dtype, tile=(tile, tile), compression="zlib",
                  photometric="minisblack" if colormap is None else "palette", colormap=colormap,
                  extratags=list(tags))
