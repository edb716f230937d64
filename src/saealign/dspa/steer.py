"""DSPA steering at inference (METHOD.md, "DSPA — steering at inference").

Per prompt, from the prefill pass itself: `g(x)` at layer l_in (it runs before l_out, so no extra
forward pass), `g~ = TopK_{k_prompt}(g)`, scores `s = A^T g~`, and the latent sets S- (the k_diff
most negative scores, mode ablate), S+ (the k_diff most positive, mode augment) or both.

Per edited token at layer l_out: `f = enc_out(h)`, `m = max_i f_i`; for active j in S-:
`f'_j = max(0, f_j - alpha m)`; for active j in S+: `f'_j = f_j + alpha m`; `h' = h + (f' - f) W_dec`.
Only token-active latents change, the SAE error term stays in the stream, and a token with no
selected active latent is left bit-for-bit unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from saealign.activations import keep_mask
from saealign.config import check_config
from saealign.dspa.map import DSPAMap, first_real_position, prompt_statistic
from saealign.hooks import CallContext, HookSession, PositionSpec
from saealign.sae.core import SAE, load_sae

log = logging.getLogger(__name__)

Mode = Literal["ablate", "augment", "both"]


@dataclass
class SteerConfig:
    mode: Mode = "ablate"
    alpha: float = field(default=0.2, metadata={"ge": 0})
    k_prompt: int = field(default=32, metadata={"ge": 1})
    k_diff: int = field(default=16, metadata={"ge": 1})
    threshold: float | None = field(default=None, metadata={"ge": 0})  # None: the map's recommended tau
    edit_prompt: bool = False
    record: bool = False  # keep a per-token record of edited latents (for the audit)

    def __post_init__(self) -> None:
        check_config(self)


def select_latents(scores: torch.Tensor, k_diff: int, mode: Mode) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, m_out) bool masks S- and S+ from scores s (only strictly negative / positive scores)."""
    minus = torch.zeros_like(scores, dtype=torch.bool)
    plus = torch.zeros_like(scores, dtype=torch.bool)
    k = min(k_diff, scores.shape[-1])
    if mode in ("ablate", "both"):
        vals, idx = (-scores).topk(k, dim=-1)
        minus.scatter_(-1, idx, vals > 0)
    if mode in ("augment", "both"):
        vals, idx = scores.topk(k, dim=-1)
        plus.scatter_(-1, idx, vals > 0)
    return minus, plus


def edit_latents(f: torch.Tensor, minus: torch.Tensor, plus: torch.Tensor, alpha: float) -> torch.Tensor:
    """f' from f (n, m) and per-row selected sets (n, m): only active selected latents change."""
    m_t = f.max(dim=-1, keepdim=True).values
    active = f > 0
    new = f.clone()
    dec = minus & active
    inc = plus & active
    new = torch.where(dec, torch.clamp(f - alpha * m_t, min=0.0), new)
    new = torch.where(inc, f + alpha * m_t, new)
    return new


@dataclass
class EditRecord:
    """Which latents one edited token had changed (for the feature audit)."""

    row: int
    position: int  # absolute position (prompt length included)
    latents: list[int]
    before: list[float]
    after: list[float]


