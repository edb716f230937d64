"""Evaluation harnesses (MT-Bench, AlpacaEval, multiple choice, judge-free preference metrics) and what
they share: subsets, the policy they load, run directories, the package versions recorded with each
result. Every harness returns `saealign.results.ResultRecord`s with `saealign.stats` estimates. Kept
free of heavy imports so that every harness can use it.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import random
import sys
from pathlib import Path
from typing import Any, Sequence, TypeVar

T = TypeVar("T")

_VERSIONED = ("saealign", "torch", "transformers", "numpy", "trl", "peft", "safetensors")


def versions() -> dict[str, str]:
    """Package versions, Python, platform and the accelerator, recorded next to every result."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for dist in _VERSIONED:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    if "torch" in sys.modules:
        import torch

        out["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return out


def select_subset(items: Sequence[T], limit: int | None, seed: int = 0) -> list[T]:
    """A seeded random subset of `limit` items kept in their original order (all items when `limit` is None).

    Benchmarks are ordered by category or source, so taking the first N would test one category only.
    """
    if limit is None or limit >= len(items):
        return list(items)
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


def safe_name(name: str) -> str:
    """A file-name-safe form of a model or judge name (`org/model` -> `org--model`)."""
    cleaned = "".join(c if c.isalnum() or c in "-_.+" else "-" for c in name.replace("/", "--"))
    return cleaned.strip(".") or "unnamed"


def require_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def load_policy(cfg, model=None, tokenizer=None, intervention=None):
    """The model, tokenizer and intervention a config names, unless the caller passes them in."""
    if model is None:
        from saealign.models import load_model

        model, tokenizer = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    if intervention is None and cfg.intervention:
        from saealign.steering import load_method  # only when asked: steering pulls in the SAE stack

        intervention = load_method(cfg.intervention, model=model)  # checked against the model it steers
    return model, tokenizer, intervention


def default_name(cfg, model, intervention=None) -> str:
    """`cfg.name`, else the model id plus the intervention's name (or its artifact's folder name)."""
    from saealign.models import model_id

    if cfg.name:
        return cfg.name
    base = model_id(model)
    if intervention is not None and getattr(intervention, "name", None):
        return f"{base}+{intervention.name}"
    return f"{base}+{Path(cfg.intervention).name}" if cfg.intervention else base


def start_run(out_dir: str | os.PathLike, config: dict[str, Any], generation_fields: Sequence[str]) -> None:
    """Write `config.json` (config + versions) into `out_dir`. Runs resume from the outputs already there,
    so a run whose `generation_fields` differ from the previous run's is refused rather than mixed in."""
    import json

    from saealign._io import read_json, write_json

    path = Path(out_dir) / "config.json"
    current = json.loads(json.dumps(config, default=str))
    if path.exists():
        previous = read_json(path).get("config", {})
        changed = [f for f in generation_fields if f in previous and previous[f] != current.get(f)]
        if changed:
            raise ValueError(f"{path}: the outputs in {out_dir} were generated with other {changed} "
                             f"({[previous[f] for f in changed]} vs {[current.get(f) for f in changed]}); "
                             "use a new out_dir")
    write_json(path, {"config": current, "versions": versions()})
