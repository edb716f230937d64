"""Scoring from a cached base pass equals full teacher-forced scoring, for every architecture."""

import numpy as np
import pytest

from conftest import CharTok, build_tiny, char_triples
from saealign.dspa import DSPA, StaticSAE, SteerConfig, fit_map, FitOptions
from saealign.dspa.baselines import PromptPrefix, RepE
from saealign.runtime.scoring import score_triples
from saealign.eval.pref_cache import ScoringCache
from test_dspa import _tiny_saes


@pytest.mark.parametrize("arch", ["llama", "gemma2", "qwen3"])
def test_cached_scores_equal_full_scoring(arch):
    model, tok = build_tiny(arch), CharTok()
    sae_in, sae_out = _tiny_saes(l_in=1, l_out=2)
    triples = char_triples(10)
    dspa_map = fit_map(model, tok, sae_in, sae_out, triples, FitOptions(batch_size=4), progress=False)
    methods = {
        "dspa": DSPA(dspa_map, sae_in, sae_out, SteerConfig(alpha=0.8, k_diff=10, k_prompt=16, mode="both")),
        "static": StaticSAE(dspa_map, sae_out, SteerConfig(alpha=0.8, k_diff=10, mode="both")),
        "repe": RepE.from_map(dspa_map, coef=4.0),
    }
    cache = ScoringCache.build(model, tok, triples, start=2, prompt_reader=methods["dspa"], max_tokens=200,
                               progress=False)
    base = score_triples(model, tok, triples, max_tokens=200, progress=False)
    np.testing.assert_allclose(cache.base.logp_chosen, base.logp_chosen, atol=1e-5)
    for name, method in methods.items():
        full = score_triples(model, tok, triples, method, max_tokens=200, progress=False)
        got = cache.score(model, method)
        assert not np.allclose(full.logp_chosen, base.logp_chosen), name  # the edit did something
        np.testing.assert_allclose(got.logp_chosen, full.logp_chosen, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(got.logp_rejected, full.logp_rejected, atol=1e-4, err_msg=name)
    # another DSPA setting on the same cache (same input SAE and options) is still exact
    other = DSPA(dspa_map, sae_in, sae_out, SteerConfig(alpha=0.3, k_diff=4, k_prompt=8))
    np.testing.assert_allclose(cache.score(model, other).logp_rejected,
                               score_triples(model, tok, triples, other, max_tokens=200, progress=False).logp_rejected,
                               atol=1e-4)


def test_cache_refuses_what_it_cannot_score():
    model, tok = build_tiny("llama"), CharTok()
    sae_in, sae_out = _tiny_saes(l_in=1, l_out=2)
    triples = char_triples(4)
    dspa_map = fit_map(model, tok, sae_in, sae_out, triples, FitOptions(batch_size=4), progress=False)
    cache = ScoringCache.build(model, tok, triples, start=2, progress=False)
    assert not cache.supports(model, PromptPrefix())
    assert not cache.supports(model, RepE(dspa_map.repe_vector(), layer=1))
    assert not cache.supports(model, DSPA(dspa_map, sae_in, sae_out))  # no prompt features were cached
    with pytest.raises(ValueError, match="cannot be scored from this cache"):
        cache.score(model, PromptPrefix())


def test_saved_scores_load_back_exactly_and_a_corrupt_file_is_refused(tmp_path):
    from saealign.runtime.scoring import SequenceScores, load_scores, save_scores

    scores = SequenceScores(np.array([-12.5, -3.25]), np.array([-7.0, -40.125]), np.array([5, 9]), np.array([4, 17]))
    path = tmp_path / "scores" / "arm.safetensors"
    save_scores(path, scores)
    back = load_scores(path)
    for name in ("logp_chosen", "logp_rejected", "len_chosen", "len_rejected"):
        assert np.array_equal(getattr(back, name), getattr(scores, name))
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ValueError, match="arm.safetensors"):
        load_scores(path)
