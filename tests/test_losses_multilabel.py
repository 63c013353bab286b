"""Multi-label (one sigmoid per channel) losses against independent oracles (torch, torchvision, MONAI,
float64 sums by hand), their exact per-entry ignore, and build_loss(..., multilabel=True) on the configs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import segtrain  # noqa: F401  (makes torchvision importable beside the CPU torch build)
from torchvision.ops import sigmoid_focal_loss  # isort: skip
from segtrain.config import CONFIG_DIR, load_option
from segtrain.losses import (MULTILABEL_REGISTRY, CompositeLoss, MultilabelBCELoss, MultilabelDiceLoss,
                             MultilabelFocalLoss, build_loss)
from segtrain.losses.fused import fusable_pair
from segtrain.losses.multilabel import multilabel_bce, multilabel_dice, multilabel_focal

IGNORE = 255
CHANNELS = 3
POS_WEIGHTS = torch.tensor([1.0, 3.0, 0.5])
MULTILABEL_CONFIGS = [path for path in sorted((CONFIG_DIR / "loss").glob("*.yaml"))
                      if set(load_option("loss", path.stem).terms) <= set(MULTILABEL_REGISTRY)]


def multilabel_batch(seed: int = 0, ignore: bool = True, dtype: torch.dtype = torch.int64, scale: float = 2.0):
    """Logits (2, 3, 5, 7) and a 0/1 target of the same shape, about 25% of the entries ignored (per channel)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, CHANNELS, 5, 7, generator=g) * scale
    target = torch.randint(0, 2, logits.shape, generator=g)
    if ignore:
        target[torch.rand(logits.shape, generator=g) < 0.25] = IGNORE
        # Some pixel is ignored in one channel and valid in another: ignore is per entry, not per pixel.
        per_pixel = (target == IGNORE).sum(1)
        assert ((per_pixel > 0) & (per_pixel < CHANNELS)).any()
    assert {0, 1} <= set(target.unique().tolist())
    return logits, target.to(dtype)


def value_and_grad(loss_fn, logits, target):
    logits = logits.clone().requires_grad_(True)
    value = loss_fn(logits, target)
    value.backward()
    return value.detach(), logits.grad


