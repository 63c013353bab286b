"""``python -m segtrain.evaluate checkpoint=<path> [overrides ...]``: score a checkpoint.

The run's own config comes from the checkpoint. Overrides use the training command's syntax
and replace only what they name: ``dataset=folder dataset.root=/data/other`` swaps the dataset
and keeps the model, loss and class weights the checkpoint was trained with;
``dataset.split=test`` scores another split.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from segtrain.checkpoint import load_checkpoint
from segtrain.data import pad_collate
from segtrain.engine import Runtime, evaluate
from segtrain.losses import build_loss
from segtrain.metrics import flatten_metrics, format_table
from segtrain.train import (build_model, build_split, class_names_of, resolve_amp, resolve_device,
                            resolve_num_workers)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
USAGE = "usage: python -m segtrain.evaluate checkpoint=<path/to/last.pt> [key=value | group=option ...]"


def apply_overrides(saved: DictConfig, saved_overrides: list[str], overrides: list[str]) -> DictConfig:
    """``saved`` with the keys and groups named by ``overrides`` taken from a fresh composition
    of the training command's overrides followed by these ones."""
    if not overrides:
        return saved
    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    named = {o.key_or_group for o in parsed}
    kept = [o.input_line for o in parser.parse_overrides(saved_overrides)
            if o.key_or_group not in named and not o.key_or_group.startswith("hydra")]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        fresh = compose(config_name="train", overrides=kept + overrides)
    merged = saved.copy()
    for key in sorted(named):
        OmegaConf.update(merged, key, OmegaConf.select(fresh, key), merge=False)
    return merged


def evaluate_checkpoint(path: str | Path, overrides: list[str] | None = None) -> tuple[dict, list[str]]:
    """Metrics of the checkpoint on the configured split: (ConfusionMatrix.compute() + loss, class names)."""
    ckpt = load_checkpoint(path)
    cfg = apply_overrides(OmegaConf.create(ckpt["config"]), ckpt.get("overrides", []), overrides or [])
    ds, tr = cfg.dataset, cfg.trainer
    class_names = class_names_of(ds)
    device = resolve_device(tr.device)
    rt = Runtime(device, resolve_amp(tr.amp, device), tr.channels_last)
    split = build_split(ds, ds.get("split") or ds.val_split, train=False)
    loader = torch.utils.data.DataLoader(
        split, batch_size=ds.batch_size_val, shuffle=False, num_workers=resolve_num_workers(tr.num_workers, device),
        collate_fn=lambda batch: pad_collate(batch, ds.ignore_index))
    model = build_model(cfg.model)
    model.load_state_dict(ckpt["model"])
    model.to(device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = build_loss(cfg.loss, ckpt.get("class_weights"), num_classes=ds.num_classes,
                         ignore_index=ds.ignore_index).to(device)
    result = evaluate(model, loader, loss_fn, rt, ds.num_classes, ds.ignore_index)
    return result.metrics, class_names


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    paths = [a.split("=", 1)[1] for a in argv if a.startswith("checkpoint=")]
    if len(paths) != 1:
        print(USAGE, file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    overrides = [a for a in argv if not a.startswith("checkpoint=")]
    metrics, class_names = evaluate_checkpoint(paths[0], overrides)
    print(f"{paths[0]}:")
    print(format_table(metrics, class_names))
    print(f"loss {metrics['loss']:.4f}")
    print("metrics: " + json.dumps(flatten_metrics(metrics, class_names, "val")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
