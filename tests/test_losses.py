"""Losses against independent oracles (torch, torchvision, MONAI, float64 hand computations),
plus the properties every loss must keep: ignored pixels change nothing, an empty batch gives
a connected 0, saturated logits stay finite (fp32 and bf16 autocast), and optimising lowers it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import segtrain  # noqa: F401  (makes torchvision importable beside the CPU torch build)
from segtrain.config import CONFIG_DIR, load_option
from segtrain.losses import (LOSS_REGISTRY, BinaryCrossEntropyLoss, BinaryDiceLoss, BinaryFocalLoss, CompositeLoss,
                             CrossEntropyLoss, DiceLoss, FocalDiceLoss, FocalLoss, GeneralizedDiceLoss,
                             LovaszSoftmaxLoss, OhemCrossEntropyLoss, TverskyLoss, build_loss)

IGNORE = 255
NUM_CLASSES = 4
WEIGHTS = torch.tensor([0.5, 2.0, 1.0, 3.0])
# The softmax compositions (bce and bce_dice are multi-label only: tests/test_losses_multilabel.py)
LOSS_CONFIGS = [p for p in sorted((CONFIG_DIR / "loss").glob("*.yaml"))
                if set(load_option("loss", p.stem).terms) <= set(LOSS_REGISTRY)]


def multiclass_batch(seed: int = 0, n: int = 2, h: int = 6, w: int = 5, scale: float = 2.0):
    """Random logits (N, C, H, W) and a target with every class and about 25% ignored pixels."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, NUM_CLASSES, h, w, generator=g) * scale
    target = torch.randint(0, NUM_CLASSES, (n, h, w), generator=g)
    target[torch.rand(n, h, w, generator=g) < 0.25] = IGNORE
    assert (target == IGNORE).any() and set(range(NUM_CLASSES)) <= set(target.unique().tolist())
    return logits, target


def binary_batch(seed: int = 0, n: int = 2, h: int = 6, w: int = 5, scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 1, h, w, generator=g) * scale
    target = torch.randint(0, 2, (n, h, w), generator=g)
    target[torch.rand(n, h, w, generator=g) < 0.25] = IGNORE
    assert (target == IGNORE).any() and {0, 1} <= set(target.unique().tolist())
    return logits, target


MULTICLASS_CASES = {
    "ce": lambda: CrossEntropyLoss(),
    "ce_weighted_smoothed": lambda: CrossEntropyLoss(weight=WEIGHTS, label_smoothing=0.1),
    "focal": lambda: FocalLoss(gamma=2.0, weight=WEIGHTS),
    "focal_gamma0.5_pixels": lambda: FocalLoss(gamma=0.5, normalize="pixels"),
    "dice": lambda: DiceLoss(),
    "dice_variant": lambda: DiceLoss(batch=False, squared=True, include_background=False, weight=WEIGHTS),
    "ohem": lambda: OhemCrossEntropyLoss(thresh=0.7, min_kept=10, weight=WEIGHTS),
    "gdice": lambda: GeneralizedDiceLoss(),
    "tversky": lambda: TverskyLoss(),
    "focal_tversky": lambda: TverskyLoss(gamma=0.75),
    "lovasz": lambda: LovaszSoftmaxLoss(),
}
BINARY_CASES = {
    "binary_focal": lambda: BinaryFocalLoss(ignore_index=IGNORE),
    "binary_focal_gamma0.5": lambda: BinaryFocalLoss(alpha=None, gamma=0.5, ignore_index=IGNORE),
    "bce": lambda: BinaryCrossEntropyLoss(ignore_index=IGNORE),
    "binary_dice": lambda: BinaryDiceLoss(ignore_index=IGNORE),
    "binary_dice_variant": lambda: BinaryDiceLoss(include_background=True, squared=True, batch=False,
                                                  ignore_index=IGNORE),
}
ALL_CASES = {**MULTICLASS_CASES, **BINARY_CASES}


def case_batch(name: str, seed: int = 0, scale: float = 2.0):
    return (binary_batch if name in BINARY_CASES else multiclass_batch)(seed, scale=scale)


def value_and_grad(loss_fn, logits, target):
    logits = logits.clone().requires_grad_(True)
    value = loss_fn(logits, target)
    value.backward()
    return value.detach(), logits.grad


def ignored_logit_mask(logits, target):
    """Target's ignore mask broadcast over the logits' channel dim, (N, C, H, W)."""
    return (target == IGNORE).unsqueeze(1).expand_as(logits)


# ---------------------------------------------------------------------------------------------
# properties of every loss


@pytest.mark.parametrize("name", ALL_CASES)
def test_ignored_pixels_change_nothing(name):
    loss_fn = ALL_CASES[name]()
    logits, target = case_batch(name)
    ignored = ignored_logit_mask(logits, target)
    value, grad = value_and_grad(loss_fn, logits, target)
    perturbed = logits.clone()
    perturbed[ignored] = torch.randn(int(ignored.sum()), generator=torch.Generator().manual_seed(1)) * 50
    value_p, grad_p = value_and_grad(loss_fn, perturbed, target)
    torch.testing.assert_close(value_p, value, rtol=0, atol=1e-7)
    torch.testing.assert_close(grad_p, grad, rtol=0, atol=1e-8)
    assert torch.all(grad[ignored] == 0) and torch.all(grad_p[ignored] == 0)
    assert grad[~ignored].abs().sum() > 0


