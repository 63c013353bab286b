from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segtrain.data import EpochSampler, FolderDataset, ensure_synthetic, pad_collate, train_transform
from segtrain.data.synthetic import META_FILE, make_sample


def _write_pair(root: Path, split: str, stem: str, image: np.ndarray, mask: np.ndarray) -> None:
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "masks" / split).mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / "images" / split / f"{stem}.png")
    Image.fromarray(mask).save(root / "masks" / split / f"{stem}.png")


def test_synthetic_sample_has_the_advertised_imbalance():
    counts = np.zeros(256, dtype=np.int64)
    no_spot = 0
    for i in range(120):
        _, mask = make_sample(np.random.default_rng([0, i]), 128)
        c = np.bincount(mask.ravel(), minlength=256)
        counts += c
        no_spot += c[2] == 0
    share = counts[:3] / counts[:3].sum()
    assert 0.70 < share[0] < 0.85, share
    assert 0.12 < share[1] < 0.28, share
    assert 0.005 < share[2] <= 0.05, share
    assert 0 < no_spot < 60  # some images have no rare class, most have it
    assert counts[255] > 0 and set(np.flatnonzero(counts)) == {0, 1, 2, 255}


def test_synthetic_ignore_band_separates_classes():
    _, mask = make_sample(np.random.default_rng(3), 96)
    # Two different valid classes never touch: a 255 border always lies between them.
    for a, b in ((mask[1:, :], mask[:-1, :]), (mask[:, 1:], mask[:, :-1])):
        touching = (a != b) & (a != 255) & (b != 255)
        assert not touching.any()


def test_ensure_synthetic_is_deterministic_and_reused(tmp_path):
    root = ensure_synthetic(tmp_path / "a", num_train=3, num_val=2, size=32, seed=5)
    again = ensure_synthetic(tmp_path / "b", num_train=3, num_val=2, size=32, seed=5)
    for rel in ("images/train/train_00002.png", "masks/val/val_00001.png"):
        assert (root / rel).read_bytes() == (again / rel).read_bytes()
    mtime = (root / "masks/train/train_00000.png").stat().st_mtime_ns
    ensure_synthetic(root, num_train=3, num_val=2, size=32, seed=5)
    assert (root / "masks/train/train_00000.png").stat().st_mtime_ns == mtime  # not rewritten
    ensure_synthetic(root, num_train=2, num_val=2, size=32, seed=5)  # other parameters: regenerated
    assert len(list((root / "images/train").iterdir())) == 2


def test_ensure_synthetic_refuses_a_foreign_directory(tmp_path):
    _write_pair(tmp_path, "train", "x", np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.uint8))
    with pytest.raises(FileExistsError, match=META_FILE):
        ensure_synthetic(tmp_path)
    assert (tmp_path / "images/train/x.png").exists()


def test_folder_dataset_reads_indices_and_palette_masks(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (5, 6, 3), dtype=np.uint8)
    mask = np.array([[0, 1, 2, 255, 1, 0]] * 5, dtype=np.uint8)
    _write_pair(tmp_path, "train", "a", image, mask)
    palette_mask = Image.fromarray(mask, mode="L").convert("P")
    palette_mask.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (3 * 253))
    palette_mask.save(tmp_path / "masks/train/b.png")
    Image.fromarray(image).save(tmp_path / "images/train/b.png")
    ds = FolderDataset(tmp_path, "train", num_classes=3)
    assert [p.stem for p in ds.image_paths] == ["a", "b"]
    for i in range(2):
        x, y = ds[i]
        assert x.shape == (3, 5, 6) and x.dtype == torch.float32
        assert torch.equal(y, torch.from_numpy(mask).long())
        assert torch.equal(x, torch.from_numpy(image).permute(2, 0, 1).float())


