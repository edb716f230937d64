"""Judge-free preference evaluation on held-out triples (METHOD.md, "Evaluation protocol").

For every method (the base model = no intervention, DSPA, baselines, trained models):
- preference accuracy: `log pi(y+|x) > log pi(y-|x)`, summed and length-normalised;
- reward accuracy against the base model: `r(x,y) = log pi_method(y|x) - log pi_base(y|x)` summed
  over response tokens; the fraction with `r(x,y+) > r(x,y-)`. A pair whose rewards tie exactly
  (e.g. a steering method that edited nothing on either response) counts one half; the tie rate
  is reported beside it.
Intervals are percentile bootstraps over triples. Base log-probs never change, so they are cached
on disk keyed by model, data and rendering.

Scoring is teacher-forced: the response tokens are the positions a steering method edits (as in
generation, the first response token is predicted from the unedited last prompt position).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from saealign._io import cache_dir, save_tensors
from saealign.data import collate_pairs, render_triples, triples_fingerprint
from saealign.models import model_id, takes_logit_mask
from saealign.steering import Intervention, apply_intervention, system_prompt_of

log = logging.getLogger(__name__)


@dataclass
class SequenceScores:
    """Per triple: summed response log-probs and response lengths, chosen and rejected."""

    logp_chosen: np.ndarray
    logp_rejected: np.ndarray
    len_chosen: np.ndarray
    len_rejected: np.ndarray


def score_batches(rendered, tokenizer, max_tokens: int = 6144):
    """Length-sorted batches under a padded-token budget: yields (which, triple indices, collated batch)."""
    jobs = sorted(((w, i) for w in ("chosen", "rejected") for i in range(len(rendered))),
                  key=lambda j: rendered[j[1]].length(j[0]))
    start = 0
    while start < len(jobs):
        end = start + 1
        while end < len(jobs) and (end - start + 1) * rendered[jobs[end][1]].length(jobs[end][0]) <= max_tokens:
            end += 1
        for which in ("chosen", "rejected"):
            idx = [i for w, i in jobs[start:end] if w == which]
            if idx:
                yield which, idx, collate_pairs([rendered[i] for i in idx], tokenizer, which, "right")
        start = end


def response_logp(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor,
                  inputs_embeds: torch.Tensor | None = None, logit_mask: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: summed log p of the response tokens and their count. With `logit_mask`
    (`models.takes_logit_mask(model)`, found before any hooks are attached), the vocabulary head runs
    only at the positions that predict a response token (for a small model the head and its softmax
    cost more than the layers when computed everywhere)."""
    predicting = torch.zeros_like(response_mask)
    predicting[:, :-1] = response_mask[:, 1:]
    kwargs = {"input_ids": input_ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
    if logit_mask:
        logits = model(**kwargs, attention_mask=attention_mask, use_cache=False, logits_to_keep=predicting).logits
    else:
        logits = model(**kwargs, attention_mask=attention_mask, use_cache=False).logits[predicting]
    targets = input_ids[:, 1:][response_mask[:, 1:]]
    logits = logits.float()
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    rows = predicting.nonzero()[:, 0]
    total = torch.zeros(input_ids.shape[0], dtype=torch.float64, device=logp.device).index_add_(0, rows, logp.double())
    return total.cpu(), response_mask[:, 1:].sum(1).cpu()


@torch.no_grad()
def score_triples(model, tokenizer, triples, intervention: Intervention | None = None, max_length: int = 1024,
                  max_tokens: int = 6144, progress: bool = True, desc: str = "score") -> SequenceScores:
    """Summed log p(response | prompt) for chosen and rejected, with `intervention` applied on
    response positions."""
    rendered = render_triples(tokenizer, triples, system_prompt=system_prompt_of(intervention), max_length=max_length,
                              progress=False)
    return score_rendered(model, tokenizer, rendered, max_tokens, desc, progress,
                          lambda which, idx, ids, attn, resp: apply_intervention(intervention, model, positions=resp))


def score_rendered(model, tokenizer, rendered, max_tokens: int, desc: str, progress: bool,
                   around: Callable[..., ContextManager[Any]]) -> SequenceScores:
    """The batch loop of every scorer: `around(which, idx, input_ids, attention_mask, response_mask)` is
    entered around each batch's forward pass (an intervention's hooks, or a cache's recording hooks)."""
    dev = next(model.parameters()).device
    logp = {w: np.zeros(len(rendered)) for w in ("chosen", "rejected")}
    lens = {w: np.zeros(len(rendered), dtype=np.int64) for w in ("chosen", "rejected")}
    logit_mask = takes_logit_mask(model)
    with tqdm(total=2 * len(rendered), desc=desc, unit="seq", disable=not progress) as bar:
        for which, idx, b in score_batches(rendered, tokenizer, max_tokens):
            ids, attn, resp = (b[k].to(dev) for k in ("input_ids", "attention_mask", "response_mask"))
            with around(which, idx, ids, attn, resp):
                lp, n = response_logp(model, ids, attn, resp, logit_mask=logit_mask)
            logp[which][idx], lens[which][idx] = lp.numpy(), n.numpy()
            bar.update(len(idx))
    return SequenceScores(logp["chosen"], logp["rejected"], lens["chosen"], lens["rejected"])


def _base_cache_path(model, tokenizer, triples, max_length: int) -> Path:
    key = hashlib.sha256(json.dumps([model_id(model), str(next(model.parameters()).dtype), triples_fingerprint(triples),
                                     max_length, tokenizer.chat_template or ""]).encode()).hexdigest()[:20]
    return cache_dir() / "base_logprobs" / f"{key}.safetensors"


def store_base_scores(model, tokenizer, triples, max_length: int, scores: SequenceScores) -> None:
    """Keep base scores on disk for `base_scores_cached` (they never change)."""
    path = _base_cache_path(model, tokenizer, triples, max_length)
    if not path.exists():
        save_tensors(path, {k: torch.from_numpy(np.asarray(v)) for k, v in scores.__dict__.items()})


def base_scores_cached(model, tokenizer, triples, max_length: int = 1024, progress: bool = True) -> SequenceScores:
    """Base-model scores, cached on disk (they never change for a given model, data and rendering)."""
    path = _base_cache_path(model, tokenizer, triples, max_length)
    if path.exists():
        from safetensors.torch import load_file

        t = load_file(str(path))
        return SequenceScores(*(t[k].numpy() for k in ("logp_chosen", "logp_rejected", "len_chosen", "len_rejected")))
    scores = score_triples(model, tokenizer, triples, None, max_length, progress=progress, desc="score base")
    store_base_scores(model, tokenizer, triples, max_length, scores)
    return scores


def bootstrap_ci(values: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n_boot, len(values)))
    means = values[idx].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def _se(values: np.ndarray) -> float | None:
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else None


