"""A checkpoint ready to segment images in memory: what ``segtrain.predict`` runs on every file, and what a
registered MLflow model runs (``segtrain.tracking.registry``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from segtrain import distributed
from segtrain.analysis.postprocess import PostProcess
from segtrain.build import eval_transform_of, model_from_checkpoint
from segtrain.checkpoint import read_with_overrides
from segtrain.config.checks import class_names_of
from segtrain.config.options import inference_options
from segtrain.inference.postprocessing import apply_to_probabilities, rules_of
from segtrain.inference.windows import InferenceOptions, check_tile, labels_of, predict_probs


class Predictor:
    """A checkpoint ready to segment images: its model on a device, its normalisation and options.

        predictor = Predictor.from_checkpoint("outputs/.../best.pt", ["inference.mode=slide"])
        probs = predictor(image)            # (H, W, C) uint8 -> (K, H, W) float32 probabilities
        labels = predictor.labels(probs)    # (H, W) int64 class indices; multi-label: (K, H, W) bool
    """

    def __init__(self, model: torch.nn.Module, cfg: DictConfig, options: InferenceOptions, device: torch.device,
                 postprocess: PostProcess | None = None):
        check_tile(options, model)
        self.postprocess = postprocess  # a calibrated checkpoint's component rules, applied by ``labels``
        self.model, self.cfg, self.options, self.device = model.eval(), cfg, options, device
        self.class_names = class_names_of(cfg.dataset)
        self.in_channels = int(cfg.model.in_channels)
        self.transform = eval_transform_of(cfg.dataset)
        self.val_resize = cfg.dataset.val_resize

    @classmethod
    def from_checkpoint(cls, path: str | Path, overrides: list[str] | None = None, device: str = "auto") -> Predictor:
        saved, cfg = read_with_overrides(path, overrides)
        target = distributed.device_for(device)
        model = model_from_checkpoint(saved, cfg)  # first: its class count checked against the dataset's, named
        rules = rules_of(saved.calibration, cfg, class_names_of(cfg.dataset))
        return cls(model.to(target), cfg, inference_options(cfg, target), target, rules)

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        """(K, H, W) float32 probabilities of an (H, W, C) uint8 image, at the image's size."""
        if image.ndim != 3 or image.shape[-1] != self.in_channels:
            raise ValueError(f"image of shape {image.shape}: expected (H, W, {self.in_channels}) (model.in_channels)")
        # Contiguous (C, H, W), as the evaluation loader's batches are: the same kernels, the same numbers.
        x = torch.from_numpy(self.transform(image=image)["image"]).permute(2, 0, 1).contiguous().to(self.device)
        probs = predict_probs(self.model, x, self.options)
        height, width = image.shape[:2]
        if probs.shape[-2:] != (height, width):
            if isinstance(self.val_resize, int):  # dataset.val_resize=<int>: back to the image's size
                probs = torch.nn.functional.interpolate(probs[None], size=(height, width), mode="bilinear",
                                                        align_corners=False)[0]
            else:  # pad32: the padding is cut off
                probs = probs[:, :height, :width]
        return probs

    @property
    def multilabel(self) -> bool:
        return self.options.multilabel

    def labels(self, probs: torch.Tensor) -> torch.Tensor:
        """(H, W) class indices, or a multi-label model's (C, H, W) decisions: probability > 0.5 (a calibrated
        checkpoint's tuned thresholds are in its bias, which the probabilities already hold), post-processed by the
        checkpoint's rules when it has some (on the CPU)."""
        if self.postprocess is not None:
            return apply_to_probabilities(probs, self.postprocess, self.multilabel)
        return probs > 0.5 if self.multilabel else labels_of(probs)
