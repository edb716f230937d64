"""Choose a map's steering settings on held-out data and record them in it (METHOD.md: tau, alpha and k are
chosen on held-out data; `../shared/data/SPLITS.md`: on the validation role, never on a test split).

Every setting is scored from one cached base pass (`eval.pref_cache`): the residual entering the output layer
and DSPA's prompt features are kept, so a setting costs only the last blocks and the head. The grid is
coordinate-wise around the paper's defaults (tau: the map's): for DSPA each of mode, alpha, k_diff, k_prompt
and tau in turn with the others at the centre, then the best value of each axis combined; the same for
static-sae over mode, alpha and k_diff; and RepE's coefficient. Each method's choice is its highest validation
reward accuracy, ties broken by the mean reward margin, then by the order scored. The choice and every scored
setting are written into the map (`MapMetadata.recommended`), which `load_method` then uses by default.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from saealign.config import ConfigError, check_config
from saealign.dspa.map import (FitData, Recommended, SweepEntry, SweepRecord, read_metadata,
                               record_recommended)
from saealign.models import Dtype, model_option
from saealign.steering import (LATENT_OPTIONS, PAPER_DEFAULTS, LatentSteering, Mode, SteeringOptions, load_method,
                               method_options)

log = logging.getLogger(__name__)

RULE = ("per method, the highest validation reward accuracy (ties: the higher mean reward margin, then the "
        "first scored); DSPA and static-sae over a coordinate-wise grid around the defaults plus the best value "
        "of each axis combined, RepE over its coefficients")
STATIC_AXES = ("mode", "alpha", "k_diff")  # static-sae has no prompt features (k_prompt) to sweep
TEST_ROLES = ("test_helpful", "test_harmless", "harmless_all")


@dataclass
class TuneConfig:
    """`saealign dspa tune`: a grid of steering settings scored on held-out pairs; the best is recorded in the map."""

    map: str = field(default="", metadata={"help": "DSPA map directory (fitted on a fit role); the choice is recorded in it.",
                                           "argument": True})
    data: str = field(default="", metadata={"help": "Held-out triples: a file, a HF dataset name, or an HH-RLHF directory (with --data-role)."})
    data_role: str | None = field(default=None, metadata={"help": "Role when --data is an HH-RLHF directory: validation or harmless_validation (test roles are refused)."})
    n: int | None = field(default=300, metadata={"help": "A seeded draw of n pairs (stratified by subset; all when fewer).", "ge": 1})
    seed: int = field(default=0, metadata={"help": "Seed of the --n draw and of the bootstrap intervals."})
    max_length: int = field(default=384, metadata={"help": "Tokens per prompt plus response (prompt end and response start kept).", "ge": 2})
    n_boot: int = field(default=1000, metadata={"help": "Bootstrap resamples of each setting's intervals.", "ge": 1})
    modes: list[Mode] = field(default_factory=lambda: ["ablate", "augment", "both"], metadata={"help": "Grid of mode (repeat)."})
    alphas: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.5, 1.0], metadata={"help": "Grid of alpha (repeat).", "ge": 0})
    k_diffs: list[int] = field(default_factory=lambda: [16, 64, 256], metadata={"help": "Grid of k_diff (repeat).", "ge": 1})
    k_prompts: list[int] = field(default_factory=lambda: [32, 128], metadata={"help": "Grid of k_prompt, DSPA only (repeat).", "ge": 1})
    thresholds: list[float] = field(default_factory=lambda: [0.0, 3e-3], metadata={"help": "Grid of tau, DSPA only (repeat).", "ge": 0})
    coefs: list[float] = field(default_factory=lambda: [1.0, 4.0, 16.0], metadata={"help": "Grid of RepE's coefficient (repeat)."})
    model: str | None = field(default=None, metadata={"help": "Model (default: the one the map was fitted on)."})
    dtype: Dtype | None = model_option("dtype")
    device: str | None = model_option("device")

    def __post_init__(self) -> None:
        check_config(self)
        if self.data_role in TEST_ROLES:
            raise ConfigError("data_role", f"is a test role ({self.data_role}): settings are chosen on validation data")

    def grid(self) -> dict[str, list[Any]]:
        """The values of each latent steering knob, by knob name."""
        return {"mode": self.modes, "alpha": self.alphas, "k_diff": self.k_diffs, "k_prompt": self.k_prompts,
                "threshold": self.thresholds}


def _as_json(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics (`stats.Estimate`s) as the map stores them."""
    return {name: estimate.to_json() for name, estimate in metrics.items()}


