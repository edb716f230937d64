"""Build Typer commands from config dataclasses, so one dataclass is the single source of truth
for the CLI flags, the JSON config files (`--config FILE`) and the Python API.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import types
import typing
from pathlib import Path
from typing import Any, Callable, TypeVar

import typer

from saealign.config import describe_range, literal_choices

C = TypeVar("C")

_SIMPLE = (str, int, float, bool, Path)
CONFIG_CLASSES: list[type] = []  # every config dataclass a command is built from, in registration order


def _cli_type(tp: Any) -> tuple[Any, bool]:
    """The annotation typer sees for a field type, and whether the value is parsed from JSON text."""
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        inner, as_json = _cli_type(args[0])
        return inner | None, as_json
    if tp in _SIMPLE:
        return tp, False
    if origin is typing.Literal:
        return str, False
    if origin in (list, tuple) and args and all(a in _SIMPLE or a is Ellipsis for a in args):
        return list[args[0]], False
    if origin is list and typing.get_origin(args[0]) is typing.Literal:  # choices, checked by check_config
        return list[str], False
    return str, True  # dicts and nested types: pass JSON text


def _describe_default(field: dataclasses.Field, is_flag: bool) -> str:
    """The field's default as help text, e.g. `default: 8`, `default: --no-progress`; '' when there is none to show
    (None, empty: the help says what that means)."""
    value = (field.default if field.default is not dataclasses.MISSING else
             field.default_factory() if field.default_factory is not dataclasses.MISSING else None)
    if value is None or (not isinstance(value, bool) and value in ("", [], {})):
        return ""
    if is_flag:
        return f"default: --{'' if value else 'no-'}{field.name.replace('_', '-')}"
    return f"default: {' '.join(map(str, value)) if isinstance(value, (list, tuple)) else value}"


def field_params(config_cls: type, required: tuple[str, ...] = ()) -> tuple[list[inspect.Parameter], set[str]]:
    """One typer parameter per init field of `config_cls`, and the names of the fields passed as JSON text.

    A field whose metadata has `"argument": True` is a positional argument (named by the field, upper-cased)
    instead of a flag. The help text of each flag is `field.metadata["help"]` plus the field's choices and
    bounds (which `saealign.config.check_config` enforces when the config is built) and its default."""
    hints = typing.get_type_hints(config_cls)
    params, json_fields = [], set()
    for field in dataclasses.fields(config_cls):
        if not field.init:
            continue
        annotation, as_json = _cli_type(hints[field.name])
        if as_json:
            json_fields.add(field.name)
        flag = "--" + field.name.replace("_", "-")
        decls = [f"{flag}/--no-{field.name.replace('_', '-')}"] if annotation is bool else [flag]
        choices = literal_choices(hints[field.name])
        notes = [f"one of: {', '.join(map(str, choices))}" if choices else "", describe_range(field),
                 "required" if field.name in required else _describe_default(field, annotation is bool)]
        help_text = " ".join([field.metadata.get("help", ""), *(f"[{note}]" for note in notes if note)]).strip()
        default = (typer.Argument(None, metavar=field.name.upper(), help=help_text, show_default=False)
                   if field.metadata.get("argument") else
                   typer.Option(None, *decls, help=help_text, show_default=False))
        params.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY,
                                        annotation=annotation | None if annotation is not bool else bool | None,
                                        default=default))
    return params, json_fields


def given_values(values: dict[str, Any], json_fields: set[str]) -> dict[str, Any]:
    """The values given on the command line (None and empty lists: not given), JSON fields parsed."""
    given: dict[str, Any] = {}
    for key, value in values.items():
        if value is None:
            continue
        if key in json_fields:
            try:
                value = json.loads(value)
            except json.JSONDecodeError as err:
                raise typer.BadParameter(f"expected JSON: {err}", param_hint="--" + key.replace("_", "-"))
        if isinstance(value, list) and not value:
            continue
        given[key] = value
    return given


def config_command(app: typer.Typer, name: str, config_cls: type[C], help: str | None = None,
                   required: tuple[str, ...] = ()) -> Callable[[Callable[[C], Any]], Callable[[C], Any]]:
    """Decorator: register `fn(cfg)` as `app` command `name` with one parameter per dataclass field
    (`field_params`) and `--config FILE`. Fields named in `required` must be given (on the command line or
    in `--config`)."""

    def decorator(fn: Callable[[C], Any]) -> Callable[[C], Any]:
        CONFIG_CLASSES.append(config_cls)
        params, json_fields = field_params(config_cls, required)
        params.insert(0, inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Path | None,
                                           default=typer.Option(None, "--config", help="JSON file with any of these fields; flags override it.")))

        def command(**kwargs):
            values: dict[str, Any] = {}
            config_path = kwargs.pop("config")
            if config_path is not None:
                from saealign._io import read_json

                values.update(read_json(config_path))
                unknown = set(values) - {f.name for f in dataclasses.fields(config_cls)}
                if unknown:
                    raise typer.BadParameter(f"{config_path}: unknown field(s) {sorted(unknown)}", param_hint="--config")
            values.update(given_values(kwargs, json_fields))
            missing = [r for r in required if r not in values]
            if missing:
                raise typer.BadParameter(f"missing required option(s): {', '.join('--' + m.replace('_', '-') for m in missing)}")
            return fn(config_cls(**values))

        command.__signature__ = inspect.Signature(params)  # typer reads the signature
        command.__name__ = fn.__name__
        command.__doc__ = help or fn.__doc__
        app.command(name, help=help or fn.__doc__)(command)
        return fn

    return decorator


def config_flags(config_cls: type[C], param: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator for a hand-written typer command: add one flag per field of `config_cls` (as `config_command`
    makes them) and pass them to the command as one instance, in its argument `param`."""

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        CONFIG_CLASSES.append(config_cls)
        own = [p for p in inspect.signature(fn).parameters.values() if p.name != param]
        params, json_fields = field_params(config_cls)
        names = [p.name for p in params]

        @functools.wraps(fn)
        def command(**kwargs):
            values = given_values({name: kwargs.pop(name) for name in names}, json_fields)
            return fn(**kwargs, **{param: config_cls(**values)})

        command.__signature__ = inspect.Signature([*own, *params])  # typer reads the signature
        return command

    return decorator
