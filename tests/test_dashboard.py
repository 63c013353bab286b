"""What a run shows in TensorBoard: read back from the event files and served over HTTP."""

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONFIG_DIR
from hydra import compose, initialize_config_dir
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import plugin_data_pb2

from segtrain.train import train
from segtrain.training.dashboard import custom_layout
from segtrain.visualize import class_palette, confusion_matrix_image, overlay_panel

NAMES = ["sky", "field", "beetle"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("dashboard")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["debug=fast", f"dataset.root={tmp / 'data'}",
                                          f"dataset.class_names=[{','.join(NAMES)}]"])
    train(cfg, tmp / "run")
    return tmp / "run"


def _accumulator(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_event_files_hold_per_class_tags_images_and_hparams(run_dir):
    acc = _accumulator(run_dir)
    scalars = set(acc.Tags()["scalars"])
    final = json.loads((run_dir / "metrics.json").read_text())["final"]
    for metric in ("dice", "iou", "precision", "recall"):
        for name in NAMES:
            tag = f"val/{metric}/{name}"
            # An undefined value (NaN: e.g. precision of a class never predicted) is not drawn.
            assert (tag in scalars) != np.isnan(final[tag]), tag
    assert {f"val/dice/{name}" for name in NAMES} <= scalars
    assert {"val/mDice", "val/mIoU", "val/pixel_acc", "train/loss", "train/lr", "train/images_per_s"} <= scalars
    assert {f"train/loss/{term}" for term in ("ce", "dice")} <= scalars
    assert {f"train/soft_dice/{name}" for name in NAMES} <= scalars

    images = set(acc.Tags()["images"])
    assert "val/confusion_matrix" in images and "val/samples/0" in images
    cm = acc.Images("val/confusion_matrix")[-1]
    assert cm.step == 2 and cm.width > 100 and cm.height > 100

    hparams = acc.PluginTagToContent("hparams")
    session = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"])
    values = {k: (v.string_value or v.number_value) for k, v in session.session_start_info.hparams.items()}
    assert values["loss"] == "ce+dice" and values["weights"] == "median_freq" and values["model"] == "UNet"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/experiment"])
    metric_tags = {m.name.tag for m in experiment.experiment.metric_infos}
    assert "hparam/final/val/mDice" in metric_tags and f"hparam/best/val/dice/{NAMES[2]}" in metric_tags

    # The layout travels as a serialised Layout proto in a string tensor (the plugin data itself is empty).
    (config,) = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}
    # One multi-line chart per metric, every class in it, in class order; the training loss with its terms.
    for metric in ("dice", "iou", "precision", "recall"):
        assert charts[f"{metric} per class"] == [f"val/{metric}/{name}" for name in NAMES]
    assert charts["train soft dice per class"] == [f"train/soft_dice/{name}" for name in NAMES]
    assert charts["loss"] == ["train/loss", "val/loss", r"train/loss/.*"]
    assert {category.title for category in layout.category} == {"per class (val)", "summary"}
    final_dice = acc.Scalars("hparam/final/val/mDice")[-1].value
    assert final_dice == pytest.approx(final["val/mDice"], rel=1e-6)
    texts = acc.Tags()["tensors"]
    assert "data/class_weights/text_summary" in texts and "data/class_statistics/text_summary" in texts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, body: bytes | None = None):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.mark.slow
