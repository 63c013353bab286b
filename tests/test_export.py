"""`segtrain.export`: one trace with dynamic shapes, checked in ONNX Runtime and torch.export.load at
sizes the trace never saw; the deployed graph's normalisation and mask against segtrain.predict; the
README's ONNX Runtime snippet; bad inputs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from segtrain.data.folder import read_image
from segtrain.data.transforms import eval_transform
from segtrain.export import compare, main, unverified_path
from segtrain.inference.deploy import DeployModel, normalisation_lut, plain_batchnorm, to_onnx, trace
from segtrain.models import DeepLabV3Plus, UNet
from segtrain.predict import Predictor

ROOT = Path(__file__).resolve().parents[1]

MODELS = {
    "unet-resnet18": lambda: UNet(3, encoder="resnet18", decoder_channels=(16, 16, 16, 8, 8)),
    "unet-classic": lambda: UNet(3, encoder=None, base_width=4),
    # Both DeepLabV3+ strides, each on one encoder family (ResNet dilated to OS 8, MobileNetV3 at OS 16):
    # each ONNX conversion costs 15-45 s of a CI run on 2 cores.
    "dlv3p-resnet18-os8": lambda: DeepLabV3Plus(3, encoder="resnet18", output_stride=8),
    "dlv3p-mobilenet-os16": lambda: DeepLabV3Plus(3, encoder="mobilenet_v3_large", output_stride=16),
}
# (batch, height, width): the traced size, three that no stride divides (one at batch 2), the smallest
# just above the stride of 32 (deploy.min_size).
SIZES = [(1, 64, 96), (1, 45, 70), (2, 37, 53), (1, 33, 47)]


def _with_statistics(model: torch.nn.Module) -> torch.nn.Module:
    """BatchNorm statistics from two random batches, so eval-mode logits are of a realistic scale."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(2, 3, 64, 64))
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_exported_files_match_pytorch_at_untraced_sizes(name, tmp_path):
    net = DeployModel(_with_statistics(MODELS[name]()))
    program = trace(net, channels=3, size=SIZES[0][1:])
    # The program as torch.export.save writes it (the save/load round trip, 8 s a model here, is the
    # command's own check in test_a_failed_check_keeps_the_older_file_and_the_program_loads_without_segtrain).
    loaded = program.module()
    to_onnx(program, opset=18, output_name="logits", metadata={"k": "v"}).save(str(tmp_path / "model.onnx"))
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch, height, width in SIZES:
        x = torch.randn(batch, 3, height, width)
        with torch.no_grad():
            reference = net(x)
            from_pt2 = loaded(x)
        from_onnx = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
        assert reference.shape == (batch, 3, height, width)
        torch.testing.assert_close(from_pt2, reference, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(from_onnx, reference, rtol=1e-3, atol=1e-4)


def test_uint8_lookup_normalises_as_the_eval_transform():
    mean, std = (0.3, 0.5, 0.7), (0.2, 0.25, 0.3)
    image = np.random.default_rng(0).integers(0, 256, (23, 31, 3), dtype=np.uint8)
    expected = torch.from_numpy(eval_transform(mean=mean, std=std)(image=image)["image"]).permute(2, 0, 1)
    net = DeployModel(torch.nn.Identity(), lut=normalisation_lut(mean, std))
    got = net.lut[torch.from_numpy(image).permute(2, 0, 1)[None].long() + net.offsets][0]
    assert torch.equal(got, expected)


def test_heads_and_sync_batchnorm():
    torch.manual_seed(0)
    model = _with_statistics(UNet(3, encoder=None, base_width=4))
    x = torch.randn(2, 3, 20, 28)
    with torch.no_grad():
        logits = model(x)
        synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(UNet(3, encoder=None, base_width=4))
        synced.load_state_dict(model.state_dict())
        deployed = DeployModel(synced.train())
        assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in deployed.modules())
        assert not deployed.training and torch.equal(deployed(x), logits)  # eval-mode BatchNorm, same numbers
        assert torch.equal(DeployModel(model, "probabilities")(x), logits.softmax(1))
        mask = DeployModel(model, "argmax")(x)
        assert mask.dtype == torch.uint8 and torch.equal(mask.long(), logits.argmax(1))
        assert DeployModel(model, "argmax", mask_dtype="int64")(x).dtype == torch.int64
    assert torch.equal(plain_batchnorm(torch.nn.SyncBatchNorm(4)).running_var, torch.ones(4))