def test_folder_dataset_errors_name_the_file(tmp_path):
    img, ok = np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.uint8)
    _write_pair(tmp_path, "train", "good", img, ok)
    _write_pair(tmp_path, "train", "bad", img, np.array([[0, 7, 7, 9]] * 4, np.uint8))
    _write_pair(tmp_path, "train", "small", img, np.zeros((3, 4), np.uint8))
    ds = FolderDataset(tmp_path, "train", num_classes=3)
    with pytest.raises(ValueError, match=r"bad\.png: labels outside \[0, 3\).*value 7 \(8 px\), value 9 \(4 px\)"):
        ds[ds.image_paths.index(tmp_path / "images/train/bad.png")]
    with pytest.raises(ValueError, match=r"small\.png: mask size 4x3 differs from image small\.png size 4x4"):
        ds[ds.image_paths.index(tmp_path / "images/train/small.png")]
    Image.fromarray(img).save(tmp_path / "images/train/orphan.png")
    with pytest.raises(FileNotFoundError, match=r"orphan\.png: no mask"):
        FolderDataset(tmp_path, "train", num_classes=3)
    (tmp_path / "images" / "val").mkdir()
    (tmp_path / "masks" / "val").mkdir()
    with pytest.raises(FileNotFoundError, match="empty split"):
        FolderDataset(tmp_path, "val", num_classes=3)


def test_seeded_draw_makes_augmentation_reproducible(tmp_path):
    rng = np.random.default_rng(1)
    _write_pair(tmp_path, "train", "a", rng.integers(0, 255, (16, 16, 3), dtype=np.uint8),
                rng.integers(0, 3, (16, 16), dtype=np.uint8))
    ds = FolderDataset(tmp_path, "train", 3, transform=train_transform(hflip=True, vflip=True, scale_range=(0.5, 1.5),
                                                                        crop_size=12))
    draws = [ds[(0, s)] for s in (11, 11, 12, 13, 14)]
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])
    assert any(not torch.equal(draws[0][1], d[1]) for d in draws[2:])
    for _, y in draws:  # no invented class values, padding is ignore
        assert set(y.unique().tolist()) <= {0, 1, 2, 255}


def test_epoch_sampler_resumes_mid_epoch():
    sampler = EpochSampler(10, seed=3, drop_last_batch_of=4)
    sampler.set_epoch(2)
    full = list(sampler)
    assert len(full) == len(sampler) == 8 and len({i for i, _ in full}) == 8
    sampler.set_epoch(2, start=4)
    assert list(sampler) == full[4:] and len(sampler) == 4
    sampler.set_epoch(3)
    assert list(sampler) != full


def test_pad_collate_pads_masks_with_ignore():
    a = (torch.ones(3, 2, 3), torch.zeros(2, 3, dtype=torch.long))
    b = (torch.ones(3, 4, 2), torch.ones(4, 2, dtype=torch.long))
    images, masks = pad_collate([a, b], ignore_index=255)
    assert images.shape == (2, 3, 4, 3) and masks.shape == (2, 4, 3)
    assert (masks[0, 2:] == 255).all() and (masks[0, :2] == 0).all()
    assert (masks[1, :, 2] == 255).all() and (masks[1, :, :2] == 1).all()
    assert images[0, :, 2:].abs().sum() == 0


def test_epoch_sampler_default_order_is_unchanged():
    # Without repeat factors or ranks, the draws are the ones every earlier run made.
    sampler = EpochSampler(10, seed=3, drop_last_batch_of=4)
    sampler.set_epoch(2)
    gen = torch.Generator().manual_seed(3 * 1_000_003 + 2)
    order = torch.randperm(10, generator=gen)[:8].tolist()
    seeds = torch.randint(0, 2**31 - 1, (10,), generator=gen)[:8].tolist()
    assert list(sampler) == list(zip(order, seeds))


def test_load_mask_is_the_checked_compact_label_map(tmp_path):
    mask = np.array([[0, 1, 2, 255]] * 3, np.uint8)
    _write_pair(tmp_path, "train", "a", np.zeros((3, 4, 3), np.uint8), mask)
    Image.fromarray(mask.astype(np.uint16) * 2).save(tmp_path / "masks/train/b.png")  # 16-bit PNG
    Image.fromarray(np.zeros((3, 4, 3), np.uint8)).save(tmp_path / "images/train/b.png")
    ds = FolderDataset(tmp_path, "train", num_classes=5, ignore_index=510)
    assert ds.load_mask(1).dtype == np.int32 and ds.load_mask(1).tolist() == (mask.astype(int) * 2).tolist()
    ds = FolderDataset(tmp_path, "train", num_classes=3)
    assert ds.load_mask(0).dtype == np.uint8 and np.array_equal(ds.load_mask(0), mask)
    with pytest.raises(ValueError, match=r"b\.png: labels outside \[0, 3\).*value 4 \(3 px\), value 510 \(3 px\)"):
        ds.load_mask(1)
