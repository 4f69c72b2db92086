"""Argument checks shared by every public entry point: one message style for each kind of value.

Each check returns the value in its stored form (int, float, ...) or raises TypeError for a wrong
type and ValueError for a wrong value, naming the argument (``what``), what was given and what was
expected. bool is never accepted as a number.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

__all__ = ["is_integer", "positive_int", "pair", "positive_real", "one_of", "check_bool"]


def _type_name(value) -> str:
    return type(value).__name__


def is_integer(value) -> bool:
    """Whether ``value`` is an integer: a numbers.Integral (numpy's included), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def positive_int(value, what: str) -> int:
    """``value`` an integer (is_integer) > 0, returned as an int."""
    if not is_integer(value):
        raise TypeError(f"{what} must be a positive integer, got {value!r} ({_type_name(value)})")
    if value <= 0:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def pair(value, what: str) -> tuple[int, int]:
    """An int (square) or a list / tuple of two positive ints -> (h, w)."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"{what} must be an int or a pair (h, w), got {value!r}")
        return positive_int(value[0], f"{what}[0]"), positive_int(value[1], f"{what}[1]")
    return (positive_int(value, what),) * 2


def positive_real(value, what: str, *, at_most: float | None = None, note: str = "",
                  type_expected: str | None = None) -> float:
    """``value`` a finite numbers.Real (not bool) > 0, and <= ``at_most`` where given, returned as a
    float. ``note`` (e.g. why the bound) follows the expectation in the ValueError; ``type_expected``
    replaces it in the TypeError (e.g. "a real number (float) or None" where None is also allowed)."""
    expected = "a finite number > 0" if at_most is None else f"a positive finite number <= {at_most:g}"
    if note:
        expected += f" {note}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be {type_expected or expected}, got {value!r} ({_type_name(value)})")
    if not (math.isfinite(value) and value > 0 and (at_most is None or value <= at_most)):
        raise ValueError(f"{what} must be {expected}, got {value!r}")
    return float(value)


def one_of(value, choices: Sequence, what: str, *, kind: type = str):
    """``value`` an instance of ``kind`` among ``choices``; returned unchanged."""
    if not isinstance(value, kind):
        raise TypeError(f"{what} must be a {kind.__name__}, one of {list(choices)}, got {value!r} "
                        f"({_type_name(value)})")
    if value not in choices:
        raise ValueError(f"{what} must be one of {list(choices)}, got {value!r}")
    return value


def check_bool(value, what: str) -> bool:
    """``value`` True or False (not 0 / 1, not None)."""
    if not isinstance(value, bool):
        raise TypeError(f"{what} must be a bool (True or False), got {value!r} ({_type_name(value)})")
    return value
