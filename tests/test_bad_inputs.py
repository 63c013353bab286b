"""Bad files and values stop early with an error that names the file or key and what was expected, and leave
what is on disk intact: deep and bomb images, truncated or changed images, a checkpoint given a dataset of
another class count, zero batch sizes, tiles below the model's stride, a synthetic set given a bad
ignore_index, a one-class dataset with binary masks."""

import hashlib
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from segtrain import calibrate, evaluate, export, predict
from segtrain.build import build_data
from segtrain.checkpoint import load_checkpoint, save_checkpoint
from segtrain.config import compose_config
from segtrain.data import ensure_synthetic
from segtrain.data.folder import FolderDataset, check_image
from segtrain.data.scan import image_class_counts
from segtrain.train import train


def _bomb_png(path: Path, width: int = 30000, height: int = 30000) -> None:
    """A PNG whose header claims width x height RGB pixels, and no pixels: a few dozen bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))


def _folder_set(root: Path, count: int = 3, size: int = 48) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / f"images/{split}/{i}.png")
            Image.fromarray((np.arange(size * size).reshape(size, size) % 2).astype(np.uint8)).save(
                root / f"masks/{split}/{i}.png")
    return root


def _folder_overrides(root: Path, *extra: str) -> list[str]:
    return ["debug=fast", "dataset=folder", f"dataset.root={root}", "dataset.num_classes=2", "dataset.augment.crop_size=32",
            *extra]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- images


def test_a_16_bit_image_is_refused_naming_file_and_mode_in_training_and_predict(trained, tmp_path, caplog):
    root = _folder_set(tmp_path / "set")
    deep = root / "images/train/1.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 4096, (48, 48)).astype(np.uint16)).save(deep)
    assert Image.open(deep).mode == "I;16"
    with pytest.raises(ValueError, match=rf"{deep}: a 16-bit image \(mode I;16\); segtrain reads 8-bit images"):
        build_data(compose_config(_folder_overrides(root)).dataset)
    out = tmp_path / "pred"
    assert predict.main([f"checkpoint={trained / 'run/checkpoints/last.pt'}", f"input={root / 'images/train'}",
                         f"output={out}", "progress=false"]) == 1  # skipped, named; the others predicted
    assert f"skipped {deep}: a 16-bit image (mode I;16)" in caplog.text
    assert sorted(p.name for p in out.glob("?.png")) == ["0.png", "2.png"]


def test_a_decompression_bomb_is_skipped_by_predict_and_stops_the_dataset_pass(trained, tmp_path, capsys, caplog):
    images = tmp_path / "in"
    images.mkdir()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(images / "a.png")
    _bomb_png(images / "b.png")
    assert (images / "b.png").stat().st_size < 100
    out = tmp_path / "pred"
    assert predict.main([f"checkpoint={trained / 'run/checkpoints/last.pt'}", f"input={images}", f"output={out}",
                         "progress=false"]) == 1
    assert "1 images predicted, 1 skipped" in capsys.readouterr().out
    assert f"skipped {images / 'b.png'}: cannot read image (Image size (900000000 pixels) exceeds" in caplog.text
    root = _folder_set(tmp_path / "set")
    _bomb_png(root / "images/val/2.png")
    with pytest.raises(OSError, match=rf"{root / 'images/val/2.png'}: cannot read image \(Image size"):
        build_data(compose_config(_folder_overrides(root)).dataset)


def test_truncated_or_rewritten_images_stop_the_pass_before_step_one(tmp_path):
    """A truncated image (header intact) is decoded by the pass; an image rewritten with its size and mtime kept
    (cp -p, bit rot repaired by a tool) misses the class-count cache, so the pass checks it again."""
    root = _folder_set(tmp_path / "set")
    dataset = FolderDataset(root, "train", num_classes=2)
    image_class_counts(dataset, 2)  # checked and cached
    target = root / "images/train/1.png"
    data = bytearray(target.read_bytes())
    st = target.stat()
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert target.stat().st_size == st.st_size and target.stat().st_mtime_ns == st.st_mtime_ns
    with pytest.raises(OSError, match=rf"{target}: cannot read image \(broken data: broken PNG file"):
        image_class_counts(FolderDataset(root, "train", num_classes=2), 2)
    Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(target)  # repaired
    truncated = root / "images/train/2.png"
    truncated.write_bytes(truncated.read_bytes()[:200])
    run = tmp_path / "run"
    with pytest.raises(OSError, match=rf"{truncated}: cannot read image \(Truncated File Read"):
        train(compose_config(_folder_overrides(root)), run)
    assert not (run / "checkpoints").exists()  # stopped at the pass, before the first step
    jpeg = tmp_path / "cut.jpg"  # decoded at 1/8 scale, which still reads every byte
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpeg, quality=90)
    assert check_image(jpeg) == (64, 64)
    jpeg.write_bytes(jpeg.read_bytes()[:-400])
    with pytest.raises(OSError, match=rf"{jpeg}: cannot read image \(image file is truncated"):
        check_image(jpeg)


# ---------------------------------------------------------------- a checkpoint and its dataset


def test_a_checkpoint_given_another_class_count_is_refused_before_any_pass(trained, tmp_path, capsys):
    ckpt = trained / "run/checkpoints/last.pt"
    five = ["dataset.num_classes=5", "dataset.class_names=[a,b,c,d,e]"]
    commands = {
        "predict": lambda o: predict.main([f"checkpoint={ckpt}", f"input={trained / 'data/images/val'}",
                                           f"output={tmp_path / 'pred'}", *o]),
        "evaluate": lambda o: evaluate.main([f"checkpoint={ckpt}", f"report.dir={tmp_path / 'report'}", *o]),
        "export": lambda o: export.main([f"checkpoint={ckpt}", f"output={tmp_path / 'm.pt2'}", "format=torch_export",
                                         *o]),
        "calibrate": lambda o: calibrate.main([f"checkpoint={ckpt}", f"output={tmp_path / 'c.pt'}", *o]),
    }
    for name, command in commands.items():
        for overrides, given in ((["dataset.num_classes=4"], "dataset.num_classes=4;"),
                                 (five, "dataset.num_classes=5;")):
            assert command(overrides) == 2, name
            err = capsys.readouterr().err
            assert ("last.pt: the model has 3 output channels (trained on background, region, spot) but "
                    f"{given}") in err, (name, err)
    assert not any((tmp_path / name).exists() for name in ("pred", "report", "m.pt2", "c.pt"))
    # A one-channel (sigmoid) checkpoint of an earlier segtrain: refused with the way to train the task now.
    one = load_checkpoint(ckpt)
    config = OmegaConf.create(one["config"])
    config.model.num_classes, config.dataset.num_classes, config.dataset.class_names = 1, 1, ["spot"]
    one["config"], one["class_names"] = OmegaConf.to_yaml(config), ["spot"]
    one["model"] = {k: v[:1] if k.startswith("head.") else v for k, v in one["model"].items()}
    save_checkpoint(one, tmp_path / "one.pt")
    assert predict.main([f"checkpoint={tmp_path / 'one.pt'}", f"input={trained / 'data/images/val'}",
                         f"output={tmp_path / 'pred'}"]) == 2
    assert "a model of 1 output channel (an earlier segtrain's one-channel sigmoid model)" in capsys.readouterr().err


# ---------------------------------------------------------------- config values


def test_a_zero_batch_size_stops_before_the_data_is_read(tmp_path):
    for key in ("trainer.batch_size", "trainer.grad_accum", "dataset.batch_size_val"):
        cfg = compose_config(["debug=fast", f"dataset.root={tmp_path / 'data'}", f"{key}=0"])
        with pytest.raises(ValueError, match=rf"{key}=0: expected a number of .* >= 1"):
            train(cfg, tmp_path / "run")
        assert not (tmp_path / "data").exists()  # before the synthetic set is written, let alone scanned


def test_a_window_below_the_models_stride_is_refused(trained, tmp_path, capsys):
    ckpt = trained / "run/checkpoints/last.pt"
    slide = ["inference.mode=slide", "inference.tile=1"]
    assert evaluate.main([f"checkpoint={ckpt}", *slide]) == 2
    assert "inference.tile=[1, 1]: a window is smaller than the model's stride (32)" in capsys.readouterr().err
    assert predict.main([f"checkpoint={ckpt}", f"input={trained / 'data/images/val'}", f"output={tmp_path / 'p'}",
                         *slide]) == 2
    assert "smaller than the model's stride (32)" in capsys.readouterr().err and not (tmp_path / "p").exists()
    cfg = compose_config(["debug=fast", f"dataset.root={trained / 'data'}", *slide])
    with pytest.raises(ValueError, match=r"inference.tile=\[1, 1\]: a window is smaller than the model's stride"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run/checkpoints").exists()


def test_a_bad_ignore_index_leaves_the_generated_set_as_it_was(tmp_path):
    root = ensure_synthetic(tmp_path / "data", num_train=3, num_val=2, size=32)
    before = {p: _sha(p) for p in sorted(root.rglob("*")) if p.is_file()}
    for value in (-1, 1, 256):
        with pytest.raises(ValueError, match=rf"dataset.ignore_index={value}: the synthetic set's masks are 8-bit"):
            ensure_synthetic(root, num_train=3, num_val=2, size=32, ignore_index=value)
    cfg = compose_config(["debug=fast", f"dataset.root={root}", "dataset.ignore_index=-1"])
    with pytest.raises(ValueError, match=r"dataset.ignore_index=-1"):
        train(cfg, tmp_path / "run")
    assert {p: _sha(p) for p in sorted(root.rglob("*")) if p.is_file()} == before
    # Regenerating with other (valid) parameters replaces the set whole.
    ensure_synthetic(root, num_train=2, num_val=2, size=32)
    assert len(list((root / "images/train").iterdir())) == 2 and not list(root.glob(".generating-*"))


def test_binary_masks_with_one_class_get_a_hint_that_does_not_mislead(tmp_path):
    root = _folder_set(tmp_path / "set")
    cfg = compose_config(_folder_overrides(root, "dataset.num_classes=1"))
    with pytest.raises(ValueError) as err:
        build_data(cfg.dataset)
    message = str(err.value)
    assert "labels outside [0, 1)" in message and "value 1" in message
    assert "set dataset.num_classes=2" in message and "on_bad_label=ignore" not in message