@pytest.mark.parametrize("name", ALL_CASES)
def test_no_valid_pixel_gives_connected_zero(name):
    logits, target = case_batch(name)
    value, grad = value_and_grad(ALL_CASES[name](), logits, torch.full_like(target, IGNORE))
    assert value.item() == 0.0
    assert torch.all(grad == 0)  # backward ran (grad exists), and no NaN


@pytest.mark.parametrize("make", [
    lambda: DiceLoss(smooth=0.0), lambda: DiceLoss(smooth=0.0, batch=False, squared=True),
    lambda: TverskyLoss(smooth=0.0, gamma=0.5), lambda: GeneralizedDiceLoss(smooth=0.0),
], ids=["dice", "dice_per_image", "focal_tversky", "gdice"])
def test_overlap_losses_without_smoothing_handle_empty_sets(make):
    """smooth=0: a class (or image) with no pixel in prediction and target scores as a perfect match, not 0/0."""
    logits, target = multiclass_batch()
    value, grad = value_and_grad(make(), logits, torch.full_like(target, IGNORE))
    assert value.item() == 0.0 and torch.all(grad == 0)
    target[0] = IGNORE  # one image with no valid pixel
    value, grad = value_and_grad(make(), logits, target)
    assert torch.isfinite(value) and torch.isfinite(grad).all() and torch.all(grad[0] == 0)


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("name", ALL_CASES)
def test_saturated_logits_stay_finite(name, amp):
    logits, target = case_batch(name, scale=100.0)
    safe_target = target.masked_fill(target == IGNORE, 0)
    if name in MULTICLASS_CASES:
        # Half of the pixels certain and right (p_t == 1 exactly in float32), the rest mostly certain and wrong.
        right = (torch.arange(safe_target.numel()) % 2 == 0).reshape(safe_target.shape)
        logits.scatter_(1, safe_target.unsqueeze(1), torch.where(right, 100.0, -100.0).unsqueeze(1))
    else:
        logits = torch.where(safe_target.unsqueeze(1).bool(), 100.0, -100.0) * torch.sign(logits.clamp_min(-1))
    logits.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        value = ALL_CASES[name]()(logits.to(torch.bfloat16) if amp else logits, target)
    value.backward()
    assert value.dtype == torch.float32
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("name", ALL_CASES)
def test_bf16_logits_are_reduced_in_float32(name):
    """Under autocast the loss of bf16 logits equals the float32 loss of the same (rounded) values."""
    loss_fn = ALL_CASES[name]()
    logits, target = case_batch(name)
    logits = logits.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp_value = loss_fn(logits, target)
    torch.testing.assert_close(amp_value, loss_fn(logits.float(), target), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ALL_CASES)
def test_loss_decreases_when_optimised(name):
    loss_fn = ALL_CASES[name]()
    logits, target = case_batch(name, seed=3)
    param = torch.nn.Parameter(logits)
    optimizer = torch.optim.Adam([param], lr=0.1)
    values = []
    for _ in range(40):
        optimizer.zero_grad()
        value = loss_fn(param, target)
        value.backward()
        optimizer.step()
        values.append(value.item())
    assert values[-1] < 0.5 * values[0], values


# ---------------------------------------------------------------------------------------------
# cross-entropy and OHEM


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weight", [None, WEIGHTS], ids=["unweighted", "weighted"])
def test_cross_entropy_matches_torch(weight, label_smoothing):
    logits, target = multiclass_batch()
    expected = F.cross_entropy(logits, target, weight=weight, ignore_index=IGNORE, label_smoothing=label_smoothing)
    actual = CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)(logits, target)
    torch.testing.assert_close(actual, expected)
    all_ignored = torch.full_like(target, IGNORE)
    assert torch.isnan(F.cross_entropy(logits, all_ignored, ignore_index=IGNORE))  # what the wrapper fixes


def test_cross_entropy_without_ignore_index():
    logits, target = multiclass_batch()
    target = target.masked_fill(target == IGNORE, 2)
    torch.testing.assert_close(CrossEntropyLoss(ignore_index=None)(logits, target), F.cross_entropy(logits, target))


def test_ohem_keeps_all_pixels_when_min_kept_exceeds_them():
    logits, target = multiclass_batch()
    expected = F.cross_entropy(logits, target, weight=WEIGHTS, ignore_index=IGNORE)
    torch.testing.assert_close(OhemCrossEntropyLoss(thresh=0.01, min_kept=10_000, weight=WEIGHTS)(logits, target),
                               expected)


