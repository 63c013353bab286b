"""A calibrated checkpoint's post-processing rules where predictions are made: evaluate's batches, predict's images,
and the tuning split's predictions that ``segtrain.calibrate postprocess.tune=true`` fits them on.

The rules (``segtrain.analysis.postprocess``) act on the final label map, after sliding windows, test-time
augmentation and the decision bias; they need each pixel's second most probable class for the pixels they take
from a class. Connected components are a CPU operation: on a GPU the labels move to the host once per image.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from segtrain.analysis.postprocess import PostProcess, apply, apply_channels, top_two
from segtrain.inference.windows import InferenceOptions, scored_logits
from segtrain.metrics import decide

log = logging.getLogger(__name__)


def rules_of(calibration: dict | None, cfg, class_names: list[str]) -> PostProcess | None:
    """The rules a checkpoint's ``calibration`` entry holds as ``cfg`` applies them: None when it has none, or with
    ``inference.calibrated=false`` or ``postprocess.enabled=false``."""
    postprocess = cfg.get("postprocess")
    enabled = cfg.inference.calibrated and (postprocess is None or postprocess.enabled)
    if not enabled or not calibration or not calibration.get("postprocess"):
        return None
    return PostProcess.from_dict(calibration["postprocess"], class_names)


def apply_to_batch(logits: torch.Tensor, preds: torch.Tensor, rules: PostProcess, multilabel: bool = False
                   ) -> torch.Tensor:
    """``preds`` (N, H, W) labels, or multi-label (N, C, H, W) decisions, with the rules applied image by image."""
    out = []
    for scores, labels in zip(logits, preds):
        if multilabel:
            out.append(torch.from_numpy(apply_channels(labels.cpu().numpy(), rules)))
        else:
            top, second = top_two(scores.float())
            out.append(torch.from_numpy(apply(top, second, rules)))
    return torch.stack(out).to(preds.device, preds.dtype)


def apply_to_probabilities(probs: torch.Tensor, rules: PostProcess, multilabel: bool = False) -> torch.Tensor:
    """One image's (K, H, W) probabilities -> its post-processed labels (H, W) (multi-label: (C, H, W) decisions)."""
    if multilabel:
        return torch.from_numpy(apply_channels((probs > 0.5).cpu().numpy(), rules))
    top, second = top_two(probs.float())
    return torch.from_numpy(apply(top, second, rules))


@torch.no_grad()
def split_predictions(model, loader, rt, calibration, multilabel: bool = False,
                      inference: InferenceOptions | None = None) -> list[tuple[np.ndarray, ...]]:
    """Every image of ``loader`` as the rules' tuning sees it: (labels, second class, truth) numpy maps, or for a
    multi-label model ((C, H, W) decisions, (C, H, W) truth), the logits under ``calibration`` (a
    ``LogitCalibration``, or None). Images are taken as evaluate scores them, a batch's padding included (ignored in
    the truth)."""
    model.eval()
    samples = []
    for images, masks in loader:
        images, masks = rt.to_device(images, masks)
        with rt.autocast():
            raw = scored_logits(model, images, masks.shape[-2:], inference)
        logits = raw.float() if calibration is None else calibration.to(raw.device)(raw.float())
        for scores, truth in zip(logits, masks):
            truth = truth.cpu().numpy()
            if multilabel:
                samples.append((decide(scores[None], True)[0].cpu().numpy(), truth))
            else:
                top, second = top_two(scores)
                samples.append((top, second, truth.astype(np.int64)))
    return samples
