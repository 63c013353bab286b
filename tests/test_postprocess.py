"""Per-class post-processing rules: each rule on hand-made label maps, top_two, the stored form, and tuning on
planted speckle (scripts/postprocess_study.py's generator, at 64x64)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from segtrain.analysis.postprocess import (ClassRules, PostProcess, apply, apply_channels, report_table, top_two, tune,
                                           tune_channels)
from segtrain.metrics import ConfusionMatrix, class_argmax, class_scores

NAMES = ["background", "slab", "spot"]
_spec = importlib.util.spec_from_file_location(
    "postprocess_study", Path(__file__).resolve().parents[1] / "scripts" / "postprocess_study.py")
study = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(study)


def grid(text: str) -> np.ndarray:
    """A label map from rows of digits."""
    return np.array([[int(ch) for ch in row] for row in text.split()], dtype=np.int64)


def rules(connectivity: int = 8, **per_class: dict) -> PostProcess:
    """``rules(c1=dict(min_size=4))``: rules keyed by ``c<index>``."""
    return PostProcess({int(key[1:]): ClassRules(**value) for key, value in per_class.items()}, connectivity)


# --- each rule, exactly ------------------------------------------------------------------------------------------

def test_min_size_keeps_a_component_of_exactly_min_size_and_removes_one_pixel_less():
    labels = grid("""
        0000000
        0110000
        0110000
        0000000
        0000220
        0000020
        0000000""")
    out = apply(labels, None, rules(c1=dict(min_size=4), c2=dict(min_size=4)))
    assert (out[labels == 1] == 1).all()  # 4 pixels: stays
    assert (out[labels == 2] == 0).all()  # 3 pixels: removed
    assert (apply(labels, None, rules(c1=dict(min_size=5))) == np.where(labels == 1, 0, labels)).all()
    assert labels[1, 1] == 1  # the input is not changed


def test_connectivity_decides_whether_corner_neighbours_are_one_component():
    labels = grid("""
        00000
        01000
        00100
        00000""")
    assert (apply(labels, None, rules(8, c1=dict(min_size=2))) == labels).all()  # one component of 2 pixels
    assert (apply(labels, None, rules(4, c1=dict(min_size=2))) == 0).all()  # two of 1 pixel each


def test_holes_touching_the_border_are_not_holes_and_max_hole_is_inclusive():
    labels = grid("""
        11011111
        11011111
        11111111
        11100111
        11100111
        11111111""")
    filled = apply(labels, None, rules(c1=dict(max_hole=4)))
    assert (filled[3:5, 3:5] == 1).all()  # the 4-pixel hole: filled at max_hole = 4
    assert (filled[0:2, 2] == 0).all()  # open to the top border: not a hole, however small
    assert (apply(labels, None, rules(c1=dict(max_hole=3))) == labels).all()  # 4 > 3: kept


def test_holes_take_the_other_connectivity_and_may_hold_other_classes():
    labels = grid("""
        1111111
        1121111
        1110111
        1111111""")
    # Class 8-connected: holes 4-connected, the two diagonal pixels are two holes of 1 pixel.
    assert (apply(labels, None, rules(8, c1=dict(max_hole=1))) == 1).all()
    # Class 4-connected: holes 8-connected, one hole of 2 pixels.
    assert (apply(labels, None, rules(4, c1=dict(max_hole=1))) == labels).all()
    assert (apply(labels, None, rules(4, c1=dict(max_hole=2))) == 1).all()


def test_keep_largest_keeps_the_first_in_raster_order_among_equal_largest():
    labels = grid("""
        00000000
        00000110
        00000110
        00000000
        11000000
        11000000
        00000000""")
    out = apply(labels, None, rules(c1=dict(keep_largest=True)))
    assert (out[1:3, 5:7] == 1).all() and (out[4:6, 0:2] == 0).all()  # the top one: its first pixel comes first
    labels[6, 0] = 1  # now the bottom-left one is larger
    out = apply(labels, None, rules(c1=dict(keep_largest=True)))
    assert (out[1:3, 5:7] == 0).all() and out[4:7, 0:2].sum() == 5


def test_removed_pixels_take_their_own_second_class_or_0_without_it():
    labels = grid("""
        000000
        022200
        000000
        000001""")
    second = np.zeros_like(labels)
    second[1, 1:4] = [1, 3, 0]
    second[3, 5] = 1  # never used: class 1 has no rules
    out = apply(labels, second, rules(c2=dict(min_size=4)))
    assert out[1, 1:4].tolist() == [1, 3, 0] and out[3, 5] == 1
    assert (apply(labels, None, rules(c2=dict(min_size=4)))[1] == 0).all()


def test_a_filled_hole_removed_again_keeps_its_value():
    labels = grid("""
        00000
        01110
        01310
        01110
        00000""")
    second = np.full_like(labels, 2)
    out = apply(labels, second, rules(c1=dict(max_hole=1, min_size=20)))  # filled to 9 pixels, then removed
    assert out[2, 2] == 3 and (out[labels == 1] == 2).all() and (out[labels == 0] == 0).all()
    assert (apply(labels, second, rules(c1=dict(max_hole=1)))[1:4, 1:4] == 1).all()


def test_apply_channels_per_channel():
    masks = np.zeros((3, 6, 6), bool)
    masks[0, 1, 1] = masks[0, 3:5, 3:5] = True  # a 1-pixel speck and a 4-pixel object
    masks[1, 1:5, 1:5] = True
    masks[1, 2, 2] = False  # a 1-pixel hole
    masks[2, 0, 0] = True  # no rules: left alone
    out = apply_channels(masks, rules(c0=dict(min_size=2), c1=dict(max_hole=1)))
    assert not out[0, 1, 1] and out[0, 3:5, 3:5].all() and out[0].sum() == 4
    assert out[1, 1:5, 1:5].all() and out[1].sum() == 16
    assert (out[2] == masks[2]).all() and not masks[1, 2, 2]
    with pytest.raises(ValueError, match=r"channels \[5\]"):
        apply_channels(masks, rules(c5=dict(min_size=2)))


# --- top_two and the stored form ---------------------------------------------------------------------------------

@pytest.mark.parametrize("ties", [True, False])
def test_top_two_matches_class_argmax_and_topk(ties):
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 3, (5, 16, 17), generator=g).float() if ties else torch.randn(5, 16, 17, generator=g)
    top, second = top_two(scores)
    assert top.dtype == second.dtype == np.int64
    assert (top == class_argmax(scores[None])[0].numpy()).all()
    values = torch.topk(scores, 2, dim=0).values.numpy()
    assert (np.take_along_axis(scores.numpy(), second[None], 0)[0] == values[1]).all() and (second != top).all()
    rest = scores.numpy().copy()
    np.put_along_axis(rest, top[None], -np.inf, 0)
    assert (second == rest.argmax(0)).all()  # ties: the first of the rest
    if ties:
        assert (values[0] == values[1]).any()  # the case is exercised
    with pytest.raises(ValueError, match="K >= 2"):
        top_two(scores[:1])


def test_to_dict_from_dict_round_trip_and_errors():
    pp = rules(4, c1=dict(max_hole=4), c2=dict(min_size=8, keep_largest=True))
    data = json.loads(json.dumps(pp.to_dict(NAMES)))
    assert data == {"connectivity": 4, "rules": {"slab": {"min_size": None, "keep_largest": False, "max_hole": 4},
                                                 "spot": {"min_size": 8, "keep_largest": True, "max_hole": None}}}
    assert PostProcess.from_dict({**data, "objective": "dice", "tried": 30}, NAMES) == pp  # other keys ignored
    assert PostProcess.from_dict({"rules": {"spot": {"min_size": 3}}}, NAMES) == rules(c2=dict(min_size=3))
    for bad, match in [({"rules": {"sky": {"min_size": 3}}}, "'sky' is not a class of the model; valid: background"),
                       ({"rules": {"spot": {"min_size": 0}}}, r"spot.*min_size=0: expected null or a number of pixels"),
                       ({"rules": {"spot": {"min_size": "5"}}}, "min_size='5'"),
                       ({"rules": {"spot": {"keep_largest": "yes"}}}, "keep_largest='yes': expected true or false"),
                       ({"rules": {"spot": {"max_size": 3}}}, "spot.*max_size"),
                       ({"rules": {"spot": 3}}, "rules.spot=3"),
                       ({"connectivity": 6, "rules": {}}, "connectivity=6"),
                       ({"connectivity": 8}, "expected a mapping with 'connectivity' and 'rules'")]:
        with pytest.raises(ValueError, match=match):
            PostProcess.from_dict(bad, NAMES)


# --- tuning ------------------------------------------------------------------------------------------------------

def split_scores(samples, num_classes: int = 3, pp: PostProcess | None = None) -> dict[str, torch.Tensor]:
    """class_scores of the split's matrix, ignored pixels left out, the predictions post-processed by ``pp``."""
    cm = ConfusionMatrix(num_classes)
    for labels, second, truth in samples:
        pred = labels if pp is None else apply(labels, second, pp)
        cm.update(torch.from_numpy(pred)[None], torch.from_numpy(truth)[None])
    return class_scores(cm.matrix)


