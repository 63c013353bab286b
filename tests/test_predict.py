"""`python -m segtrain.predict`: files named after their inputs, colours, resuming, bad inputs, and
masks that give evaluate's numbers."""

import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segtrain.config import compose_config
from segtrain.data.folder import read_image, read_mask
from segtrain.data.inputs import find_inputs
from segtrain.data.voc import voc_palette
from segtrain.evaluate import evaluate_checkpoint
from segtrain.inference.writers import PredictionWriter
from segtrain.metrics import ConfusionMatrix
from segtrain.predict import Predictor, main

ROOT = Path(__file__).resolve().parents[1]


def _checkpoint(trained: Path) -> str:
    return str(trained / "run/checkpoints/last.pt")


def test_predicted_masks_give_evaluates_numbers(trained, tmp_path):
    """Train, predict the val folder, read the PNGs back: the confusion matrix of evaluate, count for count."""
    out = tmp_path / "pred"
    assert main([f"checkpoint={_checkpoint(trained)}", f"input={trained / 'data/images/val'}", f"output={out}",
                 "progress=false"]) == 0
    matrix = ConfusionMatrix(3)
    for mask_path in sorted((trained / "data/masks/val").glob("*.png")):
        predicted = read_mask(out / mask_path.name)
        assert predicted.dtype == np.int64 and predicted.max() < 3
        matrix.update(torch.from_numpy(predicted)[None], torch.from_numpy(read_mask(mask_path))[None])
    # batch_size_val=1: evaluate runs each image alone, as predict does (the same kernels, the same sums).
    metrics, _ = evaluate_checkpoint(_checkpoint(trained), ["dataset.batch_size_val=1"])
    ours = matrix.compute()
    for key in ("iou", "dice", "precision", "recall"):
        assert torch.equal(ours[key].nan_to_num(-1), metrics[key].nan_to_num(-1)), key
    assert ours["pixel_acc"] == metrics["pixel_acc"] and not math.isnan(ours["pixel_acc"])


