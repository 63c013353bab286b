"""The one wording for a value outside its choices: ``key=value; valid: a, b``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def choice_message(key: str, value: Any, valid: Iterable[Any], problem: str = "") -> str:
    """``trainer.amp='fp17'; valid: auto, bf16, fp16, none`` (``problem`` goes before the ';')."""
    return f"{key}={value!r}{' ' + problem if problem else ''}; valid: {', '.join(map(str, valid))}"


def check_choice(key: str, value: Any, valid: Iterable[Any], error: type[Exception] = ValueError) -> None:
    """Raise ``error(choice_message(...))`` unless ``value`` is one of ``valid``."""
    valid = tuple(valid)
    if value not in valid:
        raise error(choice_message(key, value, valid))
