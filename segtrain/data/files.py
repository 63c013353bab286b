"""Opening an image or mask file: every failure an ``OSError`` naming the file.

Pillow raises ``DecompressionBombError`` (not an ``OSError``) for an image above twice
``PIL.Image.MAX_IMAGE_PIXELS`` (~179 Mpx, a header of a few bytes can claim it): it would pass every reader's
``OSError`` handler and stop a prediction run or the dataset pass with a traceback instead of naming the file.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image


@contextmanager
def open_image(path: Path, what: str = "image") -> Iterator[Image.Image]:
    """``Image.open(path)``; its failures, the decompression-bomb guard's included, an ``OSError`` naming ``path``."""
    try:
        with Image.open(path) as img:
            yield img
    except Image.DecompressionBombError as err:
        raise OSError(f"{path}: cannot read {what} ({str(err).rstrip('.')}; the limit is PIL.Image.MAX_IMAGE_PIXELS, "
                      "raised in your own code where such images are expected)") from None
    except OSError as err:
        raise OSError(f"{path}: cannot read {what} ({err})") from err
