"""One validation for every config dataclass, so the CLI, `--config FILE` and the Python API refuse a bad
value the moment the config is built — before a model loads or anything is generated.

A field is checked against its `Literal[...]` choices (also inside `X | None` and `list[...]`) and
against the bounds in its metadata: `ge`, `gt`, `le`, `lt` (`field(default=1, metadata={"ge": 1})`).
A config calls `check_config(self)` from its `__post_init__`.
"""

from __future__ import annotations

import dataclasses
import operator
import types
import typing
from typing import Any

BOUNDS = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"), "le": (operator.le, "<="), "lt": (operator.lt, "<")}


class ConfigError(ValueError):
    """A bad value of one option; `field` names it, so the CLI can say `--flag` where the API says `field`."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem


def literal_choices(tp: Any) -> tuple[Any, ...]:
    """The allowed values of a `Literal` type, looking through `| None` and `list[...]`; () for other types."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return typing.get_args(tp)
    if origin in (typing.Union, types.UnionType, list, tuple):
        return tuple(c for arg in typing.get_args(tp) for c in literal_choices(arg))
    return ()


def describe_range(field: dataclasses.Field) -> str:
    """The bounds of a field as help text, e.g. `>= 1`, `> 0, < 1` ('' when unbounded)."""
    return ", ".join(f"{symbol} {field.metadata[key]}" for key, (_, symbol) in BOUNDS.items() if key in field.metadata)


def check_config(cfg: Any) -> None:
    """Raise `ConfigError` for the first field whose value (each item, for a list) is not one of its
    Literal choices or lies outside its bounds. None passes: it means "the default" wherever a field allows it."""
    hints = typing.get_type_hints(type(cfg))
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        choices = literal_choices(hints[field.name])
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item is None:
                continue
            if choices and item not in choices:
                raise ConfigError(field.name, f"must be one of {', '.join(map(str, choices))}; "
                                              f"{item!r} is not a known {field.name.replace('_', ' ')}")
            for key, (within, symbol) in BOUNDS.items():
                if key in field.metadata and not within(item, field.metadata[key]):
                    raise ConfigError(field.name, f"must be {symbol} {field.metadata[key]}, got {item!r}")


def differing_settings(have: dict[str, Any], want: dict[str, Any], unrecorded_agree: bool = False) -> str:
    """`k A there, B now; ...` for each setting of `want` that `have` (what a resumed output recorded)
    holds differently; '' when none. With `unrecorded_agree`, a setting `have` lacks (None) agrees:
    outputs written before that setting was recorded."""
    return "; ".join(f"{k} {have.get(k)!r} there, {v!r} now" for k, v in want.items()
                     if have.get(k) != v and not (unrecorded_agree and have.get(k) is None))
