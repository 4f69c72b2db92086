"""Dictionary and JSON round-trip shared by the configuration dataclasses."""

from __future__ import annotations

import dataclasses
import json


class DictConfig:
    """Mixin for a config dataclass: to_dict, from_dict (unknown fields refused, known ones listed)
    and to_json."""

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
