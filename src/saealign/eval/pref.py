"""Judge-free preference evaluation on held-out triples (METHOD.md, "Evaluation protocol").

For every method (the base model = no intervention, DSPA, baselines, trained models):
- preference accuracy: `log pi(y+|x) > log pi(y-|x)`, summed and length-normalised;
- reward accuracy against the base model: `r(x,y) = log pi_method(y|x) - log pi_base(y|x)` summed
  over response tokens; the fraction with `r(x,y+) > r(x,y-)`. A pair whose rewards tie (e.g. a
  steering method that edited nothing on either response) counts one half, as every tie does
  (`saealign.stats`); the tie rate is reported beside it.
`fpo eval` reports the same metrics (`preference_metrics`) with its reference model as the base.
Intervals are `saealign.stats` bootstraps over triples; a steered method also carries its paired
difference to the base model on the preference accuracies. The scores are teacher-forced response
log-probs (`saealign.runtime.scoring.score_triples`, base scores cached on disk).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from saealign.config import ConfigError, check_config
from saealign.data import sample, select_triples, triples_fingerprint
from saealign.eval.pref_cache import ScoringCache
from saealign.models import ModelOptions
from saealign.results import ResultRecord, format_estimate, write_results
from saealign.runtime.scoring import SequenceScores, base_scores_cached, score_triples
from saealign.stats import N_BOOT, Estimate, mean_estimate, paired_difference, wins
from saealign.steering import (Intervention, SteeringOptions, load_method, method_kind, method_options, recorded_cost,
                               split_method_entry)

log = logging.getLogger(__name__)


TIE_ATOL = 1e-9  # summed log-probs that differ by less tie (the cached and the full pass round differently)
PREF_HEADLINE = ("reward_acc", "pref_acc_sum", "pref_acc_norm")


def preference_hits(scores: SequenceScores) -> dict[str, np.ndarray]:
    """Per triple, whether the model prefers the chosen response (1, a tie 1/2, else 0), by summed and
    by length-normalised log-probability."""
    norm_c = scores.logp_chosen / np.maximum(scores.len_chosen, 1)
    norm_r = scores.logp_rejected / np.maximum(scores.len_rejected, 1)
    return {"pref_acc_sum": wins(scores.logp_chosen, scores.logp_rejected, TIE_ATOL),
            "pref_acc_norm": wins(norm_c, norm_r, TIE_ATOL)}


def implicit_rewards(method: SequenceScores, base: SequenceScores) -> tuple[np.ndarray, np.ndarray]:
    """Per triple, the implicit rewards (log-ratio to base) of the chosen and the rejected response."""
    return method.logp_chosen - base.logp_chosen, method.logp_rejected - base.logp_rejected


def reward_hits(method: SequenceScores, base: SequenceScores) -> np.ndarray:
    """Per triple, whether the implicit reward prefers the chosen response (1, a tie 1/2, else 0)."""
    return wins(*implicit_rewards(method, base), TIE_ATOL)


def preference_metrics(method: SequenceScores, base: SequenceScores | None, n_boot: int = N_BOOT,
                       seed: int = 0) -> dict[str, Estimate]:
    """Preference accuracies and, against `base`, reward accuracy, tie rate and mean reward margin
    (fractions in [0, 1] and nats), each with its bootstrap interval over triples."""
    out = {name: mean_estimate(hits, n_boot, seed) for name, hits in preference_hits(method).items()}
    if base is not None:
        r_c, r_r = implicit_rewards(method, base)
        hits = wins(r_c, r_r, TIE_ATOL)
        out["reward_acc"] = mean_estimate(hits, n_boot, seed)
        out["reward_tie_rate"] = mean_estimate((hits == 0.5).astype(float), n_boot, seed)
        out["reward_margin"] = mean_estimate(r_c - r_r, n_boot, seed)
    return out


def evaluate_preferences(model, tokenizer, triples, methods: dict[str, Intervention | None], max_length: int = 1024,
                         n_boot: int = N_BOOT, seed: int = 0, progress: bool = True, reuse_base_pass: bool = True,
                         cache=None) -> list[ResultRecord]:
    """One result record per named method (None = base) on the same triples (benchmark `pref`).

    With `reuse_base_pass`, methods that edit only late layers are scored from one cached base pass
    (`eval.pref_cache.ScoringCache`, built here or passed in as `cache`); the others (a system
    prompt, early edits) by a full pass each."""
    steered = [m for m in methods.values() if m is not None]
    if cache is None and reuse_base_pass:
        cache = ScoringCache.for_methods(model, tokenizer, triples, steered, max_length, progress=progress)
    if cache is not None and cache.triples_fingerprint != triples_fingerprint(triples):
        raise ValueError("the scoring cache was built for other triples")
    base = cache.base if cache is not None else base_scores_cached(model, tokenizer, triples, max_length, progress)
    base_name = next((name for name, m in methods.items() if m is None), None)
    base_hits = preference_hits(base)
    data = {"n": len(triples), "fingerprint": triples_fingerprint(triples)}
    records = []
    for name, intervention in methods.items():
        if intervention is None:
            scores = base
        elif cache is not None and cache.supports(model, intervention):
            scores = cache.score(model, intervention, progress=progress, desc=f"score {name} (from cache)")
        else:
            scores = score_triples(model, tokenizer, triples, intervention, max_length, progress=progress,
                                   desc=f"score {name}")
        metrics = preference_metrics(scores, None if intervention is None else base, n_boot, seed)
        metrics["mean_logp_chosen"] = Estimate(float(scores.logp_chosen.mean()))
        metrics["mean_logp_rejected"] = Estimate(float(scores.logp_rejected.mean()))
        paired = base_name is not None and intervention is not None
        deltas = ({k: paired_difference(v, base_hits[k], n_boot, seed) for k, v in preference_hits(scores).items()}
                  if paired else {})
        records.append(ResultRecord("pref", name, metrics, [h for h in PREF_HEADLINE if h in metrics],
                                    {"max_length": max_length, "n_boot": n_boot, "seed": seed}, data=dict(data),
                                    baseline=base_name if paired else None, deltas=deltas))
    return records


PREF_LEGEND = """\
- *reward acc. vs base*: the share of triples where the method raises the chosen response more than the
  rejected one, relative to the base model (reward `r = log p_method(y|x) - log p_base(y|x)`, summed over
  response tokens); 50 % means no shift, exact ties count one half (their share is in *ties*).
