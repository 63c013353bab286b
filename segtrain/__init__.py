"""segtrain: semantic segmentation training on class-imbalanced data."""

import os

# albumentations checks PyPI for a newer release at import; that stalls offline machines.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from segtrain.compat import ensure_torchvision_importable  # noqa: E402

ensure_torchvision_importable()

__version__ = "0.1.0"
