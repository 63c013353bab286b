"""Dataset layouts (folder, list files, VOC, Cityscapes, colour masks), their errors, the
dataset check script, and the augmentation presets, on tiny datasets written per test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segtrain.build import build_data
from segtrain.config.checks import class_names_of
from segtrain.data import CityscapesDataset, FolderDataset, VOCDataset, eval_transform, pad_collate, train_transform
from segtrain.data.cityscapes import CLASS_NAMES as CITYSCAPES_NAMES
from segtrain.data.cityscapes import LABEL_TO_TRAIN_ID
from segtrain.data.class_stats import compute_class_stats
from segtrain.data.transforms import IMAGENET_MEAN, IMAGENET_STD, extra_transform
from segtrain.data.voc import CLASS_NAMES as VOC_NAMES

ROOT = Path(__file__).resolve().parents[1]


def save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)
    return path


def write_pair(root: Path, split: str, stem: str, image: np.ndarray, mask: np.ndarray) -> None:
    save(root / "images" / split / f"{stem}.png", image)
    save(root / "masks" / split / f"{stem}.png", mask)


def blank(h: int = 6, w: int = 8) -> np.ndarray:
    return np.zeros((h, w, 3), np.uint8)


# ---------------------------------------------------------------- layouts


def write_voc(root: Path) -> np.ndarray:
    mask = np.array([[0, 15, 255, 20]] * 3 + [[1, 1, 255, 0]] * 3, np.uint8)
    palette = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [64] * (3 * 253)  # colours unrelated to the indices
    for stem in ("2007_000032", "2007_000039", "2008_000001"):
        save(root / "JPEGImages" / f"{stem}.jpg", blank(6, 4))
        png = Image.fromarray(mask, mode="P")
        png.putpalette(palette)
        (root / "SegmentationClass").mkdir(exist_ok=True)
        png.save(root / "SegmentationClass" / f"{stem}.png")
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets/Segmentation/train.txt").write_text("2007_000032\n2008_000001\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("2007_000039\n")
    return mask


def test_voc_palette_pngs_load_as_indices(tmp_path):
    mask = write_voc(tmp_path)
    train, val = VOCDataset(tmp_path, "train"), VOCDataset(tmp_path, "val")
    assert [p.stem for p in train.image_paths] == ["2007_000032", "2008_000001"]
    assert [p.stem for p in val.mask_paths] == ["2007_000039"]
    assert np.array_equal(train.load_mask(1), mask)
    image, target = train[0]
    assert image.shape == (3, 6, 4) and torch.equal(target, torch.from_numpy(mask).long())
    assert len(VOC_NAMES) == 21 and VOC_NAMES[15] == "person"


def write_cityscapes(root: Path, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    ids = np.array([[0, 1, 7, 8, 11, 26], [33, 31, 24, 23, 6, 34]], np.uint8)
    train_ids = np.array([[255, 255, 0, 1, 2, 13], [18, 16, 11, 10, 255, 255]], np.uint8)
    for city, frame in (("aachen", "aachen_000000_000019"), ("bremen", "bremen_000001_000019")):
        save(root / "leftImg8bit" / split / city / f"{frame}_leftImg8bit.png", blank(2, 6))
        save(root / "gtFine" / split / city / f"{frame}_gtFine_labelIds.png", ids)
        save(root / "gtFine" / split / city / f"{frame}_gtFine_color.png", blank(2, 6))  # not a mask: skipped
    return ids, train_ids


def test_cityscapes_label_ids_map_to_train_ids(tmp_path):
    _, train_ids = write_cityscapes(tmp_path)
    ds = CityscapesDataset(tmp_path, "train")
    assert len(ds) == 2 and ds.image_paths[1].parent.name == "bremen"
    assert ds.label_mapping == LABEL_TO_TRAIN_ID and len(CITYSCAPES_NAMES) == 19
    assert np.array_equal(ds.load_mask(0), train_ids)
    assert torch.equal(ds[1][1], torch.from_numpy(train_ids).long())
    stats = compute_class_stats(ds, 19, 255)  # the class statistics see the mapped labels
    assert stats.pixel_count[[0, 1, 2, 10, 11, 13, 16, 18]].tolist() == [2] * 8 and stats.total_pixels == 16


def test_colour_masks_decode_through_the_palette(tmp_path):
    colours = np.array([[0, 0, 0], [255, 0, 0], [0, 0, 255]], np.uint8)
    labels = np.array([[0, 1, 2, 2], [1, 1, 0, 2]], np.uint8)
    rgb = colours[labels]
    write_pair(tmp_path, "train", "a", blank(2, 4), rgb)
    ds = FolderDataset(tmp_path, "train", 3, palette=colours.tolist())
    assert np.array_equal(ds.load_mask(0), labels)
    assert ds.label_mapping == {(0, 0, 0): 0, (255, 0, 0): 1, (0, 0, 255): 2}  # part of the stats fingerprint
    assert compute_class_stats(ds, 3).pixel_count.tolist() == [2, 3, 3]
    as_mapping = {"0,0,0": 0, "#ff0000": 1, "0, 0, 255": 2, "255,255,255": 255}
    rgb[0, 0] = 255
    save(tmp_path / "masks/train/a.png", rgb)
    ds = FolderDataset(tmp_path, "train", 3, palette=as_mapping)
    assert ds.load_mask(0)[0, 0] == 255 and np.array_equal(ds.load_mask(0)[1], labels[1])
    rgb[1, :3] = (9, 9, 9)
    save(tmp_path / "masks/train/a.png", rgb)
    with pytest.raises(ValueError, match=r"a\.png: colours not in dataset\.palette: \(9, 9, 9\) \(3 px\)"):
        ds.load_mask(0)
    ds = FolderDataset(tmp_path, "train", 3, palette=as_mapping, on_unknown_color="ignore")
    assert ds.load_mask(0)[1].tolist() == [255, 255, 255, 2]
    with pytest.raises(ValueError, match="lists 2 colours but dataset.num_classes=3"):
        FolderDataset(tmp_path, "train", 3, palette=colours[:2].tolist())
    with pytest.raises(ValueError, match="expected a single-channel index PNG"):
        FolderDataset(tmp_path, "train", 3).load_mask(0)  # an RGB mask without a palette


def test_label_mapping_on_the_folder_layout(tmp_path):
    write_pair(tmp_path, "train", "a", blank(1, 4), np.array([[0, 128, 255, 7]], np.uint8))
    ds = FolderDataset(tmp_path, "train", 2, label_mapping={0: 0, 128: 1, 255: 255})
    assert ds.load_mask(0).tolist() == [[0, 1, 255, 255]]  # 7 is not listed: ignored
    with pytest.raises(ValueError, match=r"label_mapping: 128 -> 5"):
        FolderDataset(tmp_path, "train", 2, label_mapping={128: 5})


def test_list_file_of_stems_or_of_path_pairs(tmp_path):
    for stem in ("a", "b", "c"):
        write_pair(tmp_path, "all", stem, blank(), np.zeros((6, 8), np.uint8))
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists/train.txt").write_text("# training pairs\nc\n\na\n")
    (tmp_path / "lists/val.txt").write_text("images/all/b.png masks/all/b.png\n")
    options = dict(image_dir="images/all", mask_dir="masks/all", list_file="lists/{split}.txt")
    assert [p.stem for p in FolderDataset(tmp_path, "train", 2, **options).image_paths] == ["c", "a"]
    assert [p.name for p in FolderDataset(tmp_path, "val", 2, **options).mask_paths] == ["b.png"]
    (tmp_path / "lists/train.txt").write_text("a\nzz\nimages/all/b.png masks/all/nope.png\n")
    with pytest.raises(FileNotFoundError, match=r"(?s)train\.txt:2: 'zz' has no image.*train\.txt:3: .*nope\.png"):
        FolderDataset(tmp_path, "train", 2, **options)


# ---------------------------------------------------------------- errors name the file


def test_every_unpaired_file_is_listed(tmp_path):
    write_pair(tmp_path, "train", "ok", blank(), np.zeros((6, 8), np.uint8))
    save(tmp_path / "images/train/lonely.jpg", blank())
    save(tmp_path / "masks/train/widow.png", np.zeros((6, 8), np.uint8))
    pattern = r"(?s)unpaired files \(2\).*lonely\.jpg: no mask.*widow\.png: no image"
    with pytest.raises(FileNotFoundError, match=pattern):
        FolderDataset(tmp_path, "train", 2)


def test_unreadable_files_and_bad_labels_name_the_file(tmp_path):
    for stem in ("good", "broken_image", "broken_mask", "bad_label"):
        write_pair(tmp_path, "train", stem, blank(), np.zeros((6, 8), np.uint8))
    (tmp_path / "images/train/broken_image.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "masks/train/broken_mask.png").write_bytes(b"")
    save(tmp_path / "masks/train/bad_label.png", np.full((6, 8), 4, np.uint8))
    ds = FolderDataset(tmp_path, "train", 3)
    index = {p.stem: i for i, p in enumerate(ds.image_paths)}
    with pytest.raises(OSError, match=r"broken_image\.png: cannot read image"):
        ds[index["broken_image"]]
    with pytest.raises(OSError, match=r"broken_mask\.png: cannot read mask"):
        ds[index["broken_mask"]]
    with pytest.raises(ValueError, match=r"bad_label\.png: labels outside \[0, 3\).*value 4 \(48 px\)"):
        ds[index["bad_label"]]
    lenient = FolderDataset(tmp_path, "train", 3, on_bad_label="ignore")
    assert (lenient[index["bad_label"]][1] == 255).all()
    with pytest.raises(ValueError, match="on_bad_label='drop'; valid: error, ignore"):
        FolderDataset(tmp_path, "train", 3, on_bad_label="drop")


def test_missing_directories_and_empty_lists(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"images[/\\]train: directory not found"):
        FolderDataset(tmp_path, "train", 2)
    write_voc(tmp_path)
    (tmp_path / "ImageSets/Segmentation/train.txt").write_text("\n")
    with pytest.raises(FileNotFoundError, match=r"empty split 'train', no pairs in .*train\.txt"):
        VOCDataset(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match=r"test\.txt: list file not found"):
        VOCDataset(tmp_path, "test")


# ---------------------------------------------------------------- configs and the check script


def test_voc_and_cityscapes_configs_build(compose_cfg, tmp_path):
    write_voc(tmp_path / "voc")
    cfg = compose_cfg(["dataset=voc", f"dataset.root={tmp_path / 'voc'}", "dataset.augment.crop_size=8"])
    assert class_names_of(cfg.dataset) == list(VOC_NAMES)
    data = build_data(cfg.dataset)
    train_set, val_set = data.train_set, data.val_set
    assert (len(train_set), len(val_set)) == (2, 1) and train_set[(0, 5)][1].shape == (8, 8)
    write_cityscapes(tmp_path / "cs", "train")
    write_cityscapes(tmp_path / "cs", "val")
    cfg = compose_cfg(["dataset=cityscapes", f"dataset.root={tmp_path / 'cs'}", "dataset.augment.crop_size=[4,8]"])
    assert class_names_of(cfg.dataset) == list(CITYSCAPES_NAMES)
    train_set = build_data(cfg.dataset).train_set
    assert train_set.label_mapping == LABEL_TO_TRAIN_ID
    image, mask = train_set[(1, 3)]
    assert image.shape == (3, 4, 8) and set(mask.unique().tolist()) <= {*range(19), 255}


def test_check_dataset_reports_every_bad_pair(tmp_path):
    root = tmp_path / "data"
    for split in ("train", "val"):
        for stem in ("a", "b", "c"):
            write_pair(root, split, stem, blank(), np.array([[0, 1, 2, 255] * 2] * 6, np.uint8))
    save(root / "masks/train/b.png", np.full((6, 8), 9, np.uint8))  # label outside the classes
    save(root / "masks/train/c.png", np.zeros((5, 8), np.uint8))  # size mismatch
    (root / "images/val/a.png").write_bytes(b"garbage")  # unreadable image
    save(root / "images/val/d.png", blank())  # no mask
    cmd = [sys.executable, str(ROOT / "scripts/check_dataset.py"), "dataset=folder", f"dataset.root={root}",
           "dataset.num_classes=3", "--workers=0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    out = proc.stdout
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "split 'train': 3 pairs, 2 problems" in out and "split 'val': 3 pairs, 2 problems" in out
    assert "b.png: labels outside [0, 3) and != ignore_index 255: value 9 (48 px)" in out
    assert "c.png: mask size 8x5 differs from image c.png size 8x6" in out
    assert "a.png: cannot read image" in out and "d.png: no mask" in out
    assert "FAILED: 4 problem(s) in 2 of 2 split(s)" in out
    lines = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith("  class_")}
    assert lines["class_0"][0] == "24" and lines["class_2"][2] == "2"  # val: pixels and images of b and c


def test_check_dataset_passes_a_clean_dataset(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import check_dataset
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    write_cityscapes(tmp_path, "train")
    code = check_dataset.main(["dataset=cityscapes", f"dataset.root={tmp_path}", "--split", "train"])
    out = capsys.readouterr().out
    assert code == 0 and "split 'train': 2 pairs, no problems" in out and "OK: 2 pairs in 1 split(s)" in out
    assert "traffic light" in out


# ---------------------------------------------------------------- augmentation


def blocky(rng: np.random.Generator, size: int = 64, block: int = 8) -> np.ndarray:
    """Blocks whose red channel is far from the threshold 127, so interpolation only blurs their edges."""
    cells = size // block
    red = rng.choice([30, 225], size=(cells, cells))
    other = rng.integers(0, 256, size=(cells, cells, 2))
    image = np.concatenate([red[..., None], other], axis=-1).astype(np.uint8)
    return image.repeat(block, 0).repeat(block, 1)


def unnormalise(image: torch.Tensor) -> np.ndarray:
    x = image.permute(1, 2, 0).numpy() * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN)
    return x * 255.0


def interior(mask: np.ndarray, radius: int = 2) -> np.ndarray:
    """Pixels whose (2r+1)^2 neighbourhood holds one valid label: away from every edge."""
    h, w = mask.shape
    padded = np.pad(mask.astype(np.int64), radius, constant_values=-1)
    same = np.ones((h, w), bool)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            same &= padded[dy : dy + h, dx : dx + w] == mask
    return same & (mask != 255)


@pytest.mark.parametrize("rare_crop_p", [0.0, 1.0])
def test_augmentation_keeps_image_and_mask_aligned(tmp_path, rare_crop_p):
    rng = np.random.default_rng(0)
    for i in range(3):
        image = blocky(rng)
        write_pair(tmp_path, "train", f"s{i}", image, (image[..., 0] > 127).astype(np.uint8))
    extra = [{"name": "Affine", "rotate": (-20, 20), "p": 0.5}]
    transform = train_transform(hflip=True, vflip=True, scale_range=(0.5, 2.0), crop_size=48, extra=extra,
                                rare_crop_p=rare_crop_p, class_frequency=[0.9, 0.1])
    ds = FolderDataset(tmp_path, "train", 2, transform=transform)
    checked, ignored = 0, 0
    for seed in range(40):
        image, mask = ds[(seed % 3, seed)]
        mask = mask.numpy()
        assert set(np.unique(mask).tolist()) <= {0, 1, 255}  # no invented class
        inside = interior(mask)
        from_image = unnormalise(image)[..., 0] > 127
        assert np.array_equal(from_image[inside], mask[inside] == 1)
        checked += inside.sum()
        ignored += (mask == 255).sum()
    assert checked > 20000 and ignored > 0  # padding and rotation corners are ignore, not class 0


def test_colour_jitter_and_extras_leave_the_mask_alone(tmp_path):
    rng = np.random.default_rng(1)
    image = blocky(rng)
    write_pair(tmp_path, "train", "a", image, (image[..., 0] > 127).astype(np.uint8))
    plain = FolderDataset(tmp_path, "train", 2, transform=train_transform(scale_range=(0.5, 1.5), crop_size=40))
    jitter = FolderDataset(tmp_path, "train", 2, transform=train_transform(
        scale_range=(0.5, 1.5), crop_size=40, color_jitter=0.4,
        extra=[{"name": "RandomBrightnessContrast", "p": 1.0}, {"name": "GaussNoise", "p": 1.0}]))
    for seed in range(5):
        (x0, y0), (x1, y1) = plain[(0, seed)], jitter[(0, seed)]
        assert torch.equal(y0, y1) and not torch.equal(x0, x1)


def test_unknown_or_unsafe_extra_transforms_fail_with_a_hint():
    with pytest.raises(ValueError, match="'RandomBrightnesContrast'; did you mean RandomBrightnessContrast"):
        train_transform(extra=[{"name": "RandomBrightnesContrast"}])
    with pytest.raises(ValueError, match="nearest-neighbour only"):
        extra_transform({"name": "Affine", "mask_interpolation": 1})
    with pytest.raises(ValueError, match=r"Affine has no option 'rotation'; valid: .*rotate"):
        extra_transform({"name": "Affine", "rotation": 3})
    assert extra_transform({"name": "Rotate", "limit": 10}, ignore_index=99).fill_mask == 99
    with pytest.raises(ValueError, match="need dataset.augment.crop_size"):
        train_transform(rare_crop_p=0.5)


def test_val_resize_pads_or_resizes_the_image_only(tmp_path):
    image, mask = blocky(np.random.default_rng(2), size=40, block=5), np.ones((40, 40), np.uint8)
    out = eval_transform(val_resize="pad32")(image=image, mask=mask)
    assert out["image"].shape == (64, 64, 3) and out["mask"].shape == (64, 64)
    assert (out["mask"][:40, :40] == 1).all() and (out["mask"][40:] == 255).all() and (out["mask"][:, 40:] == 255).all()
    out = eval_transform(val_resize=20)(image=image[:, :30], mask=mask[:, :30])
    assert out["image"].shape == (27, 20, 3) and out["mask"].shape == (40, 30)
    with pytest.raises(ValueError, match="val_resize='pad31'; valid: null, pad32"):
        eval_transform(val_resize="pad31")
    same = [(torch.zeros(3, 20, 15), torch.zeros(40, 30, dtype=torch.long))] * 2
    images, masks = pad_collate(same)
    assert images.shape == (2, 3, 20, 15) and masks.shape == (2, 40, 30)
    mixed = same[:1] + [(torch.zeros(3, 20, 20), torch.zeros(40, 40, dtype=torch.long))]
    with pytest.raises(ValueError, match="batch_size_val=1"):
        pad_collate(mixed)