- *pref. acc. (sum)*: the share where the model gives the chosen response a higher total log-probability
  than the rejected one (favours the shorter response);
- *pref. acc. (length-norm.)*: the same with the mean log-probability per response token.
"""


def markdown_table(records: list[ResultRecord], title: str = "", legend: bool = False) -> str:
    """Methods x metrics, percentages with 95 % intervals; `legend` adds what each column means."""
    def cell(m: Estimate | None) -> str:
        return format_estimate(m, digits=1, scale=100, missing="—")

    n = records[0].data["n"]
    lines = [f"**{title}** (n = {n})" if title else f"n = {n}", "",
             "| method | reward acc. vs base % [95% CI] | ties % | pref. acc. (sum) % | pref. acc. (length-norm.) % |",
             "|---|---|---|---|---|"]
    for r in records:
        m = r.metrics
        lines.append(f"| {r.method} | {cell(m.get('reward_acc'))} | {cell(m.get('reward_tie_rate'))} | "
                     f"{cell(m['pref_acc_sum'])} | {cell(m['pref_acc_norm'])} |")
    return "\n".join(lines) + "\n" + ("\n" + PREF_LEGEND if legend else "")


@dataclass
class PrefEvalConfig(SteeringOptions, ModelOptions):
    """`eval pref`: the steering knobs (each method gets those it takes) and what to score."""

    data: str = field(default="", metadata={"help": "Held-out triples: a file, HF name, or HH-RLHF directory (with --data-role)."})
    data_role: str | None = field(default=None, metadata={"help": "Role when --data is an HH-RLHF directory (SPLITS.md): validation, test_helpful, harmless_validation, test_harmless (the test half of harmless-base), harmless_all (all of it: published pre-split numbers), or a fit role."})
    methods: list[str] = field(default_factory=lambda: ["base"], metadata={"help": "Methods: base, prompt-prefix, dspa:MAP, static-sae:MAP, repe:DIR|MAP (repeat); NAME=SPEC names a column."})
    n: int | None = field(default=None, metadata={"help": "Score a seeded draw of this many triples, stratified by subset (default: all).", "ge": 1})
    seed: int = field(default=0, metadata={"help": "Seed of the --n draw and of the bootstrap."})
    max_length: int = field(default=1024, metadata={"help": "Tokens per prompt plus response (prompt end and response start kept).", "ge": 1})
    n_boot: int = field(default=2000, metadata={"help": "Bootstrap resamples of the 95% intervals.", "ge": 1})
    output: str | None = field(default=None, metadata={"help": "Write results.json and results.md into this directory."})

    def __post_init__(self) -> None:
        check_config(self)
        kinds = [method_kind(split_method_entry(entry)[1]) for entry in self.methods]
        for option in self.steering_options():
            if not any(option in method_options(kind) for kind in kinds):
                raise ConfigError(option, f"is given, but none of the methods takes it ({', '.join(self.methods)})")


def run_pref_eval(cfg: PrefEvalConfig, model=None, tokenizer=None) -> list[ResultRecord]:
    """`saealign eval pref`: the methods `cfg` names scored on its (sampled) triples; written to
    `cfg.output` when set."""
    from saealign.models import load_model

    available = select_triples(cfg.data, cfg.data_role)
    if cfg.n is not None and cfg.n > len(available):
        raise ConfigError("n", f"asks for {cfg.n} triples, but {cfg.data_role or cfg.data} has only {len(available)}")
    triples = sample(available, cfg.n, cfg.seed)
    if model is None:
        model, tokenizer = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    methods, costs = {}, {}
    for entry in cfg.methods:
        name, spec = split_method_entry(entry)
        takes = method_options(method_kind(spec))
        methods[name or spec] = load_method(spec, model=model, **{k: v for k, v in cfg.steering_options().items() if k in takes})
        costs[name or spec] = recorded_cost(spec)
    result = evaluate_preferences(model, tokenizer, triples, methods, cfg.max_length, cfg.n_boot, cfg.seed)
    provenance = {"source": cfg.data, "role": cfg.data_role, "split_seed": 0, "sample_seed": cfg.seed}
    result = [replace(r, benchmark=f"pref:{cfg.data_role or 'triples'}", config=cfg.__dict__,
                      data={**r.data, **provenance}, details={**r.details, "alignment_cost": costs[r.method]})
              for r in result]
    if cfg.output:
        out = Path(cfg.output)
        write_results(out / "results.json", result)
        (out / "results.md").write_text(markdown_table(result, f"{cfg.data_role or cfg.data}", legend=True))
    return result
