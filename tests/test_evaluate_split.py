"""``segtrain.evaluate`` names the split it scored: its keys, its table's header, the metrics.json it saves."""

from __future__ import annotations

import json
import shutil

from segtrain import evaluate


def test_another_split_is_printed_and_saved_under_its_own_name(trained, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(trained / "data", data)
    for folder in ("images", "masks"):  # a test split: the val images under another name
        shutil.copytree(data / folder / "val", data / folder / "test")
    report = tmp_path / "report"
    code = evaluate.main([f"checkpoint={trained / 'run/checkpoints/last.pt'}", f"dataset.root={data}",
                          "dataset.split=test", f"report.dir={report}"])
    out = capsys.readouterr().out
    assert code == 0
    header, first_row = out.splitlines()[:2]  # the line above the table
    assert header.endswith(f"split test of {data} (4 images):") and first_row.startswith("class ")
    printed = json.loads(out.split("metrics: ", 1)[1])
    names = ["background", "region", "spot"]
    expected = {"test/mIoU", "test/mDice", "test/pixel_acc", "test/loss", "test/ece",
                *(f"test/{m}/{n}" for m in ("iou", "dice", "precision", "recall", "ece") for n in names)}
    assert set(printed) == expected  # no val/ key left
    saved = json.loads((report / "metrics.json").read_text())
    assert saved["split"] == "test" and saved["root"] == str(data) and saved["images"] == 4
    assert saved["metrics"] == printed
    # The same images under their training name: the same numbers, training's val/ keys.
    evaluate.main([f"checkpoint={trained / 'run/checkpoints/last.pt'}", f"dataset.root={data}",
                   f"report.dir={tmp_path / 'val'}"])
    on_val = json.loads(capsys.readouterr().out.split("metrics: ", 1)[1])
    assert on_val == {key.replace("test/", "val/", 1): value for key, value in printed.items()}
