"""The offline reference cache: exact against a live reference, sparse but complete, keyed and refused on mismatch."""

import pytest
import torch

from conftest import build_tiny
from saealign.fpo import cache as C
from saealign.fpo.batching import collate
from saealign.fpo.objective import ModelReference, Objective, run_model
from test_fpo_support import perturbed, random_pairs, tiny_sae, tiny_tokenizer


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("SAEALIGN_CACHE", str(tmp_path / "cache"))
    model, tok, sae = build_tiny("llama"), tiny_tokenizer(), tiny_sae()
    pairs = random_pairs(6, seed=5)
    return model, tok, sae, pairs


def test_cache_equals_live_reference_and_gives_the_same_fpo_loss(setup):
    model, tok, sae, pairs = setup
    cache = C.load_or_build(model, tok, pairs, sae, batch_size=4, show_progress=False)
    policy = perturbed(model)
    live = ModelReference(model, sae)
    for k in (1, 5, 50):
        objective = Objective("fpo", fpo_topk=k)
        for index in ([0, 1, 2], [5, 3]):
            batch = collate(pairs, index, tok)
            from_cache = cache(batch, need_logits=False, need_pooled=True)
            from_model = live(batch, need_logits=False, need_pooled=True)
            torch.testing.assert_close(from_cache.logps, from_model.logps, rtol=0, atol=1e-5)
            torch.testing.assert_close(from_cache.n_tokens, from_model.n_tokens.long())
            torch.testing.assert_close(from_cache.pooled, from_model.pooled, rtol=0, atol=1e-6)
            pol = run_model(policy, batch, sae)
            torch.testing.assert_close(objective(pol, from_cache).losses, objective(pol, from_model).losses,
                                       rtol=0, atol=1e-6)


def test_cache_stores_every_active_latent(setup):
    model, tok, sae, pairs = setup
    cache = C.build_reference_cache(model, tok, pairs, C.cache_key(model, pairs, sae, "float32"), sae, show_progress=False)
    batch = collate(pairs, range(len(pairs)), tok)
    dense = run_model(model, batch, sae).pooled.detach()
    b = len(pairs)
    active = [int((dense[i] > 0).sum()) for i in range(b)]  # chosen rows 0..b-1
    stored = [int(cache.offsets[2 * i + 1] - cache.offsets[2 * i]) for i in range(b)]
    assert stored == active
    assert 0 < sum(active) < b * sae.d_sae  # sparse, not empty: the test would catch dense or empty storage
    assert cache.values.min() > 0


def test_margins_are_length_normalised(setup):
    model, tok, sae, pairs = setup
    cache = C.load_or_build(model, tok, pairs, None, show_progress=False)
    batch = collate(pairs, [0], tok)
    out = run_model(model, batch)
    lens = out.mask.sum(-1)
    expected = out.token_logps.sum(-1)[0] / lens[0] - out.token_logps.sum(-1)[1] / lens[1]
    assert cache.margins()[0].item() == pytest.approx(expected.item(), abs=1e-5)
    assert not cache.has_activations
    with pytest.raises(ValueError, match="without an SAE"):
        cache(batch, need_logits=False, need_pooled=True)
    with pytest.raises(ValueError, match="TDPO"):
        cache(batch, need_logits=True, need_pooled=False)


def test_cache_is_reused_and_survives_a_round_trip(setup, monkeypatch):
    model, tok, sae, pairs = setup
    first = C.load_or_build(model, tok, pairs, sae, show_progress=False)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cache was rebuilt")

    monkeypatch.setattr(C, "build_reference_cache", no_rebuild)
    second = C.load_or_build(model, tok, pairs, sae)
    assert second.key == first.key
    for name in ("logps", "n_tokens", "offsets", "indices", "values"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name


@pytest.mark.parametrize("change", ["model", "sae", "data", "dtype"])
def test_mismatched_cache_is_refused(setup, tmp_path, change):
    model, tok, sae, pairs = setup
    path = tmp_path / "explicit"
    C.load_or_build(model, tok, pairs, sae, path=path, show_progress=False)
    kwargs = dict(model=model, pairs=pairs, sae=sae, dtype="float32")
    if change == "model":
        kwargs["model"] = perturbed(model)
    elif change == "sae":
        kwargs["sae"] = tiny_sae(seed=9)
    elif change == "data":
        kwargs["pairs"] = pairs[:-1]
    else:
        kwargs["dtype"] = "bfloat16"
    with pytest.raises(ValueError, match=f"{change}: cache has"):
        C.load_or_build(kwargs["model"], tok, kwargs["pairs"], kwargs["sae"], path=path, dtype=kwargs["dtype"])


def test_dpo_run_may_use_a_cache_built_with_an_sae(setup, tmp_path):
    model, tok, sae, pairs = setup
    path = tmp_path / "shared"
    C.load_or_build(model, tok, pairs, sae, path=path, show_progress=False)
    cache = C.load_or_build(model, tok, pairs, None, path=path)
    assert cache.has_activations


def test_cache_build_is_counted_pass_by_pass(setup):
    """With a meter, each batch's reference pass (SAE encoder included) is counted and modelled alike."""
    from saealign.cost import CostMeter

    model, tok, sae, pairs = setup
    meter = CostMeter("fpo-reference-cache", model)
    C.build_reference_cache(model, tok, pairs, C.cache_key(model, pairs, sae, "float32"), sae, batch_size=4,
                            show_progress=False, meter=meter)
    cost = meter.result()
    assert cost["passes"] == 2  # 6 pairs in batches of 4
    assert cost["flops"]["forward"] > 0 and cost["flops"]["backward"] == 0
    assert cost["analytic_over_counted"] == pytest.approx(1.0, rel=0.02)
