"""The per-image report bounded: hard cases kept while the evaluation runs (no second prediction), galleries drawn
from shrunk predictions, ``report.galleries=false``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from segtrain.analysis import hard_cases
from segtrain.analysis.hard_cases import PANEL, HardCases, galleries, panel_size
from segtrain.analysis.per_image import PerImageConfusion, per_image_scores, worst_images
from segtrain.config.options import analysis_options
from segtrain.data import pad_collate
from segtrain.evaluate import evaluate_checkpoint
from segtrain.visualize import error_gallery

C, K = 4, 3
# (indices, height, width) per batch: out of index order, sizes above PANEL so that predictions are shrunk.
BATCHES = [([5, 2, 8], 300, 500), ([0], 250, 260), ([7, 1, 3, 6, 4], 300, 500)]


def _batches():
    """Seeded (labels, target with ~10 % ignored, indices); images 7 and 3 are copies of 1: tied Dice."""
    g = torch.Generator().manual_seed(0)
    out = []
    for indices, h, w in BATCHES:
        n = len(indices)
        # Blocks of 25 px: Dice varies from image to image, as a model's errors do.
        target = torch.randint(0, C, (n, h // 25 + 1, w // 25 + 1), generator=g).repeat_interleave(25, 1)
        target = target.repeat_interleave(25, 2)[:, :h, :w].contiguous()
        preds = torch.where(torch.rand(n, h, w, generator=g) < 0.3, torch.randint(0, C, (n, h, w), generator=g),
                            target)
        target[torch.rand(n, h, w, generator=g) < 0.1] = 255
        if 1 in indices:
            one = indices.index(1)
            for copy in (indices.index(7), indices.index(3)):
                target[copy], preds[copy] = target[one], preds[one]
        out.append((preds, target, indices))
    return out


def _kept(shards: int = 1, monkeypatch=None) -> tuple[list, torch.Tensor]:
    """(HardCases.gather() with the images spread over ``shards`` ranks, the per-image matrices of all)."""
    every = PerImageConfusion(C)
    ranks = [(PerImageConfusion(C), HardCases(C, K)) for _ in range(shards)]
    for preds, target, indices in _batches():
        every.update(preds, target, indices)
        for r, (matrices, kept) in enumerate(ranks):  # a rank holds the indices i with i % shards == r
            mine = [j for j, i in enumerate(indices) if i % shards == r]
            if mine:
                batch = matrices.update(preds[mine], target[mine], [indices[j] for j in mine])
                kept.update(batch, preds[mine], torch.tensor([indices[j] for j in mine]))
    if monkeypatch is not None:
        parts = [tuple(t.cpu() for t in (k.scores, k.index, k.size, k.thumbs)) for _, k in ranks]
        monkeypatch.setattr(hard_cases, "all_gather_objects", lambda obj: parts)
    return ranks[0][1].gather(), every.result()[1]


@pytest.mark.parametrize("shards", [1, 2])
def test_kept_hard_cases_are_the_worst_images_and_their_shrunk_predictions(shards, monkeypatch):
    cases, matrices = _kept(shards, monkeypatch)
    scores = per_image_scores(matrices)
    worst = worst_images(scores, K)
    assert any(len(set(scores["dice"][[1, 3, 7], c].tolist())) == 1 for c in range(C))  # ties are exercised
    labels = {i: (preds[j], target[j]) for preds, target, indices in _batches() for j, i in enumerate(indices)}
    for c in range(C):
        assert [case.index for case in cases[c]] == worst[c]  # ranked as report.md ranks them
        for case in cases[c]:
            assert case.dice == scores["dice"][case.index, c].item()
            preds = labels[case.index][0]
            assert case.size == tuple(preds.shape)  # each batch holds images of one size here
            th, tw = panel_size(*case.size)
            assert case.predicted.shape == (th, tw) and th <= PANEL[0] and tw <= PANEL[1]
            # Oracle: Pillow's nearest-neighbour shrink of the whole-size prediction of the class.
            shrunk = np.asarray(Image.fromarray((preds == c).numpy().astype(np.uint8)).resize((tw, th), Image.NEAREST))
            np.testing.assert_array_equal(case.predicted, shrunk.astype(bool))


class _Split:
    """Two images of different sizes, as a dataset gives them (normalised image, mask): mean 0, std 1."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1)
        self.samples = [(torch.rand(3, h, w, generator=g), torch.randint(0, C, (h, w), generator=g))
                        for h, w in ((360, 480), (300, 420))]
        self.image_paths = ["a.png", "b.png"]

    def __getitem__(self, index: int):
        return self.samples[index]


def test_galleries_draw_each_image_on_its_part_of_a_padded_batch(monkeypatch):
    split, names = _Split(), [f"class {c}" for c in range(C)]
    images, masks = pad_collate([split[0], split[1]])  # (2, 3, 360, 480): the second image padded
    preds = torch.where(torch.rand(masks.shape, generator=torch.Generator().manual_seed(2)) < 0.2,
                        (masks + 1) % C, masks)
    matrices, kept = PerImageConfusion(C), HardCases(C, 2)
    kept.update(matrices.update(preds, masks, [0, 1]), preds, torch.tensor([0, 1]))
    cases = kept.gather()
    drawn = galleries(split, cases, names, 2, [0.0] * 3, [1.0] * 3)
    th, tw = panel_size(360, 480)
    assert (th, tw) == (216, 288) and set(drawn) == set(names)
    for c, name in enumerate(names):
        rows = []
        for case in cases[c]:  # oracle: the padded batch shrunk by Pillow, then this image's part of it
            image, mask = split[case.index]
            h = int(np.sum(np.floor((np.arange(th) + 0.5) * 360 / th) < image.shape[1]))
            w = int(np.sum(np.floor((np.arange(tw) + 0.5) * 480 / tw) < image.shape[2]))

            def shrink(a):
                return np.asarray(Image.fromarray(a).resize((tw, th), Image.NEAREST))[:h, :w]

            picture = shrink((images[case.index].permute(1, 2, 0) * 255).round().byte().numpy())
            truth, pred = (shrink(t[case.index].numpy().astype(np.uint8)) for t in (masks, preds))
            rows.append((picture, truth, np.where(pred == c, c, -1),
                         f"{len(rows) + 1}. {split.image_paths[case.index]}  dice {case.dice:.3f}"))
        np.testing.assert_array_equal(drawn[name], error_gallery(rows, c, names))
        assert drawn[name].shape[1] <= 3 * PANEL[1]  # a gallery stays under 1000 px wide


def test_report_galleries_false_writes_tables_only(trained, tmp_path):
    on, off = tmp_path / "on", tmp_path / "off"
    evaluate_checkpoint(trained / "run/checkpoints/last.pt", [f"report.dir={on}"])
    evaluate_checkpoint(trained / "run/checkpoints/last.pt", [f"report.dir={off}", "report.galleries=false"])
    assert any(p.name.startswith("gallery_") and p.suffix == ".jpg" for p in on.iterdir())
    assert sorted(p.name for p in off.iterdir()) == ["metrics.json", "per_image.csv", "report.md"]
    assert (on / "per_image.csv").read_text() == (off / "per_image.csv").read_text()
    assert "![" not in (off / "report.md").read_text()  # no gallery linked


def test_report_galleries_takes_a_boolean(compose_cfg):
    assert analysis_options(compose_cfg(["report.galleries=false"])).report.galleries is False
    with pytest.raises(ValueError, match=r"report.galleries='maybe': expected true or false"):
        analysis_options(compose_cfg(["report.galleries=maybe"]))
