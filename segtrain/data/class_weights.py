"""Class-weight strategies computed once from training-set statistics.

    stats = compute_class_stats(train_dataset, num_classes, ignore_index=255)
    class_weights = compute_class_weights(stats, **cfg.weights)   # (C,) float32

| strategy        | weight of class c                                                    |
|-----------------|----------------------------------------------------------------------|
| none            | 1                                                                    |
| inverse_freq    | total_pixels / pixel_count[c]                                        |
| sqrt_inv_freq   | sqrt(total_pixels / pixel_count[c])                                  |
| median_freq     | median(freq) / freq[c], freq[c] = pixel_count[c] / present_pixel_count[c] |
|                 | (Eigen & Fergus 2015; median over classes present in training)       |
| enet            | 1 / ln(k + pixel_count[c] / total_pixels), k = 1.02 (Paszke et al. 2016) |
| effective_num   | (1 - beta) / (1 - beta^n_c), n_c = pixels or images (Cui et al. 2019) |
| manual          | the user's ``values``                                                |

Then, for every strategy: a class with no training pixel gets 0 (``absent="zero"``, with a
warning) or stops the run (``absent="error"``); ``normalize="mean"`` rescales so that the
mean over present classes is 1; ``max_weight`` clips last. Math runs in float64.

Weights are computed once from the whole training split and never per batch: a class
missing from a small batch has a batch frequency of 0, so inverse-frequency style weights
for it would be infinite (or, smoothed, huge), and the loss scale would jump from batch to
batch with the sampling noise rather than reflect the real imbalance.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from segtrain.data.class_stats import ClassStats, compute_class_stats
from segtrain.errors import check_choice

__all__ = [
    "ClassStats",
    "STRATEGIES",
    "channel_table",
    "compute_channel_weights",
    "compute_class_stats",
    "compute_class_weights",
    "weights_table",
]

STRATEGIES = ("none", "inverse_freq", "sqrt_inv_freq", "median_freq", "enet", "effective_num", "manual")
NORMALIZE = ("none", "mean")
ABSENT = ("zero", "error")
COUNT = ("pixels", "images")


def _check_choice(name: str, value: object, options: Sequence[str]) -> None:
    check_choice(f"weights.{name}", value, options)


def _class_label(c: int, class_names: Sequence[str] | None) -> str:
    return f"class {c} ({class_names[c]!r})" if class_names is not None else f"class {c}"


def _manual_values(values: Sequence[float] | None, num_classes: int) -> np.ndarray:
    if values is None:
        raise ValueError("weights.strategy='manual' needs weights.values: one weight per class")
    out = np.asarray(list(values), dtype=np.float64)
    if out.ndim != 1 or out.size != num_classes:
        raise ValueError(
            f"weights.values has {out.size} entries but num_classes is {num_classes}: give one weight per class"
        )
    if not np.isfinite(out).all() or (out < 0).any():
        raise ValueError(f"weights.values must be finite and >= 0, got {out.tolist()}")
    return out


def _raw_weights(stats: ClassStats, strategy: str, present: np.ndarray, beta: float, count: str, k: float):
    """Unnormalised float64 weights; only entries where ``present`` is True are meaningful."""
    # Absent classes get a dummy denominator of 1 so no division by zero ever happens;
    # their weight is overwritten by the ``absent`` policy afterwards.
    pixels = np.where(present, stats.pixel_count, 1).astype(np.float64)
    if strategy == "none":
        return np.ones(stats.num_classes)
    if strategy == "inverse_freq":
        return stats.total_pixels / pixels
    if strategy == "sqrt_inv_freq":
        return np.sqrt(stats.total_pixels / pixels)
    if strategy == "median_freq":
        freq = stats.present_frequency
        return np.median(freq[present]) / np.where(present, freq, 1.0)
    if strategy == "enet":
        return 1.0 / np.log(k + stats.pixel_count / stats.total_pixels)
    if strategy == "effective_num":
        n = stats.pixel_count if count == "pixels" else stats.image_count
        n = np.where(present, n, 1).astype(np.float64)
        # 1 - beta^n via expm1: beta^n is within 1e-4 of 1 for small n, where 1 - beta**n
        # would lose digits to cancellation.
        exponent = n * math.log(beta)
        if exponent[present].max() < -20.0:
            warnings.warn(
                f"effective_num with beta={beta} and count={count!r}: beta^n is below 2e-9 for every "
                f"class (smallest n = {int(n[present].min())}), so all weights equal 1 - beta and nothing "
                "is balanced; use count=images or a beta closer to 1 (about 1 - 1/n)",
                stacklevel=3,
            )
        return (1.0 - beta) / -np.expm1(exponent)
    raise AssertionError(strategy)  # unreachable: the strategy was checked by the caller


def _check_options(strategy, normalize, max_weight, absent, beta, count, k, values) -> None:
    _check_choice("strategy", strategy, STRATEGIES)
    _check_choice("normalize", normalize, NORMALIZE)
    _check_choice("absent", absent, ABSENT)
    _check_choice("count", count, COUNT)
    if max_weight is not None and not (math.isfinite(max_weight) and max_weight > 0):
        raise ValueError(f"weights.max_weight must be null or a finite number > 0, got {max_weight!r}")
    if not 0.0 < beta < 1.0:
        raise ValueError(f"weights.beta must be in (0, 1) (Cui et al. use 0.9999), got {beta!r}")
    if not k > 1.0:
        raise ValueError(f"weights.k must be > 1 so that ln(k + freq) > 0 (ENet uses 1.02), got {k!r}")
    if values is not None and strategy != "manual":
        # Most likely weights.values was set but the strategy was left at its default.
        raise ValueError(f"weights.values is only used by strategy 'manual', not {strategy!r}")


def compute_class_weights(
    stats: ClassStats,
    strategy: str,
    *,
    normalize: str = "none",
    max_weight: float | None = None,
    absent: str = "zero",
    beta: float = 0.9999,
    count: str = "images",
    k: float = 1.02,
    values: Sequence[float] | None = None,
    class_names: Sequence[str] | None = None,
) -> torch.Tensor:
    """Per-class loss weights, a float32 tensor of shape (num_classes,).

    ``strategy`` is one of STRATEGIES (table in the module docstring); the keyword options
    match the keys of ``configs/weights/*.yaml`` so that ``compute_class_weights(stats,
    **cfg.weights)`` works. ``class_names`` only makes warnings and errors readable.
    """
    _check_options(strategy, normalize, max_weight, absent, beta, count, k, values)
    num_classes = stats.num_classes
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"class_names has {len(class_names)} entries but num_classes is {num_classes}")
    present = stats.pixel_count > 0
    if not present.any():
        raise ValueError("class statistics hold no labelled pixel: every mask is empty or ignore_index")

    if strategy == "manual":
        weights = _manual_values(values, num_classes)
    else:
        weights = _raw_weights(stats, strategy, present, beta, count, k)

    missing = np.flatnonzero(~present).tolist()
    if missing:
        names = ", ".join(_class_label(c, class_names) for c in missing)
        if absent == "error":
            raise ValueError(
                f"{names}: no pixel in the training masks, so no weight can be computed "
                "(weights.absent=error); fix the data or num_classes, or set weights.absent=zero"
            )
        warnings.warn(f"{names}: no pixel in the training masks; its class weight is set to 0", stacklevel=2)
        weights = np.where(present, weights, 0.0)

    if normalize == "mean":
        mean = weights[present].mean()
        if not mean > 0:
            raise ValueError(f"cannot normalize weights whose mean over present classes is {mean}")
        weights = weights / mean
    if max_weight is not None:
        weights = np.minimum(weights, float(max_weight))
    return torch.as_tensor(weights, dtype=torch.float32)


def compute_channel_weights(stats, strategy: str, *, class_names: Sequence[str] | None = None,
                            **options: Any) -> torch.Tensor:
    """Multi-label data: one positive-class weight per channel (``pos_weight`` of a sigmoid loss), (C,) float32.

    Each channel is its own two-class problem, present against absent, so a strategy gives the two classes of a
    channel their weights [w_absent, w_present] from the channel's ``ClassStats`` (``ChannelStats.binary``) and the
    channel's weight is w_present / w_absent: ``inverse_freq`` gives absent pixels / present pixels, the usual
    ``pos_weight``. ``manual`` values are the per-channel weights themselves; ``max_weight`` clips them.
    ``normalize=mean`` does not apply: a ratio of 1 already means "balanced as the data is". ``options`` are
    ``compute_class_weights``' keyword options (the keys of ``configs/weights/*.yaml``).
    """
    known = inspect.signature(compute_class_weights).parameters
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(f"compute_channel_weights: unknown option(s) {unknown}")
    o = {name: p.default for name, p in known.items() if p.kind is inspect.Parameter.KEYWORD_ONLY} | options
    normalize, max_weight, absent, values = o["normalize"], o["max_weight"], o["absent"], o["values"]
    _check_options(strategy, normalize, max_weight, absent, o["beta"], o["count"], o["k"], values)
    if normalize != "none":
        raise ValueError("weights.normalize=mean: in multi-label mode a weight is each channel's present/absent "
                         "ratio (1 = as the data is), not a share of a class mean; set weights.normalize=none")
    channels = stats.num_classes
    if strategy == "manual":
        weights = _manual_values(values, channels)
    else:
        weights = np.ones(channels)
        for c, binary in enumerate(stats.binary):
            present = binary.pixel_count > 0
            if present.all():
                raw = _raw_weights(binary, strategy, present, o["beta"], o["count"], o["k"])
                weights[c] = raw[1] / raw[0]
    missing = np.flatnonzero(stats.positive == 0).tolist()
    if missing:
        names = ", ".join(_class_label(c, class_names) for c in missing)
        if absent == "error":
            raise ValueError(f"{names}: no positive pixel in the training masks (weights.absent=error); fix the "
                             "data or set weights.absent=zero")
        warnings.warn(f"{names}: no positive pixel in the training masks; its positive-class weight is set to 0",
                      stacklevel=2)
        weights = np.where(stats.positive > 0, weights, 0.0)
    if max_weight is not None:
        weights = np.minimum(weights, float(max_weight))
    return torch.as_tensor(weights, dtype=torch.float32)


def channel_table(stats, class_names: Sequence[str], strategy: str, weights: torch.Tensor) -> str:
    """Multi-label data: per channel, its positive and valid pixels, its share, images containing it and the
    positive-class weight used."""
    header = ["channel", "positive px", "valid px", "share %", "images", f"pos weight ({strategy})"]
    rows = [[name, f"{int(p):,}", f"{int(v):,}", f"{100 * f:.3f}", f"{int(n):,}", f"{float(w):.4g}"]
            for name, p, v, f, n, w in zip(class_names, stats.positive, stats.valid, stats.frequency, stats.images,
                                           weights.tolist())]
    return _format_rows(header, rows) + f"\n{stats.num_images:,} images; each channel is weighed against its own " \
        "absence (positive-class weight = w_present / w_absent of the strategy)"


def _format_rows(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        # Names left-aligned, numbers right-aligned so that digits line up.
        cells = zip(row, widths)
        return "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(cells))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *map(fmt, rows)])


def _column(stats: ClassStats, strategy: str, options: Mapping[str, Any]) -> list[float]:
    # A column only compares strategies: an absent class shows 0 rather than stopping the table.
    options = {key: value for key, value in options.items() if key not in ("strategy", "values", "absent")}
    return compute_class_weights(stats, strategy, **options).tolist()


def weights_table(
    stats: ClassStats,
    class_names: Sequence[str] | None,
    chosen_strategy: str,
    weights: torch.Tensor | Sequence[float] | None = None,
    column_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    """Plain-text per-class table: counts, shares, freq and the weight under each strategy.

    Each strategy column uses ``column_options[strategy]`` (e.g. the keys of its
    ``configs/weights/<strategy>.yaml``) or, for strategies not in it, compute_class_weights'
    defaults; the chosen strategy is marked with ``*``. ``weights`` (the ones actually used,
    after normalize/max_weight or manual values) adds a ``used`` column. For TensorBoard text,
    indent every line by four spaces so Markdown keeps it as a fixed-width block.
    """
    _check_choice("strategy", chosen_strategy, STRATEGIES)
    num_classes = stats.num_classes
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"class_names has {len(names)} entries but num_classes is {num_classes}")
    strategies = [s for s in STRATEGIES if s != "manual"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the absent-class warning belongs to the real call
        columns = [_column(stats, s, (column_options or {}).get(s, {})) for s in strategies]

    header = ["class", "pixels", "share", "images", "freq"]
    header += [s + ("*" if s == chosen_strategy else "") for s in strategies]
    used = None
    if weights is not None:
        used = torch.as_tensor(weights, dtype=torch.float64).flatten().tolist()
        if len(used) != num_classes:
            raise ValueError(f"weights has {len(used)} entries but num_classes is {num_classes}")
        header.append(f"used ({chosen_strategy})")
    share, freq = stats.frequency, stats.present_frequency
    rows = []
    for c in range(num_classes):
        row = [names[c], f"{stats.pixel_count[c]:,}", f"{100 * share[c]:.2f}%", f"{stats.image_count[c]:,}"]
        row.append(f"{freq[c]:.5f}")
        row += [f"{col[c]:.4g}" for col in columns]
        if used is not None:
            row.append(f"{used[c]:.4g}")
        rows.append(row)
    footer = f"{stats.num_images:,} images, {stats.total_pixels:,} labelled pixels; * = chosen strategy"
    return _format_rows(header, rows) + "\n" + footer