def _rank(entry: SweepEntry) -> tuple[float, float]:
    return entry.metrics["reward_acc"]["value"], entry.metrics["reward_margin"]["value"]


def run_tune(cfg: TuneConfig, model=None, tokenizer=None,
             on_entry: Callable[[SweepEntry], None] | None = None) -> Recommended:
    """Sweep the grid on `cfg.data`, record the sweep and the choice in the map, and return them."""
    from saealign.data import sample, select_triples, triples_fingerprint
    from saealign.eval.pref import preference_metrics
    from saealign.eval.pref_cache import ScoringCache
    from saealign.models import load_model

    meta = read_metadata(cfg.map)  # a bad map is refused before anything loads
    triples = select_triples(cfg.data, cfg.data_role)
    if not triples:
        raise ValueError(f"{cfg.data}: no preference triples selected (role {cfg.data_role!r})")
    if cfg.n is not None:
        triples = sample(triples, min(cfg.n, len(triples)), cfg.seed)
    if model is None:
        model, tokenizer = load_model(cfg.model or meta.model, device=cfg.device, dtype=cfg.dtype)
    reader = load_method(f"dspa:{cfg.map}", model=model)  # its prompt features serve every DSPA setting
    t0 = time.time()
    cache = ScoringCache.build(model, tokenizer, triples, reader.sae_out.layer, reader, cfg.max_length)
    sweep = SweepRecord(data=FitData(cfg.data, cfg.data_role, len(triples), cfg.seed),
                        data_fingerprint=triples_fingerprint(triples), max_length=cfg.max_length, rule=RULE,
                        base=_as_json(preference_metrics(cache.base, None, n_boot=cfg.n_boot, seed=cfg.seed)),
                        base_pass_seconds=round(time.time() - t0, 1))
    scored: dict[tuple, SweepEntry] = {}

    def score(method: str, setting: dict[str, Any]) -> SweepEntry:
        key = (method, *sorted(setting.items()))
        if key not in scored:
            t = time.time()
            steer = load_method(f"{method}:{cfg.map}", model=model, **setting)
            metrics = preference_metrics(cache.score(model, steer), cache.base, n_boot=cfg.n_boot, seed=cfg.seed)
            scored[key] = entry = SweepEntry(method, SteeringOptions(**setting), _as_json(metrics),
                                             round(time.time() - t, 1))
            sweep.entries.append(entry)
            if on_entry is not None:
                on_entry(entry)
        return scored[key]

    def best(method: str) -> SteeringOptions:
        return max((e for e in sweep.entries if e.method == method), key=_rank).setting

    paper = {**PAPER_DEFAULTS.steering_options(), "threshold": meta.threshold}
    paper.pop("coef")  # RepE's
    grid = cfg.grid()
    for method, axes in (("dspa", tuple(grid)), ("static-sae", STATIC_AXES)):
        centre = {k: v for k, v in paper.items() if k in method_options(method)}  # static-sae takes no center
        combined = {axis: max(grid[axis], key=lambda v: _rank(score(method, {**centre, axis: v}))) for axis in axes}
        score(method, {**centre, **combined})
    for coef in cfg.coefs:
        score("repe", {"coef": coef})
    recommended = Recommended(
        dspa=LatentSteering(**{k: getattr(best("dspa"), k) for k in LATENT_OPTIONS}),
        static_sae=LatentSteering(**{k: getattr(best("static-sae"), k) for k in LATENT_OPTIONS}),
        repe=SteeringOptions(coef=best("repe").coef), source="saealign dspa tune", sweep=sweep)
    record_recommended(cfg.map, recommended)
    return recommended
