import math

import numpy as np
import pytest
import torch
from sklearn.metrics import jaccard_score, precision_recall_fscore_support

from segtrain.metrics import ConfusionMatrix, flatten_metrics, format_table


def _random_case(seed: int, num_classes: int = 4, absent: int = 3):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, num_classes, (3, 9, 11), generator=g)
    target[target == absent] = 0  # class `absent` never occurs in the target...
    target[:, :2] = 255  # ...and a band of ignored pixels
    logits = torch.randn(3, num_classes, 9, 11, generator=g)
    logits[:, absent] -= 100  # ...nor in the predictions
    return logits, target


def test_per_class_values_match_scikit_learn():
    logits, target = _random_case(0)
    cm = ConfusionMatrix(4)
    cm.update(logits[:2], target[:2])
    cm.update(logits[2:], target[2:])
    out = cm.compute()
    valid = target != 255
    y_true, y_pred = target[valid].numpy(), logits.argmax(1)[valid].numpy()
    labels = [0, 1, 2]
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=None, zero_division=np.nan)
    j = jaccard_score(y_true, y_pred, labels=labels, average=None)
    np.testing.assert_allclose(out["precision"][:3].numpy(), p, rtol=1e-12)
    np.testing.assert_allclose(out["recall"][:3].numpy(), r, rtol=1e-12)
    np.testing.assert_allclose(out["dice"][:3].numpy(), f, rtol=1e-12)
    np.testing.assert_allclose(out["iou"][:3].numpy(), j, rtol=1e-12)
    assert all(math.isnan(out[k][3].item()) for k in ("iou", "dice", "precision", "recall"))
    assert out["mIoU"] == pytest.approx(j.mean(), rel=1e-12)
    assert out["mDice"] == pytest.approx(f.mean(), rel=1e-12)
    assert out["pixel_acc"] == pytest.approx((y_true == y_pred).mean(), rel=1e-12)


def test_hand_computed_case_and_labels_input():
    target = torch.tensor([[[0, 0, 1, 1, 255]]])
    preds = torch.tensor([[[0, 1, 1, 1, 0]]])
    cm = ConfusionMatrix(2)
    cm.update(preds, target)
    assert cm.matrix.tolist() == [[1, 1], [0, 2]]
    out = cm.compute()
    assert out["iou"].tolist() == pytest.approx([1 / 2, 2 / 3])
    assert out["dice"].tolist() == pytest.approx([2 / 3, 4 / 5])
    assert out["precision"].tolist() == pytest.approx([1.0, 2 / 3])
    assert out["recall"].tolist() == pytest.approx([1 / 2, 1.0])


def test_dataset_level_differs_from_mean_of_batches():
    # Batch 1: the rare class is tiny and missed; batch 2: it is large and found.
    t1, p1 = torch.tensor([[[0, 0, 0, 1]]]), torch.tensor([[[0, 0, 0, 0]]])
    t2, p2 = torch.tensor([[[1, 1, 1, 0]]]), torch.tensor([[[1, 1, 1, 0]]])
    whole = ConfusionMatrix(2)
    per_batch = []
    for t, p in ((t1, p1), (t2, p2)):
        whole.update(p, t)
        single = ConfusionMatrix(2)
        single.update(p, t)
        per_batch.append(single.compute()["mIoU"])
    # Dataset level: class 0 tp=4 fp=1 -> 4/5, class 1 tp=3 fn=1 -> 3/4.
    assert whole.compute()["mIoU"] == pytest.approx((4 / 5 + 3 / 4) / 2)
    assert np.mean(per_batch) == pytest.approx(((3 / 4 + 0) / 2 + 1.0) / 2)
    assert whole.compute()["mIoU"] != pytest.approx(np.mean(per_batch))


def test_flatten_and_table_use_class_names():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([[0, 1]]), torch.tensor([[0, 1]]))
    out = cm.compute()
    flat = flatten_metrics(out, ["sky", "car"])
    assert flat["val/dice/car"] == 1.0 and flat["val/iou/sky"] == 1.0 and flat["val/mDice"] == 1.0
    assert "car" in format_table(out, ["sky", "car"])


def test_per_class_and_macro_values_match_torchmetrics():
    from torchmetrics.classification import (MulticlassF1Score, MulticlassJaccardIndex, MulticlassPrecision,
                                             MulticlassRecall)

    logits, target = _random_case(1)
    cm = ConfusionMatrix(4)
    for i in range(3):  # batch by batch: the counts add up
        cm.update(logits[i : i + 1], target[i : i + 1])
    out = cm.compute()
    preds = logits.argmax(1)
    oracles = {"iou": MulticlassJaccardIndex, "dice": MulticlassF1Score, "precision": MulticlassPrecision,
               "recall": MulticlassRecall}
    for key, cls in oracles.items():
        per_class = cls(4, average=None, ignore_index=255)(preds, target).double()
        ours = out[key]
        # torchmetrics reports 0 where a class is in neither target nor prediction; segtrain says NaN.
        assert torch.isnan(ours[3]) and per_class[3] == 0
        torch.testing.assert_close(ours[:3], per_class[:3], rtol=1e-6, atol=1e-7)
    macro_iou = MulticlassJaccardIndex(4, average="macro", ignore_index=255)(preds, target).item()
    macro_f1 = MulticlassF1Score(4, average="macro", ignore_index=255)(preds, target).item()
    assert out["mIoU"] == pytest.approx(macro_iou, rel=1e-6)
    assert out["mDice"] == pytest.approx(macro_f1, rel=1e-6)


def test_soft_dice_tracker_sums_over_steps_and_ignores_pixels():
    from segtrain.metrics import SoftDiceTracker

    g = torch.Generator().manual_seed(2)
    logits = [torch.randn(2, 3, 5, 5, generator=g) for _ in range(2)]
    targets = [torch.randint(0, 3, (2, 5, 5), generator=g) for _ in range(2)]
    targets[0][0, 0] = 255
    tracker = SoftDiceTracker(3)
    for lg, t in zip(logits, targets):
        tracker.update(lg, t)
    got = tracker.compute_and_reset()
    # float64 hand computation over both steps together
    inter, card = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for lg, t in zip(logits, targets):
        p = lg.double().softmax(1)
        for c in range(3):
            valid = t != 255
            pc, gc = p[:, c][valid], (t[valid] == c).double()
            inter[c] += (pc * gc).sum()
            card[c] += pc.sum() + gc.sum()
    torch.testing.assert_close(got, 2 * inter / card, rtol=1e-5, atol=1e-7)
    assert torch.isnan(tracker.compute_and_reset()).all()  # reset: nothing accumulated


def test_class_argmax_matches_argmax_with_ties_and_nan():
    from segtrain.metrics import class_argmax

    g = torch.Generator().manual_seed(3)
    logits = torch.randint(0, 3, (4, 5, 9, 7), generator=g).float()  # many ties between classes
    logits[0, 3, 0, 0] = float("nan")
    logits[1, :, 2, 2] = 1.0  # a pixel tied over every class
    for x in (logits, logits.bfloat16(), logits.contiguous(memory_format=torch.channels_last)):
        assert torch.equal(class_argmax(x), x.argmax(dim=1))
    assert class_argmax(logits)[0, 0, 0] == 3 and class_argmax(logits)[1, 2, 2] == 0
