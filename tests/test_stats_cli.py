"""``python -m segtrain.stats`` in a subprocess: its table against a direct computation.

Every run starts in the test's tmp dir, not the repository: the configs must be found
relative to the package, and nothing (no outputs/, no .hydra/, no log) may appear there.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from segtrain.build import dataset_split
from segtrain.config import load_option
from segtrain.data.class_stats import compute_class_stats
from segtrain.data.class_weights import STRATEGIES, compute_class_weights
from segtrain.data.scan import counts_cache_file
from segtrain.stats import _with_no_run_dir

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS_DIR = ROOT / "configs" / "weights"
COLUMNS = [s for s in STRATEGIES if s != "manual"]


def _run_stats(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "segtrain.stats", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def _parse_table(stdout: str) -> tuple[list[str], dict[str, list[str]]]:
    """(header cells, {class name: row cells}) of the table between its header and its footer."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("class ") and "pixels" in line)
    header = re.split(r"\s{2,}", lines[start].strip())
    assert set(lines[start + 1].replace(" ", "")) == {"-"}
    rows = {}
    for line in lines[start + 2:]:
        cells = line.split()
        if len(cells) != len(header):  # the footer
            break
        rows[cells[0]] = cells[1:]
    return header, rows


def _number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("%"))


def _assert_table_matches(stdout: str, stats, class_names, chosen: str, used: np.ndarray) -> None:
    header, rows = _parse_table(stdout)
    assert header[:5] == ["class", "pixels", "share", "images", "freq"]
    assert header[5:-1] == [s + ("*" if s == chosen else "") for s in COLUMNS]
    assert header[-1] == f"used ({chosen})"
    assert sum(cell.endswith("*") for cell in header) == 1
    assert list(rows) == class_names

    columns = {}
    for strategy in COLUMNS:
        options = OmegaConf.to_container(load_option("weights", strategy))
        columns[strategy] = compute_class_weights(stats, **options).numpy()
    for c, name in enumerate(class_names):
        cells = rows[name]
        assert _number(cells[0]) == stats.pixel_count[c]
        assert _number(cells[1]) == pytest.approx(100 * stats.frequency[c], abs=0.005 + 1e-9)
        assert _number(cells[2]) == stats.image_count[c]
        assert _number(cells[3]) == pytest.approx(stats.present_frequency[c], abs=5e-6 + 1e-12)
        # Weights print with 4 significant digits: half a unit of the 4th digit is <= 5e-4 relative.
        printed = [_number(cell) for cell in cells[4:]]
        expected = [columns[s][c] for s in COLUMNS] + [used[c]]
        assert printed == pytest.approx(expected, rel=5e-4 + 1e-9)


def test_table_matches_a_direct_computation_and_second_run_hits_the_cache(tmp_path, compose_cfg):
    data = tmp_path / "data"
    overrides = ["debug=fast", f"dataset.root={data}"]
    first = _run_stats(overrides, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]

    cfg = compose_cfg(overrides)
    train_set = dataset_split(cfg.dataset, "train")
    stats = compute_class_stats(train_set, cfg.dataset.num_classes, cfg.dataset.ignore_index, cache=False)
    names = list(cfg.dataset.class_names)
    used = compute_class_weights(stats, class_names=names, **cfg.weights).numpy()
    assert cfg.weights.strategy == "median_freq"
    _assert_table_matches(first.stdout, stats, names, "median_freq", used)
    cache_file = counts_cache_file(train_set, cfg.dataset.num_classes, cfg.dataset.ignore_index)
    assert cache_file.is_file()
    assert "computed over 8 masks" in first.stdout and str(cache_file) in first.stdout
    assert "cached" not in first.stdout

    # Other weights with normalize and a clip: the counts come from the cache, and the used
    # column differs from the strategy's own column.
    weights = ["weights=inverse_freq", "weights.normalize=mean", "weights.max_weight=2.0"]
    second = _run_stats(overrides + weights, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"cached: read from {cache_file}" in second.stdout
    used = compute_class_weights(stats, "inverse_freq", normalize="mean", max_weight=2.0).numpy()
    assert used.max() == pytest.approx(2.0)
    _assert_table_matches(second.stdout, stats, names, "inverse_freq", used)

    assert sorted(os.listdir(tmp_path)) == ["data"]  # no outputs/, .hydra/ or log file


def _write_folder_dataset(root: Path, bad: tuple[str, int] | None = None) -> None:
    """Two 8x8 samples per split, classes 0-2; ``bad = (stem, value)`` puts value into a train mask."""
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for stem in ("a", "b"):
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "images" / split / f"{stem}.png")
            mask = np.zeros((8, 8), np.uint8)
            mask[:4], mask[0, :2], mask[7, 7] = 1, 2, 255
            if bad is not None and split == "train" and stem == bad[0]:
                mask[5, 2:5] = bad[1]
            Image.fromarray(mask).save(root / "masks" / split / f"{stem}.png")


def test_bad_mask_label_exits_nonzero_naming_file_and_value(tmp_path):
    _write_folder_dataset(tmp_path / "data", bad=("b", 7))
    proc = _run_stats(["dataset=folder", "dataset.root=data", "dataset.num_classes=3"], cwd=tmp_path)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert str(Path("data/masks/train/b.png")) in output
    assert "value 7 (3 px)" in output and "[0, 3)" in output
    assert "Traceback" not in output
    assert not (tmp_path / "data" / ".segtrain").exists()  # a failed count caches nothing
    assert sorted(os.listdir(tmp_path)) == ["data"]


def test_folder_dataset_counts(tmp_path):
    _write_folder_dataset(tmp_path / "data")
    proc = _run_stats(["dataset=folder", "dataset.root=data", "dataset.num_classes=3", "weights=none"],
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    header, rows = _parse_table(proc.stdout)
    # per mask: class 2 x2, class 1 x30, class 0 x31, ignored x1
    assert [_number(rows[f"class_{c}"][0]) for c in range(3)] == [62, 60, 4]
    assert "none*" in header
    assert sorted(os.listdir(tmp_path)) == ["data"]


@pytest.mark.parametrize(
    "args, expected_prefix",
    [
        ([], []),
        (["debug=fast"], []),
        (["-m", "weights=none,enet"], ["-m"]),
        (["--cfg", "job", "debug=fast"], ["--cfg", "job"]),
        (["--info"], None),
    ],
)
def test_run_dir_overrides_join_the_users_overrides(args, expected_prefix):
    argv = _with_no_run_dir(["stats", *args])
    assert argv[0] == "stats" and "hydra.run.dir=." in argv and "hydra.output_subdir=null" in argv
    rest = argv[1:]
    if expected_prefix is None:  # only flags: the defaults go first, where no flag can take them
        assert rest[-1] == "--info"
        return
    assert rest[:len(expected_prefix)] == expected_prefix
    # The user's overrides come last, so their own hydra.run.dir=... would win.
    assert rest[len(rest) - len(args) + len(expected_prefix):] == args[len(expected_prefix):]
