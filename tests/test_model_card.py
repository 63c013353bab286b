"""The model card: every number in its tables is the one in metrics.json or the checkpoint, the Reproduce command is
the stored command line, calibrate and export keep their sections, the limits are generated from the run."""

from __future__ import annotations

import csv
import json
import math
import shlex

import onnx
import pytest
import torch

from segtrain.analysis.model_card import (EXPORTS, card_for, note_export, update_model_card, write_model_card)

SCORES = {"dice": "Dice", "iou": "IoU", "precision": "precision", "recall": "recall", "ece": "ECE"}


def card_tables(text: str) -> dict[tuple[str, str | None], list[dict[str, str]]]:
    """Every Markdown table of a card as {(section, caption): rows}; the caption is the ``Table: ...`` line just
    before the table, None without one."""
    tables, section, lines = {}, None, text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("## "):
            section = line[3:]
        if not line.startswith("|") or lines[i - 1].startswith("|"):
            continue
        before = [previous for previous in lines[:i] if previous.strip()][-1]
        rows = []
        for row in lines[i + 2:]:
            if not row.startswith("|"):
                break
            rows.append(row.strip("|").split(" | "))
        header = [cell.strip() for cell in line.strip("|").split(" | ")]
        key = (section, before if before.startswith("Table: ") else None)
        tables[key] = [dict(zip(header, (cell.strip() for cell in row))) for row in rows]
    return tables


def captioned(tables, section: str, words: str) -> list[dict[str, str]]:
    (rows,) = [rows for (s, caption), rows in tables.items() if s == section and caption and words in caption]
    return rows


def number(cell: str) -> int:
    return int(cell.replace(",", ""))