class LatentSteerer:
    """Shared machinery of DSPA and static-sae: latent sets -> token-active edits at l_out."""

    system_prompt: str | None = None
    name = "latent-steerer"

    def __init__(self, sae_out: SAE, cfg: SteerConfig):
        self.sae_out = sae_out
        self.cfg = cfg
        self.records: list[EditRecord] = []
        self.edited_tokens = 0  # token positions changed so far (always counted: proof that steering acted)
        self._sets: tuple[torch.Tensor, torch.Tensor] | None = None

    def latent_sets(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The (S-, S+) masks of the current prompt batch (None before a prefill)."""
        return self._sets

    def _edit(self, hidden: torch.Tensor, ctx: CallContext) -> torch.Tensor | None:
        if self._sets is None or not ctx.mask.any():
            return None
        minus, plus = self._sets
        rows, cols = ctx.mask.nonzero(as_tuple=True)
        sae = self.sae_out
        x = hidden[rows, cols].float()
        f = sae.encode(x)
        f_new = edit_latents(f, minus[rows], plus[rows], self.cfg.alpha)
        diff = f_new - f
        changed = diff.ne(0).any(-1)
        n_changed = int(changed.sum())
        if n_changed == 0:
            return None
        self.edited_tokens += n_changed
        out = hidden.clone()
        delta = diff[changed] @ sae.W_dec
        r, c = rows[changed], cols[changed]
        out[r, c] = (hidden[r, c].float() + delta).to(hidden.dtype)
        if self.cfg.record:
            for i in changed.nonzero().squeeze(1).tolist():
                idx = diff[i].nonzero().squeeze(1)
                self.records.append(EditRecord(int(rows[i]), ctx.past_len + int(cols[i]), idx.tolist(),
                                               f[i, idx].tolist(), f_new[i, idx].tolist()))
        return out

    def _edit_positions(self, positions: PositionSpec) -> PositionSpec:
        if self.cfg.edit_prompt and isinstance(positions, str):
            return "all"
        return positions


class DSPA(LatentSteerer):
    """Prompt-conditional SAE steering: `with dspa.apply(model): model.generate(...)`."""

    name = "dspa"

    def __init__(self, dspa_map: DSPAMap, sae_in: SAE, sae_out: SAE, cfg: SteerConfig | None = None, **overrides: Any):
        cfg = cfg or SteerConfig(**{**dspa_map.config.get("recommended", {}), **overrides})
        super().__init__(sae_out, cfg)
        dspa_map.check_compatible(sae_in=sae_in, sae_out=sae_out)
        self.map = dspa_map
        self.sae_in = sae_in
        self.A = dspa_map.matrix(cfg.threshold)  # (m_in, m_out), thresholded
        self.options = dspa_map.config["options"]

    @classmethod
    def load(cls, path: str | Path, model=None, sae_in: SAE | str | None = None, sae_out: SAE | str | None = None,
             **overrides: Any) -> "DSPA":
        """Load a saved map; the SAEs default to the ones recorded in it (by source path)."""
        dspa_map = DSPAMap.load(path)
        device = next(model.parameters()).device if model is not None else None
        sae_in = load_sae(sae_in or dspa_map.config["sae_in"]["source"], device=device)
        sae_out = load_sae(sae_out or dspa_map.config["sae_out"]["source"], device=device)
        dspa_map.check_compatible(model, sae_in, sae_out)
        return cls(dspa_map, sae_in, sae_out, **overrides)

    def scores(self, g: torch.Tensor) -> torch.Tensor:
        """s = A^T TopK_{k_prompt}(g) for a batch of prompt statistics (batch, m_in)."""
        vals, idx = g.topk(min(self.cfg.k_prompt, g.shape[-1]), dim=-1)
        g_top = torch.zeros_like(g).scatter_(-1, idx, vals)
        return g_top @ self.A.to(g.device)

    def prompt_features(self, hidden: torch.Tensor, ctx: CallContext, explicit: torch.Tensor | None = None
                        ) -> torch.Tensor | None:
        """g(x) (batch, m_in) from the residual at l_in of a prefill call (None on decode steps).
        With `explicit` (the edited positions of a teacher-forced call) the prompt is everything else."""
        if explicit is not None:
            prompt = ctx.attention_mask & ~explicit.to(ctx.attention_mask.device)
        elif ctx.is_prefill:
            prompt = ctx.prompt_mask()
        else:
            return None  # decode steps reuse the sets chosen at prefill
        if self.options.get("exclude_sinks", True):
            prompt = prompt & keep_mask(hidden, ctx.attention_mask, self.options.get("sink_factor", 10.0),
                                        first_real_position(ctx.attention_mask))
        u = torch.zeros(*prompt.shape, self.sae_in.d_sae, device=hidden.device)
        if prompt.any():
            u[prompt] = self.sae_in.encode(hidden[prompt].float())
        return prompt_statistic(u, prompt, self.options.get("stat", "density"))

    def use_prompt_features(self, g: torch.Tensor) -> None:
        """Choose the latent sets from given prompt features (a cached prefill, see eval.pref_cache)."""
        self._sets = select_latents(self.scores(g), self.cfg.k_diff, self.cfg.mode)

    def _read_prompt(self, hidden: torch.Tensor, ctx: CallContext, explicit: torch.Tensor | None) -> None:
        g = self.prompt_features(hidden, ctx, explicit)
        if g is not None:
            self.use_prompt_features(g)

    def apply(self, model, positions: PositionSpec = "generation") -> HookSession:
        explicit = positions if isinstance(positions, torch.Tensor) else None
        session = HookSession(model)
        session.add(self.sae_in.layer, lambda h, ctx: self._read_prompt(h, ctx, explicit), positions="all")
        session.add(self.sae_out.layer, self._edit, positions=self._edit_positions(positions))
        return session
