"""The one wording for a value outside its choices: ``key=value; valid: a, b``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def choice_message(key: str, value: Any, valid: Iterable[Any], problem: str = "") -> str:
    """``trainer.amp='fp17'; valid: auto, bf16, fp16, none`` (``problem`` goes before the ';')."""
    return f"{key}={value!r}{' ' + problem if problem else ''}; valid: {', '.join(map(str, valid))}"


def check_count(key: str, value: Any, expected: str = "a whole number", minimum: int = 1) -> None:
    """Raise ``ValueError("key=value: expected <expected> >= <minimum>")`` unless ``value`` is an int (not a bool)
    of at least ``minimum``. Callers that allow null test for None first."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key}={value!r}: expected {expected} >= {minimum}")


def check_choice(key: str, value: Any, valid: Iterable[Any], error: type[Exception] = ValueError) -> None:
    """Raise ``error(choice_message(...))`` unless ``value`` is one of ``valid``."""
    valid = tuple(valid)
    if value not in valid:
        raise error(choice_message(key, value, valid))
