"""Batched chat generation shared by every generative harness, the local judges and the server.

One code path renders conversations with the model's chat template (plus the intervention's
`system_prompt`, the prompt-prefix baseline), left-pads them, and runs `model.generate` inside
`intervention.apply(model)`, so a steered model is evaluated and served exactly as it is benchmarked.

Sampling uses the global torch RNG seeded once per batch (`seed + batch index`), so outputs are
reproducible for a fixed input list, batch size and device, not across batch sizes.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from saealign.steering import Intervention, apply_intervention, system_prompt_of

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


def with_system_prompt(conversation: Conversation, system_prompt: str | None) -> Conversation:
    """Prepend `system_prompt`; when the conversation already has a system turn, put it in front of that text."""
    if not system_prompt:
        return list(conversation)
    if conversation and conversation[0].get("role") == "system":
        merged = {"role": "system", "content": f"{system_prompt}\n\n{conversation[0]['content']}"}
        return [merged, *conversation[1:]]
    return [{"role": "system", "content": system_prompt}, *conversation]


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


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def max_positions(model) -> int | None:
    cfg = getattr(model.config, "text_config", None) or model.config
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


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


def left_pad(batch: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        if ids:
            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            mask[row, width - len(ids):] = 1
    return input_ids.to(device), mask.to(device)


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    return tokenizer.eos_token_id


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
             progress: bool = True, desc: str = "generate") -> list[Generation]:
    """Complete rendered prompt texts. `top_logprobs` (k >= 0) also returns per-token log-probabilities."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not prompts:
        return []
    device = model_device(model)
    pad_id = _pad_id(tokenizer)
    eos_ids = eos_token_ids(model, tokenizer)
    limit = max_positions(model)
    encoded = encode_prompts(tokenizer, prompts, None if limit is None else limit - sampling.max_new_tokens)
    cfg = _generation_config(model, sampling, pad_id, eos_ids, top_logprobs is not None)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # similar lengths share a batch
    results: list[Generation | None] = [None] * len(encoded)
    starts = range(0, len(order), batch_size)
    scope = apply_intervention(intervention, model)
    with scope, tqdm(total=len(order), desc=desc, disable=not progress, leave=False) as bar:
        for batch_index, start in enumerate(starts):
            rows = order[start:start + batch_size]
            input_ids, mask = left_pad([encoded[i] for i in rows], pad_id, device)
            torch.manual_seed(seed + batch_index)
            out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=cfg)
            new = out.sequences[:, input_ids.shape[1]:].tolist()
            step_logprobs = None
            if top_logprobs is not None:
                step_logprobs = [torch.log_softmax(step.float(), dim=-1) for step in out.logits]
            for b, i in enumerate(rows):
                results[i] = _finish(tokenizer, new[b], len(encoded[i]), eos_ids, step_logprobs, b, top_logprobs)
            bar.update(len(rows))
    return results  # type: ignore[return-value]


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
                  progress: bool = True, desc: str = "generate") -> list[str]:
    """Answer each conversation's last user turn; returns the assistant texts in input order."""
    system_prompt = system_prompt_of(intervention)
    prompts = [render_chat(tokenizer, conv, system_prompt) for conv in conversations]
    outs = generate(model, tokenizer, prompts, sampling, seed=seed, batch_size=batch_size, intervention=intervention,
                    progress=progress, desc=desc)
    return [g.text for g in outs]


@torch.no_grad()
def next_token_logprobs(model, tokenizer, prompts: Sequence[str], batch_size: int = 8) -> torch.Tensor:
    """log p(next token | prompt) for rendered prompts, [n, vocab] on CPU. Position ids follow the
    attention mask, so a left-padded row scores exactly as it would alone."""
    device = model_device(model)
    pad_id = _pad_id(tokenizer)
    limit = max_positions(model)
    encoded = encode_prompts(tokenizer, prompts, None if limit is None else limit)
    rows = []
    for start in range(0, len(encoded), batch_size):
        input_ids, mask = left_pad(encoded[start:start + batch_size], pad_id, device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        rows.append(torch.log_softmax(logits[:, -1].float(), dim=-1).cpu())
    return torch.cat(rows) if rows else torch.empty(0)
