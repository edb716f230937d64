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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from saealign.activations import keep_mask
from saealign.config import ConfigError, check_config
from saealign.dspa.map import DSPAMap, first_real_position, prompt_statistic
from saealign.hooks import CallContext, HookSession, PositionSpec
from saealign.sae.core import SAE, load_sae
from saealign.steering import LATENT_OPTIONS, PAPER_DEFAULTS, LatentSteering, Mode, RowSteering

log = logging.getLogger(__name__)


@dataclass
class SteerConfig(LatentSteering):
    """The settings one DSPA or static-sae steerer runs with: the knobs of `LatentSteering` (a knob not given
    takes the paper's default; threshold None: the map's tau), and how the edits are made."""

    edit_prompt: bool = field(default=False, metadata={"help": "Also edit prompt positions (default: generated tokens only)."})
    record: bool = field(default=False, metadata={"help": "Keep a per-token record of the edited latents (the feature audit)."})

    def __post_init__(self) -> None:
        for name in ("mode", "alpha", "k_prompt", "k_diff", "center"):
            if getattr(self, name) is None:
                setattr(self, name, getattr(PAPER_DEFAULTS, name))
        check_config(self)

    @classmethod
    def resolve(cls, recommended: LatentSteering, **overrides: Any) -> "SteerConfig":
        """The given options over a map's recommended setting (over the paper's defaults)."""
        return cls(**{**recommended.steering_options(), **overrides})


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


def prompt_scores(a: torch.Tensor, g: torch.Tensor, k_prompt: int, g_mean: torch.Tensor | None = None) -> torch.Tensor:
    """s = A^T TopK_{k_prompt}(g) per row (METHOD.md). With `g_mean` (a centred map, `LatentSteering.center`) the
    prompt enters by its deviation from the mean prompt, g(x) - mean(g): its k_prompt largest entries in size,
    signs kept (a latent rarer than usual in this prompt says as much as one more frequent)."""
    k = min(k_prompt, g.shape[-1])
    if g_mean is None:
        idx = g.topk(k, dim=-1).indices
    else:
        g = g - g_mean.to(g.device)
        idx = g.abs().topk(k, dim=-1).indices
    return torch.zeros_like(g).scatter_(-1, idx, g.gather(-1, idx)) @ a.to(g.device)


def edit_latents(f: torch.Tensor, minus: torch.Tensor, plus: torch.Tensor, alpha: float,
                 peak: torch.Tensor | None = None) -> torch.Tensor:
    """f' from f (n, m) and per-row selected sets (n, m): only active selected latents change. `peak`: the
    token's largest activation m, when `f` holds only some of its latents."""
    m_t = f.max(dim=-1, keepdim=True).values if peak is None else peak
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


