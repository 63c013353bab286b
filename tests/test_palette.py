"""The class palette stays distinct up to 32 classes (CIELAB distances measured by OpenCV, not by segtrain)."""

from __future__ import annotations

import colorsys
import itertools

import cv2
import numpy as np
import pytest

from segtrain.visualize import FALSE_POSITIVE_COLOUR, IGNORE_COLOUR, MISSED_COLOUR, cielab, class_palette

# CIE76 distance below which two class colours count as too close. Two colours ~10 apart are told apart side by
# side but not as two small regions of an overlay; 25 leaves a margin under what the greedy construction reaches at
# 32 colours (~30) while the palette before it fell to ~5 (two yellows).
MIN_DISTANCE = 25.0


def _lab(rgb: np.ndarray) -> np.ndarray:
    """OpenCV's CIELAB (D65) of uint8 sRGB colours: float32 input in [0, 1] gives L in [0, 100], a and b unscaled."""
    return cv2.cvtColor(np.asarray(rgb, np.float32).reshape(1, -1, 3) / 255, cv2.COLOR_RGB2Lab).reshape(-1, 3)


def _min_distance(colours: np.ndarray) -> float:
    lab = _lab(colours).astype(np.float64)
    return min(float(np.linalg.norm(lab[i] - lab[j])) for i, j in itertools.combinations(range(len(lab)), 2))


def _palette_before(num_classes: int) -> np.ndarray:
    """The palette segtrain drew with until then: ten fixed colours, then golden-ratio steps around the hue circle."""
    base = [(68, 68, 68), (230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0),
            (204, 121, 167), (153, 153, 153), (117, 112, 179)]
    colours = base[:num_classes]
    for i in range(len(colours), num_classes):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.65, 0.95)
        colours.append((int(r * 255), int(g * 255), int(b * 255)))
    return np.array(colours, np.uint8)


def test_segtrain_cielab_agrees_with_opencv_and_published_values():
    # sRGB red: L 53.24, a 80.09, b 67.20 (the CIE formulas with the sRGB primaries, D65).
    np.testing.assert_allclose(cielab([255, 0, 0]), [53.24, 80.09, 67.20], atol=0.05)
    colours = np.random.default_rng(0).integers(0, 256, (200, 3))
    np.testing.assert_allclose(cielab(colours), _lab(colours), atol=0.5)  # OpenCV's rounded matrix


def test_the_first_32_colours_stay_apart_and_the_old_palette_did_not():
    palette = class_palette(32)
    assert palette.shape == (32, 3) and palette.dtype == np.uint8
    assert _min_distance(palette) > MIN_DISTANCE
    assert _min_distance(_palette_before(32)) < MIN_DISTANCE
    assert _min_distance(_palette_before(11)) < MIN_DISTANCE  # the reported 11-class case: two yellows
    # Away from the ignore colour and the galleries' miss and false-positive marks too.
    assert _min_distance(np.vstack([palette, [IGNORE_COLOUR, MISSED_COLOUR, FALSE_POSITIVE_COLOUR]])) > MIN_DISTANCE
    assert tuple(palette[0]) == (68, 68, 68)  # the background's dark grey, as before


@pytest.mark.parametrize("count", [1, 3, 11, 40])
def test_a_palette_is_the_start_of_a_longer_one(count):
    np.testing.assert_array_equal(class_palette(count), class_palette(64)[:count])  # colours never move
