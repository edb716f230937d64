"""The offline reference cache: one pass of the reference model before training.

Per response it stores the summed reference log-prob and the response length (so DPO's summed and
FPO's length-normalised reference terms both follow; the per-pair length-normalised margin is
`margins()`), and — when built with an SAE — the pooled reference SAE activations as a sparse CSR
matrix holding *every* non-zero latent. Any `I_k` (top-k of the policy united with the reference's
top-k, for any k) can then be evaluated exactly: a latent not stored is exactly zero.

TDPO is not served by the cache: its sequential KL needs the reference's full next-token
distribution at every response position (vocab x tokens floats per response), so TDPO keeps a live
reference model — that difference is what the memory comparison measures.

A cache is keyed by the fingerprints of the reference weights, the SAE and the exact token ids
(tokenizer, chat template and truncation included), plus the compute dtype; loading a cache whose
key differs from the run's is refused.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import torch
from tqdm.auto import tqdm

from saealign._io import cache_dir, read_json, save_tensors, tensor_fingerprint, write_json
from saealign.cost import CostMeter, measured
from saealign.data import RenderedTriple
from saealign.fpo.batching import collate, pairs_fingerprint
from saealign.fpo.objective import ReferenceOutput, run_model
from saealign.hooks import num_layers

log = logging.getLogger(__name__)

CACHE_VERSION = 1
_TENSORS = "reference.safetensors"
_META = "cache.json"


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hash of the reference weights (all parameters and buffers)."""
    return tensor_fingerprint(dict(model.state_dict()))


@dataclass
class CacheKey:
    model: str
    sae: str | None
    data: str
    dtype: str

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "sae": self.sae, "data": self.data, "dtype": self.dtype}

    def dirname(self) -> str:
        return f"{self.model}-{self.sae or 'nosae'}-{self.data}-{self.dtype}"


@dataclass
class ReferenceCache:
    """Reference quantities for `N` pairs; response row `2i` is pair i's chosen, `2i + 1` its rejected."""

    logps: torch.Tensor  # (N, 2) summed reference log-probs [chosen, rejected]
    n_tokens: torch.Tensor  # (N, 2) response lengths
    key: CacheKey
    d_sae: int | None = None
    offsets: torch.Tensor | None = None  # (2N + 1,) CSR row offsets into indices/values
    indices: torch.Tensor | None = None  # (nnz,) int32 latent ids
    values: torch.Tensor | None = None  # (nnz,) float32 pooled activations
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None  # where it was loaded from or saved to

    @property
    def n_pairs(self) -> int:
        return self.logps.shape[0]

    @property
    def has_activations(self) -> bool:
        return self.offsets is not None

    def margins(self) -> torch.Tensor:
        """Per pair `lp_ref(y_w) - lp_ref(y_l)` with length-normalised log-probs (`gamma_ref / beta`)."""
        norm = self.logps / self.n_tokens.clamp(min=1)
        return norm[:, 0] - norm[:, 1]

    def _rows(self, pair_index: torch.Tensor) -> torch.Tensor:
        """Response rows in TRL batch order: chosen of every pair, then rejected of every pair."""
        pair_index = pair_index.cpu().long()
        return torch.cat([2 * pair_index, 2 * pair_index + 1])

    def __call__(self, batch: dict[str, torch.Tensor], need_logits: bool, need_pooled: bool) -> ReferenceOutput:
        """The `Reference` protocol: reference values for a collated batch (looked up by `pair_index`)."""
        if need_logits:
            raise ValueError("the reference cache holds no per-token distributions; TDPO needs a live reference model")
        device = batch["input_ids"].device
        rows = self._rows(batch["pair_index"])
        out = ReferenceOutput(self.logps.reshape(-1)[rows].to(device), self.n_tokens.reshape(-1)[rows].to(device))
        if need_pooled:
            out.pooled = self.pooled(rows).to(device)
        return out

    def pooled(self, rows: torch.Tensor) -> torch.Tensor:
        """Dense `(len(rows), d_sae)` pooled reference activations of response rows."""
        if not self.has_activations:
            raise ValueError("this reference cache was built without an SAE; rebuild it with the SAE for FPO")
        dense = torch.zeros(len(rows), self.d_sae)
        for out_row, row in enumerate(rows.tolist()):
            lo, hi = int(self.offsets[row]), int(self.offsets[row + 1])
            dense[out_row, self.indices[lo:hi].long()] = self.values[lo:hi]
        return dense

    # -- persistence --------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tensors = {"logps": self.logps, "n_tokens": self.n_tokens}
        if self.has_activations:
            tensors.update(offsets=self.offsets, indices=self.indices, values=self.values)
        save_tensors(path / _TENSORS, tensors)
        write_json(path / _META, {"version": CACHE_VERSION, "key": self.key.as_dict(), "n_pairs": self.n_pairs,
                                  "d_sae": self.d_sae, **self.meta})
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | Path, expect: CacheKey | None = None) -> "ReferenceCache":
        """Load a cache; with `expect`, refuse one built for another model, SAE, data or dtype."""
        from safetensors.torch import load_file

        path = Path(path)
        meta = read_json(path / _META)
        if meta.get("version") != CACHE_VERSION:
            raise ValueError(f"{path / _META}: cache version {meta.get('version')!r}, expected {CACHE_VERSION}")
        key = CacheKey(**meta.pop("key"))
        if expect is not None:
            check_key(key, expect, path / _META)
        t = load_file(str(path / _TENSORS))
        meta.pop("version")
        meta.pop("n_pairs")
        d_sae = meta.pop("d_sae")
        return cls(t["logps"], t["n_tokens"], key, d_sae, t.get("offsets"), t.get("indices"), t.get("values"), meta, path)


