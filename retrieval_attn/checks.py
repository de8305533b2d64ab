"""Checks of the values a user gives: the one ``ConfigError`` and the checks that raise it.

A ``ConfigError`` is a ``ValueError`` that carries, as data, the settings class and the field it is
about, what the field allows and the value given. Library users read the usual sentence
(``RetrievalConfig.top_k must be an int in [1, inf], got 0``); the CLI reads the field and prints the
flag that sets it (``--top-k must be an int >= 1, got 0``), with no text rewriting. Every settings class
(``RetrievalConfig``, the tools' settings) checks its fields with these functions.

Also the names of the dtypes the package takes (``DTYPE_NAMES``, resolved with ``dtype_named``), and the
one wording of a backend whose library is not installed (``missing_library_message``).

Imports nothing heavy (torch only inside ``dtype_named``): the CLI's parser uses it.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

__all__ = [
    "ConfigError", "DTYPE_NAMES", "check_bool", "check_choice", "check_int", "check_ints", "check_number",
    "check_numbers", "dtype_named", "missing_library_message", "shown",
]

DTYPE_NAMES = ("float32", "bfloat16", "float16")  # the weight and row dtypes, as flags and settings name them


class ConfigError(ValueError):
    """A field of a settings object holds a value it does not allow.

    Attributes
    ----------
    owner : the settings class (``"RetrievalConfig"``), or "" for a plain argument.
    field : the field's name (``"top_k"``).
    allowed : what the field allows, as a phrase that follows "must be" (``"an int >= 1"``).
    value : the value given.
    none_allowed : None is allowed too (a library caller may pass it; a CLI flag left out means it).
    hint : what follows the value: why it is refused, or what to do (``" (it needs the hnswlib package ...)"``).
    """

    def __init__(self, owner: str, field: str, allowed: str, value: Any, none_allowed: bool = False, hint: str = ""):
        self.owner, self.field, self.allowed, self.value = owner, field, allowed, value
        self.none_allowed, self.hint = none_allowed, hint
        name = f"{owner}.{field}" if owner else field
        super().__init__(f"{name} must be {allowed}{' or None' if none_allowed else ''}, got {value!r}{hint}")

    @classmethod
    def about(cls, owner: str, field: str, text: str) -> ConfigError:
        """An error about ``field`` that is no range: ``text`` follows the field's name after a colon."""
        err = cls(owner, field, "", None)
        err.text = text
        err.args = (f"{owner}.{field}: {text}" if owner else f"{field}: {text}",)
        return err

    text: str | None = None  # set by ``about``

    def for_flag(self, flag: str) -> str:
        """The sentence with ``flag`` in place of the field, the value as the user typed it."""
        if self.text is not None:
            return f"{flag}: {self.text}"
        return f"{flag} must be {self.allowed}, got {shown(self.value)}{self.hint}"


def shown(value: Any) -> str:
    """A value as a user typed it on a command line: sequences space-separated, strings unquoted."""
    if isinstance(value, (list, tuple)):
        return " ".join(shown(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _range(low: float | None, high: float | None) -> str:
    if high is None:
        return f">= {low}"
    return f"in [{low}, {high}]"


def check_int(owner: str, field: str, value: Any, low: int, high: int | None = None,
              none_allowed: bool = False) -> None:
    """``value`` is an int (not a bool) in [low, high] (high None: unbounded), or None where allowed."""
    if value is None and none_allowed:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        raise ConfigError(owner, field, f"an int {_range(low, high)}", value, none_allowed)


def check_ints(owner: str, field: str, values: Any, low: int, high: int | None = None, why: str = "") -> None:
    """``values`` is a non-empty sequence of ints in [low, high]; ``why`` explains the bound."""
    if (not isinstance(values, Sequence) or isinstance(values, str) or not values
            or any(isinstance(v, bool) or not isinstance(v, int) or v < low or (high is not None and v > high)
                   for v in values)):
        raise ConfigError(owner, field, f"one or more ints {_range(low, high)}{f' ({why})' if why else ''}", values)


def check_number(owner: str, field: str, value: Any, low: float, high: float = math.inf, low_open: bool = False,
                 high_open: bool = False, none_allowed: bool = False, unit: str = "") -> None:
    """``value`` is a finite real number (not a bool) between ``low`` and ``high``, each end open or closed."""
    if value is None and none_allowed:
        return
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        if high == math.inf:
            span = f"> {low:g}" if low_open else f">= {low:g}"
        else:
            span = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ConfigError(owner, field, f"a finite number {span}{f' ({unit})' if unit else ''}", value, none_allowed)


def check_numbers(owner: str, field: str, values: Any, low: float, high: float) -> None:
    """``values`` is a non-empty sequence of finite real numbers (not bools) in [low, high]."""
    if (not isinstance(values, Sequence) or isinstance(values, str) or not values
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v <= high for v in values)):
        raise ConfigError(owner, field, f"one or more numbers in [{low:g}, {high:g}]", values)


def check_bool(owner: str, field: str, value: Any, none_allowed: bool = False, none_means: str = "") -> None:
    """``value`` is True or False (or None where allowed, meaning ``none_means``)."""
    if value is None and none_allowed:
        return
    if not isinstance(value, bool):
        raise ConfigError(owner, field, "True or False" + (f" (None: {none_means})" if none_means else ""), value,
                          none_allowed)


def check_choice(owner: str, field: str, value: Any, choices: Iterable[str], hint: str = "") -> None:
    """``value`` is one of ``choices``; ``hint`` follows the value (e.g. the library a backend lacks)."""
    choices = list(choices)
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(owner, field, f"one of {', '.join(choices)}", value, hint=hint)


def dtype_named(name: str):
    """The torch dtype of a name in ``DTYPE_NAMES`` (``"bfloat16"`` -> ``torch.bfloat16``)."""
    check_choice("", "dtype", name, DTYPE_NAMES)
    import torch

    return getattr(torch, name)


def missing_library_message(package: str) -> str:
    """The one wording of a backend that needs a package this machine lacks: it follows the backend's name."""
    return f"needs the {package} package, which is not installed here: pip install {package}"