def final_scores(candidates) -> np.ndarray:
    return [c.after for c in candidates if c.accepted][-1]


def test_tune_on_planted_speckle_removes_islands_fills_holes_and_generalises():
    tuning = study.planted_split(0, 20, 64)
    pp, candidates = tune(tuning, 3)
    assert pp == rules(c1=dict(max_hole=4), c2=dict(min_size=8))  # islands <= 6 px, true spots >= 29 px
    assert [c.rule for c in candidates if c.class_index == 2] == ["max_hole"] * 7 + ["min_size"] * 7 + ["keep_largest"]
    held_out = study.planted_split(1, 20, 64)
    before, after = split_scores(held_out), split_scores(held_out, pp=pp)
    assert after["precision"][2] > before["precision"][2] + 0.1 and after["dice"][2] > before["dice"][2] + 0.05
    assert after["recall"][1] > before["recall"][1]
    table = report_table(candidates, NAMES)
    assert "spot        min_size=8" in table and "slab        max_hole=4" in table
    assert "spot keep_largest=True: does not improve spot" in table


def test_tune_counts_what_apply_gives_ignored_pixels_left_out():
    tuning = study.planted_split(0, 12, 64)
    for labels, second, truth in tuning[::3]:
        truth[:, :20] = 255
    pp, candidates = tune(tuning, 3, objective="iou", try_keep_largest=False)
    assert pp.rules
    assert np.allclose(final_scores(candidates), split_scores(tuning, pp=pp)["iou"].numpy(), equal_nan=True)
    assert np.allclose(candidates[0].before, split_scores(tuning)["iou"].numpy(), equal_nan=True)