def preference_metrics(method: SequenceScores, base: SequenceScores | None, n_boot: int = 2000, seed: int = 0) -> dict:
    """Accuracy metrics with bootstrap intervals (values are fractions in [0, 1])."""
    def summarise(hits: np.ndarray) -> dict:
        lo, hi = bootstrap_ci(hits, n_boot, seed)
        return {"value": float(hits.mean()), "ci95": [lo, hi], "se": _se(hits)}

    out = {
        "pref_acc_sum": summarise((method.logp_chosen > method.logp_rejected).astype(float)),
        "pref_acc_norm": summarise((method.logp_chosen / np.maximum(method.len_chosen, 1)
                                    > method.logp_rejected / np.maximum(method.len_rejected, 1)).astype(float)),
    }
    if base is not None:
        r_c = method.logp_chosen - base.logp_chosen
        r_r = method.logp_rejected - base.logp_rejected
        tie = np.isclose(r_c, r_r, rtol=0, atol=1e-9)
        hits = np.where(tie, 0.5, (r_c > r_r).astype(float))
        out["reward_acc"] = summarise(hits)
        out["reward_tie_rate"] = {"value": float(tie.mean()), "se": None}
        margin = r_c - r_r
        lo, hi = bootstrap_ci(margin, n_boot, seed)
        out["reward_margin"] = {"value": float(margin.mean()), "ci95": [lo, hi], "se": _se(margin)}
    return out


