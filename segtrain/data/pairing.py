"""Find the (image, mask) file pairs of a split: by matching keys, or from a list file.

A file's key is its path relative to its directory, without the layout's suffix: ``a`` for
``images/train/a.png``, ``aachen/aachen_000000_000019`` for Cityscapes'
``leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png``. Images and masks with
the same key form a pair. Every problem is collected, not just the first, so that one error
(or one ``check_dataset.py`` report) lists all the unpaired files at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence


@dataclass
class Pairing:
    image_paths: list[Path] = field(default_factory=list)
    mask_paths: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # one line per unpaired or missing file


def files_by_key(directory: Path, suffixes: Sequence[str], recursive: bool = False) -> dict[str, Path]:
    """``{key: path}`` of the files under ``directory`` whose name ends with one of ``suffixes``
    (case-insensitive); a key shared by two files is an error naming both."""
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: directory not found")
    lowered = [s.lower() for s in suffixes]
    files: dict[str, Path] = {}
    for path in sorted(directory.rglob("*") if recursive else directory.iterdir()):
        name = path.name.lower()
        suffix = next((s for s in lowered if name.endswith(s)), None)
        if suffix is None or not path.is_file():
            continue
        key = path.relative_to(directory).as_posix()[: -len(suffix)]
        if key in files:
            raise ValueError(f"{directory}: two files share the key '{key}': {files[key].name}, {path.name}")
        files[key] = path
    return files


def pair_by_key(image_dir: Path, mask_dir: Path, image_suffixes: Sequence[str], mask_suffix: str,
                recursive: bool = False) -> Pairing:
    """Every image with a mask of the same key; unmatched files on either side are problems."""
    images = files_by_key(image_dir, image_suffixes, recursive)
    masks = files_by_key(mask_dir, (mask_suffix,), recursive)
    return pair_keys(images, masks, image_dir, lambda key: f"no mask {mask_dir / (key + mask_suffix)}")


def pair_keys(images: dict[str, Path], masks: dict[str, Path], image_dir: Path, missing) -> Pairing:
    """The pairs of the keys both sides have; ``missing(key)`` says what an image without a mask lacks."""
    out = Pairing()
    for key in sorted(images.keys() - masks.keys()):
        out.problems.append(f"{images[key]}: {missing(key)}")
    for key in sorted(masks.keys() - images.keys()):
        out.problems.append(f"{masks[key]}: no image with key '{key}' in {image_dir}")
    for key in sorted(images.keys() & masks.keys()):
        out.image_paths.append(images[key])
        out.mask_paths.append(masks[key])
    return out


def pair_from_list(list_path: Path, root: Path, image_dir: Path, mask_dir: Path, image_suffixes: Sequence[str],
                   mask_suffix: str, recursive: bool = False) -> Pairing:
    """The pairs a list file names, in its order: one key per line (looked up in ``image_dir``
    and ``mask_dir``), or ``image_path mask_path`` per line (relative to ``root``).

    Blank lines and lines starting with ``#`` are skipped. Files the list does not name are
    not part of the split (Pascal VOC keeps every split's images in one directory).
    """
    if not list_path.is_file():
        raise FileNotFoundError(f"{list_path}: list file not found")
    lines = [(n, line.split()) for n, line in enumerate(list_path.read_text().splitlines(), 1)]
    lines = [(n, fields) for n, fields in lines if fields and not fields[0].startswith("#")]
    out = Pairing()
    images = masks = None
    seen: dict[tuple[str, ...], int] = {}
    for n, fields in lines:
        where = f"{list_path}:{n}"
        if len(fields) > 2:
            raise ValueError(f"{where}: expected a key or 'image_path mask_path', got {len(fields)} fields")
        if tuple(fields) in seen:
            raise ValueError(f"{where}: '{' '.join(fields)}' is listed twice (first at line {seen[tuple(fields)]})")
        seen[tuple(fields)] = n
        if len(fields) == 2:
            image, mask = (root / f for f in fields)
            missing = [f"{where}: {p}: file not found" for p in (image, mask) if not p.is_file()]
        else:
            if images is None:  # listed only when needed: pair lists never touch the directories
                images = files_by_key(image_dir, image_suffixes, recursive)
                masks = files_by_key(mask_dir, (mask_suffix,), recursive)
            key = fields[0]
            image, mask = images.get(key), masks.get(key)
            missing = []
            if image is None:
                missing.append(f"{where}: '{key}' has no image ({', '.join(image_suffixes)}) in {image_dir}")
            if mask is None:
                missing.append(f"{where}: '{key}' has no mask {mask_dir / (key + mask_suffix)}")
        out.problems += missing
        if not missing:
            out.image_paths.append(image)
            out.mask_paths.append(mask)
    return out
