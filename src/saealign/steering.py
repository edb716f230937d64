"""The one interface every alignment method applies through, so every harness treats them alike.

An `Intervention` changes a model at inference time: `apply(model, positions)` returns a context
manager (hooks are attached inside it and removed after), and `system_prompt` (or None) is the
text harnesses put in the system turn when they render chats (the prompt-prefix baseline).

`positions`: "generation" (default: tokens generated after the prompt) or an explicit
(batch, seq) bool mask of positions to edit — teacher-forced scoring passes its response mask,
so a scored response is edited exactly where generation would have edited it.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any, ContextManager, Protocol, runtime_checkable

from saealign._io import read_json
from saealign.hooks import PositionSpec


@runtime_checkable
class Intervention(Protocol):
    name: str
    system_prompt: str | None

    def apply(self, model, positions: PositionSpec = "generation") -> ContextManager[Any]: ...


def apply_intervention(intervention: Intervention | None, model, positions: PositionSpec = "generation") -> ContextManager[Any]:
    """`with apply_intervention(x, model): ...` — a no-op for the base model (`None`)."""
    return nullcontext() if intervention is None else intervention.apply(model, positions)


def system_prompt_of(intervention: Intervention | None) -> str | None:
    return None if intervention is None else getattr(intervention, "system_prompt", None)


ARTIFACT_CONFIG = "config.json"


def load_intervention(path: str | Path, model=None, **options: Any) -> Intervention:
    """Load a saved method artifact (DSPA map, static-sae, repe, prompt-prefix) by its `kind`.

    `options` override the artifact's recommended steering settings (alpha, k_diff, mode, ...).
    When `model` is given, the artifact is checked against it (a mismatch is refused).
    """
    path = Path(path)
    config_path = path / ARTIFACT_CONFIG
    if not config_path.exists():
        raise FileNotFoundError(f"{path}: not a saealign artifact (no {ARTIFACT_CONFIG})")
    kind = read_json(config_path).get("kind")
    from saealign.dspa import baselines, steer

    loaders = {"dspa_map": steer.DSPA.load, "static_sae": baselines.StaticSAE.load,
               "repe": baselines.RepE.load, "prompt_prefix": baselines.PromptPrefix.load}
    if kind not in loaders:
        raise ValueError(f"{config_path}: unknown artifact kind {kind!r}; expected one of {sorted(loaders)}")
    return loaders[kind](path, model=model, **options)


METHOD_KINDS = ("base", "dspa", "static-sae", "repe", "prompt-prefix")


def load_method(spec: str, model=None, **options: Any) -> Intervention | None:
    """A method from a spec string: `base`, `prompt-prefix[:TEXT]`, `dspa:MAP_DIR`, `static-sae:MAP_DIR`,
    `repe:DIR` (a RepE artifact or a DSPA map directory), or a bare artifact directory (its kind is read from its config)."""
    from saealign.dspa import baselines, steer

    kind, _, arg = spec.partition(":")
    if kind == "base":
        return None
    if kind == "prompt-prefix":
        return baselines.PromptPrefix(arg) if arg else baselines.PromptPrefix()
    if kind == "dspa":
        return steer.DSPA.load(arg, model=model, **options)
    if kind == "static-sae":
        return baselines.StaticSAE.load(arg, model=model, **options)
    if kind == "repe":
        return baselines.RepE.load(arg, model=model, **options)
    if Path(spec).is_dir():
        return load_intervention(spec, model=model, **options)
    raise ValueError(f"unknown method {spec!r}: expected one of {', '.join(METHOD_KINDS)} (as kind:PATH) or an artifact directory")
