"""Per-image confusion matrices, their scores, the worst-image ranking and the written report."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from PIL import Image

from segtrain import visualize
from segtrain.analysis import per_image
from segtrain.analysis.per_image import PerImageConfusion, PerImageReport, gallery_file, per_image_scores, worst_images
from segtrain.metrics import ConfusionMatrix
from segtrain.visualize import error_gallery, legend

C = 4
BATCH_INDICES = [[5, 2, 8], [0], [7, 1, 3, 6, 4]]  # batches of different sizes, indices out of order


def _batches(h: int = 7, w: int = 9):
    """Seeded (logits, target with ~20 % ignored pixels, indices) per batch."""
    g = torch.Generator().manual_seed(1)
    out = []
    for indices in BATCH_INDICES:
        n = len(indices)
        logits = torch.randn(n, C, h, w, generator=g)
        target = torch.randint(0, C, (n, h, w), generator=g)
        target[torch.rand(n, h, w, generator=g) < 0.2] = 255
        out.append((logits, target, indices))
    return out


def _accumulated():
    images = PerImageConfusion(C)
    for logits, target, indices in _batches():
        images.update(logits, target, indices)
    return images


def test_per_image_matrices_sum_to_the_dataset_matrix():
    dataset, images = ConfusionMatrix(C), PerImageConfusion(C)
    for logits, target, indices in _batches():
        dataset.update(logits, target)
        images.update(logits, target, indices)
    indices, matrices = images.result()
    assert indices == list(range(9))
    assert matrices.dtype == torch.int64 and matrices.shape == (9, C, C)
    assert torch.equal(matrices.sum(dim=0), dataset.matrix)
    assert int(dataset.matrix.sum()) < 9 * 7 * 9  # ignored pixels really were left out


def test_each_image_matrix_matches_numpy_for_that_image_alone():
    _, matrices = _accumulated().result()
    for logits, target, indices in _batches():
        preds = logits.argmax(dim=1).numpy()
        for j, index in enumerate(indices):
            t, p = target[j].numpy().ravel(), preds[j].ravel()
            keep = t != 255
            expected = np.zeros((C, C), dtype=np.int64)
            np.add.at(expected, (t[keep], p[keep]), 1)
            np.testing.assert_array_equal(matrices[index].numpy(), expected)


def test_labels_input_and_out_of_range_labels_stay_in_their_image():
    images = PerImageConfusion(3)
    target = torch.tensor([[[0, 1], [3, 2]], [[2, 2], [255, 1]]])  # 3: not a class, not ignore_index
    preds = torch.tensor([[[0, 2], [0, 2]], [[2, 1], [0, 5]]])  # 5: not a class
    images.update(preds, target, [1, 0])
    indices, matrices = images.result()
    assert indices == [0, 1]
    assert matrices[1].tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 1]]
    assert matrices[0].tolist() == [[0, 0, 0], [0, 0, 0], [0, 1, 1]]


def test_scores_of_a_hand_made_two_image_example():
    matrices = torch.tensor([[[3, 1, 0], [0, 2, 0], [0, 0, 0]],  # class 2 absent: NaN
                             [[0, 0, 2], [0, 0, 0], [0, 0, 0]]])  # class 0 missed, class 2 only predicted
    s = per_image_scores(matrices)
    nan = math.nan
    torch.testing.assert_close(s["dice"], torch.tensor([[6 / 7, 4 / 5, nan], [0.0, nan, 0.0]], dtype=torch.float64),
                               equal_nan=True)
    torch.testing.assert_close(s["iou"], torch.tensor([[3 / 4, 2 / 3, nan], [0.0, nan, 0.0]], dtype=torch.float64),
                               equal_nan=True)
    assert s["true_pixels"].tolist() == [[4, 2, 0], [2, 0, 0]]
    assert s["predicted_pixels"].tolist() == [[3, 3, 0], [0, 0, 2]]
    assert s["true_pixels"].dtype == s["predicted_pixels"].dtype == torch.int64


def _report(seed: int = 3, m: int = 12) -> PerImageReport:
    g = torch.Generator().manual_seed(seed)
    matrices = torch.randint(0, 3, (m, 3, 3), generator=g)
    matrices[[7, 9]] = matrices[3].clone()  # identical images: tied Dice in every class
    matrices[5, 1, :] = matrices[5, :, 1] = 0  # class 1 absent from image 5
    matrices[2, 2, :] = 0  # class 2 only predicted in image 2 (Dice 0)
    matrices[2, 0, 2] = 4
    paths = [f"images/val/img_{i:02d}.png" for i in range(m)]
    return PerImageReport(paths, ["background", "road", "bike lane"], matrices)


def test_worst_images_equal_sorting_the_written_csv(tmp_path):
    report, k = _report(), 4
    report.write_csv(tmp_path / "per_image.csv")
    with open(tmp_path / "per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 * 3 and list(rows[0]) == ["image", "class", "dice", "iou", "true_pixels",
                                                     "predicted_pixels"]
    worst = worst_images(report.scores, k)
    for c, name in enumerate(report.class_names):
        present = [r for r in rows if r["class"] == name and int(r["true_pixels"]) + int(r["predicted_pixels"]) > 0]
        assert all(r["dice"] != "" for r in present)
        expected = [r["image"] for r in sorted(present, key=lambda r: float(r["dice"]))[:k]]  # stable: file order
        assert [report.image_paths[i] for i in worst[c]] == expected
    assert report.image_paths[2] in [report.image_paths[i] for i in worst[2]]  # a predicted-only image counts
    absent = [r for r in rows if r["image"].endswith("img_05.png") and r["class"] == "road"]
    assert absent[0]["dice"] == absent[0]["iou"] == ""
    assert worst_images(report.scores, 100)[1] == sorted(worst_images(report.scores, 100)[1],
                                                         key=lambda i: float(report.scores["dice"][i, 1]))
    assert len(worst_images(report.scores, 100)[1]) == 11  # fewer than k: only the qualifying images


def _error_rows(n: int):
    """n rows of 32x32 images (enlarged 4x at min_side 128): class 1 in the left half of the truth."""
    rows = []
    for i in range(n):
        image = np.full((32, 32, 3), 100, dtype=np.uint8)
        target = np.zeros((32, 32), dtype=np.int64)
        target[:, :16] = 1
        target[0, :] = 255
        pred = np.zeros_like(target)
        pred[:16, :] = 1  # top-left correct, bottom-left missed, top-right false positive
        rows.append((image, target, pred, f"{i + 1}. images/val/x{i}.png  dice 0.50"))
    return rows


def _legend_height(width: int) -> int:
    return legend(width, ["road missed", "false positive", "correct"], np.zeros((3, 3), np.uint8)).height


def test_error_gallery_marks_misses_and_false_positives_and_pads_rows():
    names = ["background", "road", "bike lane"]
    small = (np.zeros((16, 48, 3), np.uint8), np.ones((16, 48), int), np.ones((16, 48), int), "wide")
    gallery = error_gallery([*_error_rows(1), small], 1, names, min_side=128)
    row_h = 128 + visualize._CAPTION_HEIGHT
    width = 3 * 48 * 8  # the wide row: enlarged 8x to reach 128 pixels
    assert gallery.shape == (2 * row_h + _legend_height(width), width, 3) and gallery.dtype == np.uint8
    pred_x, y0 = 2 * 32 * 4, visualize._CAPTION_HEIGHT  # the prediction panel of the first row

    def pixel(y, x, panel_x=pred_x):
        return tuple(gallery[y0 + 4 * y + 1, panel_x + 4 * x + 1])

    blend = lambda colour: tuple(round(0.6 * c + 0.4 * 100) for c in colour)  # noqa: E731
    road = visualize.class_palette(3)[1]
    assert pixel(8, 8) == blend(road)  # correct
    assert pixel(24, 8) == blend(visualize.MISSED_COLOUR)
    assert pixel(8, 24) == blend(visualize.FALSE_POSITIVE_COLOUR)
    assert pixel(24, 24) == (100, 100, 100)  # true negative: the image itself
    assert pixel(0, 20) == blend(visualize.IGNORE_COLOUR)  # ignored, though predicted as the class
    assert pixel(24, 8, panel_x=32 * 4) == blend(road)  # truth panel: the class wherever it is true
    assert tuple(gallery[y0 + 2 * row_h - 5, 3 * 32 * 4 + 10]) == (255, 255, 255)  # narrow row padded


def test_write_produces_the_report_and_never_leaves_half_a_file(tmp_path, monkeypatch):
    report, k = _report(), 3
    gallery = error_gallery(_error_rows(3), 1, report.class_names)
    written = report.write(tmp_path / "out", k, {"bike lane": gallery})
    out = tmp_path / "out"
    assert sorted(p.name for p in written) == ["gallery_bike_lane.jpg", "per_image.csv", "report.md"]
    assert gallery_file("bike lane") == "gallery_bike_lane.jpg"
    with Image.open(out / "gallery_bike_lane.jpg") as jpeg:
        assert jpeg.format == "JPEG"
        assert jpeg.height == 3 * (128 + visualize._CAPTION_HEIGHT) + _legend_height(3 * 32 * 4)
        # Lossy: flat areas come back within a few levels (JPEG at quality 75), the picture is the gallery's.
        assert np.abs(np.asarray(jpeg.convert("RGB"), dtype=np.int64) - gallery).mean() < 3
    text = (out / "report.md").read_text()
    assert "12 images" in text and "![bike lane: worst images](gallery_bike_lane.jpg)" in text
    for c, name in enumerate(report.class_names):
        section = text.split(f"## {name}\n")[1].split("\n## ")[0]
        ranked = [line.split(" | ")[1] for line in section.splitlines() if line.startswith("| ") and "---" not in line]
        assert ranked[1:] == [report.image_paths[i] for i in worst_images(report.scores, k)[c]]
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def half_written_save(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"\xff\xd8 half a JPEG")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", half_written_save)
    changed = PerImageReport(report.image_paths, report.class_names, report.matrices.flip(0))
    with pytest.raises(OSError, match="disk full"):
        changed.write(out, k, {"bike lane": gallery[:, ::-1].copy()})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # same files, same bytes, no temp files

    calls = []

    def failing_cell(value):  # the CSV writer fails after its first rows
        calls.append(value)
        if len(calls) > 5:
            raise OSError("disk full")
        return f"{value:.6f}"

    monkeypatch.setattr(per_image, "_cell", failing_cell)
    with pytest.raises(OSError, match="disk full"):
        changed.write_csv(out / "per_image.csv")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_class_without_images_says_so():
    matrices = torch.zeros((2, 2, 2), dtype=torch.int64)
    matrices[:, 0, 0] = 5
    text = PerImageReport(["a.png", "b.png"], ["sky", "bird"], matrices).markdown(5)
    assert "No image has bird in its truth or its prediction." in text
    assert "| 1 | a.png | 1.0000 | 1.0000 | 5 | 5 |" in text and "| 2 | b.png |" in text


def test_gather_in_one_process_equals_result():
    images = _accumulated()
    indices, matrices = images.result()
    gathered_indices, gathered = images.gather()
    assert gathered_indices == indices and torch.equal(gathered, matrices)
    assert PerImageConfusion(C).gather()[1].shape == (0, C, C)


def test_gather_joins_the_shards_of_two_ranks_in_index_order(monkeypatch):
    shards = [PerImageConfusion(C), PerImageConfusion(C)]  # ShardSampler: rank r holds indices r, r + 2, ...
    for logits, target, indices in _batches():
        for j, index in enumerate(indices):
            shards[index % 2].update(logits[j : j + 1], target[j : j + 1], [index])
    monkeypatch.setattr(per_image, "all_gather_objects", lambda obj: [shards[0].result(), shards[1].result()])
    indices, matrices = shards[0].gather()
    expected_indices, expected = _accumulated().result()
    assert indices == expected_indices and torch.equal(matrices, expected)


def test_a_repeated_index_is_an_error():
    images = PerImageConfusion(2)
    images.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long), [3])
    images.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long), [3])
    with pytest.raises(ValueError, match=r"indices \[3\]"):
        images.result()
