"""Judge-free preference metrics: definitions, ties, intervals, and teacher-forced scoring."""

import numpy as np
import pytest
import torch

from conftest import CharTok, char_triples
from saealign.eval.pref import preference_metrics
from saealign.runtime.scoring import SequenceScores
from saealign.stats import mean_estimate


def _scores(c, r, lc=None, lr=None):
    c, r = np.asarray(c, float), np.asarray(r, float)
    return SequenceScores(c, r, np.asarray(lc or [1] * len(c)), np.asarray(lr or [1] * len(r)))


def test_preference_and_reward_accuracy_by_hand():
    base = _scores([-10, -10, -10, -10], [-12, -8, -10, -10])
    method = _scores([-9, -10, -10, -11], [-12, -9, -10, -10])
    m = preference_metrics(method, base, n_boot=200)
    # row 0 wins (-9 > -12), row 2 ties (-10 = -10: one half, the one tie rule), rows 1 and 3 lose
    assert m["pref_acc_sum"].value == pytest.approx(0.375)
    # rewards r = method - base: chosen [1, 0, 0, -1], rejected [0, -1, 0, 0]
    # row0 win, row1 win, row2 tie (0.5), row3 loss -> 2.5 / 4
    assert m["reward_acc"].value == pytest.approx(0.625)
    assert m["reward_tie_rate"].value == pytest.approx(0.25)
    assert m["reward_margin"].value == pytest.approx(np.mean([1, 1, 0, -1]))


def test_length_normalised_differs_from_sum():
    s = _scores([-10.0], [-6.0], lc=[10], lr=[2])  # sum prefers rejected, per-token prefers chosen
    m = preference_metrics(s, None, n_boot=50)
    assert m["pref_acc_sum"].value == 0.0 and m["pref_acc_norm"].value == 1.0
    assert "reward_acc" not in m


def test_bootstrap_interval_covers_mean():
    values = (np.random.default_rng(0).random(400) < 0.6).astype(float)
    lo, hi = mean_estimate(values, 1000).ci95
    assert lo < values.mean() < hi and hi - lo < 0.15


def test_teacher_forced_scores_match_manual(tiny_llama):
    from saealign.runtime.scoring import score_triples
    from saealign.data import render_triples

    tok = CharTok()
    triples = char_triples(3)
    got = score_triples(tiny_llama, tok, triples, progress=False)
    for i, r in enumerate(render_triples(tok, triples)):
        ids = torch.tensor([r.prompt_ids + r.chosen_ids])
        with torch.no_grad():
            logp = torch.log_softmax(tiny_llama(ids).logits[0, :-1].float(), -1)
        target = ids[0, 1:]
        want = logp[torch.arange(len(target)), target][len(r.prompt_ids) - 1:].sum().item()
        assert got.logp_chosen[i] == pytest.approx(want, abs=1e-3)
        assert got.len_chosen[i] == len(r.chosen_ids)


class _NoLogitMask(torch.nn.Module):
    """A model as transformers 5.17 behaves: `logits_to_keep` is in the signature, but a boolean mask
    indexes the sequence axis and fails inside the forward (IndexError)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, use_cache=None, logits_to_keep=0):
        if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.dtype == torch.bool:
            raise IndexError("too many indices for tensor of dimension 3")
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                          use_cache=use_cache, logits_to_keep=logits_to_keep)


def test_scoring_without_boolean_logits_to_keep_equals_with_it(tiny_llama):
    """The GPU image's transformers 5.17 case: found by behaviour, then the full-logits path, same scores."""
    from saealign.runtime.scoring import score_triples
    from saealign.models import takes_logit_mask

    tok, triples = CharTok(), char_triples(4)
    old = _NoLogitMask(tiny_llama)
    assert not takes_logit_mask(old)
    got = score_triples(old, tok, triples, progress=False)
    want = score_triples(tiny_llama, tok, triples, progress=False)
    np.testing.assert_allclose(got.logp_chosen, want.logp_chosen, rtol=1e-5)
    np.testing.assert_allclose(got.logp_rejected, want.logp_rejected, rtol=1e-5)
    assert np.all(got.logp_chosen < 0)