def same(cell: str, value: float) -> bool:
    """``cell`` is ``value`` rounded to the card's 4 decimals ("nan" for NaN)."""
    return cell == "nan" if math.isnan(value) else float(cell) == round(value, 4)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A four-step debug=fast run (a space in its paths, for the shell quoting) and its card as first written."""
    from segtrain.config import compose_config
    from segtrain.train import train

    tmp = tmp_path_factory.mktemp("model card")
    overrides = ["debug=fast", f"dataset.root={tmp / 'data set'}", "trainer.max_steps=4"]
    train(compose_config(overrides), tmp / "run", overrides=overrides)
    card = write_model_card(tmp / "run")
    return tmp / "run", card.read_text()


def test_every_number_in_the_tables_is_the_one_in_its_file(run):
    run_dir, text = run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    ckpt = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    names, tables = metrics["class_names"], card_tables(text)
    model = {row["field"]: row["value"] for row in tables[("Model", None)]}
    assert model["checkpoint"] == "checkpoints/best.pt" and number(model["step"]) == ckpt["train_state"]["step"]
    assert {row["split"]: number(row["images"]) for row in tables[("Data", None)]} == metrics["split_sizes"]
    data = captioned(tables, "Data", "per class")
    assert [row["class"] for row in data] == names
    for c, row in enumerate(data):
        assert number(row["training pixels"]) == metrics["class_pixels"][c]
        assert number(row["training images"]) == metrics["class_images"][c]
        assert same(row["share of labelled pixels"], metrics["class_pixel_share"][c])
    weights = captioned(tables, "Training recipe", "class weights")
    assert [row["class"] for row in weights] == names
    assert all(same(row["class weight"], w) for row, w in zip(weights, ckpt["class_weights"].tolist()))
    final = captioned(tables, "Results on val", "metrics.json `final`")
    assert [row["class"] for row in final] == names
    for row, name in zip(final, names):
        for key, column in SCORES.items():
            assert same(row[column], metrics["final"][f"val/{key}/{name}"]), (name, key)
    means = {row["metric"]: row["final"] for row in captioned(tables, "Results on val", "means")}
    assert all(same(means[key], metrics["final"][f"val/{key}"]) for key in ("mDice", "mIoU", "pixel_acc", "ece"))
    assert f"holds step {ckpt['train_state']['step']}" in text


def test_hard_cases_are_the_worst_rows_of_per_image_csv(run):
    run_dir, text = run
    rows = list(csv.DictReader((run_dir / "eval" / "val" / "per_image.csv").open()))
    cases = card_tables(text)[("Hard cases", None)]
    for name in json.loads((run_dir / "metrics.json").read_text())["class_names"]:
        expected = sorted(float(r["dice"]) for r in rows if r["class"] == name and r["dice"])[:3]
        got = [row["Dice"] for row in cases if row["class"] == name]
        assert len(got) == len(expected) and all(same(cell, value) for cell, value in zip(got, expected)), name


def test_reproduce_gives_the_stored_command_line_shell_quoted(run):
    run_dir, text = run
    ckpt = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    lines = text.split("## Reproduce", 1)[1].splitlines()
    train = [line for line in lines if line.startswith("python -m segtrain ")]
    assert len(train) == 1 and " " in ckpt["overrides"][1]  # the data root's space, quoted
    assert shlex.split(train[0]) == ["python", "-m", "segtrain", *ckpt["overrides"]]
    (evaluate,) = [line for line in lines if line.startswith("python -m segtrain.evaluate")]
    assert shlex.split(evaluate)[3:] == [f"checkpoint={run_dir / 'checkpoints' / 'best.pt'}"]


def linked_copy(run_dir, to, skip=()):
    """``run_dir``'s files as links in ``to`` (a card written there leaves the shared run's card as it is)."""
    (to / "checkpoints").mkdir()
    for name in ("config.yaml", "metrics.json", "eval", "checkpoints/best.pt", "checkpoints/last.pt"):
        if name not in skip:
            (to / name).symlink_to(run_dir / name)
    return to


def test_results_label_final_and_best_apart(run, tmp_path):
    """best.pt at an earlier step than last.pt (metrics.json's best made so): two tables, each of its own source."""
    run_dir, _ = run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["best"] = {**{k: v / 2 for k, v in metrics["final"].items()}, "step": 2, "epoch": 0}
    (linked_copy(run_dir, tmp_path, skip=("metrics.json",)) / "metrics.json").write_text(json.dumps(metrics))
    text = write_model_card(tmp_path, tmp_path / "checkpoints" / "last.pt").read_text()
    tables = card_tables(text)
    for source, words in (("final", "last.pt, step 4: the final evaluation"), ("best", "best.pt, step 2")):
        rows = captioned(tables, "Results on val", words)
        for row, name in zip(rows, metrics["class_names"]):
            assert all(same(row[column], metrics[source][f"val/{key}/{name}"]) for key, column in SCORES.items())
        means = {row["metric"]: row[source] for row in captioned(tables, "Results on val", "means")}
        assert same(means["mDice"], metrics[source]["val/mDice"])
    assert "last.pt, holds step 4: the `final` scores are its own" in text


def test_limits_flag_classes_with_few_training_images(run, tmp_path):
    """Spot is in 7 of the 8 training images: the only class under min_images=8."""
    run_dir, text = run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    card = write_model_card(linked_copy(run_dir, tmp_path), min_images=8, min_pixels=0).read_text()
    few = {n for n, images in zip(metrics["class_names"], metrics["class_images"]) if images < 8}
    assert few and {n for n in metrics["class_names"] if f"**{n}: too few to trust**" in card} == few
    low = {n for n in metrics["class_names"] if not metrics["final"][f"val/dice/{n}"] >= 0.1}  # nan included
    assert {n for n in metrics["class_names"] if f"- **{n}: val Dice" in card or f"- **{n}: no val Dice" in card} == low


def test_an_uncalibrated_checkpoint_gets_the_command_that_calibrates_it(run):
    run_dir, text = run
    section = text.split("## Calibration and decision", 1)[1].split("\n## ", 1)[0]
    assert "checkpoints/best.pt is uncalibrated" in section
    (command,) = [line for line in section.splitlines() if line.startswith("python -m segtrain.calibrate")]
    assert shlex.split(command)[3:] == [f"checkpoint={run_dir / 'checkpoints' / 'best.pt'}", "decision.tune=true"]


def test_calibrate_writes_its_section_of_the_calibrated_checkpoint(run):
    from segtrain.calibrate import calibrate

    run_dir, _ = run
    path, _ = calibrate(run_dir / "checkpoints" / "best.pt", ["decision.tune=true", "decision.objective=mDice"])
    entry = torch.load(path, weights_only=True)["calibration"]
    tables = card_tables((run_dir / "checkpoints" / "model_card.md").read_text())
    fields = {row["field"]: row["value"] for row in tables[("Calibration and decision", None)]}
    assert fields["checkpoint"] == "checkpoints/best_calibrated.pt"
    assert same(fields["temperature"], entry["temperature"])
    assert fields["objective"].startswith("mDice: ") and entry["fitted_on"]["name"] in fields["fitted on"]
    before, after = fields["objective"].removeprefix("mDice: ").split(" -> ")
    assert same(before, entry["objective_value"][0]) and same(after, entry["objective_value"][1])
    bias = captioned(tables, "Calibration and decision", "per class")
    assert len(bias) == len(entry["bias"]) and all(same(row["bias"], b) for row, b in zip(bias, entry["bias"]))


@pytest.mark.slow
def test_export_carries_the_card_and_the_card_lists_the_export(run, tmp_path):
    from segtrain.export import main

    run_dir, _ = run
    card = run_dir / "checkpoints" / "model_card.md"
    before, out = card.read_text(), tmp_path / "model.onnx"
    checkpoint = run_dir / "checkpoints" / "best.pt"
    assert main([f"checkpoint={checkpoint}", f"output={out}", "size=64", "verify_size=96"]) == 0
    meta = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert meta["model_card"] == before  # the card as it was before its own Exports row
    after = card.read_text()
    assert after.startswith(before.rstrip("\n").split(f"\n## {EXPORTS}")[0])  # nothing else changed
    (row,) = card_tables(after)[(EXPORTS, None)]
    assert row["file"] == str(out) and row["checkpoint"] == "checkpoints/best.pt"
    assert (row["format"], row["head"], row["input"]) == ("onnx", "logits", "float32")
    assert row["verification"].startswith("verified: ") and "FAILED" not in row["verification"]


def test_update_replaces_a_section_in_place_and_appends_a_new_one(tmp_path):
    card = tmp_path / "checkpoints" / "model_card.md"
    card.parent.mkdir()
    card.write_text("# Model card: x\n\n## A\n\none\n\n## B\n\ntwo\n")
    update_model_card(card, "A", "uno")
    update_model_card(card, "C", "tres")
    assert card.read_text() == "# Model card: x\n\n## A\n\nuno\n\n## B\n\ntwo\n\n## C\n\ntres\n"
    for verification in ("verified: first", "verified: second"):  # one row per file, the newest
        note_export(card, tmp_path / "m.onnx", tmp_path / "checkpoints" / "best.pt", "onnx", "argmax", "uint8",
                    verification)
    note_export(card, tmp_path / "m.pt2", tmp_path / "checkpoints" / "last.pt", "torch_export", "logits", "float32",
                "not verified (verify=false)")
    rows = card_tables(card.read_text())[(EXPORTS, None)]
    assert [(row["file"], row["verification"]) for row in rows] == [
        (str(tmp_path / "m.onnx"), "verified: second"), (str(tmp_path / "m.pt2"), "not verified (verify=false)")]
    with pytest.raises(FileNotFoundError, match="no model card to update"):
        update_model_card(tmp_path / "none.md", "A", "x")


def test_no_card_outside_a_run_directory(tmp_path):
    checkpoint = tmp_path / "checkpoints" / "best.pt"  # no metrics.json beside checkpoints/
    checkpoint.parent.mkdir()
    assert card_for(checkpoint) is None and not (tmp_path / "checkpoints" / "model_card.md").exists()
