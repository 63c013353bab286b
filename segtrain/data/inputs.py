"""The images a prediction run reads, and the names its outputs take.

An input is one image file, a folder (searched recursively for the image extensions the
datasets read, through links to folders too), a glob pattern (``data/new/**/*.png``), or a list
file (``.txt``, one path per line, relative to the list file's folder; ``#`` starts a comment). Every image gets a key, its
path relative to the input's base folder without the suffix (``city/frame_01``), and its
outputs are ``<output>/<key>.png``, ``<output>/<key>_color.png``, ...: sub-folders are kept
and names match the inputs.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

from segtrain.data.folder import IMAGE_EXTENSIONS

LIST_SUFFIXES = (".txt", ".lst")


@dataclass(frozen=True)
class InputImage:
    path: Path
    key: str  # relative to the base folder, without the suffix: the outputs' name


def _is_image(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(IMAGE_EXTENSIONS)


def _walk(folder: Path) -> list[Path]:
    """The images under ``folder``, through symbolic links to folders too (``Path.rglob`` does not follow them),
    each real folder once: a link back to a folder above is not followed round again."""
    found, seen = [], set()
    for current, dirs, files in os.walk(folder, followlinks=True):
        st = os.stat(current)
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []  # a loop, or a folder already searched under another name
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs.sort()
        found += [path for path in (Path(current, name) for name in files) if _is_image(path)]
    return found


def _from_list(list_file: Path) -> tuple[list[Path], Path]:
    paths = []
    for number, line in enumerate(list_file.read_text().splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        path = Path(text).expanduser()
        path = path if path.is_absolute() else list_file.parent / path
        if not path.is_file():
            raise FileNotFoundError(f"{list_file}:{number}: {text!r}: no such image file")
        paths.append(path)
    base = Path(os.path.commonpath([str(p.parent.resolve()) for p in paths])) if paths else list_file.parent
    return paths, base


def _glob_base(pattern: str) -> Path:
    """The folder part of a pattern before its first wildcard."""
    parts = Path(pattern).parts
    fixed = parts[: next(i for i, p in enumerate(parts) if glob.has_magic(p))]
    return Path(*fixed) if fixed else Path(".")


def find_inputs(spec: str | Path) -> tuple[list[InputImage], Path]:
    """(images in a stable order, the base folder their keys are relative to)."""
    text = str(spec)
    path = Path(text).expanduser()
    if glob.has_magic(text) and not path.exists():
        base = _glob_base(text)
        paths = sorted(p for p in map(Path, glob.glob(text, recursive=True)) if _is_image(p))
        source = f"no image ({', '.join(IMAGE_EXTENSIONS)}) matches the pattern"
    elif path.is_dir():
        base = path
        images = sorted((InputImage(p, p.relative_to(path).with_suffix("").as_posix()) for p in _walk(path)),
                        key=lambda image: image.key)
        if not images:
            raise FileNotFoundError(f"input={text!r}: no image ({', '.join(IMAGE_EXTENSIONS)}) in the folder or its "
                                    "sub-folders")
        return images, base
    elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        paths, base = _from_list(path)
        source = "the list file names no image"
    elif path.is_file():
        if not _is_image(path):
            raise ValueError(f"input={text!r}: not an image ({', '.join(IMAGE_EXTENSIONS)}) nor a list file "
                             f"({', '.join(LIST_SUFFIXES)})")
        paths, base, source = [path], path.parent, ""
    else:
        raise FileNotFoundError(f"input={text!r}: no such file, folder or matching pattern")
    if not paths:
        raise FileNotFoundError(f"input={text!r}: {source}")
    return [InputImage(p, _key(p, base)) for p in paths], base


def _key(path: Path, base: Path) -> str:
    try:
        relative = path.resolve().relative_to(base.resolve())
    except ValueError:  # a list entry outside the common folder cannot happen; keep the name anyway
        relative = Path(path.name)
    return relative.with_suffix("").as_posix()


def check_output_dir(output: Path, base: Path, spec: str | Path) -> None:
    """The outputs must not land where the inputs are searched: a second run would read them."""
    out, root = output.resolve(), base.resolve()
    if Path(spec).is_file():
        return  # one image or a list: nothing is searched
    if out == root or root in out.parents:
        raise ValueError(f"output={str(output)!r} is inside the input folder {base}: the predicted masks would be "
                         "read as inputs by the next run; choose an output folder outside it")
