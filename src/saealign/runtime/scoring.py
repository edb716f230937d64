"""Log-likelihood scoring, with an intervention applied, shared by every harness that scores text.

* `score_requests`: the log-likelihood of continuations given contexts (multiple choice, likelihood judges).
  Scoring runs in two forward calls per batch, the way generation does: a prefill of the context, then the
  continuation tokens on top of its KV cache. So `intervention.apply(model)` sees the answer tokens as
  *generated* positions and the context as the prompt, with no special position mask, and the score is the
  steered model's teacher-forced log-likelihood of the answer. With `steer_positions="generated"` (default)
  the first answer token is predicted by the unsteered last prompt position, exactly as in steered
  generation, so single-token answers (MMLU letters) do not move under generation-only steering;
  `"scored"` moves the last context token into the second call so that every scored position is steered.
  Without an intervention one prefill is shared by all choices of an item (the cache is expanded per
  choice); with one, each choice gets its own prefill row, because steering state is kept per prefill row.
* `score_triples` / `score_rendered`: summed response log-probs of preference triples (teacher-forced; the
  response tokens are the positions a steering method edits, and as in generation the first response token
  is predicted from the unedited last prompt position). Base-model scores never change, so
  `base_scores_cached` keeps them on disk keyed by model, data and rendering.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ContextManager, Literal, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from saealign._io import cache_dir, load_tensors, save_tensors
from saealign.data import collate_pairs, length_batches, render_triples, triples_fingerprint
from saealign.models import cache_argument, model_id, pad_token_id, returned_cache, takes_logit_mask
from saealign.runtime.inputs import left_pad, mask_positions, max_positions, model_device
from saealign.steering import Intervention, apply_intervention, system_prompt_of

log = logging.getLogger(__name__)

SteerPositions = Literal["generated", "scored"]


@dataclass
class _Group:
    """Requests that share one context token sequence."""

    context: list[int]
    rows: list[tuple[int, list[int]]] = field(default_factory=list)  # (request index, continuation ids)

    @property
    def length(self) -> int:
        return len(self.context) + max(len(cont) for _, cont in self.rows)


def encode_requests(tokenizer, requests: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) per request, tokenised as lm-eval's HFLM does: trailing context
    whitespace joins the continuation, and the continuation ids are the tail of encode(context + continuation)
    after len(encode(context)), so word-boundary merges tokenise as in running text."""
    prefix = tokenizer.bos_token or tokenizer.eos_token
    cache: dict[str, list[int]] = {}

    def encode(text: str) -> list[int]:
        special = not (prefix and text.startswith(prefix))  # no second BOS when the text carries one
        return tokenizer.encode(text, add_special_tokens=special)

    out = []
    for index, (context, continuation) in enumerate(requests):
        if not context:
            raise ValueError(f"request {index}: empty context (every multiple-choice prompt has one)")
        n_space = len(context) - len(context.rstrip())
        if n_space:
            context, continuation = context[:-n_space], context[-n_space:] + continuation
        if context not in cache:  # every choice of an item shares its context
            cache[context] = encode(context)
        context_ids = cache[context]
        whole = encode(context + continuation)
        continuation_ids = whole[len(context_ids):]
        if not continuation_ids:
            raise ValueError(f"request {index}: continuation {continuation!r} adds no tokens to its context")
        out.append((context_ids, continuation_ids))
    return out


def _group(pairs: list[tuple[list[int], list[int]]], max_length: int, split_last: bool) -> list[_Group]:
    groups: dict[tuple[int, ...], _Group] = {}
    truncated = 0
    for index, (context, continuation) in enumerate(pairs):
        if len(continuation) > max_length:
            raise ValueError(f"request {index}: continuation of {len(continuation)} tokens exceeds the model's "
                             f"context length {max_length}")
        keep = max_length + 1 - len(continuation)  # the input is context + continuation[:-1]
        if len(context) > keep:
            context, truncated = context[-keep:], truncated + 1
        if split_last and len(context) < 2:
            raise ValueError(f"request {index}: steer_positions='scored' needs a context of at least 2 tokens")
        key = tuple(context)
        groups.setdefault(key, _Group(context)).rows.append((index, continuation))
    if truncated:
        log.warning("%d requests exceed the context length %d: their contexts lose their oldest tokens",
                    truncated, max_length)
    return list(groups.values())


def _takes_logits_to_keep(model) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


