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
from hydra import compose, initialize_config_dir
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from segtrain.train import train
from segtrain.visualize import class_palette, confusion_matrix_image, overlay_panel

from conftest import CONFIG_DIR

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

    layout = acc.PluginTagToContent("custom_scalars")
    assert layout  # one multi-line chart per metric, every class in it
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


def test_confusion_matrix_image_shades_by_row_share():
    matrix = torch.tensor([[9, 1, 0], [0, 0, 0], [5, 0, 5]])
    img = confusion_matrix_image(matrix, NAMES, cell=40)
    assert img.ndim == 3 and img.shape[2] == 3
    # The darkest cell is the 0.9 share; an empty row stays white-ish.
    blue = img[..., 0].astype(int)
    assert blue.min() < 255 - 200 * 0.85
