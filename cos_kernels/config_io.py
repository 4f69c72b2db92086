"""Dictionary and JSON round-trip shared by the configuration dataclasses."""

from __future__ import annotations

import dataclasses
import json
import numbers

from .validation import is_integer, one_of, positive_int, positive_real


def option(default, help: str, **kw):
    """A config field with its command-line help; ``choices``, ``nargs`` and ``type`` (of list items)
    go to argparse (cos_kernels.train.cli.add_option). A list default becomes a default factory."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


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
        """Each of ``names`` a positive integer (validation.positive_int; stored back as an int)."""
        for name in names:
            setattr(self, name, positive_int(getattr(self, name), f"{type(self).__name__}.{name}"))

    def check_positive_reals(self, *names: str) -> None:
        """Each of ``names`` a finite number > 0 (validation.positive_real; stored back as a float)."""
        for name in names:
            setattr(self, name, positive_real(getattr(self, name), f"{type(self).__name__}.{name}"))

    def check_types(self) -> None:
        """TypeError naming the field unless each field's value has its annotated type (int, float, str,
        bool, list of the metadata's item type; "| None" allows None); the metadata's choices are checked
        too (ValueError)."""
        for f in dataclasses.fields(self):
            self._check_type(f, getattr(self, f.name))

    def _check_type(self, f: dataclasses.Field, value) -> None:
        kinds = f.type.split(" | ")
        if value is None:
            if "None" in kinds:
                return
        else:
            kind = kinds[0]
            item = f.metadata.get("type")
            if kind == "bool":
                ok = isinstance(value, bool)
            elif kind == "int":
                ok = is_integer(value)
            elif kind == "float":
                ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
            elif kind == "str":
                ok = isinstance(value, str)
            else:  # list
                ok = isinstance(value, (list, tuple)) and len(value) > 0 and all(
                    isinstance(v, item) and not isinstance(v, bool) for v in value)
            if ok:
                choices = f.metadata.get("choices")
                if choices:
                    one_of(value, choices, f"{type(self).__name__}.{f.name}", kind=object)
                return
        expected = {"bool": "True or False", "int": "an integer", "float": "a number", "str": "a string",
                    "list": f"a non-empty list of {getattr(f.metadata.get('type'), '__name__', '')}s"}[kinds[0]]
        raise TypeError(f"{type(self).__name__}.{f.name} must be {expected}{' or None' if 'None' in kinds else ''}, "
                        f"got {value!r} ({type(value).__name__})")