def masked_mean(per_entry: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return per_entry[target != IGNORE].mean()


def bce_oracle(logits, target, pos_weight=None):
    pw = None if pos_weight is None else pos_weight.view(-1, 1, 1)
    t = target.masked_fill(target == IGNORE, 0).float()
    return masked_mean(F.binary_cross_entropy_with_logits(logits, t, pos_weight=pw, reduction="none"), target)


def focal_oracle(logits, target, gamma, alpha):
    """torchvision's sigmoid_focal_loss per channel (one alpha per channel), masked mean."""
    alphas = [-1] * CHANNELS if alpha is None else (alpha.tolist() if torch.is_tensor(alpha) else [alpha] * CHANNELS)
    t = target.masked_fill(target == IGNORE, 0).float()
    per_entry = torch.stack([sigmoid_focal_loss(logits[:, c], t[:, c], alphas[c], gamma, reduction="none")
                             for c in range(CHANNELS)], dim=1)
    return masked_mean(per_entry, target)


def dice_oracle(logits, target, smooth=1e-5, batch=True, squared=False, weight=None):
    """Soft Dice from explicit float64 sums over the valid entries only."""
    p, t = torch.sigmoid(logits.double()), target.double()
    valid = target != IGNORE
    dims = (0, 2, 3) if batch else (2, 3)
    zero = torch.zeros((), dtype=torch.float64)

    def masked_sum(x):
        return torch.where(valid, x, zero).sum(dims)

    denominator = masked_sum(p.square() + t.square()) if squared else masked_sum(p + t)
    dice = (2 * masked_sum(p * t) + smooth) / (denominator + smooth)  # (C,) or (N, C)
    if weight is None:
        return (1 - dice.mean()).float()
    return (1 - ((dice * weight.double()).sum(-1) / weight.sum()).mean()).float()


def monai_dice(logits, target, batch=True, squared=False, weight=None, smooth=1e-5):
    monai_losses = pytest.importorskip("monai.losses")
    # MONAI averages w_c (1 - D_c): our 1 - sum(w_c D_c) / sum(w_c) when the weights have mean 1.
    monai_weight = None if weight is None else weight * len(weight) / weight.sum()
    loss = monai_losses.DiceLoss(sigmoid=True, batch=batch, squared_pred=squared, smooth_nr=smooth, smooth_dr=smooth,
                                 weight=monai_weight)
    return loss(logits, target.float())


# One case per loss, with every option set away from its default somewhere.
CASES = {
    "bce": lambda: MultilabelBCELoss(),
    "bce_pos_weight": lambda: MultilabelBCELoss(weight=POS_WEIGHTS),
    "focal": lambda: MultilabelFocalLoss(),
    "focal_weight_gamma0.5": lambda: MultilabelFocalLoss(gamma=0.5, weight=POS_WEIGHTS),
    "focal_alpha": lambda: MultilabelFocalLoss(alpha=0.25),
    "dice": lambda: MultilabelDiceLoss(),
    "dice_variant": lambda: MultilabelDiceLoss(batch=False, squared=True, channel_weight=POS_WEIGHTS),
}


# ---------------------------------------------------------------------------------------------
# values and gradients against oracles


@pytest.mark.parametrize("ignore", [False, True], ids=["no_ignore", "ignore"])
@pytest.mark.parametrize("pos_weight", [None, POS_WEIGHTS], ids=["plain", "pos_weight"])
def test_bce_matches_torch(pos_weight, ignore):
    logits, target = multilabel_batch(ignore=ignore)
    actual, grad = value_and_grad(MultilabelBCELoss(weight=pos_weight), logits, target)
    expected, expected_grad = value_and_grad(lambda x, t: bce_oracle(x, t, pos_weight), logits, target)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(multilabel_bce(logits, target, pos_weight), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("ignore", [False, True], ids=["no_ignore", "ignore"])
@pytest.mark.parametrize("gamma,alpha", [(2.0, None), (2.0, 0.25), (0.5, torch.tensor([0.25, 0.5, 0.9])),
                                         (0.0, None)])
def test_focal_matches_torchvision(gamma, alpha, ignore):
    logits, target = multilabel_batch(ignore=ignore)
    actual, grad = value_and_grad(lambda x, t: multilabel_focal(x, t, gamma, alpha), logits, target)
    expected, expected_grad = value_and_grad(lambda x, t: focal_oracle(x, t, gamma, alpha), logits, target)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=0)


def test_focal_gamma0_without_alpha_is_bce():
    logits, target = multilabel_batch()
    torch.testing.assert_close(MultilabelFocalLoss(gamma=0.0)(logits, target), bce_oracle(logits, target))


def test_focal_weight_becomes_alpha():
    """A positive-class weight w gives alpha = w / (1 + w): positives weigh w times the negatives."""
    focal = MultilabelFocalLoss(weight=torch.tensor([3.0, 1.0, 0.0]))
    torch.testing.assert_close(focal.channel_alpha(), torch.tensor([0.75, 0.5, 0.0]))
    logits, target = multilabel_batch()
    expected = focal_oracle(logits, target, 2.0, torch.tensor([0.75, 0.5, 0.0]))
    torch.testing.assert_close(focal(logits, target), expected, atol=1e-5, rtol=0)
    assert MultilabelFocalLoss(alpha=0.3).channel_alpha() == 0.3 and MultilabelFocalLoss().channel_alpha() is None
    with pytest.raises(ValueError, match=r"positive-class weight or alpha=0.25, not both"):
        MultilabelFocalLoss(weight=POS_WEIGHTS, alpha=0.25)
    with pytest.raises(ValueError, match=r"alpha must be None, a float in \[0, 1\]"):
        MultilabelFocalLoss(alpha=1.5)


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("squared", [False, True], ids=["plain", "squared"])
@pytest.mark.parametrize("batch", [True, False], ids=["batch", "per_image"])
def test_dice_matches_monai_without_ignore(batch, squared, weighted):
    logits, target = multilabel_batch(ignore=False)
    weight = POS_WEIGHTS if weighted else None
    actual = MultilabelDiceLoss(batch=batch, squared=squared, channel_weight=weight)(logits, target)
    torch.testing.assert_close(actual, monai_dice(logits, target, batch, squared, weight), atol=1e-5, rtol=0)
    torch.testing.assert_close(actual, dice_oracle(logits, target, batch=batch, squared=squared, weight=weight),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("squared", [False, True], ids=["plain", "squared"])
@pytest.mark.parametrize("batch", [True, False], ids=["batch", "per_image"])
def test_dice_with_ignore_matches_masked_sums_and_monai(batch, squared):
    logits, target = multilabel_batch()
    actual, grad = value_and_grad(MultilabelDiceLoss(batch=batch, squared=squared), logits, target)
    expected, expected_grad = value_and_grad(lambda x, t: dice_oracle(x, t, batch=batch, squared=squared),
                                             logits, target)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=0)
    # MONAI sees an ignored entry as absent when its sigmoid is exactly 0 (logit -1e4) and its target 0.
    ignored = target == IGNORE
    hidden = monai_dice(logits.masked_fill(ignored, -1e4), target.masked_fill(ignored, 0), batch, squared)
    torch.testing.assert_close(actual, hidden, atol=1e-5, rtol=0)
    torch.testing.assert_close(multilabel_dice(logits, target, 1e-5, batch, squared), expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# exact ignore


@pytest.mark.parametrize("name", CASES)
def test_ignored_entries_get_zero_gradient_and_change_nothing(name):
    loss_fn = CASES[name]()
    logits, target = multilabel_batch()
    ignored = target == IGNORE
    value, grad = value_and_grad(loss_fn, logits, target)
    assert torch.isfinite(grad).all()
    assert (grad[ignored] == 0).all()
    assert (grad[~ignored] != 0).any()
    moved = logits + torch.where(ignored, 50 * torch.randn(logits.shape), torch.zeros(()))
    moved_value, moved_grad = value_and_grad(loss_fn, moved, target)
    torch.testing.assert_close(moved_value, value, atol=0, rtol=0)
    torch.testing.assert_close(moved_grad, grad, atol=0, rtol=0)


@pytest.mark.parametrize("name", CASES)
def test_uint8_target_equals_int64(name):
    loss_fn = CASES[name]()
    logits, target = multilabel_batch()
    torch.testing.assert_close(loss_fn(logits, target.to(torch.uint8)), loss_fn(logits, target), atol=0, rtol=0)


@pytest.mark.parametrize("name", CASES)
def test_no_valid_entry_gives_connected_finite_value(name):
    logits, target = multilabel_batch()
    value, grad = value_and_grad(CASES[name](), logits, torch.full_like(target, IGNORE))
    assert torch.isfinite(value) and (grad == 0).all()
    if not name.startswith("dice"):  # Dice of two empty sets is smooth / smooth = 1, a loss of 0 as well
        assert value == 0
    else:
        torch.testing.assert_close(value, torch.tensor(0.0))


@pytest.mark.parametrize("name", CASES)
def test_saturated_logits_and_bf16_autocast_stay_finite_in_float32(name):
    logits, target = multilabel_batch(scale=1e4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value, grad = value_and_grad(CASES[name](), logits.bfloat16(), target)
    assert value.dtype == torch.float32 and torch.isfinite(value) and torch.isfinite(grad.float()).all()



# ---------------------------------------------------------------------------------------------
# bad inputs


@pytest.mark.parametrize("loss", [multilabel_bce, multilabel_focal, multilabel_dice])
def test_shapes_and_values_are_checked(loss):
    logits, target = multilabel_batch()
    with pytest.raises(ValueError, match=r"logits \(N, C, \*spatial\) and a target of the same shape.*"
                                         r"got logits \(2, 3, 5, 7\) and target \(2, 5, 7\)"):
        loss(logits, target[:, 0])
    with pytest.raises(ValueError, match=r"must hold 0, 1 or ignore_index=255; found values in \[0, 2\]"):
        loss(logits, target.masked_fill(target == 1, 2))
    with pytest.raises(ValueError, match=r"found values in \[-1, 1\]"):
        loss(logits, target.masked_fill(target == IGNORE, -1))
    with pytest.raises(TypeError, match=r"integer tensor"):
        loss(logits, target.float())
    # Without an ignore_index, 255 is a value like any other.
    with pytest.raises(ValueError, match=r"ignore_index=None; found values in \[0, 255\]"):
        loss(logits, target, ignore_index=None)


def test_per_channel_options_must_have_one_value_per_channel():
    logits, target = multilabel_batch()
    with pytest.raises(ValueError, match=r"pos_weight must have shape \(C,\) = \(3,\) .* got shape \(2,\)"):
        multilabel_bce(logits, target, pos_weight=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"alpha must have shape \(C,\) = \(3,\)"):
        multilabel_focal(logits, target, alpha=[0.5, 0.5])
    with pytest.raises(ValueError, match=r"weight must have shape \(C,\) = \(3,\)"):
        multilabel_dice(logits, target, weight=[1.0])


def test_one_channel_works():
    logits, target = multilabel_batch()
    logits, target = logits[:, :1], target[:, :1]
    for loss_fn in (MultilabelBCELoss(), MultilabelFocalLoss(), MultilabelDiceLoss()):
        assert torch.isfinite(loss_fn(logits, target))


# ---------------------------------------------------------------------------------------------
# build_loss and the configs


def test_bce_dice_config_equals_sum_of_oracles():
    cfg = load_option("loss", "bce_dice")
    loss = build_loss(cfg, POS_WEIGHTS, num_classes=CHANNELS, ignore_index=IGNORE, multilabel=True)
    assert isinstance(loss.terms["bce"], MultilabelBCELoss) and isinstance(loss.terms["dice"], MultilabelDiceLoss)
    torch.testing.assert_close(loss.terms["bce"].weight, POS_WEIGHTS)
    assert loss.terms["dice"].channel_weight is None  # the run's positive-class weights never reach the Dice
    logits, target = multilabel_batch()
    out = loss(logits.clone().requires_grad_(True), target)
    expected = {"bce": bce_oracle(logits, target, POS_WEIGHTS), "dice": dice_oracle(logits, target)}
    for name in ("bce", "dice"):
        torch.testing.assert_close(out[name], expected[name], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["loss"].detach(), expected["bce"] + expected["dice"], atol=1e-5, rtol=0)


def test_focal_dice_config_works_unchanged_in_multilabel_mode():
    cfg = load_option("loss", "focal_dice")
    loss = build_loss(cfg, POS_WEIGHTS, num_classes=CHANNELS, ignore_index=IGNORE, multilabel=True)
    assert isinstance(loss.terms["focal"], MultilabelFocalLoss) and isinstance(loss.terms["dice"], MultilabelDiceLoss)
    assert loss.fused is None and fusable_pair(loss.terms) is None  # the softmax fused kernel never takes these
    logits, target = multilabel_batch()
    out = loss(logits.clone().requires_grad_(True), target)
    alpha = POS_WEIGHTS / (1 + POS_WEIGHTS)
    # The run's weights are positive-class ratios: the Dice's channel mean never takes them.
    expected = focal_oracle(logits, target, 2.0, alpha) + dice_oracle(logits, target)
    torch.testing.assert_close(out["loss"].detach(), expected, atol=1e-5, rtol=0)


def test_bce_config_builds_with_one_channel():
    loss = build_loss(load_option("loss", "bce"), [4.0], num_classes=1, multilabel=True)
    logits, target = multilabel_batch()
    out = loss(logits[:, :1], target[:, :1])
    torch.testing.assert_close(out["bce"], bce_oracle(logits[:, :1], target[:, :1], torch.tensor([4.0])))


@pytest.mark.parametrize("path", MULTILABEL_CONFIGS, ids=lambda p: p.stem)
def test_every_multilabel_loss_config_builds_and_runs(path):
    """Every configs/loss/*.yaml whose terms are all multi-label terms (bce, bce_dice, focal, dice, focal_dice)."""
    cfg = load_option("loss", path.stem)
    logits, target = multilabel_batch()
    out = build_loss(cfg, POS_WEIGHTS, num_classes=CHANNELS, multilabel=True)(logits, target)
    assert set(out) == {"loss", *cfg.terms} and torch.isfinite(out["loss"])


def test_multilabel_registry_and_mode_errors():
    assert set(MULTILABEL_REGISTRY) == {"bce", "focal", "dice"}
    assert {"bce", "bce_dice", "focal_dice"} <= {path.stem for path in MULTILABEL_CONFIGS}
    with pytest.raises(ValueError, match=r"loss.terms='ce' is a softmax loss; multi-label data trains one sigmoid "
                                         r"per channel: use bce \(loss=bce or bce_dice\)"):
        build_loss({"terms": {"ce": {}}}, num_classes=CHANNELS, multilabel=True)
    with pytest.raises(ValueError, match=r"bce is the multi-label loss \(dataset.regions or "
                                         r"dataset.layout=binary_masks\); softmax models use ce"):
        build_loss(load_option("loss", "bce"), num_classes=CHANNELS)
    with pytest.raises(ValueError, match=r"loss.terms='bcee' is not a loss term; valid: bce, dice, focal$"):
        build_loss({"terms": {"bcee": {}}}, multilabel=True)
    with pytest.raises(ValueError, match=r"num_classes must be an integer >= 1 \(one sigmoid channel per class\)"):
        build_loss({"terms": {"bce": {}}}, num_classes=0, multilabel=True)
    with pytest.raises(ValueError, match=r"num_classes must be an integer >= 2"):
        build_loss({"terms": {"ce": {}}}, num_classes=1)
    with pytest.raises(ValueError, match=r"'focal' \(MultilabelFocalLoss\): unknown option 'normalize'"):
        build_loss({"terms": {"focal": {"normalize": "pixels"}}}, multilabel=True)
    with pytest.raises(ValueError, match=r"positive-class weight or alpha=0.25, not both"):
        build_loss({"terms": {"focal": {"alpha": 0.25}}}, POS_WEIGHTS, multilabel=True)
    fixed = build_loss({"terms": {"focal": {"alpha": 0.25, "use_class_weights": False}}}, POS_WEIGHTS, multilabel=True)
    assert fixed.terms["focal"].channel_alpha() == 0.25


def test_multilabel_terms_are_never_fused():
    terms = {"focal": (MultilabelFocalLoss(), 1.0), "dice": (MultilabelDiceLoss(), 1.0)}
    assert fusable_pair(CompositeLoss(terms).terms) is None and CompositeLoss(terms).fused is None
