"""A checkpoint on a labelled split, set up once for the commands that score it (evaluate, calibrate).

    run = CheckpointOnSplit.open("best.pt", ["dataset.split=test"])   # model, options, class names; no data read
    run.read_split()                                                  # the split checked, its loader, the model placed

Opening reads and checks the checkpoint (its stored config, its classes against the dataset given, the tiles),
so a command can check its own options (calibrate's objective) before the data pass; ``read_split`` then reads
the split (generating a synthetic one only at a root the user gave) and places the model on the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from segtrain.build.data import eval_loader, eval_split
from segtrain.build.model import inference_runtime, model_from_checkpoint, place_model, resolve_num_workers
from segtrain.checkpoint import SavedModel, read_with_overrides
from segtrain.config.checks import class_names_of
from segtrain.config.options import AnalysisOptions, analysis_options
from segtrain.data import FolderDataset
from segtrain.data.scan_cache import counts_cache_in
from segtrain.inference import InferenceOptions, check_tile
from segtrain.inference.postprocessing import rules_of
from segtrain.runtime import Runtime


@dataclass
class CheckpointOnSplit:
    saved: SavedModel
    cfg: DictConfig  # the checkpoint's config with the command line's overrides
    analysis: AnalysisOptions
    class_names: list[str]
    runtime: Runtime  # predict's precision (inference.amp): the numbers predict gives on this machine
    inference: InferenceOptions
    model: torch.nn.Module  # on the CPU until read_split, then on the runtime's device
    workers: int
    split: FolderDataset | None = None
    loader: torch.utils.data.DataLoader | None = None

    @property
    def postprocess(self):
        """The checkpoint's post-processing rules as evaluate applies them (None: none, or switched off)."""
        return rules_of(self.saved.calibration, self.cfg, self.class_names)

    @classmethod
    def open(cls, path: str | Path, overrides: list[str] | None = None) -> CheckpointOnSplit:
        saved, cfg = read_with_overrides(path, overrides)
        runtime, inference = inference_runtime(cfg)
        model = model_from_checkpoint(saved, cfg)  # its class count checked before any pass over the data
        check_tile(inference, model)
        return cls(saved, cfg, analysis_options(cfg), class_names_of(cfg.dataset), runtime, inference, model,
                   resolve_num_workers(cfg.trainer.num_workers, runtime.device))

    def read_split(self) -> CheckpointOnSplit:
        ds = self.cfg.dataset
        with counts_cache_in(ds.get("cache_dir")):  # dataset.cache_dir: eval_split's pass takes no such key
            self.split = eval_split(ds, ds.split or ds.val_split, self.workers,
                                    generate=self.saved.user_gave("dataset.root"))
        self.loader = eval_loader(self.split, ds, self.workers)
        self.model = place_model(self.model, self.runtime)
        return self