def steer_hidden(sae: SAE, hidden: torch.Tensor, edit: torch.Tensor, minus: torch.Tensor, plus: torch.Tensor,
                 alpha: torch.Tensor | float, latents: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The edit at l_out for a (batch, seq, d) residual with per-row sets (batch, m) and alpha (scalar or (batch, 1)),
    at the positions `edit` (batch, seq) marks. Returns (new residual, (batch, seq) bool: tokens changed).
    `latents`: the only latents any row selects (then `minus`/`plus` are given over them), so that the
    decode reads those rows of W_dec only — most of a small batch's steering cost otherwise.

    Fixed shapes and no host synchronisation (masks, never nonzero or early returns), so a decode step stays
    cheap and can be captured by CUDA graphs / torch.compile. A token with no selected active latent keeps its
    exact bits: it is taken from `hidden` by `torch.where`, not recomputed."""
    f = sae.encode(hidden.float())
    peak = f.max(dim=-1, keepdim=True).values
    w_dec = sae.W_dec
    if latents is not None:
        f, w_dec = f[..., latents], w_dec[latents]
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.unsqueeze(1)  # (batch, 1, 1) against (batch, seq, m)
    f_new = edit_latents(f, minus.unsqueeze(1), plus.unsqueeze(1), alpha, peak)
    diff = (f_new - f) * edit.unsqueeze(-1)
    changed = diff.ne(0).any(-1)
    edited = (hidden.float() + diff @ w_dec).to(hidden.dtype)
    return torch.where(changed.unsqueeze(-1), edited, hidden), changed


ROW_SETTINGS = tuple(k for k in LATENT_OPTIONS if k not in ("threshold", "center"))  # per request (the map's A: not)


class LatentRowEdit:
    """`steer_hidden` over a shared batch at one output SAE's layer; each row carries its own S-, S+ and alpha
    (a base row: empty sets, alpha 0)."""

    def __init__(self, sae_out: SAE):
        self.sae, self.layer, self.key = sae_out, sae_out.layer, ("latent-edit", id(sae_out))

    def empty(self, rows: int, device: torch.device) -> dict[str, torch.Tensor]:
        sets = torch.zeros(rows, self.sae.d_sae, dtype=torch.bool, device=device)
        return {"minus": sets, "plus": sets.clone(), "alpha": torch.zeros(rows, 1, device=device)}

    def prepare(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Narrow the sets to the latents some row selects (a host sync, once per change of the batch's rows)."""
        latents = (state["minus"] | state["plus"]).any(0).nonzero().squeeze(1)
        return {"minus": state["minus"][:, latents], "plus": state["plus"][:, latents], "alpha": state["alpha"],
                "latents": latents}

    def __call__(self, hidden: torch.Tensor, edit: torch.Tensor, state: dict[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        return steer_hidden(self.sae, hidden, edit, state["minus"], state["plus"], state["alpha"], state["latents"])


class LatentSteerer:
    """Shared machinery of DSPA and static-sae: latent sets -> token-active edits at l_out."""

    system_prompt: str | None = None
    name = "latent-steerer"

    def __init__(self, sae_out: SAE, cfg: SteerConfig):
        self.sae_out = sae_out
        self.cfg = cfg
        self.records: list[EditRecord] = []
        # token positions changed so far (always counted: proof that steering acted); a device tensor, so
        # counting never waits for the device
        self._edited = torch.zeros((), dtype=torch.long, device=sae_out.W_dec.device)
        self._sets: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def edited_tokens(self) -> int:
        return int(self._edited)

    def latent_sets(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The (S-, S+) masks of the current prompt batch (None before a prefill)."""
        return self._sets

    def row_sets(self, cfg: SteerConfig, hidden_in: torch.Tensor, ctx: CallContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(S-, S+) for the prompts of a prefill call under settings `cfg` (a request's own alpha/k/mode), so
        rows of one shared batch can each carry their own sets; `hidden_in` is the residual at `in_layer`."""
        raise NotImplementedError

    @property
    def in_layer(self) -> int | None:
        """The layer whose prefill residual `row_sets` reads (None: the sets do not depend on the prompt)."""
        return None

    def row_steering(self, **settings: Any) -> RowSteering:
        """This method with one request's settings (`ROW_SETTINGS`), as rows of a shared batch."""
        unknown = sorted(set(settings) - set(ROW_SETTINGS))
        if unknown:
            raise ConfigError(unknown[0], f"is not a per-request setting of {self.name!r} (it takes {', '.join(ROW_SETTINGS)})")
        cfg = replace(self.cfg, **settings)  # validated like any SteerConfig

        def state(hidden_in: torch.Tensor | None, ctx: CallContext) -> dict[str, torch.Tensor]:
            minus, plus = self.row_sets(cfg, hidden_in, ctx)
            return {"minus": minus, "plus": plus, "alpha": torch.full((minus.shape[0], 1), cfg.alpha, device=minus.device)}

        return RowSteering(LatentRowEdit(self.sae_out), state, self.in_layer)

    def _edit(self, hidden: torch.Tensor, ctx: CallContext) -> torch.Tensor | None:
        if self._sets is None:
            return None
        minus, plus = self._sets
        out, changed = steer_hidden(self.sae_out, hidden, ctx.mask, minus, plus, self.cfg.alpha)
        self._edited += changed.sum()
        if self.cfg.record:  # the audit trail needs host-side indices (a sync, only when asked for)
            self._record(hidden, out, changed, ctx)
        return out

    def _record(self, hidden: torch.Tensor, out: torch.Tensor, changed: torch.Tensor, ctx: CallContext) -> None:
        minus, plus = self._sets
        for row, col in changed.nonzero().tolist():
            f = self.sae_out.encode(hidden[row, col].float())
            f_new = edit_latents(f, minus[row], plus[row], self.cfg.alpha)
            idx = (f_new - f).nonzero().squeeze(1)
            self.records.append(EditRecord(row, ctx.past_len + col, idx.tolist(), f[idx].tolist(), f_new[idx].tolist()))

    def _edit_positions(self, positions: PositionSpec) -> PositionSpec:
        if self.cfg.edit_prompt and isinstance(positions, str):
            return "all"
        return positions


class DSPA(LatentSteerer):
    """Prompt-conditional SAE steering: `with dspa.apply(model): model.generate(...)`."""

    name = "dspa"

    def __init__(self, dspa_map: DSPAMap, sae_in: SAE, sae_out: SAE, cfg: SteerConfig | None = None, **overrides: Any):
        cfg = cfg or SteerConfig.resolve(dspa_map.meta.recommended.dspa, **overrides)
        super().__init__(sae_out, cfg)
        dspa_map.check_compatible(sae_in=sae_in, sae_out=sae_out)
        self.map = dspa_map
        self.sae_in = sae_in
        self.A = dspa_map.matrix(cfg.threshold, cfg.center)  # (m_in, m_out), thresholded
        self.g_mean = dspa_map.mean_g() if cfg.center else None
        self.options = asdict(dspa_map.meta.options)

    @classmethod
    def load(cls, path: str | Path, model=None, sae_in: SAE | str | None = None, sae_out: SAE | str | None = None,
             **overrides: Any) -> "DSPA":
        """Load a saved map; the SAEs default to the ones recorded in it (by source path)."""
        dspa_map = DSPAMap.load(path)
        device = next(model.parameters()).device if model is not None else None
        sae_in = load_sae(sae_in or dspa_map.meta.sae_in["source"], device=device)
        sae_out = load_sae(sae_out or dspa_map.meta.sae_out["source"], device=device)
        dspa_map.check_compatible(model, sae_in, sae_out)
        return cls(dspa_map, sae_in, sae_out, **overrides)

    def scores(self, g: torch.Tensor, k_prompt: int | None = None) -> torch.Tensor:
        """s for a batch of prompt statistics (batch, m_in) (`prompt_scores`); k_prompt defaults to the config's."""
        return prompt_scores(self.A, g, k_prompt or self.cfg.k_prompt, self.g_mean)

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
        if self.options["exclude_sinks"]:
            prompt = prompt & keep_mask(hidden, ctx.attention_mask, self.options["sink_factor"],
                                        first_real_position(ctx.attention_mask))
        u = torch.zeros(*prompt.shape, self.sae_in.d_sae, device=hidden.device)
        if prompt.any():
            u[prompt] = self.sae_in.encode(hidden[prompt].float())
        return prompt_statistic(u, prompt, self.options["stat"])

    @property
    def in_layer(self) -> int:
        return self.sae_in.layer

    def row_sets(self, cfg: SteerConfig, hidden_in: torch.Tensor, ctx: CallContext) -> tuple[torch.Tensor, torch.Tensor]:
        return select_latents(self.scores(self.prompt_features(hidden_in, ctx), cfg.k_prompt), cfg.k_diff, cfg.mode)

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
