"""Batched chat generation shared by every generative harness, the local judges and the server.

One code path renders conversations with the model's chat template (plus the intervention's
`system_prompt`, the prompt-prefix baseline), left-pads them, and runs `model.generate` inside
`intervention.apply(model)`, so a steered model is evaluated and served exactly as it is benchmarked.

Sampling uses the global torch RNG seeded once per batch (`seed + batch index`), so outputs are
reproducible for a fixed input list, batch size and device, not across batch sizes.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import threading
import time
from collections import Counter, deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, ContextManager, Sequence

import torch
from tqdm.auto import tqdm
from transformers.cache_utils import DynamicCache
from transformers.generation.logits_process import TopPLogitsWarper

from saealign.data import with_system_prompt
from saealign.hooks import CallContext, attach
from saealign.models import pad_token_id
from saealign.runtime.inputs import left_pad, mask_positions, max_positions, model_device
from saealign.steering import Intervention, RowEdit, RowSteering, apply_intervention, system_prompt_of

log = logging.getLogger(__name__)

Message = dict[str, str]
Conversation = list[Message]


@dataclass(frozen=True)
class Sampling:
    """Decoding settings; `temperature == 0` means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 512

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class TokenLogprob:
    """One generated token with its log-probability under the raw (untempered) model distribution."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the `k` most likely tokens at this step, best first


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (an end-of-sequence token) or "length"
    logprobs: list[TokenLogprob] | None = None


def render_chat(tokenizer, conversation: Conversation, system_prompt: str | None = None) -> str:
    """The prompt text for the next assistant turn (chat template with the generation prompt)."""
    if not conversation or conversation[-1].get("role") != "user":
        raise ValueError("a conversation to answer must end with a user turn")
    return tokenizer.apply_chat_template(with_system_prompt(conversation, system_prompt), tokenize=False,
                                         add_generation_prompt=True)


def eos_token_ids(model, tokenizer) -> list[int]:
    ids: set[int] = set()
    for source in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source is not None:
            ids.update(int(i) for i in source)
    return sorted(ids)


def encode_prompts(tokenizer, prompts: Sequence[str], budget: int | None) -> list[list[int]]:
    """Token ids of rendered prompts (the template already holds the special tokens); over-long prompts
    lose their oldest tokens so that `budget` tokens fit, with a warning."""
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if budget is None:
        return encoded
    if budget < 1:
        raise ValueError("max_new_tokens leaves no room for the prompt within the model's context length")
    out = []
    for ids in encoded:
        if len(ids) > budget:
            log.warning("prompt of %d tokens truncated to its last %d to fit the context", len(ids), budget)
            ids = ids[-budget:]
        out.append(ids)
    return out


def _generation_config(model, sampling: Sampling, pad_id: int, eos_ids: list[int], want_logits: bool):
    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None)
    cfg = copy.deepcopy(base) if base is not None else GenerationConfig()
    greedy = sampling.temperature == 0
    cfg.do_sample = not greedy
    cfg.temperature = None if greedy else sampling.temperature
    cfg.top_p = None if greedy else sampling.top_p
    cfg.top_k = None
    cfg.max_new_tokens = sampling.max_new_tokens
    cfg.max_length = None
    cfg.pad_token_id = pad_id
    cfg.eos_token_id = eos_ids or None
    cfg.return_dict_in_generate = True
    cfg.output_logits = want_logits
    return cfg


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], sampling: Sampling = Sampling(), *, seed: int = 0,
             batch_size: int = 8, intervention: Intervention | None = None, top_logprobs: int | None = None,
             progress: bool = True, desc: str = "generate", num_samples: int = 1) -> list[Generation]:
    """Complete rendered prompt texts. `top_logprobs` (k >= 0) also returns per-token log-probabilities.

    `num_samples` answers per prompt come back prompt-major (prompt 0's samples first); `batch_size` counts
    sequences. Without an intervention each prompt is prefilled once and its KV cache repeated for its
    samples: best-of-K's prompts are longer than its answers, so repeating the prefill K times would cost
    more than the decoding. (An intervention reads its prompt during the prefill, so it keeps whole rows.)"""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if not prompts:
        return []
    device = model_device(model)
    pad_id = pad_token_id(tokenizer)
    eos_ids = eos_token_ids(model, tokenizer)
    limit = max_positions(model)
    encoded = encode_prompts(tokenizer, prompts, None if limit is None else limit - sampling.max_new_tokens)
    cfg = _generation_config(model, sampling, pad_id, eos_ids, top_logprobs is not None)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # similar lengths share a batch
    results: list[Generation | None] = [None] * (len(encoded) * num_samples)
    per_call = max(1, batch_size // num_samples)
    share_prefill = num_samples > 1 and intervention is None
    scope = apply_intervention(intervention, model)
    with scope, tqdm(total=len(results), desc=desc, disable=not progress, leave=False) as bar:
        for batch_index, start in enumerate(range(0, len(order), per_call)):
            rows = order[start:start + per_call]
            input_ids, mask = left_pad([encoded[i] for i in rows], pad_id, device)
            cache = {}
            if share_prefill and input_ids.shape[1] > 1:
                cache = {cache_keyword(model): _prompt_cache(model, input_ids[:, :-1], mask[:, :-1], num_samples)}
            input_ids, mask = input_ids.repeat_interleave(num_samples, 0), mask.repeat_interleave(num_samples, 0)
            torch.manual_seed(seed + batch_index)
            out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=cfg, **cache)
            new = out.sequences[:, input_ids.shape[1]:].tolist()
            step_logprobs = None
            if top_logprobs is not None:
                step_logprobs = [torch.log_softmax(step.float(), dim=-1) for step in out.logits]
            for b in range(len(new)):
                i, sample = rows[b // num_samples], b % num_samples
                results[i * num_samples + sample] = _finish(tokenizer, new[b], len(encoded[i]), eos_ids,
                                                            step_logprobs, b, top_logprobs)
            bar.update(len(new))
    return results  # type: ignore[return-value]


def _prompt_cache(model, input_ids: torch.Tensor, mask: torch.Tensor, repeats: int) -> DynamicCache:
    """The KV cache of left-padded prompt tokens, computed once and repeated `repeats` times per row."""
    cache = DynamicCache(config=model.config)
    model(input_ids=input_ids, attention_mask=mask, position_ids=mask_positions(mask), use_cache=True,
          logits_to_keep=1, **{cache_keyword(model): cache})
    cache.batch_repeat_interleave(repeats)
    return cache


def _finish(tokenizer, new_ids: list[int], prompt_tokens: int, eos_ids: list[int],
            step_logprobs: list[torch.Tensor] | None, row: int, k: int | None) -> Generation:
    stop_at = next((t for t, tok in enumerate(new_ids) if tok in eos_ids), None)
    kept = new_ids if stop_at is None else new_ids[:stop_at]
    logprobs = None
    if step_logprobs is not None:
        logprobs = []
        for t, tok in enumerate(kept):
            dist = step_logprobs[t][row]
            top = torch.topk(dist, k) if k else None
            logprobs.append(TokenLogprob(tok, float(dist[tok]),
                                         [] if top is None else list(zip(top.indices.tolist(), top.values.tolist()))))
    return Generation(text=tokenizer.decode(kept, skip_special_tokens=True).strip(), token_ids=kept,
                      prompt_tokens=prompt_tokens, finish_reason="length" if stop_at is None else "stop",
                      logprobs=logprobs)


def generate_chat(model, tokenizer, conversations: Sequence[Conversation], sampling: Sampling = Sampling(), *,
                  seed: int = 0, batch_size: int = 8, intervention: Intervention | None = None,
                  progress: bool = True, desc: str = "generate", num_samples: int = 1) -> list[str]:
    """Answer each conversation's last user turn; returns the assistant texts in input order (each
    conversation's `num_samples` answers together)."""
    system_prompt = system_prompt_of(intervention)
    prompts = [render_chat(tokenizer, conv, system_prompt) for conv in conversations]
    outs = generate(model, tokenizer, prompts, sampling, seed=seed, batch_size=batch_size, intervention=intervention,
                    progress=progress, desc=desc, num_samples=num_samples)
    return [g.text for g in outs]


@torch.no_grad()
def next_token_logprobs(model, tokenizer, prompts: Sequence[str], batch_size: int = 8) -> torch.Tensor:
    """log p(next token | prompt) for rendered prompts, [n, vocab] on CPU. Position ids follow the
    attention mask, so a left-padded row scores exactly as it would alone."""
    device = model_device(model)
    pad_id = pad_token_id(tokenizer)
    limit = max_positions(model)
    encoded = encode_prompts(tokenizer, prompts, None if limit is None else limit)
    rows = []
    for start in range(0, len(encoded), batch_size):
        input_ids, mask = left_pad(encoded[start:start + batch_size], pad_id, device)
        positions = mask_positions(mask)
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        rows.append(torch.log_softmax(logits[:, -1].float(), dim=-1).cpu())
    return torch.cat(rows) if rows else torch.empty(0)


# ------------------------------------------------------------------------------------------------------
# Continuous batching (the server): requests join a running batch at step boundaries and leave when done.


def cache_keyword(model) -> str:
    """The name the model's forward gives its KV cache (`past_key_values` up to transformers 5.23, `cache` from 5.24)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@dataclass(eq=False)
class DecodeRow:
    """One sequence to complete inside a shared batch. The engine thread appends to `token_ids` (and
    `logprobs`) and sets `finish_reason` ("stop", "length", "cancelled", "timeout" or "error"), then calls
    `notify` (after each token when `stream`, else once at the end); any thread may set `cancelled`."""

    prompt_ids: list[int]
    sampling: Sampling
    seed: int = 0
    steering: RowSteering | None = None
    top_logprobs: int | None = None
    stops: tuple[str, ...] = ()
    deadline: float = math.inf  # time.monotonic() after which the row is dropped
    stream: bool = False
    notify: Callable[[], None] = lambda: None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    edited_tokens: int = 0  # decoded positions its steering changed
    error: str | None = None
    cancelled: bool = False
    ending: str | None = None  # the finish reason decided inside a step, published when the row leaves the batch

    def __post_init__(self) -> None:
        self.generator = None
        if self.sampling.temperature > 0:
            self.generator = torch.Generator().manual_seed(self.seed)
        if self.top_logprobs is not None:
            self.logprobs = []

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def text(self, tokenizer) -> str:
        """The completion so far, cut before the first stop string."""
        text = tokenizer.decode(self.token_ids, skip_special_tokens=True).strip()
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        return text if cut < 0 else text[:cut]

    def hit_stop(self, tokenizer) -> bool:
        if not self.stops:
            return False
        text = tokenizer.decode(self.token_ids, skip_special_tokens=True)
        return any(s in text for s in self.stops)


class QueueFull(Exception):
    """The engine's queue holds `max_queue` rows already."""


class BatchEngine:
    """Decodes every submitted row in one shared batch, one token per step (continuous batching).

    New rows are prefilled together at a step boundary and their KV cache is merged (left-padded) into the
    running batch; finished, cancelled and timed-out rows leave it after any step. Each row keeps its own
    sampling, seed (a private generator, so its output does not depend on its neighbours) and steering: rows
    whose steering shares a `RowEdit.key` are edited by one call per step with per-row state, a base row
    carries empty state. Runs in its own thread (`start`/`close`)."""

    def __init__(self, model, tokenizer, *, max_batch: int = 64, max_queue: int = 256, max_prefill_tokens: int = 16384):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_prefill_tokens = max_prefill_tokens  # prompt tokens admitted per step (at least one row), so long
        # prompts arriving together do not stall the running rows in one huge prefill
        self.device = model_device(model)
        self.pad_id = pad_token_id(tokenizer)
        self.eos_ids = set(eos_token_ids(model, tokenizer))
        self.context_length = max_positions(model)
        self._cache_kw = cache_keyword(model)
        self._pending: deque[DecodeRow] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._reset_batch()
        self.stats = {"steps": 0, "prefills": 0, "tokens": 0, "prompt_tokens": 0, "finished": Counter()}
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of the last steps, for tokens/s

    # -- public, any thread ------------------------------------------------------------------------
    def submit(self, rows: Sequence[DecodeRow]) -> None:
        """Queue rows (all or none); QueueFull when they do not fit."""
        with self._wake:
            if self._closed:
                raise QueueFull("the engine is shut down")
            if len(self._pending) + len(rows) > self.max_queue:
                raise QueueFull(f"the queue holds {len(self._pending)} rows (limit {self.max_queue})")
            self._pending.extend(rows)
            self._wake.notify()

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return len(self._rows)

    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self._recent) if now - t <= window]
        return sum(n for _, n in recent) / window if recent else 0.0

    def start(self) -> "BatchEngine":
        self._thread = threading.Thread(target=self.run, name="saealign-engine", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None

    # -- the engine thread --------------------------------------------------------------------------
    def run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._pending and not self._rows:
                    self._wake.wait()
                if self._closed:
                    break
                joining = self._admit()
            try:
                self.step(joining)
            except Exception as err:  # a failed step fails its rows, never the engine
                log.exception("decode step failed")
                for row in [*self._rows, *joining]:
                    if not row.done:
                        row.error = f"{type(err).__name__}: {err}"
                        self._finish(row, "error")
                self._reset_batch()
        for row in [*self._rows, *self._pending]:
            self._finish(row, "cancelled")

    def _admit(self) -> list[DecodeRow]:
        joining: list[DecodeRow] = []
        budget = self.max_prefill_tokens
        while self._pending and len(self._rows) + len(joining) < self.max_batch:
            if joining and len(self._pending[0].prompt_ids) > budget:
                break
            joining.append(self._pending.popleft())
            budget -= len(joining[-1].prompt_ids)
        return joining

    @torch.inference_mode()
    def step(self, joining: Sequence[DecodeRow] = ()) -> None:
        """Admit `joining` (a prefill), then decode one token for every running row."""
        now = time.monotonic()
        for row in joining:  # given up or timed out while queued
            ending = self._ending(row, now)
            if ending:
                self._finish(row, ending)
        joining = [r for r in joining if not r.done]
        if joining:
            self._prefill(joining)
            self._retire()  # rows done after their first token (max_tokens 1, an immediate stop)
        if self._rows:
            self._decode()
            self._retire()

    def _reset_batch(self) -> None:
        self._rows: list[DecodeRow] = []
        self._cache = None
        self._mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)  # real tokens of the cache (+ current)
        self._next_pos = torch.zeros(0, dtype=torch.long, device=self.device)
        self._last = torch.zeros(0, dtype=torch.long, device=self.device)  # the token each row feeds next
        self._edits: dict[Any, RowEdit] = {}
        self._states: dict[Any, dict[str, torch.Tensor]] = {}  # per row, in batch order
        self._step_states: dict[Any, dict[str, torch.Tensor]] = {}  # what the edits take (`RowEdit.prepare`)
        self._edited = torch.zeros(0, dtype=torch.long, device=self.device)

    def _forward(self, **inputs) -> torch.Tensor:
        return self.model(**inputs, use_cache=True, logits_to_keep=1).logits[:, -1]

    def _prefill(self, rows: list[DecodeRow]) -> None:
        input_ids, mask = left_pad([r.prompt_ids for r in rows], self.pad_id, self.device)
        cache = DynamicCache(config=self.model.config)
        read = {r.steering.in_layer for r in rows if r.steering is not None and r.steering.in_layer is not None}
        captured: dict[int, torch.Tensor] = {}
        with _hooks(self.model, {layer: partial(_capture, captured, layer) for layer in read}):
            logits = self._forward(input_ids=input_ids, attention_mask=mask, position_ids=mask_positions(mask),
                                   **{self._cache_kw: cache})
        states = self._row_states(rows, input_ids, mask, captured)
        self.stats["prefills"] += 1
        self.stats["prompt_tokens"] += int(mask.sum())
        n_old = len(self._rows)
        self._cache = cache if self._cache is None else _merge_caches(self._cache, cache)
        self._mask = _cat_left_padded(self._mask, mask)
        self._next_pos = torch.cat([self._next_pos, mask.sum(-1)])
        self._edited = torch.cat([self._edited, torch.zeros(len(rows), dtype=torch.long, device=self.device)])
        for key in set(self._states) | set(states):
            if key not in self._edits:
                self._edits[key] = states[key][0]
            edit = self._edits[key]
            old = self._states.get(key) or edit.empty(n_old, self.device)
            new = states[key][1] if key in states else edit.empty(len(rows), self.device)
            self._states[key] = {name: torch.cat([old[name], new[name]]) for name in old}
        self._prepare_edits()
        self._rows.extend(rows)
        self._last = torch.cat([self._last, self._choose(rows, logits)])

    def _row_states(self, rows: list[DecodeRow], input_ids: torch.Tensor, mask: torch.Tensor,
                    captured: dict[int, torch.Tensor]) -> dict[Any, tuple[RowEdit, dict[str, torch.Tensor]]]:
        """Each steering key's (edit, state for the joining rows). A row's state is computed from that row
        alone (its own prompt statistics), exactly as if it were decoded by itself."""
        states: dict[Any, tuple[RowEdit, dict[str, torch.Tensor]]] = {}
        attention = mask.bool()
        for i, row in enumerate(rows):
            if row.steering is None:
                continue
            edit = row.steering.edit
            if edit.key not in states:
                states[edit.key] = (edit, edit.empty(len(rows), self.device))
            layer = row.steering.in_layer
            ctx = CallContext(input_ids[i:i + 1], attention[i:i + 1], 0, input_ids.shape[1], True)
            for name, value in row.steering.state(None if layer is None else captured[layer][i:i + 1], ctx).items():
                states[edit.key][1][name][i] = value[0]
        return states

    def _decode(self) -> None:
        rows = len(self._rows)
        self._mask = torch.cat([self._mask, torch.ones(rows, 1, dtype=torch.long, device=self.device)], dim=1)
        by_layer: dict[int, list[Any]] = {}
        for key, edit in self._edits.items():
            by_layer.setdefault(edit.layer, []).append(key)
        with _hooks(self.model, {layer: partial(self._edit, keys) for layer, keys in by_layer.items()}):
            logits = self._forward(input_ids=self._last.unsqueeze(1), attention_mask=self._mask,
                                   position_ids=self._next_pos.unsqueeze(1), **{self._cache_kw: self._cache})
        self._next_pos += 1
        self._last = self._choose(self._rows, logits)
        self.stats["steps"] += 1

    def _edit(self, keys: list[Any], hidden: torch.Tensor, ctx: CallContext) -> torch.Tensor:
        """Every steering group at this layer, over the whole batch, with no host synchronisation."""
        for key in keys:
            hidden, changed = self._edits[key](hidden, ctx.mask, self._step_states[key])
            self._edited += changed.sum(-1)
        return hidden

    def _choose(self, rows: Sequence[DecodeRow], logits: torch.Tensor) -> torch.Tensor:
        """The next token of each row (greedy, or sampled with the row's own generator); records it."""
        chosen = logits.argmax(-1)
        for i, row in enumerate(rows):
            if row.generator is not None:
                scores = logits[i:i + 1].float() / row.sampling.temperature
                if row.sampling.top_p < 1:
                    scores = TopPLogitsWarper(row.sampling.top_p)(None, scores)
                chosen[i] = torch.multinomial(torch.softmax(scores, -1).cpu(), 1, generator=row.generator)[0, 0]
        ids = chosen.tolist()
        for i, (row, token) in enumerate(zip(rows, ids)):
            if token in self.eos_ids:
                row.ending = "stop"
                continue
            row.token_ids.append(token)
            if row.logprobs is not None:
                row.logprobs.append(_token_logprob(logits[i], token, row.top_logprobs))
            if row.hit_stop(self.tokenizer):
                row.ending = "stop"
            elif len(row.token_ids) >= row.sampling.max_new_tokens:
                row.ending = "length"
            elif row.stream:
                row.notify()
        self.stats["tokens"] += len(ids)
        self._recent.append((time.monotonic(), len(ids)))
        while self._recent and time.monotonic() - self._recent[0][0] > 60:
            self._recent.popleft()
        return chosen

    @staticmethod
    def _ending(row: DecodeRow, now: float) -> str | None:
        """Why a row ends now: its own finish, its client gave up, or its time ran out (None: it goes on)."""
        if row.ending:
            return row.ending
        if row.cancelled:
            return "cancelled"
        return "timeout" if now > row.deadline else None

    def _retire(self) -> None:
        """Take the rows that ended out of the batch, then publish them (edit counts first), so that a client
        told its request is done never sees the batch still holding it."""
        now = time.monotonic()
        endings = [self._ending(row, now) for row in self._rows]
        if not any(endings):
            return
        ended = [(row, ending, edited) for row, ending, edited in zip(self._rows, endings, self._edited.tolist()) if ending]
        keep = [i for i, ending in enumerate(endings) if ending is None]
        if keep:
            index = torch.tensor(keep, device=self.device)
            start = int(self._mask[index].any(0).long().argmax())  # leading columns every remaining row pads
            self._rows = [self._rows[i] for i in keep]
            self._mask = self._mask[index, start:]
            self._cache = _select_cache(self._cache, index, start)
            self._next_pos, self._last, self._edited = self._next_pos[index], self._last[index], self._edited[index]
            used = {row.steering.edit.key for row in self._rows if row.steering is not None}
            self._edits = {k: e for k, e in self._edits.items() if k in used}
            self._states = {k: {n: t[index] for n, t in s.items()} for k, s in self._states.items() if k in used}
            self._prepare_edits()
        else:
            self._reset_batch()
        for row, ending, edited in ended:
            row.edited_tokens = edited
            self._finish(row, ending)

    def _prepare_edits(self) -> None:
        self._step_states = {key: self._edits[key].prepare(state) for key, state in self._states.items()}

    def _finish(self, row: DecodeRow, reason: str) -> None:
        row.finish_reason = reason
        self.stats["finished"][reason] += 1
        row.notify()