def test_ohem_selects_hard_pixels():
    logits, target = multiclass_batch()
    valid = target != IGNORE
    p_t = logits.softmax(1).gather(1, target.masked_fill(~valid, 0).unsqueeze(1)).squeeze(1)
    # Only the threshold: pixels with p_t < 0.3.
    hard = target.masked_fill(~(valid & (p_t < 0.3)), IGNORE)
    torch.testing.assert_close(OhemCrossEntropyLoss(thresh=0.3, min_kept=0)(logits, target),
                               F.cross_entropy(logits, hard, ignore_index=IGNORE))
    # Threshold below every p_t: exactly the min_kept lowest p_t among valid pixels.
    order = np.argsort(np.where(valid.numpy(), p_t.numpy(), np.inf), axis=None)[:7]
    kept = torch.zeros(valid.numel(), dtype=torch.bool)
    kept[torch.from_numpy(order)] = True
    hardest = target.masked_fill(~kept.reshape(valid.shape), IGNORE)
    torch.testing.assert_close(OhemCrossEntropyLoss(thresh=1e-12, min_kept=7)(logits, target),
                               F.cross_entropy(logits, hardest, ignore_index=IGNORE))


# ---------------------------------------------------------------------------------------------
# focal


def focal_reference(logits, target, gamma, weight, normalize):
    """Float64 per-pixel loop over the paper's formula."""
    x, t = logits.double().numpy(), target.numpy()
    total = denominator = 0.0
    for n, i, j in np.ndindex(*t.shape):
        c = t[n, i, j]
        if c == IGNORE:
            continue
        z = x[n, :, i, j]
        log_p = z[c] - (z.max() + math.log(np.exp(z - z.max()).sum()))
        a = 1.0 if weight is None else float(weight[c])
        total += -a * (1 - math.exp(log_p)) ** gamma * log_p
        denominator += a if normalize == "weights" else 1.0
    return torch.tensor(total / denominator, dtype=torch.float32)


@pytest.mark.parametrize("weight", [None, WEIGHTS], ids=["unweighted", "weighted"])
def test_focal_gamma0_equals_weighted_cross_entropy(weight):
    logits, target = multiclass_batch()
    expected = F.cross_entropy(logits, target, weight=weight, ignore_index=IGNORE)
    torch.testing.assert_close(FocalLoss(gamma=0.0, weight=weight)(logits, target), expected)


@pytest.mark.parametrize("normalize", ["weights", "pixels"])
@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_focal_matches_float64_reference(gamma, normalize):
    logits, target = multiclass_batch()
    expected = focal_reference(logits, target, gamma, WEIGHTS, normalize)
    torch.testing.assert_close(FocalLoss(gamma, WEIGHTS, normalize=normalize)(logits, target), expected)


@pytest.mark.parametrize("make", [lambda w: FocalLoss(gamma=2.0, weight=w), lambda w: DiceLoss(weight=w),
                                  lambda w: CrossEntropyLoss(weight=w)], ids=["focal", "dice", "ce"])
def test_class_weights_uniform_and_scale_invariant(make):
    logits, target = multiclass_batch()
    torch.testing.assert_close(make(torch.full((NUM_CLASSES,), 3.0))(logits, target), make(None)(logits, target))
    torch.testing.assert_close(make(WEIGHTS * 7.3)(logits, target), make(WEIGHTS)(logits, target))


def test_focal_fractional_gamma_has_zero_gradient_at_certain_pixels():
    logits = torch.zeros(1, 3, 1, 2)
    logits[0, 1, 0, 0] = 200.0  # p_t == 1 exactly: (1 - p_t) ** 0.5 has an infinite derivative there
    target = torch.tensor([[[1, 2]]])
    value, grad = value_and_grad(FocalLoss(gamma=0.5, normalize="pixels"), logits, target)
    torch.testing.assert_close(value, torch.tensor(-(1 - 1 / 3) ** 0.5 * math.log(1 / 3) / 2))
    assert torch.isfinite(grad).all() and torch.all(grad[0, :, 0, 0] == 0)


# ---------------------------------------------------------------------------------------------
# binary focal


def binary_focal_reference(logits, target, alpha, gamma):
    x, t = logits.double(), target.double()
    p = torch.sigmoid(x)
    bce = -(t * torch.log(p) + (1 - t) * torch.log1p(-p))
    p_t = p * t + (1 - p) * (1 - t)
    loss = bce * (1 - p_t) ** gamma
    if alpha is not None:
        loss = loss * (alpha * t + (1 - alpha) * (1 - t))
    return loss.mean().float()


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.75, 0.5), (None, 1.0)])
@pytest.mark.parametrize("channel_dim", [True, False], ids=["N1HW", "NHW"])
def test_binary_focal_matches_torchvision_and_formula(alpha, gamma, channel_dim):
    from torchvision.ops import sigmoid_focal_loss

    logits, target = binary_batch()
    target = target.masked_fill(target == IGNORE, 1)
    if not channel_dim:
        logits = logits.squeeze(1)
    actual = BinaryFocalLoss(alpha, gamma)(logits, target)
    expected = sigmoid_focal_loss(logits, target.reshape(logits.shape).float(), -1 if alpha is None else alpha,
                                  gamma, reduction="mean")
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(actual, binary_focal_reference(logits.squeeze(), target.squeeze(), alpha, gamma))


def test_binary_focal_ignores_pixels_as_if_absent():
    logits, target = binary_batch()
    valid = target != IGNORE
    expected = binary_focal_reference(logits.squeeze(1)[valid], target[valid], 0.25, 2.0)
    torch.testing.assert_close(BinaryFocalLoss(ignore_index=IGNORE)(logits, target), expected)