def evaluate_preferences(model, tokenizer, triples, methods: dict[str, Intervention | None], max_length: int = 1024,
                         n_boot: int = 2000, seed: int = 0, progress: bool = True, reuse_base_pass: bool = True,
                         cache=None) -> dict:
    """Metrics for every named method (None = base) on the same triples.

    With `reuse_base_pass`, methods that edit only late layers are scored from one cached base pass
    (`eval.pref_cache.ScoringCache`, built here or passed in as `cache`); the others (a system
    prompt, early edits) by a full pass each."""
    from saealign.eval.pref_cache import ScoringCache

    steered = [m for m in methods.values() if m is not None]
    if cache is None and reuse_base_pass:
        cache = ScoringCache.for_methods(model, tokenizer, triples, steered, max_length, progress=progress)
    if cache is not None and cache.triples_fingerprint != triples_fingerprint(triples):
        raise ValueError("the scoring cache was built for other triples")
    base = cache.base if cache is not None else base_scores_cached(model, tokenizer, triples, max_length, progress)
    results = {}
    for name, intervention in methods.items():
        if intervention is None:
            scores = base
        elif cache is not None and cache.supports(model, intervention):
            scores = cache.score(model, intervention, progress=progress, desc=f"score {name} (from cache)")
        else:
            scores = score_triples(model, tokenizer, triples, intervention, max_length, progress=progress,
                                   desc=f"score {name}")
        results[name] = preference_metrics(scores, None if intervention is None else base, n_boot, seed)
        results[name]["mean_logp_chosen"] = float(scores.logp_chosen.mean())
        results[name]["mean_logp_rejected"] = float(scores.logp_rejected.mean())
    return {"triples": len(triples), "data_fingerprint": triples_fingerprint(triples), "methods": results}


PREF_LEGEND = """\
- *reward acc. vs base*: the share of triples where the method raises the chosen response more than the
  rejected one, relative to the base model (reward `r = log p_method(y|x) - log p_base(y|x)`, summed over
  response tokens); 50 % means no shift, exact ties count one half (their share is in *ties*).
- *pref. acc. (sum)*: the share where the model gives the chosen response a higher total log-probability
  than the rejected one (favours the shorter response);
- *pref. acc. (length-norm.)*: the same with the mean log-probability per response token.
"""


def markdown_table(result: dict, title: str = "", legend: bool = False) -> str:
    """Methods x metrics, percentages with 95 % intervals; `legend` adds what each column means."""
    from saealign.eval import percent_cell

    def cell(m: dict | None) -> str:
        return percent_cell(m, missing="—")

    lines = [f"**{title}** (n = {result['triples']})" if title else f"n = {result['triples']}", "",
             "| method | reward acc. vs base % [95% CI] | ties % | pref. acc. (sum) % | pref. acc. (length-norm.) % |",
             "|---|---|---|---|---|"]
    for name, m in result["methods"].items():
        lines.append(f"| {name} | {cell(m.get('reward_acc'))} | {cell(m.get('reward_tie_rate'))} | "
                     f"{cell(m['pref_acc_sum'])} | {cell(m['pref_acc_norm'])} |")
    return "\n".join(lines) + "\n" + ("\n" + PREF_LEGEND if legend else "")


def sample_pairs(triples: Sequence, n: int | None, seed: int) -> list:
    from saealign.data import sample

    return list(triples) if n is None or n >= len(triples) else sample(triples, n, seed)
