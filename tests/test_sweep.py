"""Sweeps: a real Hydra multirun, scripts/sweep_report.py on it, and the sweep configs."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import CONFIG_DIR
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "sweep_report.py"
GRID = {"loss": ["ce", "focal_dice"], "weights": ["none", "median_freq"]}


def _load_script():
    spec = importlib.util.spec_from_file_location("sweep_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script loads
    spec.loader.exec_module(module)
    return module


sweep_report = _load_script()


def _table(report_md: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the markdown table in report.md."""
    lines = [line for line in report_md.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert set("".join(cells[1])) <= set("-:"), "second table line is the separator"
    return cells[0], cells[2:]


def _is_bold(cell: str) -> bool:
    return cell.startswith("**") and cell.endswith("**")


def _value(cell: str) -> str:
    return cell.strip("*")


def _metric_key(header: str) -> str:
    return {"mDice": "val/mDice", "mIoU": "val/mIoU"}.get(header) or "val/dice/" + header.removeprefix("Dice ")


def _check_bold_is_best(header: list[str], rows: list[list[str]], first_metric: int) -> None:
    for col in range(first_metric, len(header)):
        printed = {i: float(_value(row[col])) for i, row in enumerate(rows) if _value(row[col]) not in ("–", "nan")}
        best = max(printed.values())
        expected = set() if len(set(printed.values())) < 2 else {i for i, v in printed.items() if v == best}
        assert {i for i, row in enumerate(rows) if _is_bold(row[col])} == expected, header[col]


# ---------------------------------------------------------------- a real multirun, end to end


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("sweep")
    args = ["-m", "debug=fast", f"dataset.root={tmp / 'data'}", *(f"{k}={','.join(v)}" for k, v in GRID.items()),
            f"hydra.sweep.dir={tmp / 'sweep'}"]
    proc = subprocess.run([sys.executable, "-m", "segtrain", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "sweep"


def _report_cli(path: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(SCRIPT), str(path), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_multirun_writes_one_directory_per_combination(sweep_dir):
    assert (sweep_dir / "multirun.yaml").is_file()
    seen = set()
    for num in range(4):
        run = sweep_dir / str(num)
        overrides = dict(o.split("=", 1) for o in yaml.safe_load((run / ".hydra/overrides.yaml").read_text()))
        seen.add((overrides["loss"], overrides["weights"]))
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["weights_strategy"] == overrides["weights"]
        assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert seen == {(loss, weights) for loss in GRID["loss"] for weights in GRID["weights"]}
    assert not (sweep_dir / "4").exists()


@pytest.mark.slow
def test_report_rows_match_the_runs_metrics(sweep_dir):
    proc = _report_cli(sweep_dir)
    text = (sweep_dir / "report.md").read_text()
    assert text in proc.stdout  # the table is also printed
    header, rows = _table(text)
    assert header[:3] == ["run", "loss", "weights"]  # only the overrides that vary are columns
    assert "debug" not in header and "`debug=fast`" in text  # common ones are listed above the table
    assert header[3:] == ["mDice", "mIoU", "Dice background", "Dice region", "Dice spot"]
    assert len(rows) == 4
    for row in rows:
        run = sweep_dir / row[0]
        overrides = dict(o.split("=", 1) for o in yaml.safe_load((run / ".hydra/overrides.yaml").read_text()))
        assert row[1:3] == [overrides["loss"], overrides["weights"]]
        final = json.loads((run / "metrics.json").read_text())["final"]
        for name, cell in zip(header[3:], row[3:]):
            assert _value(cell) == f"{final[_metric_key(name)]:.4f}", (row[0], name)
    _check_bold_is_best(header, rows, first_metric=3)


@pytest.mark.slow
def test_report_png_is_a_valid_image(sweep_dir):
    _report_cli(sweep_dir)
    png = sweep_dir / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        assert image.size[0] > 300 and image.size[1] > 200


@pytest.mark.slow
def test_report_of_the_best_checkpoints(sweep_dir):
    text, _ = sweep_report.report(sweep_dir, which="best")
    header, rows = _table(text)
    assert header[3] == "step"
    for row in rows:
        best = json.loads((sweep_dir / row[0] / "metrics.json").read_text())["best"]
        assert row[3] == str(best["step"])
        assert _value(row[4]) == f"{best['val/mDice']:.4f}"


@pytest.mark.slow
def test_a_run_without_metrics_is_a_failed_row(sweep_dir, tmp_path):
    broken = tmp_path / "sweep"
    shutil.copytree(sweep_dir, broken)
    (broken / "2" / "metrics.json").unlink()
    text = _report_cli(broken).stdout
    header, rows = _table(text)
    assert len(rows) == 4 and header[3] == "status"
    by_run = {row[0]: row for row in rows}
    assert by_run["2"][3] == "failed" and all(cell == "–" for cell in by_run["2"][4:])
    assert by_run["2"][1:3] != ["–", "–"]  # its overrides are still shown
    assert all(by_run[n][3] == "ok" for n in ("0", "1", "3"))
    assert "Failed (no metrics.json): 2." in text
    _check_bold_is_best(header, rows, first_metric=4)


# ---------------------------------------------------------------- the report on hand-made runs


def _fake_run(sweep: Path, num: int, overrides: list[str], final: dict | None, **summary) -> None:
    run = sweep / str(num)
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if final is not None:
        names = ["bg", "rare", "mid"]
        data = {"class_names": names, "class_weights": [1.0, 1.0, 1.0], "weights_strategy": "none",
                "monitor": "val/mDice", "final": final, "best": {**final, "step": 7}, **summary}
        (run / "metrics.json").write_text(json.dumps(data))


def _metrics(mdice: float, rare: float, loss: float = 1.0) -> dict:
    return {"val/mDice": mdice, "val/mIoU": mdice - 0.1, "val/dice/bg": 0.9, "val/dice/rare": rare,
            "val/dice/mid": math.nan, "val/loss": loss}


def test_bold_marks_the_best_ties_and_lowest_loss(tmp_path):
    _fake_run(tmp_path, 0, ["lr=0.1", "seed=1"], _metrics(0.81234, 0.5, loss=0.3))
    _fake_run(tmp_path, 1, ["lr=0.2", "seed=1"], _metrics(0.81231, 0.7, loss=0.2))  # same mDice at 4 decimals
    _fake_run(tmp_path, 2, ["lr=0.3", "seed=1"], _metrics(0.7, 0.7, loss=0.4))
    text, _ = sweep_report.report(tmp_path, extra=["val/loss"])
    header, rows = _table(text)
    assert header == ["run", "lr", "mDice", "mIoU", "Dice bg", "Dice rare", "Dice mid", "val/loss"]
    assert "`seed=1`" in text
    bold = {h: [row[0] for row in rows if _is_bold(row[i])] for i, h in enumerate(header)}
    assert bold["mDice"] == ["0", "1"] and bold["Dice rare"] == ["1", "2"]
    assert bold["Dice bg"] == [] and bold["Dice mid"] == []  # all equal, or nan: nothing stands out
    assert bold["val/loss"] == ["1"]
    assert rows[0][5] == "0.5000" and rows[0][6] == "nan"
    with pytest.raises(SystemExit, match=r"--extra val/lss: not in the 'final' metrics of any run; valid: .*val/loss"):
        sweep_report.report(tmp_path, extra=["val/lss"])


def test_class_order_rarest_first_with_a_fallback(tmp_path):
    runs = [sweep_report.Run(0, tmp_path, {}, {}, {"class_pixel_share": [0.7, 0.05, 0.25]})]
    order, how = sweep_report.class_order(runs, ["bg", "rare", "mid"])
    assert order == ["rare", "mid", "bg"] and "pixel share" in how and "rare 5.0%" in how
    runs = [sweep_report.Run(0, tmp_path, {}, {}, {"class_weights": [1.0, 1.0, 1.0]}),
            sweep_report.Run(1, tmp_path, {}, {},
                             {"class_weights": [0.3, 9.0, 1.0], "weights_strategy": "median_freq"})]
    order, how = sweep_report.class_order(runs, ["bg", "rare", "mid"])
    assert order == ["rare", "mid", "bg"] and "median_freq class weight of run 1" in how
    assert sweep_report.class_order(runs[:1], ["bg", "rare", "mid"])[0] == ["bg", "rare", "mid"]


def test_report_without_matplotlib_still_writes_the_table(tmp_path, monkeypatch):
    _fake_run(tmp_path, 0, ["lr=0.1"], _metrics(0.8, 0.5))
    _fake_run(tmp_path, 1, ["lr=0.2"], None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    text, png = sweep_report.report(tmp_path)
    assert not png and not (tmp_path / "report.png").exists()
    assert "needs matplotlib" in text and (tmp_path / "report.md").read_text() == text
    assert [row[:3] for row in _table(text)[1]] == [["0", "0.1", "ok"], ["1", "0.2", "failed"]]


def test_a_directory_without_runs_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="no numbered run directories"):
        sweep_report.report(tmp_path)


# ---------------------------------------------------------------- the sweep configs


def _compose(overrides: list[str]):
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose(config_name="train", overrides=overrides, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


def test_imbalance_study_declares_the_grid_and_leaves_loss_free():
    cfg = _compose(["experiment=imbalance_study"])
    params = cfg.hydra.sweeper.params
    assert set(params) == {"loss", "weights"}
    parser = OverridesParser.create()
    for key, value in params.items():
        options = list(parser.parse_override(f"{key}={value}").sweep_string_iterator())
        assert all((CONFIG_DIR / key / f"{option}.yaml").is_file() for option in options), options
    assert len(list(parser.parse_override(f"loss={params.loss}").sweep_string_iterator())) == 3
    # No `override /loss` in the experiment: the defaults stay, the sweeper picks.
    assert cfg.hydra.runtime.choices.loss == "ce_dice" and cfg.hydra.runtime.choices.weights == "median_freq"
    assert cfg.trainer.epochs < _compose([]).trainer.epochs


def test_optuna_search_space_names_existing_keys():
    # Needs no plugin: every searched key exists in the focal_dice config, with a valid sweep syntax.
    search = OmegaConf.load(CONFIG_DIR / "hparams_search" / "focal_optuna.yaml")
    cfg = _compose(["loss=focal_dice"])
    parser = OverridesParser.create()
    for key, value in search.hydra.sweeper.params.items():
        assert OmegaConf.select(cfg, key) is not None, key
        assert parser.parse_override(f"{key}={value}").is_interval_sweep(), key


def _require_optuna():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper",
                        reason="the Optuna sweeper plugin is not installed (pip install -e '.[sweep]')")


def test_optuna_config_composes():
    _require_optuna()
    cfg = _compose(["hparams_search=focal_optuna"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert sweeper.direction == "maximize" and cfg.trainer.monitor == "val/mDice" and cfg.trainer.monitor_mode == "max"
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed is not None
    assert sweeper.n_trials == 20
    assert set(sweeper.params) == {"loss.terms.focal.gamma", "loss.terms.dice.loss_weight", "optimizer.lr"}
    assert set(cfg.loss.terms) == {"focal", "dice"}


@pytest.mark.slow
def test_optuna_runs_two_trials(tmp_path):
    _require_optuna()
    sweep = tmp_path / "optuna"
    args = ["-m", "hparams_search=focal_optuna", "debug=fast", f"dataset.root={tmp_path / 'data'}",
            "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run([sys.executable, "-m", "segtrain", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    scores = [json.loads((sweep / str(n) / "metrics.json").read_text())["best"]["val/mDice"] for n in range(2)]
    assert result["best_value"] == pytest.approx(max(scores))
    assert set(result["best_params"]) == {"loss.terms.focal.gamma", "loss.terms.dice.loss_weight", "optimizer.lr"}
    header, rows = _table(_report_cli(sweep).stdout)
    assert len(rows) == 2 and "optimizer.lr" in header