@torch.no_grad()
def _score_batch(model, groups: list[_Group], pad_id: int, split_last: bool, per_row_prefill: bool,
                 keep_last: bool) -> list[tuple[int, float]]:
    device = model_device(model)
    rows = [(g, index, cont) for g, group in enumerate(groups) for index, cont in group.rows]
    heads = [group.context[:-1] if split_last else group.context for group in groups]
    # second-call inputs: the answer tokens that are fed back, as in generation (plus the last context token)
    tails = [([groups[g].context[-1]] if split_last else []) + cont[:-1] for g, _, cont in rows]
    second_call = any(tails)
    per_row = per_row_prefill and second_call
    prefill_of_row = list(range(len(rows))) if per_row else [g for g, _, _ in rows]
    prefill = [heads[g] for g, _, _ in rows] if per_row else heads

    ids, mask = left_pad(prefill, pad_id, device)
    positions = mask_positions(mask)
    extra = {"logits_to_keep": 1} if keep_last else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=second_call, **extra)
    totals = [0.0] * len(rows)
    if not split_last:
        last = out.logits[:, -1].float().log_softmax(-1)
        first = last[torch.tensor(prefill_of_row, device=device), torch.tensor([c[0] for _, _, c in rows], device=device)]
        totals = first.tolist()
    if second_call:
        second_rows = list(range(len(rows))) if per_row else [r for r, tail in enumerate(tails) if tail]
        index = torch.tensor([prefill_of_row[r] for r in second_rows], device=device)
        cache = returned_cache(out)
        if not per_row:
            cache.reorder_cache(index)  # one copy of the shared context per continuation
        width = max(1, max(len(tails[r]) for r in second_rows))
        x = torch.full((len(second_rows), width), pad_id, dtype=torch.long)
        x_mask = torch.zeros((len(second_rows), width), dtype=torch.long)
        targets = torch.zeros((len(second_rows), width), dtype=torch.long)
        for k, r in enumerate(second_rows):
            tail, cont = tails[r], rows[r][2]
            scored = cont if split_last else cont[1:]
            x[k, : len(tail)] = torch.tensor(tail, dtype=torch.long)
            x_mask[k, : len(tail)] = 1
            targets[k, : len(scored)] = torch.tensor(scored, dtype=torch.long)
        x, x_mask, targets = x.to(device), x_mask.to(device), targets.to(device)
        start = mask.sum(-1)[index].unsqueeze(1)
        logits = model(input_ids=x, attention_mask=torch.cat([mask[index], x_mask], dim=1),
                       position_ids=start + torch.arange(width, device=device),
                       use_cache=True, **cache_argument(model, cache)).logits.float()
        token_lp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
        sums = (token_lp * x_mask).sum(-1).tolist()
        for k, r in enumerate(second_rows):
            totals[r] += sums[k]
    return [(index, total) for (_, index, _), total in zip(rows, totals, strict=True)]


def score_requests(model, tokenizer, requests: Sequence[tuple[str, str]], *, batch_size: int = 32,
                   intervention=None, steer_positions: SteerPositions = "generated", max_length: int | None = None,
                   desc: str = "scoring") -> list[float]:
    """Log-likelihood of each continuation given its context (summed over the continuation's tokens)."""
    if steer_positions not in ("generated", "scored"):
        raise ValueError(f"steer_positions must be 'generated' or 'scored', got {steer_positions!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    split_last = steer_positions == "scored"
    pad_id = pad_token_id(tokenizer)
    limit = max_length or max_positions(model) or 2048
    groups = _group(encode_requests(tokenizer, requests), limit, split_last)
    keep_last = _takes_logits_to_keep(model)
    scores = [math.nan] * len(requests)
    with tqdm(total=len(requests), desc=desc, unit="choice", leave=False) as bar:
        # longest first: out-of-memory shows at once and padding stays small; whole groups, about
        # `batch_size` continuation rows per batch
        order = length_batches([g.length for g in groups], batch_size, weights=[len(g.rows) for g in groups])
        for batch in ([groups[i] for i in indices] for indices in order):
            with apply_intervention(intervention, model):
                results = _score_batch(model, batch, pad_id, split_last, intervention is not None, keep_last)
            for index, value in results:
                scores[index] = value
            bar.update(len(results))
    return scores


@dataclass
class SequenceScores:
    """Per triple: summed response log-probs and response lengths, chosen and rejected."""

    logp_chosen: np.ndarray
    logp_rejected: np.ndarray
    len_chosen: np.ndarray
    len_rejected: np.ndarray


def score_batches(rendered, tokenizer, max_tokens: int = 6144):
    """Shortest first under a padded-token budget: yields (which, triple indices, collated batch)."""
    jobs = [(which, i) for which in ("chosen", "rejected") for i in range(len(rendered))]
    lengths = [rendered[i].length(which) for which, i in jobs]
    for batch in length_batches(lengths, max_tokens=max_tokens, longest_first=False):
        for which in ("chosen", "rejected"):
            idx = [jobs[j][1] for j in batch if jobs[j][0] == which]
            if idx:
                yield which, idx, collate_pairs([rendered[i] for i in idx], tokenizer, which, "right")


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
    dev = model_device(model)
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
        save_scores(path, scores)


def save_scores(path: Path, scores: SequenceScores) -> None:
    """Per-triple scores to a safetensors file (atomically), for `load_scores`."""
    save_tensors(path, {k: torch.from_numpy(np.asarray(v)) for k, v in scores.__dict__.items()})


def load_scores(path: Path) -> SequenceScores:
    """Scores written by `save_scores`, checked by `load_tensors`."""
    t = load_tensors(path)
    return SequenceScores(**{f.name: t[f.name].numpy() for f in fields(SequenceScores)})


def base_scores_cached(model, tokenizer, triples, max_length: int = 1024, progress: bool = True) -> SequenceScores:
    """Base-model scores, cached on disk (they never change for a given model, data and rendering)."""
    path = _base_cache_path(model, tokenizer, triples, max_length)
    if path.exists():
        return load_scores(path)
    scores = score_triples(model, tokenizer, triples, None, max_length, progress=progress, desc="score base")
    store_base_scores(model, tokenizer, triples, max_length, scores)
    return scores
