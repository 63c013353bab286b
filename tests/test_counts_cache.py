"""The class-count pass: where its cache goes (``dataset.cache_dir``, a read-only root's fallback) and the ignored
pixels it counts beside the (N, C) matrix."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segtrain.data import FolderDataset, scan_cache
from segtrain.data.check import check_split, format_report
from segtrain.data.scan import counts_cache_file, image_class_counts, image_pixel_counts
from segtrain.data.scan_cache import counts_cache_in, user_cache_dir
from segtrain.data.scan_ranks import pixel_counts_over_ranks
from segtrain.stats import class_stats_report

MASKS = {  # 4x5 label maps of 3 classes; 255 is ignored, 7 a label outside the classes
    "a": [[0, 0, 1, 255, 2], [0, 255, 1, 1, 2], [0, 0, 0, 255, 255], [2, 2, 0, 0, 0]],
    "b": [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]],
    "c": [[255, 255, 255, 255, 255], [2, 2, 2, 7, 7], [0, 1, 2, 0, 1], [255, 0, 0, 0, 0]],
}


def _dataset(root: Path, bad: bool = False) -> Path:
    """images/train and masks/train of ``MASKS`` (of "a" and "b" only unless ``bad``)."""
    for folder in ("images/train", "masks/train"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for name, mask in MASKS.items():
        if name == "c" and not bad:
            continue
        Image.fromarray(np.full((4, 5, 3), 90, np.uint8)).save(root / "images/train" / f"{name}.png")
        Image.fromarray(np.array(mask, np.uint8)).save(root / "masks/train" / f"{name}.png")
    return root


def test_ignored_pixels_are_counted_beside_the_matrix(tmp_path):
    split = image_pixel_counts(FolderDataset(_dataset(tmp_path / "d", bad=True), "train", 3, on_bad_label="ignore"), 3)
    # Hand counts: a has 4 pixels of 255; b none; c 6 of 255 and 2 of 7 (ignored too, on_bad_label=ignore).
    assert split.ignored.tolist() == [4, 0, 8] and split.pixels.tolist() == [20, 20, 20]
    assert split.counts.tolist() == [[9, 3, 4], [10, 10, 0], [6, 2, 4]]  # (N, C) as before: classes only
    again = image_pixel_counts(FolderDataset(tmp_path / "d", "train", 3, on_bad_label="ignore"), 3)
    assert again.ignored.tolist() == [4, 0, 8] and again.counts.tolist() == split.counts.tolist()  # the cache's
    with np.load(counts_cache_file(FolderDataset(tmp_path / "d", "train", 3, on_bad_label="ignore"), 3)) as cached:
        assert cached["ignored"].tolist() == [4, 0, 8]  # what the second call read

    report = check_split(FolderDataset(tmp_path / "d", "train", 3, on_bad_label="ignore"))
    assert (report.ignored, report.pixels) == (12, 60)
    assert "  ignored (ignore_index 255): 12 pixels, 20.00% of all 60" in format_report(report, ["x", "y", "z"])


def test_stats_prints_the_ignored_pixels(tmp_path, compose_cfg):
    cfg = compose_cfg(["dataset=folder", f"dataset.root={_dataset(tmp_path / 'd')}", "dataset.num_classes=3",
                       "trainer.num_workers=0", f"dataset.cache_dir={tmp_path / 'cache'}"])
    for _ in range(2):  # computed, then read from the cache
        text = class_stats_report(cfg)
        assert "ignored pixels (ignore_index 255): 4 of 40 (10.00%)" in text.splitlines()
    assert "cached: read from " + str(tmp_path / "cache") in text  # dataset.cache_dir: the configured folder
    assert not (tmp_path / "d/.segtrain").exists()


def test_the_cache_goes_where_configured(tmp_path):
    root = _dataset(tmp_path / "d")
    dataset = FolderDataset(root, "train", 3)
    image_class_counts(dataset, 3, cache_dir=tmp_path / "given")
    with counts_cache_in(tmp_path / "context"):  # as training and evaluate set dataset.cache_dir
        assert pixel_counts_over_ranks(dataset, 3).counts.tolist() == [[9, 3, 4], [10, 10, 0]]
        path = counts_cache_file(dataset, 3)
    assert path.parent == tmp_path / "context" and path.is_file()
    assert [p.parent for p in (tmp_path / "given").glob("class_counts-*.npz")] == [tmp_path / "given"]
    assert not (root / ".segtrain").exists()
    assert counts_cache_file(dataset, 3).parent == root / ".segtrain"  # null: beside the dataset, as before


@pytest.fixture
def read_only(monkeypatch):
    """``read_only(root)``: the root cannot be written; as root chmod changes nothing, so the check is told too."""
    roots = []

    def make(root: Path) -> Path:
        os.chmod(root, 0o555)
        roots.append(root)
        if os.access(root, os.W_OK):  # running as root
            real = scan_cache.writable
            monkeypatch.setattr(scan_cache, "writable",
                                lambda folder: not any(Path(folder).is_relative_to(r) for r in roots) and real(folder))
        return root

    yield make
    for root in roots:
        os.chmod(root, 0o755)


def test_a_read_only_root_falls_back_to_the_user_cache(tmp_path, monkeypatch, caplog, read_only):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    roots = [_dataset(tmp_path / "d1"), _dataset(tmp_path / "d2")]
    shutil.copytree(roots[0], tmp_path / "d0")  # written before the root became read-only: its cache is read there
    image_class_counts(FolderDataset(tmp_path / "d0", "train", 3), 3)
    for root in (*roots, tmp_path / "d0", tmp_path / "d0/.segtrain"):
        read_only(root)
    with caplog.at_level(logging.INFO, logger="segtrain.data.scan"):
        first = [counts_cache_file(FolderDataset(root, "train", 3), 3) for root in roots]
        for root in roots:
            image_class_counts(FolderDataset(root, "train", 3), 3)
    assert [path.parent.parent for path in first] == [user_cache_dir()] * 2 == [tmp_path / "xdg/segtrain"] * 2
    assert first[0].parent != first[1].parent and all(path.is_file() for path in first)  # a folder per root
    moved = [r.getMessage() for r in caplog.records if "cannot be written" in r.getMessage()]
    assert moved == [f"{root} cannot be written: the class-count cache goes to {path.parent} (dataset.cache_dir sets "
                     "another folder)" for root, path in zip(roots, first)]  # one line per root
    assert not any((root / ".segtrain").exists() for root in roots)
    assert counts_cache_file(FolderDataset(tmp_path / "d0", "train", 3), 3).parent == tmp_path / "d0/.segtrain"
    # The fingerprint rules hold in the fallback: a rewritten mask is another key, counted again.
    Image.fromarray(np.zeros((4, 5), np.uint8)).save(roots[0] / "masks/train/a.png")
    changed = counts_cache_file(FolderDataset(roots[0], "train", 3), 3)
    assert changed.parent == first[0].parent and changed != first[0] and not changed.exists()
    assert image_class_counts(FolderDataset(roots[0], "train", 3), 3).tolist() == [[20, 0, 0], [10, 10, 0]]
