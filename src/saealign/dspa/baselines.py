"""Baselines that apply through the same interface as DSPA (`saealign.steering.Intervention`).

- `StaticSAE`: DSPA's map and editing rule with prompt-independent scores `s = A^T mean_n g(x_n)`
  — one latent set for every prompt; isolates the value of prompt conditioning.
- `RepE` (mean difference / CAA): `v = mean_n [mean_{R+} h^l - mean_{R-} h^l]`; adds `c v` at every
  edited position.
- `PromptPrefix`: a system prompt asking for helpful, honest, harmless answers; no hooks.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from saealign import __version__
from saealign._io import load_tensors, read_json, save_tensors, write_json
from saealign.activations import DEFAULT_SINK_FACTOR, keep_mask
from saealign.config import ConfigError
from saealign.cost import CostMeter
from saealign.dspa.map import DSPAMap
from saealign.dspa.steer import LatentSteerer, SteerConfig, select_latents
from saealign.hooks import CallContext, HookSession, PositionSpec, read_residuals
from saealign.models import ModelOptions, model_fingerprint, model_id, model_mismatch
from saealign.sae.core import SAE, load_sae
from saealign.steering import PAPER_DEFAULTS, RowSteering

CONFIG = "config.json"


class StaticSAE(LatentSteerer):
    name = "static-sae"

    def __init__(self, dspa_map: DSPAMap, sae_out: SAE, cfg: SteerConfig | None = None, **overrides: Any):
        cfg = cfg or SteerConfig.resolve(dspa_map.meta.recommended.static_sae, **overrides)
        super().__init__(sae_out, cfg)
        dspa_map.check_compatible(sae_out=sae_out)
        self.map = dspa_map
        scores = dspa_map.static_scores(cfg.threshold)
        self.scores = scores
        self._static_sets = select_latents(scores.unsqueeze(0), cfg.k_diff, cfg.mode)

    @classmethod
    def load(cls, path: str | Path, model=None, sae_out: SAE | str | None = None, **overrides: Any) -> "StaticSAE":
        cfg = read_json(Path(path) / CONFIG)
        map_dir = Path(path) / cfg.get("map", ".") if cfg.get("kind") == "static_sae" else Path(path)
        dspa_map = DSPAMap.load(map_dir)
        device = next(model.parameters()).device if model is not None else None
        sae_out = load_sae(sae_out or dspa_map.meta.sae_out["source"], device=device)
        dspa_map.check_compatible(model, sae_out=sae_out)
        return cls(dspa_map, sae_out, **{**cfg.get("steer", {}), **overrides})

    def row_sets(self, cfg: SteerConfig, hidden_in: torch.Tensor | None, ctx: CallContext
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """The one set of every prompt, under a request's own k_diff and mode."""
        rows, device = ctx.attention_mask.shape[0], ctx.attention_mask.device
        minus, plus = select_latents(self.scores.unsqueeze(0), cfg.k_diff, cfg.mode)
        return minus.to(device).expand(rows, -1), plus.to(device).expand(rows, -1)

    def _set_sets(self, hidden: torch.Tensor, ctx: CallContext) -> None:
        batch = hidden.shape[0]
        minus, plus = self._static_sets
        self._sets = (minus.to(hidden.device).expand(batch, -1), plus.to(hidden.device).expand(batch, -1))

    def apply(self, model, positions: PositionSpec = "generation") -> HookSession:
        session = HookSession(model)
        layer = self.sae_out.layer

        def edit(h: torch.Tensor, ctx: CallContext):
            self._set_sets(h, ctx)
            return self._edit(h, ctx)

        session.add(layer, edit, positions=self._edit_positions(positions))
        return session


