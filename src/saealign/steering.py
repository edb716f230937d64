"""The one interface every alignment method applies through, so every harness treats them alike.

An `Intervention` changes a model at inference time: `apply(model, positions)` returns a context
manager (hooks are attached inside it and removed after), and `system_prompt` (or None) is the
text harnesses put in the system turn when they render chats (the prompt-prefix baseline).

For batches that mix methods (the server), an intervention also has a per-row form
(`row_steering(**settings)` -> `RowSteering`): its edit takes each row's own state, so a base row is a
row with empty state and a request's settings never touch the method object.

`positions`: "generation" (default: tokens generated after the prompt) or an explicit
(batch, seq) bool mask of positions to edit — teacher-forced scoring passes its response mask,
so a scored response is edited exactly where generation would have edited it.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ContextManager, Hashable, Literal, Protocol, runtime_checkable

import torch

from saealign._io import read_json
from saealign.config import ConfigError, check_config
from saealign.hooks import CallContext, PositionSpec
from saealign.models import ModelOptions

Mode = Literal["ablate", "augment", "both"]


@dataclass
class LatentSteering:
    """The knobs of SAE-latent steering (DSPA and static-sae, METHOD.md "DSPA — steering at inference"), declared
    once: every command's flags, the map's recommended settings and the tuning grid are these fields. None keeps
    the artifact's recommended setting (`saealign dspa tune` records it), else the paper's default (`PAPER_DEFAULTS`)."""

    mode: Mode | None = field(default=None, metadata={
        "help": "Which latents are edited: ablate the k_diff most negatively scored (the paper's main mode), "
                "augment the k_diff most positively scored, or both sets."})
    alpha: float | None = field(default=None, metadata={
        "help": "Edit strength: an active selected latent moves by alpha times the token's largest activation.",
        "ge": 0})
    k_prompt: int | None = field(default=None, metadata={
        "help": "DSPA: prompt latents kept (TopK of g(x)) when scoring the output latents (s = A^T g~).", "ge": 1})
    k_diff: int | None = field(default=None, metadata={
        "help": "Output latents selected per prompt (per side in mode both).", "ge": 1})
    threshold: float | None = field(default=None, metadata={
        "help": "tau: map entries with |A_ij| below it are dropped before scoring (default: the map's tau).",
        "ge": 0})
    center: bool | None = field(default=None, metadata={
        "help": "DSPA: score with the centred map A - mean(g) mean(delta)^T and the prompt's deviation g(x) - mean(g) "
                "(k_prompt largest in size; k_prompt = m_in keeps all): drops what is the same for every prompt, so "
                "the edits follow the prompt (default: off, the paper's rule)."})

    def __post_init__(self) -> None:
        check_config(self)

    def steering_options(self) -> dict[str, Any]:
        """The steering knobs that are set (None: not given), without the fields of a config that extends them."""
        knobs = STEERING_OPTIONS if isinstance(self, SteeringOptions) else LATENT_OPTIONS
        return {name: getattr(self, name) for name in knobs if getattr(self, name) is not None}


@dataclass
class SteeringOptions(LatentSteering):
    """Every steering knob of every method (`load_method` passes each method those it takes)."""

    coef: float | None = field(default=None, metadata={
        "help": "RepE: coefficient c of the mean-difference vector added at every edited position."})


def steering_field(name: str) -> Any:
    """A config field for one steering knob, as `SteeringOptions` declares it (help, bounds), default None: for
    a config that takes only some of the knobs."""
    declared = next(f for f in fields(SteeringOptions) if f.name == name)
    return field(default=None, metadata=declared.metadata)


LATENT_OPTIONS = tuple(f.name for f in fields(LatentSteering))
STEERING_OPTIONS = tuple(f.name for f in fields(SteeringOptions))
PAPER_DEFAULTS = SteeringOptions(mode="ablate", alpha=0.2, k_prompt=32, k_diff=16, center=False, coef=1.0)  # METHOD.md; tau: the map's


def split_method_entry(entry: str) -> tuple[str, str]:
    """`NAME=SPEC` -> (NAME, SPEC); a bare SPEC -> ("", SPEC). Only an `=` before the first `:` names
    the column, so paths may contain `=`."""
    head = entry.split(":", 1)[0]
    if "=" in head:
        name, _, spec = entry.partition("=")
        return name, spec
    return "", entry


@runtime_checkable
class Intervention(Protocol):
    name: str
    system_prompt: str | None

    def apply(self, model, positions: PositionSpec = "generation") -> ContextManager[Any]: ...


class RowEdit(Protocol):
    """One layer's edit over a batch whose rows each carry their own state (a row in `empty` state stays
    bit-for-bit unchanged). Rows of every request whose steering has the same `key` share one call per step."""

    key: Hashable
    layer: int

    def empty(self, rows: int, device: torch.device) -> dict[str, torch.Tensor]: ...

    def prepare(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The form `__call__` takes, made once each time the batch's rows change (it may synchronise)."""
        ...

    def __call__(self, hidden: torch.Tensor, edit: torch.Tensor, state: dict[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(new residual, (batch, seq) bool: positions changed) for the positions `edit` marks."""
        ...


@dataclass(frozen=True)
class RowSteering:
    """The per-row form of an intervention with one request's settings, so that requests with different
    methods share a batch (the server): `state(hidden_in, ctx)` gives the rows' state for `edit` from their
    prefill call (`hidden_in`: the residual at `in_layer`, None when `in_layer` is None)."""

    edit: RowEdit
    state: Callable[[torch.Tensor | None, CallContext], dict[str, torch.Tensor]]
    in_layer: int | None = None


def row_steering(intervention: Intervention | None, **settings: Any) -> RowSteering | None:
    """The per-row form of `intervention` with per-request `settings` (alpha, k_prompt, k_diff, mode; coef for
    RepE), validated; None when it edits nothing (base, prompt-prefix)."""
    from saealign.dspa.baselines import PromptPrefix

    if intervention is None or isinstance(intervention, PromptPrefix):  # no hooks: only the rendered prompt differs
        if settings:
            name = getattr(intervention, "name", "base")
            raise ConfigError(next(iter(settings)), f"is not a setting of method {name!r} (it takes none)")
        return None
    form = getattr(intervention, "row_steering", None)
    if form is None:
        raise ValueError(f"intervention {intervention.name!r} has no per-row form (`row_steering`), so it cannot "
                         "share a batch with other methods")
    return form(**settings)


def apply_intervention(intervention: Intervention | None, model, positions: PositionSpec = "generation") -> ContextManager[Any]:
    """`with apply_intervention(x, model): ...` — a no-op for the base model (`None`)."""
    return nullcontext() if intervention is None else intervention.apply(model, positions)


def system_prompt_of(intervention: Intervention | None) -> str | None:
    return None if intervention is None else getattr(intervention, "system_prompt", None)


ARTIFACT_CONFIG = "config.json"
METHOD_KINDS = ("base", "dspa", "static-sae", "repe", "prompt-prefix")
ARTIFACT_METHODS = {"dspa_map": "dspa", "static_sae": "static-sae", "repe": "repe", "prompt_prefix": "prompt-prefix"}


def artifact_method(path: str | Path) -> str:
    """The method kind of a saved artifact (DSPA map, static-sae, repe, prompt-prefix), read from its config."""
    config_path = Path(path) / ARTIFACT_CONFIG
    if not config_path.exists():
        raise FileNotFoundError(f"{path}: not a saealign artifact (no {ARTIFACT_CONFIG})")
    kind = read_json(config_path).get("kind")
    if kind not in ARTIFACT_METHODS:
        raise ValueError(f"{config_path}: unknown artifact kind {kind!r}; expected one of {sorted(ARTIFACT_METHODS)}")
    return ARTIFACT_METHODS[kind]


def method_kind(spec: str) -> str:
    """The method kind a spec names (an artifact directory's from its config), so a bad spec or a missing
    artifact is refused before any model loads."""
    kind, _, arg = spec.partition(":")
    if kind in METHOD_KINDS:
        if kind in ("dspa", "static-sae", "repe") and not Path(arg).is_dir():
            raise FileNotFoundError(f"method {spec!r}: no artifact directory {arg!r}")
        return kind
    if Path(spec).is_dir():
        return artifact_method(spec)
    raise ValueError(f"unknown method {spec!r}: expected one of {', '.join(METHOD_KINDS)} (as kind:PATH) or an artifact directory")


def method_options(kind: str) -> frozenset[str]:
    """The options `load_method` passes to a method kind: the latent steering knobs (and how it runs, and the
    SAEs) for DSPA and static-sae, the coefficient for RepE, nothing for base and prompt-prefix."""
    from saealign.dspa.steer import SteerConfig

    latent = frozenset(f.name for f in fields(SteerConfig))
    return {"dspa": latent | {"sae_in", "sae_out"}, "static-sae": (latent - {"center"}) | {"sae_out"},
            "repe": frozenset({"coef"})}.get(kind, frozenset())


def check_options(kind: str, options: dict[str, Any]) -> None:
    """Refuse an option the method would silently ignore (or fail on late)."""
    unknown = sorted(set(options) - method_options(kind))
    if unknown:
        takes = ", ".join(sorted(method_options(kind))) or "no options"
        raise ConfigError(unknown[0], f"is not an option of method {kind!r} (it takes {takes})")


def _loaders() -> dict[str, Any]:
    from saealign.dspa import baselines, steer

    return {"dspa": steer.DSPA.load, "static-sae": baselines.StaticSAE.load, "repe": baselines.RepE.load,
            "prompt-prefix": baselines.PromptPrefix.load}


def load_intervention(path: str | Path, model=None, **options: Any) -> Intervention:
    """Load a saved method artifact (DSPA map, static-sae, repe, prompt-prefix) by its `kind`.

    `options` override the artifact's recommended steering settings (alpha, k_diff, mode, ...); an
    option the artifact's method does not take is refused.
    When `model` is given, the artifact is checked against it (a mismatch is refused).
    """
    kind = artifact_method(path)
    check_options(kind, options)
    return _loaders()[kind](Path(path), model=model, **options)


def recorded_cost(spec: str | None) -> dict[str, Any] | None:
    """The alignment-stage cost (`saealign.cost`) a method's artifact recorded: a DSPA map's fit (also the
    cost of static-sae and of the RepE vector it carries), a RepE vector's fit, a trained model's
    `train_summary.json`. None for the base model, a prompt prefix, a hub model, or an artifact made before
    costs were recorded; evaluators put it in `details["alignment_cost"]` so `saealign report` shows it."""
    if not spec:
        return None
    kind, _, arg = spec.partition(":")
    where = Path(arg) if kind in ("dspa", "static-sae", "repe") else Path(spec)
    for name in ("config.json", "train_summary.json"):  # a trained model's config.json is the model's, without one
        if (where / name).is_file() and (cost := read_json(where / name).get("cost")):
            return cost
    return None


def load_method(spec: str, model=None, **options: Any) -> Intervention | None:
    """A method from a spec string: `base`, `prompt-prefix[:TEXT]`, `dspa:MAP_DIR`, `static-sae:MAP_DIR`,
    `repe:DIR` (a RepE artifact or a DSPA map directory), or a bare artifact directory (its kind is read from its config).
    `options` the method does not take are refused (see `method_options`)."""
    kind = method_kind(spec)
    head, _, arg = spec.partition(":")
    if head != kind:  # a bare artifact directory
        return load_intervention(spec, model=model, **options)
    check_options(kind, options)
    if kind == "base":
        return None
    if kind == "prompt-prefix":
        from saealign.dspa.baselines import PromptPrefix

        return PromptPrefix(arg) if arg else PromptPrefix()
    return _loaders()[kind](arg, model=model, **options)


@dataclass
class PolicyOptions(ModelOptions):
    """The policy a benchmark evaluates: a model, optionally steered, and the name its results go under."""

    intervention: str | None = field(default=None, metadata={
        "help": "Steering applied while answering: a method spec (dspa:DIR, static-sae:DIR, repe:DIR, "
                "prompt-prefix[:TEXT]) or an artifact directory (default: the unsteered model)."})
    name: str | None = field(default=None, metadata={
        "help": "Method name the outputs and results are labelled with (default: model id[+intervention])."})

    def __post_init__(self) -> None:
        check_config(self)
        if self.intervention:
            method_kind(self.intervention)  # a bad spec or a missing artifact fails before a model loads


def load_policy(cfg, model=None, tokenizer=None, intervention=None):
    """The model, tokenizer and intervention a config names, unless the caller passes them in."""
    if model is None:
        from saealign.models import load_model

        model, tokenizer = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    if intervention is None and cfg.intervention:
        intervention = load_method(cfg.intervention, model=model)  # checked against the model it steers
    return model, tokenizer, intervention


def policy_cost(cfg) -> dict[str, Any] | None:
    """The recorded alignment-stage cost of the policy a config names: its intervention's, else its model's."""
    return recorded_cost(cfg.intervention) or recorded_cost(cfg.model)


def default_name(cfg, model, intervention=None) -> str:
    """`cfg.name`, else the model id plus the intervention's name (or its artifact's folder name)."""
    from saealign.models import model_id

    if cfg.name:
        return cfg.name
    base = model_id(model)
    if intervention is not None and getattr(intervention, "name", None):
        return f"{base}+{intervention.name}"
    return f"{base}+{Path(cfg.intervention).name}" if cfg.intervention else base
