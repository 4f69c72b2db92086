"""Dictionary and JSON round-trip shared by the configuration dataclasses."""

from __future__ import annotations

import dataclasses
import json


class DictConfig:
    """Mixin for a config dataclass: to_dict, from_dict (unknown fields refused, known ones listed),
    to_json, and the positive-integer check its __post_init__ uses."""

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
        """Raise ValueError naming the first of ``names`` whose value is not a positive integer."""
        for name in names:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{type(self).__name__}.{name} must be a positive integer, got {value!r}")
