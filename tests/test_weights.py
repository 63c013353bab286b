"""Class statistics (counting, cache) and class-weight strategies, on a 3-image dataset.

The three 4x4 masks below have 4 classes, an ignored region and class 3 absent:

    mask 0: 0 x10, 1 x4, ignored x2 -> 14 valid
    mask 1: 0 x14, 2 x2             -> 16 valid
    mask 2: 1 x10, ignored x6       -> 10 valid

    pixel_count = [24, 14, 2, 0], total = 40, image_count = [2, 2, 1, 0]
    share = pixel_count / 40 = [0.6, 0.35, 0.05, 0]
    present_pixel_count = [14+16, 14+10, 16, 0] = [30, 24, 16, 0]
    freq = [24/30, 14/24, 2/16] = [0.8, 7/12, 0.125]
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from segtrain.config import CONFIG_DIR, load_option
from segtrain.data.class_weights import (STRATEGIES, ClassStats, compute_class_stats, compute_class_weights,
                                         weights_table)
from segtrain.data.scan import counts_cache_file, read_cached_counts

I = 255  # noqa: E741  (ignore_index, short so the masks below stay readable)
MASKS = [
    [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1], [I, I, 1, 1]],
    [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 2, 2]],
    [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, I, I], [I, I, I, I]],
]
NAMES = ["road", "car", "person", "sky"]
CONFIGS = CONFIG_DIR / "weights"


class PngMasks:
    """Minimal mask source: index PNGs under <root>/masks, counting load_mask calls."""

    def __init__(self, root: Path, label_mapping=None):
        self.root = root
        self.mask_paths = sorted((root / "masks").glob("*.png"))
        self.label_mapping = label_mapping
        self.loads = 0

    def load_mask(self, index: int) -> np.ndarray:
        self.loads += 1
        return np.asarray(Image.open(self.mask_paths[index]))


def write_mask(path: Path, rows) -> None:
    Image.fromarray(np.array(rows, dtype=np.uint8)).save(path)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "masks").mkdir()
    for i, rows in enumerate(MASKS):
        write_mask(tmp_path / "masks" / f"img_{i:03d}.png", rows)
    return tmp_path


@pytest.fixture
def stats() -> ClassStats:
    return ClassStats(np.array([24, 14, 2, 0]), np.array([2, 2, 1, 0]), np.array([30, 24, 16, 0]), 40, 3)


def weights(stats, strategy, **kwargs):
    with pytest.warns(UserWarning, match="class 3"):  # class 3 is absent in every call here
        return compute_class_weights(stats, strategy, **kwargs).numpy()


# ---------------------------------------------------------------- statistics


def test_counts_from_png_masks(root, stats):
    computed = compute_class_stats(PngMasks(root), num_classes=4, cache=False)
    assert computed == stats
    assert computed.pixel_count.dtype == np.int64
    np.testing.assert_allclose(computed.present_frequency, [0.8, 7 / 12, 0.125, 0.0])
    np.testing.assert_allclose(computed.frequency, [0.6, 0.35, 0.05, 0.0])


def test_plain_iterable_of_arrays_and_tensors(stats):
    masks = [np.array(MASKS[0]), torch.tensor(MASKS[1]), np.array(MASKS[2], dtype=np.int32)]
    assert compute_class_stats(masks, num_classes=4) == stats


def test_workers_give_same_stats(root):
    serial = compute_class_stats(PngMasks(root), 4, num_workers=0, cache=False)
    parallel = compute_class_stats(PngMasks(root), 4, num_workers=2, cache=False)
    assert parallel == serial


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_label_names_file_values_and_counts(root, num_workers):
    rows = [[0, 7, 7, 7], [0, 0, 9, 0], [I, 0, 0, 0], [0, 0, 0, 0]]
    write_mask(root / "masks" / "img_001.png", rows)
    with pytest.raises(ValueError) as err:
        compute_class_stats(PngMasks(root), 4, num_workers=num_workers)
    assert not (root / ".segtrain").exists()  # a failed pass caches nothing
    message = str(err.value)
    assert "img_001.png" in message
    assert "outside [0, 4)" in message and "ignore_index 255" in message
    assert "value 7 (3 px)" in message and "value 9 (1 px)" in message


def test_bad_label_in_plain_iterable_names_item():
    with pytest.raises(ValueError, match=r"mask item 1: .* value -1 \(2 px\)"):
        compute_class_stats([np.zeros((2, 2), int), np.array([[0, -1], [-1, 0]])], 4)


def test_stats_from_per_image_counts(stats):
    counts = np.array([[10, 4, 0, 0], [14, 0, 2, 0], [0, 10, 0, 0]])  # MASKS, row by row
    assert ClassStats.from_counts(counts) == stats
    # int64 all the way: 16000 images of 512x512 overflow int32 sums.
    big = ClassStats.from_counts(np.full((16000, 1), 512 * 512))
    assert big.pixel_count.tolist() == [4_194_304_000] == big.present_pixel_count.tolist()
    assert big.total_pixels == 4_194_304_000 and big.num_images == 16000


# ---------------------------------------------------------------- cache


def test_cache_hit_reads_no_mask(root, stats):
    first = PngMasks(root)
    assert compute_class_stats(first, 4) == stats and first.loads == 3
    assert len(list((root / ".segtrain").glob("class_counts-*.npz"))) == 1
    second = PngMasks(root)
    assert compute_class_stats(second, 4) == stats
    assert second.loads == 0


def test_cache_invalidated_by_rewritten_mask(root, stats):
    compute_class_stats(PngMasks(root), 4)
    path = root / "masks" / "img_002.png"
    write_mask(path, [[2] * 4] * 4)
    later = path.stat().st_mtime_ns + 5_000_000_000  # the rewrite may land in the same mtime tick
    os.utime(path, ns=(later, later))
    source = PngMasks(root)
    changed = compute_class_stats(source, 4)
    assert source.loads == 3
    assert changed.pixel_count.tolist() == [24, 4, 18, 0]


@pytest.mark.parametrize(
    "change",
    [
        {"num_classes": 5},
        {"label_mapping": {3: 2}},
        {"drop_file": True},
    ],
)
def test_cache_invalidated_by_arguments_and_file_list(root, change):
    compute_class_stats(PngMasks(root), 4)
    source = PngMasks(root, label_mapping=change.get("label_mapping"))
    if change.get("drop_file"):
        source.mask_paths = source.mask_paths[:2]
    compute_class_stats(source, change.get("num_classes", 4))
    assert source.loads == len(source.mask_paths)


def test_cache_invalidated_by_ignore_index(root):
    # 256 classes so that 255 is a valid label when it is not the ignore_index.
    compute_class_stats(PngMasks(root), 256, ignore_index=255)
    source = PngMasks(root)
    counted = compute_class_stats(source, 256, ignore_index=0)
    assert counted.pixel_count[255] == 8 and source.loads == 3
    assert counted.pixel_count[0] == 0  # the ignore_index is counted nowhere, even inside [0, num_classes)


def test_cache_probe_reads_no_mask(root, stats):
    source = PngMasks(root)
    path = counts_cache_file(source, 4)
    assert read_cached_counts(source, 4) is None and not path.exists()
    compute_class_stats(source, 4)
    assert path.is_file() and source.loads == 3
    again = PngMasks(root)
    assert ClassStats.from_counts(read_cached_counts(again, 4)) == stats and again.loads == 0
    assert read_cached_counts(again, 4, ignore_index=0) is None
    assert counts_cache_file(again, 4, ignore_index=0) != path
    with pytest.raises(TypeError, match="mask source"):
        read_cached_counts([np.zeros((2, 2), int)], 4)


def test_corrupt_cache_is_rewritten(root, stats, caplog):
    compute_class_stats(PngMasks(root), 4)
    (cache_file,) = (root / ".segtrain").glob("class_counts-*.npz")
    cache_file.write_bytes(b"not an npz file")
    source = PngMasks(root)
    with caplog.at_level(logging.WARNING, logger="segtrain.data.scan"):
        assert compute_class_stats(source, 4) == stats
    assert source.loads == 3 and "class_counts-" in caplog.text
    again = PngMasks(root)
    assert compute_class_stats(again, 4) == stats and again.loads == 0


# ---------------------------------------------------------------- strategies


def test_worked_example_median_freq():
    side = 512 * 512
    pixels = np.array([3.13914322e9, 8.32395811e8, 2.22764968e8]).round().astype(np.int64)
    images = np.array([16000, 15412, 14356])
    # The 9-digit counts sum to 4,194,303,999: one pixel short of 16000 * 512 * 512 through
    # rounding, so total_pixels is their sum, as compute_class_stats would report it.
    assert 16000 * side - pixels.sum() == 1
    example = ClassStats(pixels, images, images * side, int(pixels.sum()), 16000)
    np.testing.assert_allclose(example.present_frequency, [0.74843, 0.20603, 0.05919], atol=1e-5)
    w = compute_class_weights(example, "median_freq")
    np.testing.assert_allclose(w.numpy(), [0.27528, 1.0, 3.48063], atol=1e-4)


@pytest.mark.parametrize(
    "strategy, options, expected",
    [  # the table of docs/weights.md, to the digits printed there
        ("inverse_freq", {}, [1.3361, 5.0388, 18.828]),
        ("inverse_freq", {"normalize": "mean"}, [0.15904, 0.59978, 2.2412]),
        ("sqrt_inv_freq", {}, [1.1559, 2.2447, 4.3392]),
        ("enet", {}, [1.7541, 5.0611, 14.172]),
        ("effective_num", {"count": "images"}, [1.2529e-4, 1.2724e-4, 1.3123e-4]),
        ("effective_num", {"count": "pixels", "beta": 0.999999999, "normalize": "mean"}, [0.40086, 0.67876, 1.9204]),
    ],
)
def test_worked_example_other_strategies(strategy, options, expected):
    pixels = np.array([3.13914322e9, 8.32395811e8, 2.22764968e8]).round().astype(np.int64)
    images = np.array([16000, 15412, 14356])
    example = ClassStats(pixels, images, images * 512 * 512, int(pixels.sum()), 16000)
    w = compute_class_weights(example, strategy, **options)
    np.testing.assert_allclose(w.numpy(), expected, rtol=5e-5)


def test_worked_example_effective_num_on_pixels_is_uniform():
    pixels = np.array([3139143220, 832395811, 222764968])
    example = ClassStats(pixels, np.array([16000, 15412, 14356]), np.array([4194304000] * 3), int(pixels.sum()), 16000)
    with pytest.warns(UserWarning, match="all weights equal 1 - beta"):
        w = compute_class_weights(example, "effective_num", count="pixels")
    np.testing.assert_allclose(w.numpy(), [1e-4] * 3, rtol=1e-6)


@pytest.mark.parametrize(
    "strategy, options, expected",
    [
        ("none", {}, [1, 1, 1, 0]),
        ("inverse_freq", {}, [40 / 24, 40 / 14, 40 / 2, 0]),
        # sqrt([5/3, 20/7, 20])
        ("sqrt_inv_freq", {}, [1.2909944, 1.6903085, 4.4721360, 0]),
        # median of [0.8, 7/12, 0.125] is 7/12: [35/48, 1, 14/3]
        ("median_freq", {}, [35 / 48, 1.0, 14 / 3, 0]),
        # 1/ln(1.02 + [0.6, 0.35, 0.05]) = 1/ln([1.62, 1.37, 1.07]) = 1/[0.4824261, 0.3148107, 0.0676586]
        ("enet", {}, [2.0728561, 3.1765117, 14.7800765, 0]),
        # 0.1 / (1 - 0.9^[24, 14, 2]) = 0.1 / (1 - [0.0797664, 0.2287679, 0.81])
        ("effective_num", {"beta": 0.9, "count": "pixels"}, [0.1086681, 0.1296627, 0.5263158, 0]),
        # 0.1 / (1 - 0.9^[2, 2, 1]) = [0.1/0.19, 0.1/0.19, 0.1/0.1]; images are the default count
        ("effective_num", {"beta": 0.9}, [0.5263158, 0.5263158, 1.0, 0]),
        ("manual", {"values": [0.5, 1, 2, 4]}, [0.5, 1, 2, 0]),
        # present values [1, 2, 3] have mean 2; the absent class's 7 is zeroed first
        ("manual", {"values": [1, 2, 3, 7], "normalize": "mean"}, [0.5, 1.0, 1.5, 0]),
        # inverse_freq [5/3, 20/7, 20] has mean 515/63 over present classes
        ("inverse_freq", {"normalize": "mean"}, [105 / 515, 180 / 515, 1260 / 515, 0]),
        ("inverse_freq", {"normalize": "mean", "max_weight": 2.0}, [105 / 515, 180 / 515, 2.0, 0]),
        ("inverse_freq", {"max_weight": 2.5}, [5 / 3, 2.5, 2.5, 0]),
    ],
)
def test_strategy_by_hand(stats, strategy, options, expected):
    with pytest.warns(UserWarning, match="class 3"):
        result = compute_class_weights(stats, strategy, **options)
    assert result.dtype == torch.float32 and result.shape == (4,)
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-6, atol=1e-7)


def test_absent_class_warning_uses_name(stats):
    with pytest.warns(UserWarning, match=r"class 3 \('sky'\)"):
        compute_class_weights(stats, "median_freq", class_names=NAMES)


def test_absent_error_names_class(stats):
    with pytest.raises(ValueError, match=r"class 3 \('sky'\): no pixel"):
        compute_class_weights(stats, "inverse_freq", absent="error", class_names=NAMES)


def test_manual_length_and_value_errors(stats):
    with pytest.raises(ValueError, match="values has 3 entries but num_classes is 4"):
        compute_class_weights(stats, "manual", values=[1, 2, 3])
    with pytest.raises(ValueError, match="finite and >= 0"):
        compute_class_weights(stats, "manual", values=[1, -2, 3, 1])
    with pytest.raises(ValueError, match="needs weights.values"):
        compute_class_weights(stats, "manual")
    with pytest.raises(ValueError, match="only used by strategy 'manual'"):
        compute_class_weights(stats, "inverse_freq", values=[1, 1, 1, 1])


@pytest.mark.parametrize(
    "options, match",
    [
        ({"strategy": "inverse"}, "weights.strategy='inverse'; valid: none, inverse_freq, .*median_freq"),
        ({"normalize": "max"}, r"weights.normalize='max'; valid: none, mean$"),
        ({"absent": "skip"}, "absent='skip'"),
        ({"count": "boxes"}, "count='boxes'"),
        ({"beta": 1.0}, "beta must be in"),
        ({"k": 1.0}, "k must be > 1"),
        ({"max_weight": 0}, "max_weight must be"),
    ],
)
def test_bad_options(stats, options, match):
    options = {"strategy": "enet", **options}
    with pytest.raises(ValueError, match=match):
        compute_class_weights(stats, **options)


def test_effective_num_warns_when_beta_cannot_balance_pixels(stats):
    present = ClassStats(stats.pixel_count[:3], stats.image_count[:3], stats.present_pixel_count[:3], 40, 3)
    # n = 2 for the rarest class: 1e-5^2 = 1e-10 < 2e-9
    with pytest.warns(UserWarning, match="all weights equal 1 - beta"):
        w = compute_class_weights(present, "effective_num", beta=1e-5, count="pixels")
    assert math.isclose(w[0].item(), w[2].item(), rel_tol=1e-6)


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_config_file_runs(stats, config):
    cfg = load_option("weights", config.stem)
    assert cfg.strategy == config.stem
    if cfg.strategy == "manual":
        cfg.values = [1.0, 2.0, 3.0, 4.0]
    with pytest.warns(UserWarning, match="class 3"):
        w = compute_class_weights(stats, **OmegaConf.to_container(cfg))
    assert w.shape == (4,) and torch.isfinite(w).all() and w[3] == 0


def test_configs_cover_every_strategy():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(STRATEGIES)


def test_weights_table(stats):
    used = weights(stats, "median_freq")
    table = weights_table(stats, NAMES, "median_freq", weights=used)
    lines = table.splitlines()
    assert len(lines) == 2 + 4 + 1  # header, rule, one row per class, footer
    assert "median_freq*" in lines[0] and "inverse_freq*" not in lines[0]
    assert lines[2].startswith("road") and "24" in lines[2] and "60.00%" in lines[2]
    assert lines[5].startswith("sky")
    assert lines[4].count("4.667") == 2  # person under median_freq (14/3), as a column and as used


def test_weights_table_column_options(stats):
    options = {"effective_num": {"strategy": "effective_num", "beta": 0.9, "count": "images", "absent": "error"}}
    lines = weights_table(stats, NAMES, "none", column_options=options).splitlines()
    header = lines[0].split()
    column = header.index("effective_num")
    # 0.1 / (1 - 0.9^[2, 2, 1]); absent=error is not applied to a column: sky shows 0
    assert [line.split()[column] for line in lines[2:6]] == ["0.5263", "0.5263", "1", "0"]
    assert lines[5].split()[header.index("inverse_freq")] == "0"