def test_outputs_keep_names_and_sub_folders_with_the_palette(trained, tmp_path):
    data = tmp_path / "new"
    for rel in ("a.png", "city/b.jpg", "city/deep/c.png"):
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 52, 3), dtype=np.uint8)).save(data / rel)
    (data / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert main([f"checkpoint={_checkpoint(trained)}", f"input={data}", f"output={out}", "save.overlay=true",
                 "save.probabilities=true", "progress=false"]) == 0
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert names == ["a.png", "a_color.png", "a_overlay.jpg", "a_prob.npz",
                     "city/b.png", "city/b_color.png", "city/b_overlay.jpg", "city/b_prob.npz",
                     "city/deep/c.png", "city/deep/c_color.png", "city/deep/c_overlay.jpg", "city/deep/c_prob.npz",
                     "legend.png"]
    mask = np.asarray(Image.open(out / "city/b.png"))
    color = Image.open(out / "city/b_color.png")
    assert mask.shape == (40, 52) and mask.dtype == np.uint8 and color.mode == "P"
    assert np.array_equal(np.asarray(color), mask)  # the colour PNG reads back as the same indices
    from segtrain.visualize import class_palette
    assert color.getpalette()[:9] == class_palette(3).reshape(-1).tolist()
    probs = np.load(out / "city/b_prob.npz")
    assert probs["probabilities"].dtype == np.float16 and probs["probabilities"].shape == (3, 40, 52)
    assert list(probs["class_names"]) == ["background", "region", "spot"]
    np.testing.assert_array_equal(probs["probabilities"].astype(np.float32).argmax(0), mask)


def test_dataset_palettes_and_uint16_masks(tmp_path):
    labels = np.array([[0, 15, 20], [299, 3, 0]])
    writer = PredictionWriter(tmp_path, [f"c{i}" for i in range(300)], np.zeros((300, 3), np.uint8), ["color"])
    writer.write("x", np.zeros((2, 3, 3), np.uint8), labels)
    assert np.asarray(Image.open(tmp_path / "x.png")).tolist() == labels.tolist()
    assert Image.open(tmp_path / "x.png").mode.startswith("I")  # uint16 above 256 classes
    assert Image.open(tmp_path / "x_color.png").mode == "RGB"
    voc = PredictionWriter(tmp_path / "voc", [f"c{i}" for i in range(21)], np.array(voc_palette()), ["color"])
    voc.write("y", np.zeros((2, 3, 3), np.uint8), labels % 21)
    palette = Image.open(tmp_path / "voc/y_color.png").getpalette()
    assert tuple(palette[15 * 3 : 16 * 3]) == (192, 128, 128)  # VOC's person colour


def test_predictor_takes_the_datasets_palette(trained):
    from segtrain.predict import palette_for

    cfg = compose_config(["dataset=voc"])
    assert palette_for(cfg, 21)[15].tolist() == [192, 128, 128]
    cfg = compose_config(["dataset=folder", "dataset.num_classes=2", "dataset.root=x",
                          "dataset.palette=[[1,2,3],[4,5,6]]"])
    assert palette_for(cfg, 2).tolist() == [[1, 2, 3], [4, 5, 6]]


def test_skip_existing_resumes_a_folder_run(trained, tmp_path):
    out = tmp_path / "out"
    args = [f"checkpoint={_checkpoint(trained)}", f"input={trained / 'data/images/val'}", f"output={out}",
            "progress=false"]
    assert main(args) == 0
    (out / "val_00001.png").unlink()  # as if the run had been stopped before this image
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    proc = subprocess.run([sys.executable, "-m", "segtrain.predict", *args, "save.skip_existing=true"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "1 images predicted, 0 skipped, 3 already done" in proc.stdout
    # The three finished images are left as they were; the fourth is written again, all its files.
    assert all(out.joinpath(name).stat().st_mtime_ns == stamp for name, stamp in stamps.items()
               if not name.startswith(("legend", "val_00001")))
    assert (out / "val_00001.png").is_file()


def test_an_unreadable_image_is_named_and_skipped_or_stops_the_run(trained, tmp_path, capsys):
    data = tmp_path / "in"
    shutil.copytree(trained / "data/images/val", data)
    (data / "broken.png").write_bytes(b"\x89PNG not an image")
    out = tmp_path / "out"
    args = [f"checkpoint={_checkpoint(trained)}", f"input={data}", f"output={out}", "progress=false"]
    assert main(args) == 1  # some skipped
    captured = capsys.readouterr()
    assert "4 images predicted, 1 skipped" in captured.out
    assert not (out / "broken.png").exists() and len(list(out.glob("val_*_color.png"))) == 4
    assert main(args + ["on_error=stop"]) == 2
    assert "broken.png: cannot read image" in capsys.readouterr().err
    assert main([*args[:1], f"input={data / 'broken.png'}", f"output={tmp_path / 'one'}"]) == 2  # one image: stop


def test_bad_inputs_stop_with_a_clear_message(trained, tmp_path, capsys):
    ckpt = f"checkpoint={_checkpoint(trained)}"
    (tmp_path / "empty").mkdir()
    cases = [
        ([ckpt, f"input={tmp_path / 'empty'}", f"output={tmp_path / 'o'}"], "empty': no image (.png"),
        ([ckpt, f"input={tmp_path / 'nope'}", f"output={tmp_path / 'o'}"], "nope': no such file, folder"),
        ([ckpt, f"input={trained / 'data/images'}", f"output={trained / 'data/images/val/pred'}"],
         "is inside the input folder"),
        ([f"checkpoint={tmp_path / 'other.pt'}", f"input={trained / 'data/images/val'}", f"output={tmp_path}/o"],
         "other.pt: not a segtrain checkpoint"),
        ([ckpt, f"input={trained / 'data/images/val'}", f"output={tmp_path / 'o'}", "inference.mode=tiles"],
         "inference.mode='tiles'; valid: whole, slide"),
        ([ckpt, f"input={trained / 'data/images/val'}", f"output={tmp_path / 'o'}", "save.colour=true"],
         "save.colour"),
        ([ckpt, f"input={trained / 'data/images/val'}", f"output={tmp_path / 'o'}", "dataset.tta_flips=[h]",
          "inference.tta.flips=[v]"], "has 'v', which dataset.tta_flips does not allow"),
    ]
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    for args, message in cases:
        assert main(args) == 2, args
        assert message in capsys.readouterr().err.replace('"', "'"), message
    assert main([ckpt]) == 2 and "missing: input, output" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (trained / "data/images/val/pred").exists()


def test_wrong_channel_count_names_the_file(trained, tmp_path):
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(rgb)
    with pytest.raises(ValueError, match=r"rgb.png: an image of 3 channels; the model takes 4"):
        read_image(rgb, channels=4)
    predictor = Predictor.from_checkpoint(_checkpoint(trained))
    with pytest.raises(ValueError, match=r"expected \(H, W, 3\)"):
        predictor(np.zeros((8, 8, 4), np.uint8))


def test_inputs_from_a_glob_and_a_list_file(tmp_path):
    for rel in ("x/1.png", "x/y/2.png", "z/3.jpg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / rel)
    images, base = find_inputs(str(tmp_path / "x" / "**" / "*.png"))
    assert base == tmp_path / "x" and [i.key for i in images] == ["1", "y/2"]
    (tmp_path / "list.txt").write_text("# two images\nx/y/2.png\n\nz/3.jpg\n")
    images, _ = find_inputs(tmp_path / "list.txt")
    assert [i.key for i in images] == ["x/y/2", "z/3"]
    (tmp_path / "list.txt").write_text("x/nope.png\n")
    with pytest.raises(FileNotFoundError, match=r"list.txt:1: 'x/nope.png': no such image file"):
        find_inputs(tmp_path / "list.txt")


def _images(folder: Path, names) -> None:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((36, 40, 3), 90, np.uint8)).save(folder / name)


@pytest.mark.parametrize("names, clash", [(["x.png", "x_color.png"], "x_color.png"), (["legend.png"], "legend.png"),
                                          (["1.png", "1.jpg"], "1.png"), (["a/b.png", "a/b_color.png"], "a/b_color.png")])
def test_inputs_whose_outputs_would_collide_are_refused_before_anything_is_written(trained, tmp_path, capsys, names,
                                                                                  clash):
    _images(tmp_path / "in", names)
    out = tmp_path / "out"
    assert main([f"checkpoint={_checkpoint(trained)}", f"input={tmp_path / 'in'}", f"output={out}",
                 "progress=false"]) == 2
    err = capsys.readouterr().err
    assert f"would both be {out / clash}" in err and "rename one of the inputs" in err, err
    assert not out.exists()  # not even the legend


def test_colliding_names_predict_when_the_clashing_kind_is_not_saved(trained, tmp_path):
    _images(tmp_path / "in", ["x.png", "x_color.png"])
    out = tmp_path / "out"
    assert main([f"checkpoint={_checkpoint(trained)}", f"input={tmp_path / 'in'}", f"output={out}",
                 "save.color=false", "progress=false"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["legend.png", "x.png", "x_color.png"]


def test_a_linked_folder_is_searched_and_a_link_loop_ends(tmp_path):
    _images(tmp_path / "data", ["a.png", "sub/c.png"])
    _images(tmp_path / "outside", ["b.png"])
    (tmp_path / "data/linked").symlink_to(tmp_path / "outside", target_is_directory=True)
    (tmp_path / "data/sub/loop").symlink_to(tmp_path / "data", target_is_directory=True)
    images, base = find_inputs(tmp_path / "data")
    assert base == tmp_path / "data"
    assert [(i.key, i.path) for i in images] == [("a", tmp_path / "data/a.png"),
                                                 ("linked/b", tmp_path / "data/linked/b.png"),
                                                 ("sub/c", tmp_path / "data/sub/c.png")]


def test_evaluate_scores_with_the_same_sliding_windows(trained):
    whole, _ = evaluate_checkpoint(_checkpoint(trained))
    one_window, _ = evaluate_checkpoint(_checkpoint(trained), ["inference.mode=slide", "inference.tile=64"])
    assert torch.equal(one_window["iou"].nan_to_num(-1), whole["iou"].nan_to_num(-1))
    slide, _ = evaluate_checkpoint(_checkpoint(trained), ["inference.mode=slide", "inference.tile=32",
                                                          "inference.tta.flips=[h]"])
    assert math.isfinite(slide["loss"]) and slide["loss"] != whole["loss"]
