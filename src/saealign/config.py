"""One validation for every config dataclass, so the CLI, `--config FILE` and the Python API refuse a bad
value the moment the config is built — before a model loads or anything is generated.

A field is checked against its `Literal[...]` choices (also inside `X | None` and `list[...]`) and
against the bounds in its metadata: `ge`, `gt`, `le`, `lt` (`field(default=1, metadata={"ge": 1})`).
A config calls `check_config(self)` from its `__post_init__`.

Every command names the same thing the same way; `GLOSSARY` is that vocabulary (tests keep the fields to it).
"""

from __future__ import annotations

import dataclasses
import operator
import types
import typing
from typing import Any

GLOSSARY = {
    "output": "where a command writes: its output directory (artifacts, results.json, caches; a rerun resumes "
              "from it), or one results file where the help says so",
    "data": "where the input comes from: a file, a directory (the shared data root, an HH-RLHF role directory, "
            "a benchmark folder) or a hub dataset",
    "data_role": "one of the fixed roles of the shared HH-RLHF data (fit, validation, test_helpful, ...)",
    "n": "how many items a command uses (triples, prompts, texts, questions; per task or per source where "
         "its help says so), as a seeded draw whose kind (uniform, nested, stratified by subset) the help names; "
         "unset: all",
    "seed": "the seed of a command's randomness: its draw of n, and sampling or bootstrap where it has them",
    "subset_seed": "the seed of the draw of n in the benchmarks (eval mc, mt-bench, alpaca-eval), "
                   "kept apart from their generation seeds",
    "seeds": "generation seeds: one sampled output per prompt and seed",
    "split_seed": "the seed of the HH-RLHF fit/validation split",
    "model": "a `saealign models` alias, a local directory or a hub id (default: saealign.models.DEFAULT_MODEL)",
    "dtype": "the dtype a model is loaded in (default: bfloat16 on CUDA, float32 on CPU)",
    "device": "a torch device: cpu, cuda, cuda:N, mps (default: CUDA when present)",
    "intervention": "one steering method applied to the evaluated model (a method spec or an artifact directory)",
    "methods": "several methods side by side (repeat the flag), each SPEC or NAME=SPEC",
    "name": "the label results are written under",
    "batch_size": "items per forward pass or optimizer step (the help names the unit)",
    "max_length": "tokens per input (prompt plus response, or one text); longer inputs are cut",
    "max_new_tokens": "the most tokens generated per output",
    "n_boot": "bootstrap resamples of a 95% interval",
    "progress": "show progress bars",
    "overwrite": "start afresh in an output that holds work of other settings, instead of refusing",
}

BOUNDS = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"), "le": (operator.le, "<="), "lt": (operator.lt, "<")}


class ConfigError(ValueError):
    """A bad value of one option; `field` names it, so the CLI can say `--flag` where the API says `field`."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem


def option(text: str, **bounds: float) -> dict[str, Any]:
    """A config field's metadata: its help text and the bounds `check_config` enforces (ge=, gt=, le=, lt=)."""
    return {"help": text, **bounds}


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
