"""Fast residual-stream extraction: length-bucketed batches, early stop at the last layer needed,
optional bf16, and exclusion of attention-sink tokens.

Activation extraction feeds SAE training, SAE evaluation, DSPA fitting and FPO caching, so it is
written once here. Batches are right-padded (a causal model's real tokens never see the padding,
so no position shift) and sorted by length so that padding is nearly zero.

Attention sinks: SmolLM2's residual norm is ~200 on ordinary tokens but ~25,000 on the first
token. Such tokens would dominate any squared-error metric, so `keep_mask` drops (a) the first
token of every sequence and (b) any token whose norm exceeds `sink_factor` x the median norm of
the batch's other real tokens. Every SAE metric and the SAE trainer use this same rule.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from saealign._io import read_json, write_json
from saealign.data import length_batches
from saealign.hooks import read_residuals

log = logging.getLogger(__name__)

DEFAULT_SINK_FACTOR = 10.0


def tokenize_texts(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids per text, truncated to `max_length`. Chat-rendered texts already carry their
    special tokens, so none are added here (no double BOS)."""
    out = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
    return [ids for ids in out if len(ids) >= 2]


def padded_batches(sequences: Sequence[Sequence[int]], batch_tokens: int, pad_id: int
                   ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Yield `(indices, input_ids, attention_mask)`: `data.length_batches` shortest first, right-padded,
    each batch holding at most `batch_tokens` padded tokens (a long sequence still gets a batch of one)."""
    for batch in length_batches([len(seq) for seq in sequences], max_tokens=batch_tokens, longest_first=False):
        yield _pad(batch, sequences, pad_id)


def _pad(batch: list[int], sequences, pad_id: int):
    width = max(len(sequences[i]) for i in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, index in enumerate(batch):
        seq = sequences[index]
        ids[row, : len(seq)] = torch.as_tensor(seq)
        mask[row, : len(seq)] = 1
    return batch, ids, mask


def keep_mask(hidden: torch.Tensor, attention_mask: torch.Tensor, sink_factor: float = DEFAULT_SINK_FACTOR,
              first_position: torch.Tensor | None = None) -> torch.Tensor:
    """(batch, seq) bool: real tokens that are not attention sinks (see module docstring).

    `first_position` (batch,) gives the column of each row's first real token (0 for right padding).
    """
    real = attention_mask.bool().clone()
    rows = torch.arange(real.shape[0], device=real.device)
    first = first_position if first_position is not None else torch.zeros_like(rows)
    real[rows, first] = False
    norms = hidden.float().norm(dim=-1)
    if real.any():
        limit = sink_factor * norms[real].median()
        real &= norms <= limit
    return real


@dataclass
class ExtractStats:
    sequences: int = 0
    tokens_seen: int = 0
    tokens_kept: int = 0
    padded_tokens: int = 0

    @property
    def excluded(self) -> int:
        return self.tokens_seen - self.tokens_kept


@torch.no_grad()
def iter_activations(model, sequences: Sequence[Sequence[int]], layers: Sequence[int], batch_tokens: int = 8192,
                     sink_factor: float = DEFAULT_SINK_FACTOR, stats: ExtractStats | None = None,
                     progress: bool = True, desc: str = "activations") -> Iterator[dict[int, torch.Tensor]]:
    """Yield, per batch, `{layer: (n_kept_tokens, d)}` in the model's dtype; padding and tokens that
    are sinks at any of the layers removed (`keep_mask`), so rows align across layers."""
    device = next(model.parameters()).device
    pad_id = 0
    bar = tqdm(total=sum(len(s) for s in sequences), unit="tok", desc=desc, disable=not progress, smoothing=0.1)
    for _, ids, mask in padded_batches(sequences, batch_tokens, pad_id):
        ids, mask = ids.to(device), mask.to(device)
        hidden = read_residuals(model, ids, mask, list(layers))
        keep = mask.bool()
        for layer in layers:  # one mask for all layers keeps their rows aligned token by token
            keep &= keep_mask(hidden[layer], mask, sink_factor)
        out = {layer: hidden[layer][keep] for layer in layers}
        if stats is not None:
            stats.sequences += ids.shape[0]
            stats.tokens_seen += int(mask.sum())
            stats.tokens_kept += out[layers[0]].shape[0]
            stats.padded_tokens += ids.numel()
        bar.update(int(mask.sum()))
        yield out
    bar.close()


class ActivationCache:
    """Activations of several layers written to disk as float16 memmaps, resumable.

    Layout: `<dir>/acts_L{layer}.f16` (rows of d floats) and `<dir>/meta.json` with the row count
    and how many sequences are done, so an interrupted extraction continues where it stopped.
    """

    def __init__(self, directory: str | Path, layers: Sequence[int], d_model: int):
        self.dir = Path(directory)
        self.layers = list(layers)
        self.d = d_model
        self.meta_path = self.dir / "meta.json"
        self.meta = read_json(self.meta_path) if self.meta_path.exists() else {
            "layers": self.layers, "d": d_model, "rows": 0, "sequences_done": 0, "complete": False}
        reusable = self.meta["complete"] and set(self.layers) <= set(self.meta["layers"])
        if reusable:  # a finished cache of more layers serves any subset of them
            self.layers = list(self.meta["layers"])
        if self.meta["layers"] != self.layers or self.meta["d"] != d_model:
            raise ValueError(f"{self.meta_path}: cache holds layers {self.meta['layers']} (d={self.meta['d']}), "
                             f"asked for {self.layers} (d={d_model}); use another directory")

    def path(self, layer: int) -> Path:
        return self.dir / f"acts_L{layer}.f16"

    @property
    def rows(self) -> int:
        return self.meta["rows"]

    def fill(self, model, sequences: Sequence[Sequence[int]], batch_tokens: int = 8192,
             sink_factor: float = DEFAULT_SINK_FACTOR, checkpoint_sequences: int = 250) -> ExtractStats:
        """Extract activations for `sequences` (resuming after the ones already done)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        done = self.meta["sequences_done"]
        stats = ExtractStats()
        files = {layer: open(self.path(layer), "r+b" if self.path(layer).exists() else "wb") for layer in self.layers}
        try:
            for fh in files.values():  # drop rows written after the last checkpoint
                fh.truncate(self.rows * self.d * 2)
                fh.seek(self.rows * self.d * 2)
            for start in range(done, len(sequences), checkpoint_sequences):
                chunk = sequences[start: start + checkpoint_sequences]
                for acts in iter_activations(model, chunk, self.layers, batch_tokens, sink_factor, stats,
                                             desc=f"activations {start + len(chunk)}/{len(sequences)} seqs"):
                    for layer in self.layers:
                        files[layer].write(acts[layer].to(torch.float16).cpu().numpy().tobytes())
                    self.meta["rows"] += acts[self.layers[0]].shape[0]
                for fh in files.values():
                    fh.flush()
                    os.fsync(fh.fileno())
                self.meta["sequences_done"] = start + len(chunk)
                write_json(self.meta_path, self.meta)
        finally:
            for fh in files.values():
                fh.close()
        self.meta["complete"] = True
        write_json(self.meta_path, self.meta)
        return stats

    def array(self, layer: int) -> np.ndarray:
        return np.memmap(self.path(layer), dtype=np.float16, mode="r", shape=(self.rows, self.d))

