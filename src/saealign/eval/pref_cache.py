"""Score many steering settings from one base pass (validation sweeps, method tables).

A steering method that edits at layer l leaves everything below l as the base model computed it.
So one base pass keeps, per batch, the residual entering block `start` (and DSPA's prompt features
g(x), read at l_in in the same pass), and scores the base model. A setting whose edits all sit at
layers >= start is then scored by running only blocks start..L-1 and the head
(`hooks.resume_from_layer`). For the default model (30 blocks, edits at 24) that is about a
fifth of the layers. The scores equal `score_triples` on the same batches (a test).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from saealign.data import render_triples, triples_fingerprint
from saealign.runtime.scoring import SequenceScores, response_logp, score_rendered, store_base_scores
from saealign.hooks import HookSession, resume_from_layer
from saealign.models import takes_logit_mask
from saealign.steering import Intervention, apply_intervention, system_prompt_of


@dataclass
class _CachedBatch:
    which: str
    idx: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    resid: torch.Tensor  # residual entering block `start`
    prompt_features: torch.Tensor | None  # DSPA g(x), when a prompt reader was given


def _prompt_key(dspa) -> tuple:
    return dspa.sae_in.fingerprint(), tuple(sorted(dspa.options.items()))


class ScoringCache:
    """Base scores plus what is needed to score edits at layers >= `start` without the lower layers."""

    def __init__(self, batches: list[_CachedBatch], start: int, base: SequenceScores, triples_fp: str,
                 prompt_key: tuple | None):
        self.batches, self.start, self.base = batches, start, base
        self.triples_fingerprint, self.prompt_key = triples_fp, prompt_key

    @classmethod
    @torch.no_grad()
    def build(cls, model, tokenizer, triples, start: int, prompt_reader=None, max_length: int = 1024,
              max_tokens: int = 6144, progress: bool = True) -> "ScoringCache":
        """One base pass. `prompt_reader`: a DSPA whose input SAE and options give the cached g(x)
        (any DSPA with the same input SAE and options can then be scored)."""
        rendered = render_triples(tokenizer, triples, max_length=max_length, progress=False)
        batches = []

        @contextlib.contextmanager
        def record(which, idx, ids, attn, resp):
            got: dict[str, torch.Tensor | None] = {"g": None}
            with HookSession(model) as session:
                session.add(start, lambda h, ctx: got.__setitem__("resid", h.detach()), site="resid_pre")
                if prompt_reader is not None:
                    session.add(prompt_reader.sae_in.layer,
                                lambda h, ctx: got.__setitem__("g", prompt_reader.prompt_features(h, ctx, resp)))
                yield
            batches.append(_CachedBatch(which, idx, ids, attn, resp, got["resid"], got["g"]))

        base = score_rendered(model, tokenizer, rendered, max_tokens, "base pass (cached)", progress, record)
        store_base_scores(model, tokenizer, triples, max_length, base)
        key = _prompt_key(prompt_reader) if prompt_reader is not None else None
        return cls(batches, start, base, triples_fingerprint(triples), key)

    @classmethod
    def for_methods(cls, model, tokenizer, triples, methods: list, max_length: int = 1024, max_tokens: int = 6144,
                    progress: bool = True) -> "ScoringCache | None":
        """A cache that serves as many of `methods` as possible (None when it would serve none): it
        starts at the lowest layer they edit and reads the first DSPA's prompt features."""
        layers, reader = [], None
        for m in methods:
            if system_prompt_of(m) is not None:
                continue
            hooked = _hooked_layers(model, m)
            if hasattr(m, "use_prompt_features"):
                reader = reader or m
                hooked -= {m.sae_in.layer}
            layers.extend(hooked)
        if not layers or min(layers) < 1:
            return None
        return cls.build(model, tokenizer, triples, min(layers), reader, max_length, max_tokens, progress)

    def supports(self, model, intervention: Intervention | None) -> bool:
        """Whether `score` can take this method (no system prompt; every hook at a layer >= start)."""
        if intervention is None:
            return True
        if system_prompt_of(intervention) is not None:
            return False
        needs_prompt = hasattr(intervention, "use_prompt_features")
        if needs_prompt and _prompt_key(intervention) != self.prompt_key:
            return False
        skip = {intervention.sae_in.layer} if needs_prompt else set()
        return all(layer >= self.start for layer in _hooked_layers(model, intervention) - skip)

    @torch.no_grad()
    def score(self, model, intervention: Intervention | None, progress: bool = False, desc: str = "score"
              ) -> SequenceScores:
        if intervention is None:
            return self.base
        if not self.supports(model, intervention):
            raise ValueError(f"{getattr(intervention, 'name', intervention)!r} cannot be scored from this cache "
                             f"(it edits below layer {self.start}, changes the prompt, or reads other prompt "
                             "features): use score_triples")
        n = len(self.base.logp_chosen)
        logp = {w: np.zeros(n) for w in ("chosen", "rejected")}
        logit_mask = takes_logit_mask(model)
        for b in tqdm(self.batches, desc=desc, disable=not progress):
            if b.prompt_features is not None and hasattr(intervention, "use_prompt_features"):
                intervention.use_prompt_features(b.prompt_features)
            with apply_intervention(intervention, model, positions=b.response_mask), resume_from_layer(model, self.start):
                lp, _ = response_logp(model, b.input_ids, b.attention_mask, b.response_mask, inputs_embeds=b.resid,
                                       logit_mask=logit_mask)
            logp[b.which][b.idx] = lp.numpy()
        return SequenceScores(logp["chosen"], logp["rejected"], self.base.len_chosen, self.base.len_rejected)


def _hooked_layers(model, intervention) -> set[int]:
    """The decoder layers an intervention hooks (its hooks are attached, read and removed at once)."""
    with intervention.apply(model) as session:
        return set(getattr(session, "layers", ()))