def check_key(found: CacheKey, expected: CacheKey, where: Path | str) -> None:
    """Raise naming every field where a cache's key differs from what this run needs."""
    wanted = expected.as_dict()
    if expected.sae is None:  # a run without SAE (DPO) can use a cache that also holds activations
        wanted["sae"] = found.sae
    diffs = [f"{name}: cache has {found.as_dict()[name]!r}, this run needs {value!r}"
             for name, value in wanted.items() if found.as_dict()[name] != value]
    if diffs:
        raise ValueError(f"{where}: reference cache does not match this run ({'; '.join(diffs)}). "
                         "Delete it or pass another --ref-cache path to rebuild.")


@torch.no_grad()
def build_reference_cache(model: torch.nn.Module, tokenizer: Any, pairs: Sequence[RenderedTriple], key: CacheKey,
                          sae: Any = None, batch_size: int = 4, device: torch.device | str | None = None,
                          autocast: Callable[[], ContextManager] = contextlib.nullcontext,
                          show_progress: bool = True, meter: CostMeter | None = None) -> ReferenceCache:
    """One teacher-forced pass of the reference over every pair (each batch's pass counted by `meter`)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    n_layers = num_layers(model)
    was_training = model.training
    model.eval()
    logps = torch.zeros(len(pairs), 2)
    n_tokens = torch.zeros(len(pairs), 2, dtype=torch.long)
    sparse_rows: list[tuple[torch.Tensor, torch.Tensor]] = []  # response rows in order 2i (chosen), 2i + 1
    starts = range(0, len(pairs), batch_size)
    for start in tqdm(starts, desc="reference cache", disable=not show_progress):
        index = list(range(start, min(start + batch_size, len(pairs))))
        batch = {k: v.to(device) for k, v in collate(pairs, index, tokenizer).items()}
        with measured(meter, *batch["input_ids"].shape, layers=n_layers, lm_head=True) as counted, autocast():
            out = run_model(model, batch, sae)
        if sae is not None:
            counted.extra(int(batch["completion_mask"].sum()), sae.d_in, sae.d_sae)
        b = len(index)
        seq = out.token_logps.sum(-1).float().cpu()
        lens = out.mask.sum(-1).long().cpu()
        logps[index, 0], logps[index, 1] = seq[:b], seq[b:]
        n_tokens[index, 0], n_tokens[index, 1] = lens[:b], lens[b:]
        if out.pooled is not None:
            pooled = out.pooled.float().cpu()
            for j in range(b):
                for row in (j, b + j):
                    nz = pooled[row].nonzero(as_tuple=True)[0]
                    sparse_rows.append((nz.to(torch.int32), pooled[row, nz]))
    model.train(was_training)
    cache = ReferenceCache(logps, n_tokens, key)
    if sae is not None:
        counts = torch.tensor([len(ix) for ix, _ in sparse_rows])
        cache.d_sae = sae.d_sae
        cache.offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        cache.indices = torch.cat([ix for ix, _ in sparse_rows])
        cache.values = torch.cat([v for _, v in sparse_rows])
        cache.meta["sae"] = sae.describe()
        cache.meta["mean_active_latents"] = float(counts.float().mean())
    return cache


def cache_key(model: torch.nn.Module, pairs: Sequence[RenderedTriple], sae: Any, dtype: torch.dtype | str) -> CacheKey:
    sae_fp = sae.fingerprint() if sae is not None else None
    return CacheKey(model_fingerprint(model), sae_fp, pairs_fingerprint(pairs), str(dtype).removeprefix("torch."))


def default_cache_path(key: CacheKey) -> Path:
    return cache_dir() / "fpo-reference" / key.dirname()


def load_or_build(model: torch.nn.Module, tokenizer: Any, pairs: Sequence[RenderedTriple], sae: Any = None,
                  path: str | Path | None = None,
                  dtype: torch.dtype | str = "float32", **build_kwargs: Any) -> ReferenceCache:
    """Reuse the cache at `path` (default: keyed under the saealign cache dir) or build and save it.

    An explicit `path` holding a cache for another model/SAE/data/dtype is refused, never overwritten.
    """
    key = cache_key(model, pairs, sae, dtype)
    target = Path(path) if path is not None else default_cache_path(key)
    if (target / _META).exists():
        cache = ReferenceCache.load(target, expect=key)  # a matching SAE fingerprint implies stored activations
        log.info("reusing reference cache %s", target)
        return cache
    log.info("building reference cache %s (%d pairs)", target, len(pairs))
    cache = build_reference_cache(model, tokenizer, pairs, key, sae, **build_kwargs)
    cache.meta["model_id"] = getattr(getattr(model, "config", None), "saealign_model_id", None)
    if build_kwargs.get("meter") is not None:  # a run that reuses the cache still owes its build to the method
        cache.meta["build_cost"] = build_kwargs["meter"].result()
    cache.save(target)
    return cache
