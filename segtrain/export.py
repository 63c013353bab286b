"""``python -m segtrain.export checkpoint=<path> [format=onnx|torch_export] [output=<file>] [key=value ...]``

    python -m segtrain.export checkpoint=outputs/.../best.pt format=onnx output=model.onnx
    python -m segtrain.export checkpoint=... format=onnx head=argmax input=uint8   # mask out, raw RGB in
    python -m segtrain.export checkpoint=... format=torch_export output=model.pt2

One ``torch.export`` trace with dynamic batch, height and width (``segtrain.inference.deploy``) gives either
file: an ONNX model through torch's dynamo exporter (needs the ``export`` extra: onnx, onnxscript,
onnxruntime), or the ExportedProgram itself (``torch.export.save``; ``torch.export.load`` reads it
without segtrain). Class names, palette, mean/std, the input and output layout and the segtrain
version go into the ONNX ``metadata_props`` and, for .pt2, into a JSON file beside it.

The file is written first as ``<name>.unverified<suffix>`` (atomically), then run -- ONNX Runtime
or ``torch.export.load`` -- against the PyTorch model at the export size (batch 1) and at
``verify_size`` (batch 2); only when both agree (every value within ``rtol``/``atol``, at most
``max_mismatch`` of the pixels of another class) is it renamed to the output name, replacing an
older file in one step. Exit status 0 when written and verified (or ``verify=false``/``--no-verify``),
1 when the check failed (the file is kept under its unverified name, the older output untouched),
2 when nothing could be exported; errors are printed without a traceback; 75 when SIGTERM or Ctrl-C
stopped it (half-written and unverified files removed, the older output untouched).

``register=<name>`` (the ``mlflow`` extra) then puts the checkpoint, with the verified file and the run's model card,
into the MLflow model registry as a pyfunc model (``segtrain.tracking.registry``) at ``tracking_uri`` (null: the local
store under ``outputs/``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from segtrain.analysis.calibration import CalibratedModel
from segtrain.analysis.model_card import card_for, note_export
from segtrain.analysis.postprocess import PostProcess
from segtrain.atomic import atomic_write, atomic_write_serialized
from segtrain.build import model_from_checkpoint, palette_for
from segtrain.checkpoint import read_with_overrides, tensor_bytes
from segtrain.config import compose_config, split_overrides
from segtrain.config.checks import class_names_of, is_multilabel
from segtrain.errors import check_choice
from segtrain.inference.deploy import (HEADS, INPUTS, OUTPUT_NAMES, DeployModel, metadata, min_size, normalisation_lut,
                                       require_onnx, to_onnx, trace)
from segtrain.metrics import class_argmax
from segtrain.tracking.mlflow_run import check_uri
from segtrain.training.signals import STOPPED_EXIT_CODE, Interrupted, interrupt_on

log = logging.getLogger("segtrain.export")
SUFFIXES = {"onnx": ".onnx", "torch_export": ".pt2"}
USAGE = "usage: python -m segtrain.export checkpoint=<path> [format=onnx|torch_export] [output=<file>] [key=value ...]"
Runner = Callable[[np.ndarray], np.ndarray]


def _size(value, key: str) -> tuple[int, int]:
    size = [value, value] if isinstance(value, int) else list(value)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f"{key}={value}: expected a size > 0 or [height, width]")
    return size[0], size[1]


def output_path(ecfg: DictConfig) -> Path:
    """``output``, or the checkpoint's name with the format's suffix beside it; its folder must exist."""
    suffix = SUFFIXES[ecfg.format]
    path = Path(ecfg.output).expanduser() if ecfg.output else Path(ecfg.checkpoint).with_suffix(suffix)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output={path}: the folder {path.parent} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"output={path} is a folder; expected a file name such as {path / ('model' + suffix)}")
    return path


def unverified_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}.unverified{path.suffix}")


@dataclass
class Check:
    """One verification input: the largest differences between the file's output and PyTorch's."""

    shape: tuple[int, ...]
    max_abs: float | None  # None for a mask
    max_rel: float | None  # over values whose reference magnitude exceeds atol
    mismatch: float  # share of pixels whose class differs
    ok: bool

    def line(self) -> str:
        values = "" if self.max_abs is None else f"max abs diff {self.max_abs:.3g}, max rel diff {self.max_rel:.3g}, "
        return (f"output {'x'.join(map(str, self.shape))}: {values}{self.mismatch:.4%} of pixels of another class "
                f"-- {'ok' if self.ok else 'FAILED'}")


def _labels(output: torch.Tensor, net: DeployModel) -> torch.Tensor:
    """The classes of an output (multi-label: the per-channel decisions)."""
    if net.head == "argmax":
        return output.long()
    if net.multilabel:
        return (output if net.head == "probabilities" else output.float().sigmoid()) > 0.5
    return class_argmax(output)


def compare(reference: torch.Tensor, got: torch.Tensor, net: DeployModel, rtol: float, atol: float,
            max_mismatch: float) -> Check:
    """The file's output ``got`` against PyTorch's ``reference``: values (not for a mask) and classes."""
    if tuple(got.shape) != tuple(reference.shape):
        return Check(tuple(reference.shape), float("inf"), float("inf"), 1.0, False)
    mismatch = (_labels(got, net) != _labels(reference, net)).float().mean()
    max_abs = max_rel = None
    close = True
    if net.head != "argmax":
        diff = (got.double() - reference.double()).abs()
        max_abs = float(diff.max())
        large = reference.abs() > atol
        max_rel = float((diff[large] / reference.double().abs()[large]).max()) if large.any() else 0.0
        close = bool((diff <= atol + rtol * reference.double().abs()).all())
    return Check(tuple(reference.shape), max_abs, max_rel, float(mismatch), close and float(mismatch) <= max_mismatch)


def verify(net: DeployModel, run: Runner, channels: int, sizes: list[tuple[int, int]], ecfg: DictConfig) -> list[Check]:
    """``run`` (the written file) against ``net`` in PyTorch: batch 1 at the first size, 2 at the others."""
    checks = []
    for index, size in enumerate(sizes):
        x = net.example(channels, size, batch=1 if index == 0 else 2, seed=index + 1)
        with torch.no_grad():
            reference = net(x)
        got = torch.from_numpy(np.asarray(run(x.numpy())))
        checks.append(compare(reference, got, net, ecfg.rtol, ecfg.atol, ecfg.max_mismatch))
    return checks


def onnx_runner(path: Path, threads: int | None = None) -> Runner:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def program_runner(path: Path) -> Runner:
    module = torch.export.load(str(path)).module()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()

    return run


def _check_config(ecfg: DictConfig) -> None:
    check_choice("format", ecfg.format, tuple(SUFFIXES))
    check_choice("head", ecfg.head, HEADS)
    check_choice("input", ecfg.input, INPUTS)
    for key in ("rtol", "atol", "max_mismatch"):
        if not isinstance(ecfg[key], (int, float)) or ecfg[key] < 0:
            raise ValueError(f"{key}={ecfg[key]!r}: expected a number >= 0")


def write_files(program: torch.export.ExportedProgram, ecfg: DictConfig, meta: dict, staged: Path,
                path: Path) -> dict[Path, Path]:
    """The file (and a .pt2's JSON metadata) written atomically at ``staged``; {written: final name}."""
    if ecfg.format == "onnx":
        log.info("converting to ONNX: %s", meta["exporter"])
        onnx_program = to_onnx(program, int(ecfg.opset), OUTPUT_NAMES[ecfg.head], meta)
        atomic_write(staged, lambda tmp: onnx_program.save(str(tmp), external_data=False),
                     size_hint=tensor_bytes(program.state_dict))
        return {staged: path}
    # Into memory first: torch.export's archive writer, failing on a full disk, aborts the process at exit.
    atomic_write_serialized(staged, lambda buffer: torch.export.save(program, buffer))
    atomic_write(staged.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(meta, indent=2) + "\n"))
    return {staged: path, staged.with_suffix(".json"): path.with_suffix(".json")}