def test_tune_accepts_nothing_when_no_rule_helps():
    exact = [(truth, second, truth) for _, second, truth in study.planted_split(0, 10, 64)]
    pp, candidates = tune(exact, 3)
    assert pp.rules == {} and candidates and all(c.why.startswith("does not improve") for c in candidates)
    real_islands = study.planted_split(0, 10, 64, holes=0, islands_true=True)  # the islands are true objects
    pp, candidates = tune(real_islands, 3)
    assert pp.rules == {} and not any(c.accepted for c in candidates)


def test_tune_rejects_a_rule_that_lowers_another_class_beyond_the_tolerance():
    # The removed islands' second class is 1 (slab) where the truth is 0: removing them lifts the spot's precision
    # but gives the slab false positives.
    split = study.planted_split(0, 20, 64, holes=0, island_second=1)
    pp, candidates = tune(split, 3)
    assert 2 not in pp.rules
    best = max((c for c in candidates if c.class_index == 2 and c.rule == "min_size"), key=lambda c: c.after[2])
    assert best.after[2] > best.before[2] + 0.05 and best.why.startswith("lowers class 1 by ")
    assert best.before[1] - best.after[1] > 0.005
    assert "spot min_size=8: lowers slab by " in report_table(candidates, NAMES)
    loose, _ = tune(split, 3, tolerance=1.0)
    assert loose.rules[2].min_size == 8


def test_tune_options_are_checked():
    split = study.planted_split(0, 2, 32)
    for options, match in [(dict(classes=[3]), r"classes=\[3\]"), (dict(objective="f1"), "objective='f1'"),
                           (dict(connectivity=6), "connectivity=6"), (dict(tolerance=-1), "tolerance=-1"),
                           (dict(min_size_grid=(0, 4)), "min_size=0")]:
        with pytest.raises(ValueError, match=match):
            tune(split, 3, **options)
    labels, second, truth = split[0]
    with pytest.raises(ValueError, match="sample 0"):
        tune([(labels, second, np.full_like(truth, 7))], 3)
    pp, candidates = tune(split, 3, classes=[1], try_keep_largest=False, min_size_grid=(), max_hole_grid=(4,))
    assert {c.class_index for c in candidates} == {1} and len(candidates) == 1


def test_tune_channels_tunes_each_channel_on_its_own():
    samples = []
    for labels, _, truth in study.planted_split(0, 12, 64):
        truth_ml = np.stack([truth == 2, truth == 1]).astype(np.uint8)
        truth_ml[:, :4] = 255
        samples.append((np.stack([labels == 2, labels == 1]), truth_ml))
    pp, candidates = tune_channels(samples, 2)
    assert pp == rules(c0=dict(min_size=8), c1=dict(max_hole=4))
    for cand in candidates:  # only the channel tried changes
        others = np.arange(2) != cand.class_index
        assert np.array_equal(cand.before[others], cand.after[others])
    dice = [2 * (p & (t == 1)).sum() / (p[t != 255].sum() + (t == 1).sum())
            for p, t in zip(np.stack([apply_channels(d, pp) for d, _ in samples], 1),
                            np.stack([t for _, t in samples], 1))]
    assert np.allclose(final_scores(candidates), dice)
    only, tried = tune_channels(samples, 2, classes=[1], objective="iou")
    assert set(only.rules) == {1} and {c.class_index for c in tried} == {1}
    assert "spot" in report_table(candidates, ["spot", "slab"])
    with pytest.raises(ValueError, match=r"expected \(3, H, W\)"):
        tune_channels(samples, 3)
