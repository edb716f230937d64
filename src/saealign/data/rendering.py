"""Chat rendering of preference triples into token ids, padded batches of them, and the one
length-bucketing batcher every model loop uses.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import numpy as np
import torch

from saealign.data.formats import LoadReport, PreferenceTriple
from saealign.models import pad_token_id

log = logging.getLogger(__name__)

@dataclass
class RenderedTriple:
    """Token ids of one triple under a chat template.

    `prompt_ids` ends with the generation prompt; `chosen_ids`/`rejected_ids` are the reply tokens
    the template renders for an assistant message, ending with its end-of-turn token (whitespace
    the template puts after that token, such as ``"\\n"``, is not part of the reply).
    """

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    def length(self, which: Literal["chosen", "rejected", "both"] = "both") -> int:
        """Length of ``[prompt; response]`` (the longer of the two for "both")."""
        responses = {"chosen": (self.chosen_ids,), "rejected": (self.rejected_ids,),
                     "both": (self.chosen_ids, self.rejected_ids)}[which]
        return len(self.prompt_ids) + max(len(r) for r in responses)


class RenderError(ValueError):
    """The chat template does not render the prompt as a token prefix of the full conversation."""


def with_system_prompt(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    """Prepend `system_prompt`; joined with an existing system message rather than adding a second one."""
    if not system_prompt:
        return list(messages)
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": system_prompt + "\n\n" + messages[0]["content"]}] + messages[1:]
    return [{"role": "system", "content": system_prompt}] + messages


def _special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if tok.special)
    return ids


def _trim_turn_separator(ids: list[int], special: set[int], tokenizer) -> list[int]:
    """Drop whitespace tokens the template puts after the reply's last special (end-of-turn) token."""
    last = max((i for i, t in enumerate(ids) if t in special), default=None)
    if last is None or last == len(ids) - 1:
        return ids
    if tokenizer.decode(ids[last + 1:]).strip():
        return ids
    return ids[:last + 1]


def _truncate(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int,
              max_prompt_length: int | None) -> tuple[list[int], list[int], list[int], bool]:
    """Fit ``[prompt; response]`` into `max_length`: keep the prompt's end, cut the responses' end.

    The prompt is shortened only as far as needed for the longer response, but keeps at least
    `max_prompt_length` tokens (default: half of `max_length`) when it has them; responses then get
    the rest. Both responses share the same (possibly shortened) prompt.
    """
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest <= max_length:
        return prompt, chosen, rejected, False
    floor = max_length // 2 if max_prompt_length is None else max_prompt_length
    keep = min(len(prompt), max(max_length - longest, floor))
    budget = max_length - keep
    if budget <= 0:
        raise ValueError(f"max_length={max_length} leaves no room for the response after {keep} prompt tokens")
    return prompt[len(prompt) - keep:], chosen[:budget], rejected[:budget], True


def render_triples(tokenizer, triples: Sequence[PreferenceTriple], system_prompt: str | None = None,
                   max_length: int | None = None, max_prompt_length: int | None = None,
                   chunk_size: int = 512, progress: bool | None = None) -> list[RenderedTriple]:
    """Render many triples with the tokenizer's chat template (batched tokenization; see `render_triple`)."""
    from tqdm.auto import tqdm

    special = _special_ids(tokenizer)
    out: list[RenderedTriple] = []
    show = len(triples) > 2000 if progress is None else progress
    for start in tqdm(range(0, len(triples), chunk_size), desc="render", disable=not show):
        chunk = triples[start:start + chunk_size]
        prompts = [with_system_prompt(t.prompt, system_prompt) for t in chunk]
        texts = tokenizer.apply_chat_template(prompts, tokenize=False, add_generation_prompt=True)
        for response in ("chosen", "rejected"):
            texts += tokenizer.apply_chat_template(
                [p + [{"role": "assistant", "content": getattr(t, response)}] for p, t in zip(prompts, chunk)],
                tokenize=False)
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        n = len(chunk)
        for i, t in enumerate(chunk):
            prompt_ids, replies = ids[i], []
            for full in (ids[n + i], ids[2 * n + i]):
                if full[:len(prompt_ids)] != prompt_ids:
                    where = f"{t.meta.get('source', '?')}:{t.meta.get('line', '?')}"
                    raise RenderError(f"{where}: the chat template's rendering of the prompt (with generation "
                                      "prompt) is not a token prefix of the rendered full conversation")
                replies.append(_trim_turn_separator(full[len(prompt_ids):], special, tokenizer))
            truncated = False
            if max_length is not None:
                prompt_ids, replies[0], replies[1], truncated = _truncate(prompt_ids, *replies, max_length, max_prompt_length)
            out.append(RenderedTriple(prompt_ids, replies[0], replies[1], truncated, t.meta))
    if max_length is not None and (cut := sum(r.truncated for r in out)):
        log.info("truncated %d of %d triples to max_length=%d", cut, len(out), max_length)
    return out


def render_triple(tokenizer, triple: PreferenceTriple, system_prompt: str | None = None,
                  max_length: int | None = None, max_prompt_length: int | None = None) -> RenderedTriple:
    """Token ids of one triple: the prompt with generation prompt, and each reply with its end-of-turn.

    Replies are derived by rendering the full conversation and taking the tokens after the prompt,
    so no BOS/EOS is doubled; a `RenderError` is raised when the prompt is not a token prefix.
    With `max_length`, see `_truncate` for the policy (prompt start and response ends are cut).
    """
    return render_triples(tokenizer, [triple], system_prompt, max_length, max_prompt_length, progress=False)[0]