def test_bce_matches_torch():
    logits, target = binary_batch()
    valid = target != IGNORE
    expected = F.binary_cross_entropy_with_logits(logits.squeeze(1)[valid], target[valid].float())
    torch.testing.assert_close(BinaryCrossEntropyLoss(ignore_index=IGNORE)(logits, target), expected)


# ---------------------------------------------------------------------------------------------
# Dice family


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("batch", [True, False])
def test_dice_matches_monai(batch, squared, include_background, weighted):
    monai_losses = pytest.importorskip("monai.losses")
    logits, target = multiclass_batch()
    weight = WEIGHTS if weighted else None
    ours = DiceLoss(batch=batch, squared=squared, include_background=include_background, weight=weight)
    # MONAI averages w_c * (1 - D_c); that equals our 1 - sum(w_c D_c) / sum(w_c) when the weights have mean 1.
    kept = WEIGHTS if include_background else WEIGHTS[1:]
    monai_weight = kept * len(kept) / kept.sum() if weighted else None
    options = dict(batch=batch, squared_pred=squared, include_background=include_background, smooth_nr=1e-5,
                   smooth_dr=1e-5, weight=monai_weight)
    # MONAI's own ignore_index, and (independently) MONAI fed p and g already zeroed at ignored pixels.
    masked = monai_losses.DiceLoss(softmax=True, to_onehot_y=True, ignore_index=IGNORE, **options)
    valid = (target != IGNORE).unsqueeze(1)
    probs = logits.softmax(1) * valid
    onehot = F.one_hot(target.masked_fill(~valid.squeeze(1), 0), NUM_CLASSES).movedim(-1, 1) * valid
    zeroed = monai_losses.DiceLoss(**options)
    actual = ours(logits, target)
    torch.testing.assert_close(actual, masked(logits, target.unsqueeze(1)))
    torch.testing.assert_close(actual, zeroed(probs, onehot.float()))


def test_binary_dice_matches_float64_reference():
    logits, target = binary_batch()
    valid = target != IGNORE
    p = torch.sigmoid(logits.squeeze(1).double())[valid]
    t = target[valid].double()
    foreground = (2 * (p * t).sum() + 1e-5) / (p.sum() + t.sum() + 1e-5)
    background = (2 * ((1 - p) * (1 - t)).sum() + 1e-5) / ((1 - p).sum() + (1 - t).sum() + 1e-5)
    torch.testing.assert_close(BinaryDiceLoss(ignore_index=IGNORE)(logits, target), (1 - foreground).float())
    both = BinaryDiceLoss(include_background=True, ignore_index=IGNORE)(logits, target)
    torch.testing.assert_close(both, (1 - (foreground + background) / 2).float())


def test_generalized_dice_matches_float64_reference_and_monai():
    logits, target = multiclass_batch()
    target[target == 3] = 1  # class 3 absent: its infinite weight becomes the largest finite one
    valid = target != IGNORE
    p = logits.double().softmax(1).movedim(1, -1)[valid]  # (P, C)
    g = F.one_hot(target[valid], NUM_CLASSES).double()
    counts = g.sum(0)
    w = torch.where(counts > 0, 1 / counts.clamp_min(1) ** 2, 0.0)
    w = torch.where(counts > 0, w, w.max())
    w = w / w.sum()
    expected = 1 - (2 * (w * (p * g).sum(0)).sum() + 1e-5) / ((w * (p.sum(0) + counts)).sum() + 1e-5)
    torch.testing.assert_close(GeneralizedDiceLoss()(logits, target), expected.float())
    # Without smoothing the weights' scale cancels, so MONAI's unnormalised weights agree.
    monai_losses = pytest.importorskip("monai.losses")
    clean = target.masked_fill(~valid, 0)
    oracle = monai_losses.GeneralizedDiceLoss(softmax=True, to_onehot_y=True, batch=True, smooth_nr=0, smooth_dr=0)
    torch.testing.assert_close(GeneralizedDiceLoss(smooth=0)(logits, clean), oracle(logits, clean.unsqueeze(1)))


def test_tversky_matches_monai_dice_and_focal_reference():
    logits, target = multiclass_batch()
    clean = target.masked_fill(target == IGNORE, 0)
    monai_losses = pytest.importorskip("monai.losses")
    oracle = monai_losses.TverskyLoss(softmax=True, to_onehot_y=True, alpha=0.3, beta=0.7, batch=True,
                                      smooth_nr=1e-5, smooth_dr=1e-5)
    torch.testing.assert_close(TverskyLoss()(logits, clean), oracle(logits, clean.unsqueeze(1)))
    # alpha = beta = 0.5 is Dice, with half the smoothing (both scale numerator and denominator by 2).
    torch.testing.assert_close(TverskyLoss(0.5, 0.5, smooth=0.5e-5)(logits, target), DiceLoss()(logits, target))
    # Focal Tversky in float64 over valid pixels.
    valid = target != IGNORE
    p = logits.double().softmax(1).movedim(1, -1)[valid]
    g = F.one_hot(target[valid], NUM_CLASSES).double()
    tp, fp, fn = (p * g).sum(0), (p * (1 - g)).sum(0), ((1 - p) * g).sum(0)
    index = (tp + 1e-5) / (tp + 0.2 * fp + 0.8 * fn + 1e-5)
    torch.testing.assert_close(TverskyLoss(0.2, 0.8, gamma=1.5)(logits, target), ((1 - index) ** 1.5).mean().float())


