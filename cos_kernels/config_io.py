"""Dictionary and JSON round-trip shared by the configuration dataclasses."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers


class DictConfig:
    """Mixin for a config dataclass: to_dict, from_dict (unknown fields refused, known ones listed),
    to_json, and the positive-number checks its __post_init__ uses."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def check_positive_ints(self, *names: str) -> None:
        """Each of ``names`` a positive integer (numbers.Integral, not bool; stored back as an int)."""
        self._check_positive(names, numbers.Integral, int, "a positive integer")

    def check_positive_reals(self, *names: str) -> None:
        """Each of ``names`` a finite number > 0 (numbers.Real, not bool; stored back as a float)."""
        self._check_positive(names, numbers.Real, float, "a finite number > 0")

    def _check_positive(self, names, kind, cast, expected: str) -> None:
        """TypeError naming the field for a wrong type, ValueError for a value not finite and > 0."""
        for name in names:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, kind):
                raise TypeError(f"{type(self).__name__}.{name} must be {expected}, got {value!r} "
                                f"({type(value).__name__})")
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{type(self).__name__}.{name} must be {expected}, got {value!r}")
            setattr(self, name, cast(value))