def collate_pairs(rendered: Sequence[RenderedTriple], tokenizer,
                  which: Literal["chosen", "rejected", "both"] = "chosen",
                  pad_side: Literal["left", "right"] = "left") -> dict[str, torch.Tensor]:
    """Pad ``[prompt; response]`` rows into a batch.

    Returns ``input_ids`` and ``attention_mask`` (int64), ``response_mask`` (bool, True on response
    tokens) and ``position_ids`` (counting from 0 at each row's first real token, so left padding does
    not shift positions). With ``which="both"`` rows are all chosen sequences, then all rejected ones.
    """
    if which not in ("chosen", "rejected", "both"):
        raise ValueError(f"which must be 'chosen', 'rejected' or 'both', got {which!r}")
    if pad_side not in ("left", "right"):
        raise ValueError(f"pad_side must be 'left' or 'right', got {pad_side!r}")
    rows = []
    if which in ("chosen", "both"):
        rows += [(r.prompt_ids, r.chosen_ids) for r in rendered]
    if which in ("rejected", "both"):
        rows += [(r.prompt_ids, r.rejected_ids) for r in rendered]
    width = max((len(p) + len(c) for p, c in rows), default=0)
    input_ids = np.full((len(rows), width), pad_token_id(tokenizer), dtype=np.int64)
    attention = np.zeros((len(rows), width), dtype=np.int64)
    response = np.zeros((len(rows), width), dtype=bool)
    for i, (prompt, reply) in enumerate(rows):
        total = len(prompt) + len(reply)
        start = width - total if pad_side == "left" else 0
        input_ids[i, start:start + total] = prompt + reply
        attention[i, start:start + total] = 1
        response[i, start + len(prompt):start + total] = True
    position_ids = np.clip(np.cumsum(attention, axis=1) - 1, 0, None)
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention),
            "response_mask": torch.from_numpy(response), "position_ids": torch.from_numpy(position_ids)}


def length_batches(items: Sequence[RenderedTriple] | Sequence[int], batch_size: int | None = None,
                   max_tokens: int | None = None, which: Literal["chosen", "rejected", "both"] = "both",
                   seed: int | None = None, *, weights: Sequence[int] | None = None,
                   longest_first: bool = True) -> list[list[int]]:
    """Index batches of similar length, to limit padding; the one batcher of every model loop.

    `items` are rendered triples (measured by `which`; "both" collates two rows per triple) or plain
    lengths (one row each). A batch holds items of total weight at most `batch_size` (`weights`, default
    1 each: a multiple-choice context weighs its continuations) and/or at most `max_tokens` padded
    tokens (rows x the batch's longest item); an item over either budget gets a batch of its own.
    Longest first shows out-of-memory at once; `longest_first=False` fills the short batches first.
    With `seed`, the batch order is shuffled (contents stay length-sorted), as training wants.
    """
    if batch_size is None and max_tokens is None:
        raise ValueError("give batch_size and/or max_tokens")
    lengths = [item if isinstance(item, int) else item.length(which) for item in items]
    rows_per = 2 if which == "both" and items and not isinstance(items[0], int) else 1
    weights = weights or [1] * len(lengths)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i] if longest_first else lengths[i])
    batches: list[list[int]] = []
    weight = width = 0
    for i in order:
        if batches:
            fits_count = batch_size is None or weight + weights[i] <= batch_size
            fits_tokens = max_tokens is None or (len(batches[-1]) + 1) * rows_per * max(width, lengths[i]) <= max_tokens
            if fits_count and fits_tokens:
                batches[-1].append(i)
                weight, width = weight + weights[i], max(width, lengths[i])
                continue
        batches.append([i])
        weight, width = weights[i], lengths[i]
    if seed is not None:
        random.Random(f"batches/{seed}").shuffle(batches)
    return batches


def _length_stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values)
    return {"min": int(arr.min()), "median": round(float(np.median(arr)), 1), "mean": round(float(arr.mean()), 1),
            "p95": round(float(np.percentile(arr, 95)), 1), "max": int(arr.max())}


def inspect_triples(triples: list[PreferenceTriple], report: LoadReport, tokenizer=None) -> dict[str, Any]:
    """Counts, formats, length statistics (chars; tokens with a tokenizer), turn distribution."""
    prompt_chars = [sum(len(m["content"]) for m in t.prompt) for t in triples]
    lengths: dict[str, dict[str, dict[str, float]]] = {"chars": {
        "prompt": _length_stats(prompt_chars),
        "chosen": _length_stats([len(t.chosen) for t in triples]),
        "rejected": _length_stats([len(t.rejected) for t in triples]),
    }}
    if tokenizer is not None and triples:
        rendered = render_triples(tokenizer, triples)
        lengths["tokens"] = {
            "prompt": _length_stats([len(r.prompt_ids) for r in rendered]),
            "chosen": _length_stats([len(r.chosen_ids) for r in rendered]),
            "rejected": _length_stats([len(r.rejected_ids) for r in rendered]),
            "prompt+longer response": _length_stats([r.length("both") for r in rendered]),
        }
    turns = Counter(sum(m["role"] == "user" for m in t.prompt) for t in triples)
    return {**report.summary(), "lengths": lengths, "user_turns": dict(sorted(turns.items())),
            "with_system_message": sum(t.prompt[0]["role"] == "system" for t in triples),
            "problems": [str(p) + f" [{p.action}]" for p in report.problems]}
