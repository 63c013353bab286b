"""Build a CompositeLoss from the ``loss`` config group (configs/loss/*.yaml)."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from segtrain.errors import choice_message
from segtrain.losses.composite import CompositeLoss
from segtrain.losses.cross_entropy import CrossEntropyLoss, OhemCrossEntropyLoss
from segtrain.losses.dice import DiceLoss, GeneralizedDiceLoss
from segtrain.losses.focal import FocalLoss
from segtrain.losses.functional import as_class_weights
from segtrain.losses.lovasz import LovaszSoftmaxLoss
from segtrain.losses.multilabel import MultilabelBCELoss, MultilabelDiceLoss, MultilabelFocalLoss
from segtrain.losses.tversky import TverskyLoss

# Term name -> class, for softmax models of two classes or more (binary data: background and foreground).
# The one-channel sigmoid losses (BinaryFocalLoss, ...) are library modules for code of one's own, not config terms.
LOSS_REGISTRY: dict[str, type[nn.Module]] = {
    "ce": CrossEntropyLoss,
    "focal": FocalLoss,
    "dice": DiceLoss,
    "ohem": OhemCrossEntropyLoss,
    "gdice": GeneralizedDiceLoss,
    "tversky": TverskyLoss,
    "lovasz": LovaszSoftmaxLoss,
}
# Term name -> class for multi-label models (build_loss(..., multilabel=True)): one sigmoid per channel.
# focal and dice take the options of their softmax namesakes, so configs/loss/focal_dice.yaml works in both modes.
MULTILABEL_REGISTRY: dict[str, type[nn.Module]] = {
    "bce": MultilabelBCELoss,
    "focal": MultilabelFocalLoss,
    "dice": MultilabelDiceLoss,
}
# Keys of a term that build_loss reads itself; every other key goes to the constructor.
TERM_KEYS = ("loss_weight", "use_class_weights")


def build_loss(
    loss_cfg: Mapping[str, Any] | DictConfig,
    class_weights: torch.Tensor | Sequence[float] | None = None,
    num_classes: int | None = None,
    ignore_index: int | None = 255,
    fuse: bool = True,
    multilabel: bool = False,
) -> CompositeLoss:
    """Build the weighted sum of the terms in ``loss_cfg["terms"]``.

        cfg = {"terms": {"focal": {"loss_weight": 1.0, "gamma": 2.0}, "dice": {"loss_weight": 1.0}}}
        loss_fn = build_loss(cfg, class_weights, num_classes=5).to(device)
        out = loss_fn(logits, masks)  # {"loss": focal + dice, "focal": ..., "dice": ...}

    Term names are the keys of LOSS_REGISTRY, or of MULTILABEL_REGISTRY with ``multilabel=True``
    (logits (N, C, H, W) with one sigmoid per channel, target (N, C, H, W) of 0, 1 and ignore_index;
    ``class_weights`` are then the positive-class weights of the channels).
    Per term, ``loss_weight`` (default 1.0) scales it in the sum and ``use_class_weights``
    (default true) lets ``class_weights`` reach it when its class takes a ``weight``; every
    other key is a constructor argument. ``ignore_index`` goes to every term. The terms are
    computed as ``CompositeLoss`` does: a focal/CE + Dice pair fused unless ``fuse=False``.
    """
    terms_cfg = _terms_of(loss_cfg)
    # A multi-label model of one channel is valid (one sigmoid mask); a softmax model needs two classes.
    minimum, why = (1, "one sigmoid channel per class") if multilabel else (2, "binary data: background and foreground")
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < minimum):
        raise ValueError(f"num_classes must be an integer >= {minimum} ({why}) or None, got {num_classes!r}")
    class_weights = as_class_weights(class_weights)
    if class_weights is not None and num_classes is not None and len(class_weights) != num_classes:
        raise ValueError(f"class_weights has {len(class_weights)} entries but num_classes is {num_classes}")
    registry = MULTILABEL_REGISTRY if multilabel else LOSS_REGISTRY
    terms = {
        name: _build_term(str(name), term_cfg, registry, class_weights, num_classes, ignore_index)
        for name, term_cfg in terms_cfg.items()
    }
    return CompositeLoss(terms, fuse=fuse)


def _terms_of(loss_cfg: Mapping[str, Any] | DictConfig) -> Mapping[str, Any]:
    if isinstance(loss_cfg, DictConfig):
        loss_cfg = OmegaConf.to_container(loss_cfg, resolve=True)
    if not isinstance(loss_cfg, Mapping):
        raise TypeError(f"loss config must be a mapping with a 'terms' key, got {type(loss_cfg).__name__}")
    extra = sorted(set(loss_cfg) - {"terms"})
    if extra:
        raise ValueError(f"loss config: unknown key(s) {extra}; the only key is 'terms' (see configs/loss/)")
    terms = loss_cfg.get("terms")
    if not isinstance(terms, Mapping) or not terms:
        raise ValueError(f"loss config: 'terms' must be a non-empty mapping of term name -> options, got {terms!r}")
    return terms


def _build_term(
    name: str,
    term_cfg: Mapping[str, Any] | None,
    registry: Mapping[str, type[nn.Module]],
    class_weights: torch.Tensor | None,
    num_classes: int | None,
    ignore_index: int | None,
) -> tuple[nn.Module, float]:
    if name not in registry:
        raise ValueError(_unknown_term_message(name, registry))
    if term_cfg is not None and not isinstance(term_cfg, Mapping):
        raise ValueError(f"loss term {name!r}: expected a mapping of options, got {term_cfg!r}")
    options = dict(term_cfg or {})
    loss_weight = _loss_weight_of(name, options)
    use_class_weights = options.pop("use_class_weights", True)
    if not isinstance(use_class_weights, bool):
        raise ValueError(f"loss term {name!r}: use_class_weights must be true or false, got {use_class_weights!r}")

    cls = registry[name]
    params = inspect.signature(cls).parameters
    # weight and ignore_index come from build_loss's arguments, once for every term.
    accepted = [p for p in params if p not in ("weight", "ignore_index")]
    for key in options:
        if key not in accepted:
            hint = "; ignore_index is set for all terms by the dataset" if key == "ignore_index" else ""
            raise ValueError(
                f"loss term {name!r} ({cls.__name__}): unknown option {key!r}{hint}; "
                f"valid options: {', '.join([*TERM_KEYS, *accepted])}"
            )
    if "weight" in params and use_class_weights and class_weights is not None:
        options["weight"] = class_weights
    if "ignore_index" in params:
        options["ignore_index"] = ignore_index
    return cls(**options), loss_weight


def _unknown_term_message(name: str, registry: Mapping[str, type[nn.Module]]) -> str:
    """Why ``name`` is not a term here; a term of the other mode says which mode it belongs to."""
    if registry is MULTILABEL_REGISTRY and name in LOSS_REGISTRY:
        return (f"loss.terms={name!r} is a softmax loss; multi-label data trains one sigmoid per channel: use bce "
                f"(loss=bce or bce_dice); multi-label terms: {', '.join(sorted(registry))}")
    if registry is LOSS_REGISTRY and name in MULTILABEL_REGISTRY:
        return (f"loss.terms={name!r}: {name} is the multi-label loss (dataset.regions or "
                f"dataset.layout=binary_masks); softmax models use ce")
    return choice_message("loss.terms", name, sorted(registry), "is not a loss term")


def _loss_weight_of(name: str, options: dict) -> float:
    """Pop the term's multiplier; named ``weight`` in segtrain 0.1, one layer from the class weights."""
    if "weight" in options:
        if "loss_weight" in options:
            raise ValueError(f"loss term {name!r}: both loss_weight and its old name weight are set; keep loss_weight")
        warnings.warn(f"loss.terms.{name}.weight is deprecated and stops working in the release after next: the term's "
                      f"multiplier is now loss.terms.{name}.loss_weight (class weights come from weights=...)",
                      FutureWarning, stacklevel=4)
        return options.pop("weight")
    return options.pop("loss_weight", 1.0)