class ShiftRowEdit:
    """RepE over a shared batch: each row adds its own vector at `layer` (a base row adds none and keeps its bits)."""

    def __init__(self, layer: int, dim: int):
        self.layer, self.dim, self.key = layer, dim, ("shift", layer)

    def empty(self, rows: int, device: torch.device) -> dict[str, torch.Tensor]:
        return {"shift": torch.zeros(rows, self.dim, device=device)}

    def prepare(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return state

    def __call__(self, hidden: torch.Tensor, edit: torch.Tensor, state: dict[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        changed = edit & state["shift"].ne(0).any(-1, keepdim=True)
        return torch.where(changed.unsqueeze(-1), hidden + state["shift"].unsqueeze(1).to(hidden.dtype), hidden), changed


class RepE:
    """Mean-difference steering vector at one layer, added with coefficient `coef`."""

    name = "repe"
    system_prompt = None

    def __init__(self, vector: torch.Tensor, layer: int, coef: float = 1.0, config: dict | None = None):
        self.vector = vector.float()
        self.layer = layer
        self.coef = coef
        self.config = config or {}

    @classmethod
    @torch.no_grad()
    def fit(cls, model, tokenizer, triples, layer: int, batch_size: int = 8, max_length: int = 1024,
            progress: bool = True, sink_factor: float = DEFAULT_SINK_FACTOR) -> "RepE":
        """Mean over triples of (mean chosen - mean rejected residual at `layer` over response tokens),
        sink tokens dropped by the rule every statistic uses (`activations.keep_mask`), as in a DSPA fit."""
        from saealign.data import collate_pairs, render_triples, triples_fingerprint

        rendered = render_triples(tokenizer, triples, max_length=max_length, progress=False)
        order = sorted(range(len(rendered)), key=lambda i: rendered[i].length("both"))
        dev = next(model.parameters()).device
        meter = CostMeter("repe fit", model)
        total = None
        for b0 in tqdm(range(0, len(order), batch_size), desc="RepE fit", disable=not progress):
            items = [rendered[i] for i in order[b0: b0 + batch_size]]
            means = []
            for which in ("chosen", "rejected"):
                b = collate_pairs(items, tokenizer, which, "right")
                with meter.forward(*b["input_ids"].shape, layers=layer + 1, lm_head=False):
                    h = read_residuals(model, b["input_ids"].to(dev), b["attention_mask"].to(dev), [layer])[layer].float()
                attn = b["attention_mask"].to(dev)
                m = (b["response_mask"].to(dev) & keep_mask(h, attn, sink_factor)).unsqueeze(-1).float()
                means.append((h * m).sum(1) / m.sum(1).clamp_min(1))
            diff = (means[0] - means[1]).sum(0)
            total = diff if total is None else total + diff
        vector = total / len(rendered)
        config = {"kind": "repe", "saealign_version": __version__, "model": model_id(model),
                  "model_fingerprint": model_fingerprint(model), "layer": layer, "count": len(rendered),
                  "data_fingerprint": triples_fingerprint(triples), "cost": meter.result()}
        return cls(vector.cpu(), layer, 1.0, config)

    @classmethod
    def from_map(cls, dspa_map: DSPAMap, coef: float = 1.0) -> "RepE":
        """The RepE vector at l_out that a DSPA fit accumulates from its own passes (no extra pass)."""
        meta = dspa_map.meta
        config = {"kind": "repe", "saealign_version": __version__, "model": meta.model,
                  "model_fingerprint": meta.model_fingerprint, "layer": meta.l_out, "count": dspa_map.count,
                  "data_fingerprint": meta.data_fingerprint, "from_dspa_map": True, "cost": meta.cost}
        return cls(dspa_map.repe_vector(), meta.l_out, coef, config)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        manifest = save_tensors(path / "repe.safetensors", {"vector": self.vector})
        write_json(path / CONFIG, {**self.config, "coef": self.coef, "tensors": manifest})
        return path

    @classmethod
    def load(cls, path: str | Path, model=None, coef: float | None = None) -> "RepE":
        """Load a vector, refusing a corrupt file (checksum, shape, finite values) or another model's."""
        config = read_json(Path(path) / CONFIG)
        if config.get("kind") == "dspa_map":  # `repe:MAP_DIR`: the vector the DSPA fit accumulated
            dspa_map = DSPAMap.load(path)
            dspa_map.check_compatible(model)
            recommended = dspa_map.meta.recommended.repe.coef
            if coef is None:
                coef = PAPER_DEFAULTS.coef if recommended is None else recommended
            return cls.from_map(dspa_map, coef)
        mismatch = model_mismatch(model, config["model"], config.get("model_fingerprint")) if model is not None else None
        if mismatch:
            raise ValueError(f"RepE vector was fitted on {mismatch}")
        vector = load_tensors(Path(path) / "repe.safetensors", config.pop("tensors", None))["vector"]
        want = (model.config.hidden_size,) if model is not None else (vector.numel(),)
        if tuple(vector.shape) != want:
            raise ValueError(f"{Path(path) / 'repe.safetensors'}: vector has shape {tuple(vector.shape)}, expected {want}")
        return cls(vector, config["layer"], config.get("coef", 1.0) if coef is None else coef, config)

    def row_steering(self, **settings: Any) -> RowSteering:
        """This vector with one request's coefficient (`coef`), as rows of a shared batch."""
        unknown = sorted(set(settings) - {"coef"})
        if unknown:
            raise ConfigError(unknown[0], "is not a per-request setting of 'repe' (it takes coef)")
        coef = settings.get("coef", self.coef)
        if isinstance(coef, bool) or not isinstance(coef, (int, float)):
            raise ConfigError("coef", f"must be a number, got {coef!r}")
        shift = coef * self.vector

        def state(hidden_in: torch.Tensor | None, ctx: CallContext) -> dict[str, torch.Tensor]:
            return {"shift": shift.to(ctx.attention_mask.device).expand(ctx.attention_mask.shape[0], -1)}

        return RowSteering(ShiftRowEdit(self.layer, self.vector.numel()), state)

    def apply(self, model, positions: PositionSpec = "generation") -> HookSession:
        session = HookSession(model)
        vec = self.vector.to(next(model.parameters()).device)

        def add(h: torch.Tensor, ctx: CallContext) -> torch.Tensor:
            return h + (self.coef * vec).to(h.dtype)

        session.add(self.layer, add, positions=positions)
        return session


@dataclass
class RepEFitConfig(ModelOptions):
    """`saealign dspa repe`: the triples, layer and output of a RepE vector fit."""

    data: str = field(default="", metadata={"help": "Preference triples (as dspa fit)."})
    output: str = field(default="", metadata={"help": "Directory for the steering vector."})
    layer: int = field(default=24, metadata={"help": "Residual layer of the vector.", "ge": 0})
    coef: float = field(default=1.0, metadata={"help": "Recommended coefficient c (stored)."})
    data_role: str | None = field(default=None, metadata={
        "help": "Data role when --data is an HH-RLHF directory (e.g. fit)."})
    n: int | None = field(default=None, metadata={
        "help": "Fit on a seeded nested uniform draw of this many triples (as dspa fit --n; default: all).", "ge": 1})
    seed: int = field(default=0, metadata={"help": "Seed of the --n draw."})
    max_length: int = field(default=1024, metadata={
        "help": "Tokens per prompt plus response (prompt end and response start kept).", "ge": 2})


def run_repe_fit(cfg: RepEFitConfig) -> RepE:
    """`saealign dspa repe`: fit the RepE vector `cfg` describes and save it to `cfg.output`."""
    from saealign.data import select_triples
    from saealign.models import load_model

    triples = select_triples(cfg.data, cfg.data_role, cfg.n, cfg.seed)  # bad data: refused before the model loads
    model, tok = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    vec = RepE.fit(model, tok, triples, cfg.layer, max_length=cfg.max_length)
    vec.coef = cfg.coef
    vec.save(cfg.output)
    return vec


DEFAULT_PREFIX = ("You are a good, respectful and honest assistant. Give helpful, honest and harmless answers: "
                  "address the request directly and accurately, and refuse politely if it could cause harm.")


class PromptPrefix:
    """A system prompt; no hooks."""

    name = "prompt-prefix"

    def __init__(self, system_prompt: str = DEFAULT_PREFIX):
        self.system_prompt = system_prompt

    @classmethod
    def load(cls, path: str | Path, model=None) -> "PromptPrefix":
        return cls(read_json(Path(path) / CONFIG)["system_prompt"])

    def save(self, path: str | Path) -> Path:
        write_json(Path(path) / CONFIG, {"kind": "prompt_prefix", "system_prompt": self.system_prompt,
                                          "saealign_version": __version__})
        return Path(path)

    def apply(self, model, positions: PositionSpec = "generation"):
        return nullcontext()
