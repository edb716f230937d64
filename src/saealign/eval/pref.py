"""Judge-free preference evaluation on held-out triples (METHOD.md, "Evaluation protocol").

For every method (the base model = no intervention, DSPA, baselines, trained models):
- preference accuracy: `log pi(y+|x) > log pi(y-|x)`, summed and length-normalised;
- reward accuracy against the base model: `r(x,y) = log pi_method(y|x) - log pi_base(y|x)` summed
  over response tokens; the fraction with `r(x,y+) > r(x,y-)`. A pair whose rewards tie (e.g. a
  steering method that edited nothing on either response) counts one half, as every tie does
  (`saealign.stats`); the tie rate is reported beside it.
`fpo eval` reports the same metrics (`preference_metrics`) with its reference model as the base.
Intervals are `saealign.stats` bootstraps over triples; a steered method also carries its paired
difference to the base model on the preference accuracies. Base log-probs never change, so they are
cached on disk keyed by model, data and rendering.

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
from saealign.results import ResultRecord, format_estimate
from saealign.stats import N_BOOT, Estimate, mean_estimate, paired_difference, wins
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


TIE_ATOL = 1e-9  # summed log-probs that differ by less tie (the cached and the full pass round differently)
PREF_HEADLINE = ("reward_acc", "pref_acc_sum", "pref_acc_norm")


def preference_hits(scores: SequenceScores) -> dict[str, np.ndarray]:
    """Per triple, whether the model prefers the chosen response (1, a tie 1/2, else 0), by summed and
    by length-normalised log-probability."""
    norm_c = scores.logp_chosen / np.maximum(scores.len_chosen, 1)
    norm_r = scores.logp_rejected / np.maximum(scores.len_rejected, 1)
    return {"pref_acc_sum": wins(scores.logp_chosen, scores.logp_rejected, TIE_ATOL),
            "pref_acc_norm": wins(norm_c, norm_r, TIE_ATOL)}


def preference_metrics(method: SequenceScores, base: SequenceScores | None, n_boot: int = N_BOOT,
                       seed: int = 0) -> dict[str, Estimate]:
    """Preference accuracies and, against `base`, reward accuracy, tie rate and mean reward margin
    (fractions in [0, 1] and nats), each with its bootstrap interval over triples."""
    out = {name: mean_estimate(hits, n_boot, seed) for name, hits in preference_hits(method).items()}
    if base is not None:
        r_c = method.logp_chosen - base.logp_chosen
        r_r = method.logp_rejected - base.logp_rejected
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
    from saealign.eval.pref_cache import ScoringCache

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


def sample_pairs(triples: Sequence, n: int | None, seed: int) -> list:
    from saealign.data import sample

    return list(triples) if n is None or n >= len(triples) else sample(triples, n, seed)
