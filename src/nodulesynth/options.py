"""Options dataclasses from config sections: one reading of a section for every stage's options.

A stage's options are a dataclass deriving from `SectionOptions`, naming its section in `SECTION` (as NVlabs/SPADE
keeps an options class beside each model); `Options.from_config(section)` reads it, validation is the
dataclass's `__post_init__`. `from_section(cls, section, name)` turns a config section (a dict from YAML or the rules' JSON params) into
keyword arguments of the dataclass `cls`: a key that is not one of its fields is an error naming
`name.key`, and each value is coerced to the field's annotated type, because PyYAML reads "1e-4" as a string
(it wants "1.0e-4") and JSON has no tuples.
"""

import dataclasses
import types
import typing
from dataclasses import fields

from nodulesynth.errors import InputError


def from_section(cls, section, name: str):
    """`cls(**section)` with unknown keys refused and values coerced to the fields' types."""
    section = dict(section or {})
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for key in section:
        if key not in known:
            raise InputError(f"unknown option {name}.{key} (known: {', '.join(sorted(known))})")
    return cls(**{key: coerce(value, hints[key], f"{name}.{key}") for key, value in section.items()})


class SectionOptions:
    """Mixin of a config section's options dataclass: `SECTION = "name"` in the subclass (no annotation: not a
    field), then `from_config`, `to_dict` and `replace` for every stage alike."""

    SECTION = ""

    @classmethod
    def from_config(cls, section: dict | None = None):
        """Options from the config section (a dict, or None for the defaults); an unknown key is an error."""
        return from_section(cls, section, cls.SECTION)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def coerce(value, hint, where: str):
    """`value` as the type `hint` says (bool, int, float, str, a tuple or list of those, Optional of any)."""
    if value is None:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # Optional[X] / X | None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], where) if len(inner) == 1 else value
    try:
        if hint is bool:
            if isinstance(value, str):
                return value.strip().lower() in ("1", "true", "yes", "on")
            return bool(value)
        if hint is int:
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if hint is float:
            return float(value)
        if hint is str:
            return str(value)
        if origin in (tuple, list) or hint in (tuple, list):
            if isinstance(value, str):  # "1, 2, 4" or "1 2 4" from a command line
                value = value.replace(",", " ").split()
            items = list(value) if isinstance(value, (list, tuple)) else [value]
            item = next((a for a in args if a is not Ellipsis), None)
            items = [coerce(v, item, where) for v in items] if item is not None else items
            return tuple(items) if (origin or hint) is tuple else items
    except (TypeError, ValueError):
        raise InputError(f"{where}: cannot read {value!r} as {getattr(hint, '__name__', hint)}") from None
    return value
