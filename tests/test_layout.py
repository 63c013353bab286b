"""The layout rules of shared STYLE.md that a machine can check: short files, short functions,
one home per name."""

import ast
import re
import sys
from pathlib import Path

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


# The commands: ``python -m segtrain`` (__main__ runs train) and ``python -m segtrain.<command>``.
COMMANDS = {"__main__": "train", "train": "train", "evaluate": "evaluate", "predict": "predict", "export": "export",
            "calibrate": "calibrate", "stats": "stats", "shard": "shard"}
# Root modules that are neither commands nor shared: what every stage runs on, the import fix.
ROOT_FRAME = {"__init__", "runtime", "compat"}


def segtrain_imports(path: Path) -> set[str]:
    """The segtrain modules a file imports, dotted (``segtrain.training.engine``); ``from segtrain.x import y`` counts
    ``segtrain.x.y`` too when that is a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "segtrain":
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "segtrain")
    package = ROOT / "segtrain"
    return {name for name in found if (package / Path(*name.split(".")[1:])).with_suffix(".py").is_file()
            or (package / Path(*name.split(".")[1:]) / "__init__.py").is_file()}


def modules(package: Path = ROOT / "segtrain") -> dict[str, Path]:
    """Dotted name -> file of every module in the package, __init__ files as their package."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def group(name: str) -> str:
    """Where a module sits: ``root`` for segtrain.<module>, else its folder (training, data, ...); a folder's
    ``__init__`` is the folder's."""
    parts = name.split(".")
    if len(parts) == 2 and (ROOT / "segtrain" / parts[1] / "__init__.py").is_file():
        return parts[1]
    return "root" if len(parts) <= 2 else parts[1]


def test_root_modules_are_commands_the_frame_or_shared_by_two_places(tmp_path):
    """The root does not fill up again: any other module there is imported from two places or more (the root's
    modules, a folder), else it belongs in a folder (config -> objects is the folder build/)."""
    assert root_rule_breaks(modules()) == []


def root_rule_breaks(found: dict[str, Path]) -> list[str]:
    users: dict[str, set[str]] = {}
    for name, path in found.items():
        for imported in segtrain_imports(path):
            if imported != name:
                users.setdefault(imported, set()).add(group(name))
    roots = [n for n, path in found.items() if path.parent.name == "segtrain" and path.name != "__init__.py"]
    return [f"{n}: imported from {sorted(users.get(n, ()))}" for n in roots
            if n.split(".")[1] not in COMMANDS and n.split(".")[1] not in ROOT_FRAME and len(users.get(n, ())) < 2]


def command_import_breaks(found: dict[str, Path]) -> list[str]:
    """No command imports another command, and nothing in a folder imports a command."""
    breaks = []
    for name, path in found.items():
        own = COMMANDS.get(name.split(".")[1]) if group(name) == "root" and "." in name else None
        for imported in segtrain_imports(path):
            target = COMMANDS.get(imported.split(".")[1]) if group(imported) == "root" and "." in imported else None
            if target is not None and target != own:
                breaks.append(f"{name} imports {imported}")
    return breaks


def test_no_command_imports_another_and_no_folder_imports_a_command():
    assert command_import_breaks(modules()) == []


def test_the_rules_see_a_planted_break(tmp_path):
    """Each rule on a small tree: a loose root module used from one place, a command importing a command."""
    package = tmp_path / "segtrain"
    (package / "training").mkdir(parents=True)
    for name in ("__init__.py", "training/__init__.py", "runtime.py"):
        (package / name).write_text("")
    (package / "loose.py").write_text("")
    (package / "shared.py").write_text("")
    (package / "evaluate.py").write_text("from segtrain.loose import x\nfrom segtrain.shared import y\n")
    (package / "training" / "engine.py").write_text("from segtrain.shared import y\n")
    (package / "predict.py").write_text("from segtrain.evaluate import check\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        found = modules(package)
        assert root_rule_breaks(found) == ["segtrain.loose: imported from ['root']"]
        assert command_import_breaks(found) == ["segtrain.predict imports segtrain.evaluate"]
    finally:
        ROOT = saved


def readme_layout_modules() -> set[str]:
    """The module file names the README's Layout block gives under segtrain/."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    package = block.split("\nsegtrain/\n", 1)[1].split("\nscripts/", 1)[0]
    return set(re.findall(r"\b([a-z_0-9]+\.py)\b", package))


def test_the_readme_layout_names_every_module_and_no_other():
    files = {p.name for p in (ROOT / "segtrain").rglob("*.py") if p.name != "__init__.py"}
    named = readme_layout_modules()
    assert sorted(files - named) == [] and sorted(named - files) == []
    folders = {p.name for p in (ROOT / "segtrain").iterdir() if (p / "__init__.py").is_file()}
    block = (ROOT / "README.md").read_text().split("## Layout", 1)[1]
    assert all(f"  {folder}/ " in block for folder in folders), folders