def test_tensorboard_serves_the_tags_over_http(run_dir):
    port = _free_port()
    tensorboard = Path(sys.executable).with_name("tensorboard")
    proc = subprocess.Popen([str(tensorboard), "--logdir", str(run_dir), "--host", "127.0.0.1", "--port", str(port),
                             "--load_fast", "false", "--reload_interval", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline, scalar_tags = time.monotonic() + 90, {}
        while time.monotonic() < deadline:
            try:
                scalar_tags = _get(f"{base}/data/plugin/scalars/tags")
                if scalar_tags:
                    break
            except OSError:
                pass
            time.sleep(1)
        assert scalar_tags, "tensorboard did not serve the run within 90 s"
        (run_name, tags), = scalar_tags.items()
        assert {f"val/dice/{name}" for name in NAMES} <= set(tags)
        image_tags = _get(f"{base}/data/plugin/images/tags")[run_name]
        assert "val/confusion_matrix" in image_tags
        experiment = _get(f"{base}/data/plugin/hparams/experiment", json.dumps({"experimentName": ""}).encode())
        assert {h["name"] for h in experiment["hparamInfos"]} >= {"loss", "weights", "lr"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_overlay_blends_class_colours_at_the_right_pixels():
    image = np.full((4, 4, 3), 100, dtype=np.uint8)
    target = np.zeros((4, 4), dtype=np.int64)
    target[1, 2] = 2
    target[0, 0] = 255
    pred = np.ones((4, 4), dtype=np.int64)
    panel = overlay_panel(image, target, pred, NAMES, alpha=0.5, min_side=4)
    palette = class_palette(3).astype(np.float64)
    assert panel[0:4, 0:4].tolist() == image.tolist()  # left: the image itself
    assert panel[1, 4 + 2].tolist() == list((0.5 * palette[2] + 50).astype(np.uint8))  # truth: beetle
    assert panel[0, 4].tolist() == [177, 177, 177]  # truth: ignore drawn white, blended
    assert panel[3, 8 + 3].tolist() == list((0.5 * palette[1] + 50).astype(np.uint8))  # prediction: field
    assert panel.shape[0] > 4  # the legend strip below


def _cell_colours(img: np.ndarray, cell: int, n: int) -> np.ndarray:
    """The fill colour of each cell, read near its top-left corner (clear of the value drawn at its centre)."""
    outline = (img == 200).all(axis=-1)  # the cells' outlines are (200, 200, 200)
    top = int(np.flatnonzero(outline.sum(axis=1) >= n * cell * 0.9)[0])  # the first full grid line
    left = int(np.flatnonzero(outline[top])[0])
    return np.array([[img[top + 4 + i * cell, left + 4 + j * cell] for j in range(n)] for i in range(n)])


def test_confusion_matrix_image_shades_by_row_share():
    matrix = torch.tensor([[9, 1, 0], [0, 0, 0], [5, 0, 5]])
    img = confusion_matrix_image(matrix, NAMES, cell=40)
    assert img.ndim == 3 and img.shape[2] == 3
    share = np.array([[0.9, 0.1, 0.0], [0.0, 0.0, 0.0], [0.5, 0.0, 0.5]])  # rows normalised; empty row 0
    shade = (255 - 200 * share).astype(int)
    expected = np.stack([shade, shade, np.full_like(shade, 255)], axis=-1)
    assert _cell_colours(img, 40, 3).tolist() == expected.tolist()
    # Another matrix gives other colours: the picture is a function of the counts.
    other = _cell_colours(confusion_matrix_image(matrix.T, NAMES, cell=40), 40, 3)
    assert other.tolist() != expected.tolist()


def test_custom_layout_names_every_class():
    layout = custom_layout(["a", "b"])
    assert layout["per class (val)"]["iou per class"] == ["Multiline", ["val/iou/a", "val/iou/b"]]


def test_evaluations_log_calibration_and_each_class_hard_cases(run_dir):
    acc = _accumulator(run_dir)
    final = json.loads((run_dir / "metrics.json").read_text())["final"]
    assert acc.Scalars("val/ece")[-1].value == pytest.approx(final["val/ece"], rel=1e-6)
    for name in NAMES:
        assert acc.Scalars(f"val/ece/{name}")[-1].value == pytest.approx(final[f"val/ece/{name}"], rel=1e-6)
    images = set(acc.Tags()["images"])
    assert "val/reliability" in images
    # A class gets a gallery when some image has it in the truth or the prediction (its Dice is then defined).
    expected = {f"val/hard_cases/{name}" for name in NAMES
                if not (np.isnan(final[f"val/dice/{name}"]))}
    assert {tag for tag in images if tag.startswith("val/hard_cases/")} == expected
    (config,) = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}
    assert charts["calibration"] == ["val/ece", *(f"val/ece/{name}" for name in NAMES)]