def test_compare_fails_beyond_the_tolerances_and_the_class_mismatch_share():
    logits = torch.randn(1, 3, 40, 50, generator=torch.Generator().manual_seed(0))
    net = DeployModel(torch.nn.Identity())
    assert compare(logits, logits + 5e-5, net, rtol=1e-3, atol=1e-4, max_mismatch=1e-3).ok
    off = compare(logits, logits + 3e-4, net, rtol=1e-3, atol=1e-4, max_mismatch=1e-3)
    assert not off.ok and off.max_abs == pytest.approx(3e-4, rel=1e-3)
    flipped = logits.clone()
    flipped[0, :, 0, :3] = flipped[0, :, 0, :3].flip(0) + torch.tensor([0.0, 1.0, 2.0])[:, None]  # 3 pixels change
    check = compare(logits, flipped, net, rtol=1e9, atol=1e9, max_mismatch=1e-3)
    assert 0 < check.mismatch <= 3 / 2000 and check.ok == (check.mismatch <= 1e-3)
    mask_net = DeployModel(torch.nn.Identity(), head="argmax")
    labels = logits.argmax(1)
    changed = labels.clone()
    changed[0, 0, 0] = (changed[0, 0, 0] + 1) % 3  # 1 of 2000 pixels: 0.05%
    assert compare(labels, changed, mask_net, 1e-3, 1e-4, max_mismatch=1e-3).ok
    changed[0, 0, 1:3] = (changed[0, 0, 1:3] + 1) % 3  # 3 of 2000: 0.15%
    check = compare(labels, changed, mask_net, 1e-3, 1e-4, max_mismatch=1e-3)
    assert not check.ok and check.mismatch == pytest.approx(3 / 2000)
    assert not compare(labels, labels[:, :-1], mask_net, 1e-3, 1e-4, 1e-3).ok  # another shape


@pytest.fixture(scope="module")
def mask_model(trained, tmp_path_factory):
    """The trained checkpoint exported as uint8 in, argmax mask out, through the command."""
    path = tmp_path_factory.mktemp("export") / "mask.onnx"
    code = main([f"checkpoint={trained / 'run/checkpoints/last.pt'}", f"output={path}", "head=argmax",
                 "input=uint8", "size=64", "verify_size=[45,70]"])
    assert code == 0
    return path


@pytest.mark.slow
def test_mask_model_equals_predict_and_carries_metadata(trained, mask_model):
    meta = {p.key: p.value for p in onnx.load(mask_model).metadata_props}
    assert json.loads(meta["class_names"]) == ["background", "region", "spot"]
    assert json.loads(meta["mean"]) == [0.485, 0.456, 0.406] and meta["input_dtype"] == "uint8"
    assert meta["head"] == "argmax" and "torch.onnx.export(dynamo=True)" in meta["exporter"]
    assert len(json.loads(meta["palette"])) == 3 and meta["segtrain_version"]
    predictor = Predictor.from_checkpoint(trained / "run/checkpoints/last.pt", device="cpu")
    session = ort.InferenceSession(str(mask_model), providers=["CPUExecutionProvider"])
    images = sorted((trained / "data/images/val").glob("*.png"))
    assert images
    for path in images:
        image = read_image(path, 3)
        expected = predictor.labels(predictor(image)).numpy()
        got = session.run(None, {"image": image.transpose(2, 0, 1)[None]})[0][0]
        assert got.dtype == np.uint8 and got.shape == image.shape[:2]
        assert np.array_equal(got, expected), path.name