def export_checkpoint(ecfg: DictConfig, model_overrides: list[str]) -> bool:
    """Trace, write, verify and name the file ``ecfg`` asks for; True when verified (or not asked to be)."""
    _check_config(ecfg)
    size, verify_size = _size(ecfg.size, "size"), _size(ecfg.verify_size, "verify_size")
    versions = require_onnx() if ecfg.format == "onnx" else {}
    if ecfg.register:  # before the trace: a missing extra or a registration without a verified file stops here
        if not ecfg.verify:
            raise ValueError(f"register={ecfg.register}: the registry takes a verified export; leave verify on")
        check_uri(ecfg.tracking_uri)
    path = output_path(ecfg)
    saved, cfg = read_with_overrides(ecfg.checkpoint, model_overrides)
    ds, channels = cfg.dataset, int(cfg.model.in_channels)
    if ds.val_resize is not None:
        log.warning("dataset.val_resize=%s is not part of the exported graph, which runs the model at the "
                    "input's own size: resize or pad before calling it, as segtrain.predict does", ds.val_resize)
    lut = normalisation_lut(ds.mean, ds.std) if ecfg.input == "uint8" else None
    net = DeployModel(model_from_checkpoint(saved, cfg), ecfg.head, lut, ecfg.mask_dtype, is_multilabel(ds))
    if min(*size, *verify_size) < min_size(net):
        raise ValueError(f"size={list(size)}, verify_size={list(verify_size)}: both must be at least "
                         f"{min_size(net)} pixels a side for this model (its stride + 1)")
    class_names = class_names_of(ds)
    if ecfg.head == "argmax" and ecfg.mask_dtype == "uint8" and len(class_names) > 256:
        raise ValueError(f"mask_dtype=uint8 holds 256 labels, the model has {len(class_names)}: use mask_dtype=int64")
    log.info("tracing %s (%s, %d parameters) with torch.export %s at 2x%dx%dx%d, dynamic batch, height and width",
             saved.path, type(net.model).__name__, sum(p.numel() for p in net.parameters()), torch.__version__,
             channels, *size)
    program = trace(net, channels, size)
    exporter = (f"torch.onnx.export(dynamo=True) {torch.__version__}, onnxscript {versions['onnxscript']}, "
                f"opset {ecfg.opset}" if ecfg.format == "onnx" else f"torch.export {torch.__version__}")
    meta = metadata(class_names=class_names, palette=palette_for(cfg, len(class_names)),
                    mean=ds.mean, std=ds.std, net=net, channels=channels, exporter=exporter, checkpoint=str(saved.path))
    if isinstance(net.model, CalibratedModel):  # logits / temperature + bias are part of the graph
        meta["calibration"] = {key: saved.calibration[key] for key in ("temperature", "bias", "objective")}
        if net.multilabel:  # each channel's bias is its tuned threshold on the temperature-scaled probability
            meta["calibration"]["thresholds"] = saved.calibration.get("thresholds")
        if saved.calibration.get("postprocess"):  # not graph ops: the rules, for the deployment to apply (README)
            meta["postprocess"] = PostProcess.from_dict(saved.calibration["postprocess"], class_names).to_dict(
                class_names)
    card = card_for(saved.path)  # the run's model_card.md (written when missing); None outside a run directory
    if card is not None:
        meta["model_card"] = card.read_text()
    if not ecfg.verify:
        write_files(program, ecfg, meta, path, path)
        log.info("wrote %s, not verified (verify=false)", path)
        note_export(card, path, saved.path, ecfg.format, ecfg.head, meta["input_dtype"], "not verified (verify=false)")
        return True
    staged = unverified_path(path)
    try:
        staged_files = write_files(program, ecfg, meta, staged, path)
        run = onnx_runner(staged) if ecfg.format == "onnx" else program_runner(staged)
        checks = verify(net, run, channels, [size, verify_size], ecfg)
    except Interrupted:  # a signal before the check ended: no unverified file left behind
        for leftover in (staged, *([staged.with_suffix(".json")] if ecfg.format == "torch_export" else [])):
            leftover.unlink(missing_ok=True)
        raise
    for check in checks:
        log.info("verify %s", check.line())
    if not all(check.ok for check in checks):
        log.error("%s does not reproduce the PyTorch model (rtol %g, atol %g, max mismatch %g): kept as %s, "
                  "%s left as it was", ecfg.format, ecfg.rtol, ecfg.atol, ecfg.max_mismatch, staged, path)
        return False
    for source, target in staged_files.items():
        os.replace(source, target)
    note_export(card, path, saved.path, ecfg.format, ecfg.head, meta["input_dtype"],
                "verified: " + "; ".join(check.line() for check in checks))
    log.info("wrote %s (verified with %s)", path, "ONNX Runtime" if ecfg.format == "onnx" else "torch.export.load")
    if ecfg.register:
        from segtrain.tracking.registry import register_checkpoint  # MLflow's pyfunc: imported only to register

        files = {"export": path, **({"model_card": card} if card is not None else {})}
        info = {key: value for key, value in meta.items() if key != "model_card"}
        model_uri = register_checkpoint(saved.path, str(ecfg.register), ecfg.tracking_uri, info, files)
        log.info("registered as %s: mlflow.pyfunc.load_model(%r).predict(image) gives the masks", model_uri,
                 model_uri)
    return True


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    for name in ("onnxscript", "onnx_ir"):  # a line per optimisation pass otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    no_verify = "--no-verify" in argv
    argv = [arg for arg in argv if arg != "--no-verify"] + (["verify=false"] if no_verify else [])
    try:
        model_overrides, run_overrides = split_overrides(argv)
        ecfg = compose_config(run_overrides, config_name="export")
        if OmegaConf.is_missing(ecfg, "checkpoint"):
            print(f"{USAGE}\nmissing: checkpoint", file=sys.stderr)
            return 2
        with interrupt_on():  # SIGTERM, Ctrl-C: out at once, half-written files removed on the way
            verified = export_checkpoint(ecfg, model_overrides)
    except Interrupted as stop:
        print(f"{stop}: nothing written, an older output left as it was; run the export again", file=sys.stderr)
        return STOPPED_EXIT_CODE
    except (OSError, ValueError, RuntimeError, ImportError, HydraException, OmegaConfBaseException) as err:
        # Each of these names the file, key or value at fault; a traceback would only bury it.
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0 if verified else 1


if __name__ == "__main__":
    sys.exit(main())
