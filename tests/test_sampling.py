"""Imbalance-aware sampling: class-aware crops and repeat-factor epochs, seeded and resumable."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segtrain.build import build_data, build_loaders
from segtrain.data import EpochSampler, FolderDataset, train_transform
from segtrain.data.class_stats import ClassStats
from segtrain.data.repeat_factors import class_repeat_factors, image_repeat_factors
from segtrain.data.scan import image_class_counts

RARE = 2


def write_rare_dataset(root: Path, count: int = 4, size: int = 96) -> None:
    """Class 1 covers the right third, class 2 one 6x6 square (0.4% of the pixels) per image."""
    rng = np.random.default_rng(0)
    for i in range(count):
        mask = np.zeros((size, size), np.uint8)
        mask[:, 2 * size // 3 :] = 1
        y, x = rng.integers(0, size - 6, 2)
        mask[y : y + 6, x : x + 6] = RARE
        mask[0, :] = 255
        for sub, array in (("images", rng.integers(0, 255, (size, size, 3), dtype=np.uint8)), ("masks", mask)):
            (root / sub / "train").mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(root / sub / "train" / f"{i}.png")


def rare_dataset(root: Path, rare_crop_p: float = 0.0, cat_max_ratio: float | None = None) -> FolderDataset:
    ds = FolderDataset(root, "train", 3)
    freq = np.zeros(3)
    for i in range(len(ds)):
        mask = ds.load_mask(i)
        freq += np.bincount(mask[mask != 255], minlength=3)
    ds.transform = train_transform(crop_size=24, hflip=True, rare_crop_p=rare_crop_p, cat_max_ratio=cat_max_ratio,
                                   class_frequency=freq / freq.sum())
    return ds


def crop_shares(ds: FolderDataset, draws: int = 200) -> np.ndarray:
    """Pixel share of each class over ``draws`` seeded crops."""
    counts = np.zeros(3)
    for k in range(draws):
        mask = ds[(k % len(ds), 1000 + k)][1].numpy()
        counts += np.bincount(mask[mask != 255], minlength=3)
    return counts / counts.sum()


def test_rare_class_cropping_raises_the_rare_share(tmp_path):
    write_rare_dataset(tmp_path)
    uniform = crop_shares(rare_dataset(tmp_path, rare_crop_p=0.0))
    rare = crop_shares(rare_dataset(tmp_path, rare_crop_p=1.0))
    half = crop_shares(rare_dataset(tmp_path, rare_crop_p=0.5))
    # Uniform 24x24 crops see the 6x6 square in its area share (~0.4%); centred crops always hold it.
    assert uniform[RARE] < 0.012, uniform
    assert rare[RARE] > 0.05 and rare[RARE] > 5 * uniform[RARE], (uniform, rare)
    assert uniform[RARE] < half[RARE] < rare[RARE]


def test_class_aware_crops_are_a_function_of_the_key(tmp_path):
    write_rare_dataset(tmp_path)
    ds = rare_dataset(tmp_path, rare_crop_p=0.7, cat_max_ratio=0.8)
    first = [ds[(i % 4, 50 + i)] for i in range(6)]
    again = [ds[(i % 4, 50 + i)] for i in range(6)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert len({tuple(m.flatten().tolist()) for _, m in first}) > 1


def test_cat_max_ratio_rejects_single_class_crops(tmp_path):
    write_rare_dataset(tmp_path)

    def mixed(ds):
        shares = []
        for k in range(100):
            mask = ds[(k % 4, k)][1].numpy()
            counts = np.bincount(mask[mask != 255], minlength=3)
            shares.append(counts.max() / counts.sum())
        return np.mean(np.array(shares) < 0.75)

    plain, rejecting = mixed(rare_dataset(tmp_path)), mixed(rare_dataset(tmp_path, cat_max_ratio=0.75))
    assert plain < 0.35 and rejecting > plain + 0.3, (plain, rejecting)


def test_rare_cropping_needs_the_frequencies_when_built(tmp_path):
    with pytest.raises(ValueError, match=r"rare_crop_p > 0 needs the class frequencies .*when the transform is built"):
        train_transform(crop_size=24, rare_crop_p=1.0)
    with pytest.raises(ValueError, match="class frequencies must be a 1-D array"):
        train_transform(crop_size=24, rare_crop_p=1.0, class_frequency=[0.5, -0.1])
    write_rare_dataset(tmp_path, count=1)
    ds = FolderDataset(tmp_path, "train", 3,
                       transform=train_transform(crop_size=24, rare_crop_p=1.0, class_frequency=[0.6, 0.39, 0.01]))
    assert ds[(0, 1)][1].shape == (24, 24)


# ---------------------------------------------------------------- repeat factors


def test_repeat_factors_follow_the_lvis_formula():
    presence = np.zeros((10, 4), bool)
    presence[:, 0] = True  # everywhere: r = 1
    presence[:5, 1] = True  # f = 0.5 >= t: r = 1
    presence[0, 2] = True  # f = 0.1: r = sqrt(0.3 / 0.1)
    presence[[0, 1, 2], 3] = True  # f = 0.3: r = 1
    per_class = class_repeat_factors(presence, 0.3)
    assert per_class == pytest.approx([1, 1, math.sqrt(3), 1])
    per_image = image_repeat_factors(presence, 0.3)
    assert per_image == pytest.approx([math.sqrt(3)] + [1] * 9)
    assert image_repeat_factors(np.zeros((2, 3), bool), 0.3).tolist() == [1, 1]  # all-ignore masks
    with pytest.raises(ValueError, match="repeat_thresh=0"):
        class_repeat_factors(presence, 0)


def test_repeat_factor_epochs_draw_images_by_their_factors():
    factors = np.array([1.0, 1.0, 2.5, 1.3, 4.0, 1.0, 1.75, 1.0])
    sampler = EpochSampler(len(factors), seed=7, repeat_factors=factors)
    assert len(sampler) == math.floor(factors.sum()) == 13
    totals = np.zeros(len(factors))
    for epoch in range(400):
        sampler.set_epoch(epoch)
        counts = np.bincount([i for i, _ in sampler], minlength=len(factors))
        totals += counts
        assert counts.sum() == 13
        assert (counts <= np.ceil(factors)).all() and (counts >= np.floor(factors) - 1).all()
    # Stochastic rounding: the mean count is the factor, less the share of the one draw that an
    # epoch of ceil(sum r) draws leaves out to keep every epoch floor(sum r) long.
    assert totals / 400 == pytest.approx(factors * 13 / factors.sum(), abs=0.06)
    sampler.set_epoch(3)
    again = EpochSampler(len(factors), seed=7, repeat_factors=factors)
    again.set_epoch(3)
    assert list(again) == list(sampler)


def test_repeat_factor_sampler_resumes_mid_epoch_and_shards():
    factors = np.linspace(1.0, 3.0, 9)
    full = EpochSampler(9, seed=1, drop_last_batch_of=2, repeat_factors=factors)
    full.set_epoch(5)
    draws = list(full)
    assert len(draws) == len(full) == 18 - 18 % 2
    full.set_epoch(5, start=6)
    assert list(full) == draws[6:] and len(full) == len(draws) - 6
    shards = [EpochSampler(9, seed=1, drop_last_batch_of=2, repeat_factors=factors, rank=r, world_size=2)
              for r in range(2)]
    for shard in shards:
        shard.set_epoch(5)
    mine = [list(s) for s in shards]
    assert len(mine[0]) == len(mine[1]) == 8  # 18 draws -> 16, whole batches of 2 on each of 2 ranks
    assert [d for pair in zip(*mine) for d in pair] == draws[:16]  # interleaved, disjoint, complete
    shards[1].set_epoch(5, start=2)
    assert list(shards[1]) == mine[1][2:]


def test_plain_sampler_shards_too():
    parts = []
    for rank in range(3):
        sampler = EpochSampler(20, seed=0, drop_last_batch_of=2, rank=rank, world_size=3)
        sampler.set_epoch(1)
        parts.append([i for i, _ in sampler])
    assert [len(p) for p in parts] == [6, 6, 6]
    assert len(set(sum(parts, []))) == 18  # no image twice in one epoch


class CountingMasks:
    def __init__(self, root: Path):
        self.root = root
        self.mask_paths = sorted((root / "masks/train").glob("*.png"))
        self.label_mapping = None
        self.loads = 0

    def load_mask(self, index):
        self.loads += 1
        return np.asarray(Image.open(self.mask_paths[index]))


def test_image_class_counts_are_computed_once_and_cached(tmp_path):
    write_rare_dataset(tmp_path, count=3, size=24)
    source = CountingMasks(tmp_path)
    counts = image_class_counts(source, 3)
    assert counts.shape == (3, 3) and (counts[:, RARE] == 36).all() and source.loads == 3
    assert counts.sum() == 3 * (24 * 24 - 24)  # first row is ignore
    assert np.array_equal(image_class_counts(source, 3), counts) and source.loads == 3
    assert len(list((tmp_path / ".segtrain").glob("class_counts-*.npz"))) == 1
    stats = ClassStats.from_counts(counts)  # the class statistics derive from the same matrix
    assert stats.pixel_count.tolist() == counts.sum(0).tolist() and stats.image_count.tolist() == [3, 3, 3]


def test_build_loaders_wires_repeat_factors_and_rare_crops(compose_cfg, fast_overrides):
    # A threshold above 1 repeats every image at least sqrt(t) times: 8 images give ~16 draws.
    cfg = compose_cfg(fast_overrides + ["dataset.sampling.repeat_thresh=4.0", "dataset.augment.crop_size=32",
                                        "dataset.sampling.rare_crop_p=0.5"])
    data = build_data(cfg.dataset)
    crop = next(t for t in data.train_set.transform.transforms if hasattr(t, "draw_weights"))
    # Rare-class cropping draws classes by 1 / (pixel share) of the training split's statistics.
    np.testing.assert_allclose(crop.draw_weights, 1 / data.stats.frequency)
    train_loader, _, steps = build_loaders(data, cfg, torch.device("cpu"))
    sampler = train_loader.sampler
    np.testing.assert_allclose(sampler.repeat_factors.numpy(), image_repeat_factors(data.train_counts > 0, 4.0))
    assert sampler.repeat_factors is not None and (sampler.repeat_factors >= 1).all()
    expected = math.floor(sampler.repeat_factors.sum().item())
    assert steps == (expected - expected % 2) // 2 and steps >= len(data.train_set)
    images, masks = next(iter(train_loader))
    assert images.shape == (2, 3, 32, 32) and masks.shape == (2, 32, 32)
