"""A calibrated checkpoint's component rules through the commands: evaluate scores the labels the rules give,
predict writes them, an export carries them and the README's NumPy/OpenCV block applies them to the file's
probabilities exactly as segtrain.predict does; calibrate tunes and stores them."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segtrain.analysis.calibration import fitted_on
from segtrain.analysis.postprocess import PostProcess, apply, top_two
from segtrain.checkpoint import load_checkpoint, save_checkpoint
from segtrain.data.folder import read_mask
from segtrain.evaluate import evaluate_checkpoint
from segtrain.metrics import ConfusionMatrix
from segtrain.predict import Predictor
from segtrain.predict import main as predict_main

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["background", "region", "spot"]
# Rules that change a barely trained model's labels: holes in region filled, small spot islands and all but the
# largest background component taken away.
RULES = {"connectivity": 8, "rules": {"background": {"keep_largest": True}, "region": {"max_hole": 50},
                                      "spot": {"min_size": 16}}}


@pytest.fixture(scope="module")
def with_rules(trained, tmp_path_factory):
    """The trained checkpoint with a calibration entry holding RULES (fitted, as recorded, on the train split)."""
    source = trained / "run/checkpoints/last.pt"
    ckpt = load_checkpoint(source)

    class Train:  # what fitted_on reads of a split
        root, split = trained / "data", "train"

    ckpt["calibration"] = {"temperature": 1.0, "bias": [0.0, 0.0, 0.0], "fitted_on": fitted_on(Train),
                           "objective": None, "postprocess": RULES}
    target = tmp_path_factory.mktemp("rules") / "with_rules.pt"
    save_checkpoint(ckpt, target)
    return target


def _labels(checkpoint, image_path, rules: bool = True) -> np.ndarray:
    """The model's labels of an image, with RULES applied here by hand (or without)."""
    predictor = Predictor.from_checkpoint(checkpoint, ["postprocess.enabled=false"], device="cpu")
    top, second = top_two(predictor(np.asarray(Image.open(image_path).convert("RGB"))))
    return apply(top, second, PostProcess.from_dict(RULES, NAMES)) if rules else top


def test_evaluate_and_predict_apply_the_rules(trained, with_rules, tmp_path):
    images = sorted((trained / "data/images/val").glob("*.png"))
    expected = {p.name: _labels(with_rules, p) for p in images}
    raw = {p.name: _labels(with_rules, p, rules=False) for p in images}
    matrix = ConfusionMatrix(3)
    for name, labels in expected.items():
        matrix.update(torch.from_numpy(labels)[None], torch.from_numpy(read_mask(trained / "data/masks/val" / name))[None])
    metrics, _ = evaluate_checkpoint(with_rules, ["dataset.batch_size_val=1"], report=False)
    for key in ("iou", "dice", "precision", "recall"):
        torch.testing.assert_close(metrics[key], matrix.compute()[key], equal_nan=True, msg=key)
    off, _ = evaluate_checkpoint(with_rules, ["dataset.batch_size_val=1", "postprocess.enabled=false"], report=False)
    assert not torch.equal(off["dice"].nan_to_num(-1), metrics["dice"].nan_to_num(-1))  # the rules changed labels
    assert predict_main([f"checkpoint={with_rules}", f"input={trained / 'data/images/val'}", f"output={tmp_path}",
                         "progress=false"]) == 0
    for name, labels in expected.items():
        np.testing.assert_array_equal(read_mask(tmp_path / name), labels)
    assert any((expected[n] != raw[n]).any() for n in expected)


def test_the_readme_block_applies_an_exports_rules_as_predict_does(trained, with_rules, tmp_path):
    import onnxruntime as ort

    from segtrain.export import main as export_main

    block = re.search(r"<!-- postprocess-snippet -->\n```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    namespace: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), namespace)
    onnx = tmp_path / "model.onnx"
    assert export_main([f"checkpoint={with_rules}", "format=onnx", "head=probabilities", "input=uint8",
                        f"output={onnx}", "size=64", "verify_size=96"]) == 0
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["postprocess"]) == {"connectivity": 8, "rules": {
        name: {"min_size": None, "keep_largest": False, "max_hole": None, **rule} for name, rule in RULES["rules"].items()}}
    assert predict_main([f"checkpoint={with_rules}", f"input={trained / 'data/images/val'}",
                         f"output={tmp_path / 'pred'}", "progress=false"]) == 0
    for path in sorted((trained / "data/images/val").glob("*.png")):
        image = np.asarray(Image.open(path).convert("RGB"))
        probs = session.run(None, {"image": image.transpose(2, 0, 1)[None].copy()})[0][0]
        np.testing.assert_array_equal(namespace["postprocess"](probs, meta), read_mask(tmp_path / "pred" / path.name))


def test_calibrate_tunes_and_stores_the_rules(trained, tmp_path, capsys):
    from segtrain.calibrate import calibrate

    target, entry = calibrate(trained / "run/checkpoints/last.pt", ["postprocess.tune=true", "dataset.split=train",
                                                                     "postprocess.min_size_grid=[4,16]",
                                                                     "postprocess.max_hole_grid=[4,16]"],
                              str(tmp_path / "tuned.pt"))
    stored = entry["postprocess"]
    assert stored["fitted_on"]["split"] == "train" and stored["connectivity"] == 8 and stored["tried"] > 0
    PostProcess.from_dict(stored, NAMES)  # a valid set of rules, possibly empty
    assert load_checkpoint(target)["calibration"]["postprocess"] == stored
    printed = capsys.readouterr().out
    assert "region" in printed and "spot" in printed