def _token_logprob(logits: torch.Tensor, token: int, k: int | None) -> TokenLogprob:
    dist = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(dist, k) if k else None
    return TokenLogprob(token, float(dist[token]), [] if top is None else list(zip(top.indices.tolist(), top.values.tolist())))


def _hooks(model, fns: dict[int, Callable]) -> ContextManager[Any]:
    """Layer functions for one forward call; none at all (not even the bookkeeping hook) for a base batch."""
    return attach(model, fns) if fns else nullcontext()


def _capture(store: dict[int, torch.Tensor], layer: int, hidden: torch.Tensor, ctx: CallContext) -> None:
    store[layer] = hidden


def _pad_left(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def _cat_left_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Stack two left-padded (rows, seq) masks, padding the narrower on the left."""
    width = max(a.shape[1], b.shape[1])
    return torch.cat([_pad_left(a, width, 1), _pad_left(b, width, 1)])


def _merge_caches(a: DynamicCache, b: DynamicCache) -> DynamicCache:
    """b's rows appended to a's, the shorter cache left-padded (its pad positions are masked out)."""
    for la, lb in zip(a.layers, b.layers):
        width = max(la.keys.shape[2], lb.keys.shape[2])
        la.keys = torch.cat([_pad_left(la.keys, width, 2), _pad_left(lb.keys, width, 2)])
        la.values = torch.cat([_pad_left(la.values, width, 2), _pad_left(lb.values, width, 2)])
    return a


def _select_cache(cache: DynamicCache, rows: torch.Tensor, start: int) -> DynamicCache:
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[rows, :, start:], layer.values[rows, :, start:]
    return cache