@pytest.mark.slow
def test_readme_onnx_snippet_segments_an_image(trained, mask_model, tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Exporting"):]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(snippet.strip().splitlines()) <= 10
    (tmp_path / "mask.onnx").write_bytes(mask_model.read_bytes())
    image = next((trained / "data/images/val").glob("*.png"))
    (tmp_path / "image.png").write_bytes(image.read_bytes())
    result = subprocess.run([sys.executable, "-c", "import sys; sys.modules['torch'] = None\n" + snippet],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    mask = np.asarray(Image.open(tmp_path / "mask.png"))
    session = ort.InferenceSession(str(mask_model), providers=["CPUExecutionProvider"])
    labels = session.run(None, {"image": read_image(image, 3).transpose(2, 0, 1)[None]})[0][0]
    palette = np.array(json.loads({p.key: p.value for p in onnx.load(mask_model).metadata_props}["palette"]))
    assert np.array_equal(mask, palette[labels].astype(np.uint8))


@pytest.mark.slow
def test_a_failed_check_keeps_the_older_file_and_the_program_loads_without_segtrain(trained, tmp_path,
                                                                                     monkeypatch, caplog):
    """format=torch_export with a planted difference in the loaded program: exit 1, the file and its JSON
    kept under the unverified name, the output written earlier untouched; the program needs no segtrain."""
    import segtrain.export as export

    out = tmp_path / "model.pt2"
    out.write_bytes(b"an earlier export")
    out.with_suffix(".json").write_text("{}")
    real = export.program_runner
    monkeypatch.setattr(export, "program_runner", lambda path: (lambda x, run=real(path): run(x) + 1e-3))
    assert main([f"checkpoint={trained / 'run/checkpoints/last.pt'}", "format=torch_export", f"output={out}",
                 "size=[40,72]", "verify_size=[45,70]", "head=probabilities"]) == 1
    assert out.read_bytes() == b"an earlier export" and out.with_suffix(".json").read_text() == "{}"
    assert "Expect archive file to be a file ending in .pt2" not in caplog.text  # written from memory, not a temp name
    staged = unverified_path(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.pt2", "model.unverified.json",
                                                          "model.unverified.pt2"]
    meta = json.loads(staged.with_suffix(".json").read_text())
    assert meta["head"] == "probabilities" and meta["label_names"] == ["background", "region", "spot"]
    assert meta["min_size"] == 33 and meta["mean"] == [0.485, 0.456, 0.406]
    script = ("import sys, torch\nm = torch.export.load(sys.argv[1]).module()\n"
              "p = m(torch.randn(2, 3, 51, 77))\nassert 'segtrain' not in sys.modules\n"
              "assert p.shape == (2, 3, 51, 77) and torch.allclose(p.sum(1), torch.ones(2, 51, 77))\n")
    result = subprocess.run([sys.executable, "-c", script, str(staged)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_bad_inputs_stop_before_anything_is_written(trained, tmp_path, capsys, monkeypatch):
    ckpt = trained / "run/checkpoints/last.pt"
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    cases = [
        (["format=tflite"], "format='tflite'"),
        (["head=softmax"], "head='softmax'"),
        (["input=rgb"], "input='rgb'"),
        ([f"output={tmp_path / 'missing/model.onnx'}"], "does not exist"),
        (["size=[64]"], "size="),
    ]
    for extra, expected in cases:
        assert main([f"checkpoint={ckpt}", f"output={tmp_path / 'm.onnx'}", *extra]) == 2
        assert expected in capsys.readouterr().err, extra
    assert main([f"checkpoint={foreign}", f"output={tmp_path / 'm.onnx'}"]) == 2
    assert "not a segtrain checkpoint" in capsys.readouterr().err
    assert main(["format=onnx"]) == 2 and "missing: checkpoint" in capsys.readouterr().err
    import segtrain.export as export

    seen = []
    monkeypatch.setattr(export, "export_checkpoint", lambda ecfg, overrides: seen.append(ecfg.verify) or True)
    assert main([f"checkpoint={ckpt}", "--no-verify"]) == 0 and main([f"checkpoint={ckpt}"]) == 0
    assert seen == [False, True]
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    assert main([f"checkpoint={ckpt}", f"output={tmp_path / 'm.onnx'}"]) == 2
    err = capsys.readouterr().err
    assert "needs onnxscript" in err and "pip install -e '.[export]'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign.pt"]