def lovasz_reference(logits, target):
    """Berman et al.'s algorithm in float64 numpy, over valid pixels and present classes."""
    valid = (target != IGNORE).numpy()
    p = logits.double().softmax(1).movedim(1, -1).numpy()[valid]  # (P, C)
    t = target.numpy()[valid]
    losses = []
    for c in np.unique(t):
        fg = (t == c).astype(np.float64)
        errors = np.abs(fg - p[:, c])
        order = np.argsort(-errors, kind="stable")
        fg_sorted, total = fg[order], fg.sum()
        jaccard = [1 - (total - fg_sorted[: k + 1].sum()) / (total + (1 - fg_sorted[: k + 1]).sum())
                   for k in range(len(order))]
        gradient = np.diff(jaccard, prepend=0.0)
        losses.append(float(errors[order] @ gradient))
    return torch.tensor(np.mean(losses), dtype=torch.float32)


def test_lovasz_matches_reference_and_iou_on_hard_predictions():
    logits, target = multiclass_batch()
    target[target == 2] = 3  # class 2 absent from the target: left out of the mean
    torch.testing.assert_close(LovaszSoftmaxLoss()(logits, target), lovasz_reference(logits, target))
    # On one-hot predictions the Lovasz extension equals the Jaccard loss: mean of 1 - IoU_c.
    hard = F.one_hot(logits.argmax(1), NUM_CLASSES).movedim(-1, 1) * 40.0
    pred, valid = logits.argmax(1), target != IGNORE
    ious = [((pred == c) & (target == c) & valid).sum() / (((pred == c) | (target == c)) & valid).sum()
            for c in target[valid].unique()]
    torch.testing.assert_close(LovaszSoftmaxLoss()(hard, target), 1 - torch.stack(ious).mean(), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# composition and build_loss


def test_composite_returns_weighted_sum_and_detached_terms():
    logits, target = multiclass_batch()
    logits.requires_grad_(True)
    composite = CompositeLoss({"ce": (CrossEntropyLoss(), 0.7), "dice": (DiceLoss(), 2.0)})
    out = composite(logits, target)
    assert set(out) == {"loss", "ce", "dice"}
    torch.testing.assert_close(out["ce"], CrossEntropyLoss()(logits, target).detach())
    torch.testing.assert_close(out["loss"], 0.7 * out["ce"] + 2.0 * out["dice"])
    assert out["loss"].requires_grad and not out["ce"].requires_grad and not out["dice"].requires_grad
    out["loss"].backward()
    assert torch.isfinite(logits.grad).all()


def test_build_loss_routes_class_weights_and_ignore_index():
    cfg = {"terms": {"ce": {"loss_weight": 1.0}, "focal": {"loss_weight": 0.5, "gamma": 1.0}, "dice": None,
                     "ohem": {"use_class_weights": False, "min_kept": 5}, "gdice": {"loss_weight": 0.1},
                     "lovasz": {"loss_weight": 0.2}, "tversky": {"alpha": 0.4}}}
    loss = build_loss(OmegaConf.create(cfg), WEIGHTS, num_classes=NUM_CLASSES, ignore_index=7)
    terms = loss.terms
    for name in ("ce", "focal", "dice"):
        torch.testing.assert_close(terms[name].weight, WEIGHTS)
        assert "weight" in dict(terms[name].named_buffers())  # so that .to(device) moves it
    assert terms["ohem"].weight is None and terms["ohem"].min_kept == 5
    assert terms["focal"].gamma == 1.0 and terms["tversky"].alpha == 0.4
    assert all(module.ignore_index == 7 for module in terms.values())
    assert loss.loss_weights == {"ce": 1.0, "focal": 0.5, "dice": 1.0, "ohem": 1.0, "gdice": 0.1, "lovasz": 0.2,
                                 "tversky": 1.0}
    logits, target = multiclass_batch()
    out = loss.double()(logits, target.masked_fill(target == IGNORE, 7))  # a cast module still computes in float32
    assert out["loss"].dtype == torch.float32
    torch.testing.assert_close(out["loss"], sum(w * out[name] for name, w in loss.loss_weights.items()))


def test_build_loss_takes_two_classes_or_more():
    """Binary data is two classes (background and foreground); the sigmoid losses are library modules, not terms."""
    with pytest.raises(ValueError, match=r"num_classes must be an integer >= 2 \(binary data: background and "
                                         r"foreground\) or None, got 1"):
        build_loss({"terms": {"ce": {}}}, num_classes=1)
    with pytest.raises(ValueError, match=r"loss.terms='binary_focal' is not a loss term; valid: ce, dice, focal, gdice"):
        build_loss({"terms": {"binary_focal": {}}}, num_classes=2)


@pytest.mark.parametrize("cfg,kwargs,message", [
    ({"terms": {"focl": {"loss_weight": 1.0}}}, {}, r"loss.terms='focl' is not a loss term; valid: ce, dice,"),
    ({"terms": {"focal": {"gama": 2.0}}}, {}, r"loss term 'focal' \(FocalLoss\): unknown option 'gama'; valid.*gamma"),
    ({"terms": {"ce": {"ignore_index": 0}}}, {}, r"'ce'.*unknown option 'ignore_index'"),
    ({"terms": {"ce": {}}}, {"class_weights": WEIGHTS, "num_classes": 3}, r"class_weights has 4 entries .* is 3"),
    ({"terms": {}}, {}, r"'terms' must be a non-empty mapping"),
    ({"terms": {"ce": {}}, "extra": 1}, {}, r"unknown key\(s\) \['extra'\]"),
    ({"terms": {"focal": {"normalize": "mean"}}}, {}, r"normalize='mean'; valid: weights, pixels$"),
    ({"terms": {"ce": {"loss_weight": -1.0}}}, {}, r"'ce': loss_weight must be finite and >= 0"),
    ({"terms": {"ce": {"loss_weight": 1.0, "weight": 2.0}}}, {}, r"'ce': both loss_weight and its old name weight"),
])
def test_build_loss_errors_name_the_problem(cfg, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_loss(cfg, **kwargs)


@pytest.mark.parametrize("path", LOSS_CONFIGS, ids=lambda p: p.stem)
def test_every_loss_config_builds_and_runs(path):
    cfg = load_option("loss", path.stem)
    logits, target = multiclass_batch()
    out = build_loss(cfg, WEIGHTS, num_classes=NUM_CLASSES)(logits, target)
    assert set(out) == {"loss", *cfg.terms} and torch.isfinite(out["loss"])
    # A term added from the command line with only a multiplier: loss=... +loss.terms.lovasz.loss_weight=0.5
    extended = OmegaConf.merge(cfg, OmegaConf.from_dotlist(["terms.lovasz.loss_weight=0.5"]))
    assert build_loss(extended, WEIGHTS, num_classes=NUM_CLASSES).loss_weights["lovasz"] == 0.5


def test_old_weight_key_still_works_with_a_deprecation_warning():
    logits, target = multiclass_batch()
    new = build_loss({"terms": {"ce": {"loss_weight": 0.3}, "dice": {}}}, WEIGHTS, num_classes=NUM_CLASSES)
    with pytest.warns(FutureWarning, match=r"loss.terms.ce.weight is deprecated.*loss.terms.ce.loss_weight"):
        old = build_loss({"terms": {"ce": {"weight": 0.3}, "dice": {}}}, WEIGHTS, num_classes=NUM_CLASSES)
    assert old.loss_weights == new.loss_weights == {"ce": 0.3, "dice": 1.0}
    torch.testing.assert_close(old(logits, target)["loss"], new(logits, target)["loss"])


# ---------------------------------------------------------------------------------------------
# fused focal/cross-entropy + Dice (functional_fused): the same values and gradients as the terms apart


FUSED_PAIRS = {
    "focal_dice_weighted": lambda: {"focal": (FocalLoss(2.0, WEIGHTS), 1.0), "dice": (DiceLoss(weight=WEIGHTS), 0.7)},
    "focal_gamma0.5_pixels": lambda: {"focal": (FocalLoss(0.5, normalize="pixels"), 0.4), "dice": (DiceLoss(), 1.0)},
    "focal_gamma1_dice_per_image": lambda: {"focal": (FocalLoss(1.0, WEIGHTS), 1.0),
                                            "dice": (DiceLoss(batch=False, weight=WEIGHTS), 2.0)},
    "focal_gamma3.5_no_background": lambda: {"dice": (DiceLoss(include_background=False, weight=WEIGHTS), 1.0),
                                             "focal": (FocalLoss(3.5), 1.5)},
    "ce_dice_weighted": lambda: {"ce": (CrossEntropyLoss(WEIGHTS), 1.0), "dice": (DiceLoss(weight=WEIGHTS), 1.0)},
    "ce_dice_unsmoothed_per_image": lambda: {
        "ce": (CrossEntropyLoss(), 0.5), "dice": (DiceLoss(smooth=0.0, batch=False, include_background=False), 1.0)},
    "with_a_third_term": lambda: {"focal": (FocalLoss(2.0, WEIGHTS), 1.0), "lovasz": (LovaszSoftmaxLoss(), 0.3),
                                  "dice": (DiceLoss(), 1.0)},
}


def uses_fused_path(value: torch.Tensor) -> bool:
    """Whether the autograd graph behind ``value`` holds the fused node."""
    seen, stack = set(), [value.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        if "FocalDice" in type(node).__name__:
            return True
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


def composite_value_and_grad(terms, logits, target, fuse):
    logits = logits.clone().requires_grad_(True)
    out = CompositeLoss(terms, fuse=fuse)(logits, target)
    assert uses_fused_path(out["loss"]) == fuse
    out["loss"].backward()
    return out, logits.grad


def assert_same_as_terms_apart(terms_factory, logits, target):
    fused, fused_grad = composite_value_and_grad(terms_factory(), logits, target, fuse=True)
    apart, apart_grad = composite_value_and_grad(terms_factory(), logits, target, fuse=False)
    assert set(fused) == set(apart)
    for name in apart:
        torch.testing.assert_close(fused[name], apart[name], rtol=2e-6, atol=1e-7)
    # Gradients are ~1 / pixel count: compare them on the scale of the largest one.
    torch.testing.assert_close(fused_grad, apart_grad, rtol=1e-5, atol=1e-6 * apart_grad.abs().max().item())
    return fused_grad


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", FUSED_PAIRS)
def test_fused_pair_equals_terms_apart(name, seed):
    logits, target = multiclass_batch(seed, n=3, h=9, w=7, scale=3.0)
    grad = assert_same_as_terms_apart(FUSED_PAIRS[name], logits, target)
    assert torch.all(grad[ignored_logit_mask(logits, target)] == 0)


@pytest.mark.parametrize("name", FUSED_PAIRS)
def test_fused_pair_ignored_pixels_change_nothing(name):
    logits, target = multiclass_batch(2)
    ignored = ignored_logit_mask(logits, target)
    out, grad = composite_value_and_grad(FUSED_PAIRS[name](), logits, target, fuse=True)
    perturbed = logits.clone()
    perturbed[ignored] = torch.randn(int(ignored.sum()), generator=torch.Generator().manual_seed(1)) * 50
    out_p, grad_p = composite_value_and_grad(FUSED_PAIRS[name](), perturbed, target, fuse=True)
    for key in out:
        torch.testing.assert_close(out_p[key], out[key], rtol=0, atol=1e-7)
    torch.testing.assert_close(grad_p, grad, rtol=0, atol=1e-8)
    assert torch.all(grad[ignored] == 0) and torch.all(grad_p[ignored] == 0)


@pytest.mark.parametrize("name", FUSED_PAIRS)
def test_fused_pair_without_valid_pixel_gives_connected_zero(name):
    logits, target = multiclass_batch()
    out, grad = composite_value_and_grad(FUSED_PAIRS[name](), logits, torch.full_like(target, IGNORE), fuse=True)
    assert all(out[key].item() == 0.0 for key in out if key != "lovasz") and torch.all(grad == 0)


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("name", ["focal_dice_weighted", "focal_gamma0.5_pixels", "ce_dice_weighted"])
def test_fused_pair_saturated_logits_match_terms_apart(name, amp):
    logits, target = multiclass_batch(scale=100.0)
    safe_target = target.masked_fill(target == IGNORE, 0)
    right = (torch.arange(safe_target.numel()) % 2 == 0).reshape(safe_target.shape)
    logits.scatter_(1, safe_target.unsqueeze(1), torch.where(right, 100.0, -100.0).unsqueeze(1))
    if amp:
        logits = logits.to(torch.bfloat16)
    results = []
    for fuse in (True, False):
        leaf = logits.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = CompositeLoss(FUSED_PAIRS[name](), fuse=fuse)(leaf, target)
        out["loss"].backward()
        assert out["loss"].dtype == torch.float32 and leaf.grad.dtype == logits.dtype
        assert torch.isfinite(out["loss"]) and torch.isfinite(leaf.grad).all()
        results.append((out, leaf.grad.float()))
    (fused, fused_grad), (apart, apart_grad) = results
    for key in apart:
        torch.testing.assert_close(fused[key], apart[key], rtol=2e-6, atol=1e-6)
    # bf16 gradients: the float32 results round to bf16, so a last-digit difference can move one ulp (2^-8).
    rtol = 2**-7 if amp else 1e-5
    torch.testing.assert_close(fused_grad, apart_grad, rtol=rtol, atol=1e-6 * apart_grad.abs().max().item())


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_fused_terms_backpropagate_separately(gamma):
    """Each output of focal_dice_loss carries its own term's gradient, also when only one is used."""
    from segtrain.losses.functional_fused import focal_dice_loss

    logits, target = multiclass_batch(4)
    focal_weight, dice_weight = WEIGHTS, WEIGHTS.flip(0)
    for index, (make, scale) in enumerate([(lambda: FocalLoss(gamma, focal_weight), 0.3),
                                           (lambda: DiceLoss(batch=False, weight=dice_weight), 1.7)]):
        leaf = logits.clone().requires_grad_(True)
        values = focal_dice_loss(leaf, target, gamma, focal_weight, "weights", 1e-5, False, True, dice_weight)
        (scale * values[index]).backward()
        expected_value, expected_grad = value_and_grad(make(), logits, target)
        torch.testing.assert_close(values[index].detach(), expected_value)
        torch.testing.assert_close(leaf.grad, scale * expected_grad, rtol=1e-5, atol=1e-8)


def test_fused_pair_supports_retain_graph():
    logits, target = multiclass_batch()
    logits.requires_grad_(True)
    out = CompositeLoss(FUSED_PAIRS["focal_dice_weighted"]())(logits, target)
    out["loss"].backward(retain_graph=True)
    first = logits.grad.clone()
    out["loss"].backward()
    torch.testing.assert_close(logits.grad, 2 * first)


def test_fused_pair_is_used_only_where_it_is_exact():
    from segtrain.losses.fused import fusable_pair

    assert fusable_pair(CompositeLoss(FUSED_PAIRS["with_a_third_term"]()).terms) == ("focal", "dice")
    not_fused = [
        {"ce": (CrossEntropyLoss(label_smoothing=0.1), 1.0), "dice": (DiceLoss(), 1.0)},
        {"focal": (FocalLoss(), 1.0), "dice": (DiceLoss(squared=True), 1.0)},
        {"focal": (FocalLoss(ignore_index=0), 1.0), "dice": (DiceLoss(), 1.0)},
        {"focal": (type("MyFocal", (FocalLoss,), {})(), 1.0), "dice": (DiceLoss(), 1.0)},
        {"focal": (FocalLoss(), 1.0), "gdice": (GeneralizedDiceLoss(), 1.0)},
    ]
    logits, target = multiclass_batch()
    target = target.masked_fill(target == IGNORE, 1)  # a valid class for the term that ignores 0 instead
    for terms in not_fused:
        assert fusable_pair(CompositeLoss(terms).terms) is None and CompositeLoss(terms).fused is None
        out = CompositeLoss(terms)(logits.clone().requires_grad_(True), target)
        assert not uses_fused_path(out["loss"])


def test_composite_built_by_hand_fuses_once_and_reads_the_terms_options():
    """A CompositeLoss of FocalLoss + DiceLoss fuses by default; the decision is made when it is built,
    and the fused term reads its modules' options at every call."""
    logits, target = multiclass_batch(3)
    loss = CompositeLoss({"focal": (FocalLoss(2.0, WEIGHTS), 1.0), "dice": (DiceLoss(), 0.5)})
    assert loss.fused == ("focal", "dice")
    assert uses_fused_path(loss(logits.clone().requires_grad_(True), target)["loss"])
    loss.terms["focal"].gamma = 0.5
    changed = loss(logits, target)
    apart = CompositeLoss({"focal": (FocalLoss(0.5, WEIGHTS), 1.0), "dice": (DiceLoss(), 0.5)}, fuse=False)
    torch.testing.assert_close(changed["focal"], apart(logits, target)["focal"], rtol=2e-6, atol=1e-7)
    with pytest.raises(ValueError, match="cannot be fused"):
        FocalDiceLoss(FocalLoss(), DiceLoss(squared=True))


@pytest.mark.parametrize("name", ["focal_dice", "ce_dice"])
def test_loss_config_with_class_weights_takes_fused_path(name):
    """As training builds it: build_loss(config, class_weights) fuses, and equals its terms apart."""
    cfg = load_option("loss", name)
    loss_fn = build_loss(cfg, WEIGHTS, num_classes=NUM_CLASSES)
    logits, target = multiclass_batch(5, n=2, h=16, w=12)
    assert uses_fused_path(loss_fn(logits.clone().requires_grad_(True), target)["loss"])
    terms = {term: (module, loss_fn.loss_weights[term]) for term, module in loss_fn.terms.items()}
    assert_same_as_terms_apart(lambda: terms, logits, target)


@pytest.mark.parametrize("shape", [(3, NUM_CLASSES), (2, NUM_CLASSES, 7), (2, NUM_CLASSES, 3, 4, 5)],
                         ids=["no_spatial", "1d", "3d"])
def test_fused_pair_other_spatial_ranks(shape):
    """1-D and 3-D logits fuse and match; (N, C) logits without pixels are left to the terms apart."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(shape, generator=g) * 2
    target = torch.randint(0, NUM_CLASSES, (shape[0], *shape[2:]), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.2] = IGNORE
    if len(shape) == 2:
        out = CompositeLoss(FUSED_PAIRS["focal_dice_weighted"]())(logits.requires_grad_(True), target)
        assert not uses_fused_path(out["loss"])
        return
    assert_same_as_terms_apart(FUSED_PAIRS["focal_gamma1_dice_per_image"], logits, target)


def test_fused_pair_channels_last_logits():
    logits, target = multiclass_batch(6)
    logits = logits.to(memory_format=torch.channels_last)  # what a channels_last model emits
    grad = assert_same_as_terms_apart(FUSED_PAIRS["focal_dice_weighted"], logits, target)
    assert grad.is_contiguous(memory_format=torch.channels_last)


def test_fused_pair_logits_without_a_pixels_view():
    """Logits whose H and W cannot merge into one dim (the fused code works on pixel views)."""
    logits, target = multiclass_batch(7)
    transposed = logits.transpose(2, 3).contiguous().transpose(2, 3)  # same values, W-major strides
    with pytest.raises(RuntimeError):
        transposed.view(*transposed.shape[:2], -1)
    assert_same_as_terms_apart(FUSED_PAIRS["focal_dice_weighted"], transposed, target)


def test_class_sums_scatter_and_compare_agree():
    from segtrain.losses.functional_fused import class_sums

    values = torch.rand(3, 5, 4, generator=torch.Generator().manual_seed(0))
    target = torch.randint(0, NUM_CLASSES, (3, 5, 4), generator=torch.Generator().manual_seed(1))
    expected = (F.one_hot(target, NUM_CLASSES) * values.unsqueeze(-1)).sum((1, 2))
    for scatter in (True, False):
        torch.testing.assert_close(class_sums(values, target, NUM_CLASSES, scatter), expected)
