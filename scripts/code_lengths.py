"""The longest files and functions of a package, in lines (docstrings and comments included).

    python scripts/code_lengths.py            # segtrain/, the five longest of each
    python scripts/code_lengths.py segtrain --top 10

The layout rule (shared STYLE.md) is files under ~300 lines and functions under ~80;
tests/test_layout.py holds segtrain/ to 300 and 80.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path


def lengths(root: Path) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """([(lines, file)], [(lines, "file:line name")]), longest first."""
    files, functions = [], []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        name = path.relative_to(root.parent).as_posix()
        files.append((len(text.splitlines()), name))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([d.lineno for d in node.decorator_list] + [node.lineno])
                functions.append((node.end_lineno - start + 1, f"{name}:{node.lineno} {node.name}"))
    return sorted(files, reverse=True), sorted(functions, reverse=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", nargs="?", default=str(Path(__file__).resolve().parents[1] / "segtrain"))
    parser.add_argument("--top", type=int, default=5)
    args = parser.parse_args()
    files, functions = lengths(Path(args.root))
    print("| lines | file |\n|---:|---|")
    print("\n".join(f"| {n} | {name} |" for n, name in files[: args.top]))
    print("\n| lines | function |\n|---:|---|")
    print("\n".join(f"| {n} | {name} |" for n, name in functions[: args.top]))


if __name__ == "__main__":
    main()
