"""The layout rules of shared STYLE.md that a machine can check: short files, short functions,
one home per name."""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from code_lengths import lengths  # noqa: E402

MAX_FILE_LINES = 300
MAX_FUNCTION_LINES = 80


def test_no_file_over_300_lines_and_no_function_over_80():
    files, functions = lengths(ROOT / "segtrain")
    assert files and functions
    assert [f for f in files if f[0] > MAX_FILE_LINES] == []
    assert [f for f in functions if f[0] > MAX_FUNCTION_LINES] == []


def test_the_length_count_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(85))
    (tmp_path / "long.py").write_text(f"def long():\n{body}\n")
    _, functions = lengths(tmp_path)
    assert functions[0][0] == 86 and functions[0][1].endswith("long")


@pytest.mark.parametrize("module", ["evaluate", "stats"])
def test_entry_points_build_through_build_py_not_train_py(module):
    tree = ast.parse((ROOT / "segtrain" / f"{module}.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "segtrain.train" not in imported and "segtrain.build" in imported
