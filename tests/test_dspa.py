"""DSPA: the map (sums, merge, sparsity, refusal of mismatches) and the steering rule."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from conftest import CharTok as _CharTok, build_tiny, char_triples as _triples
from saealign.dspa import DSPA, DSPAMap, FitOptions, MapMetadata, StaticSAE, SteerConfig, fit_map, merge_maps
from saealign.dspa.map import SparseSum
from saealign.dspa.steer import edit_latents, select_latents
from saealign.hooks import read_residuals
from saealign.sae import SAE, SAEConfig


def test_edit_rule_hand_computed():
    f = torch.tensor([[4.0, 0.0, 1.0, 2.0, 0.5]])
    minus = torch.tensor([[False, True, True, False, True]])
    plus = torch.tensor([[False, False, False, True, False]])
    # m_t = 4; alpha = 0.2 -> step 0.8
    got = edit_latents(f, minus, plus, 0.2)
    want = torch.tensor([[4.0, 0.0, 0.2, 2.8, 0.0]])  # inactive latent 1 stays 0; 0.5 - 0.8 clamps to 0
    torch.testing.assert_close(got, want)


def test_select_latents_strict_signs():
    s = torch.tensor([[-3.0, -1.0, 0.0, 2.0, 5.0, -0.5]])
    minus, plus = select_latents(s, k_diff=2, mode="both")
    assert minus.nonzero()[:, 1].tolist() == [0, 1]
    assert plus.nonzero()[:, 1].tolist() == [3, 4]
    minus, _ = select_latents(torch.tensor([[1.0, 2.0, 0.0]]), k_diff=2, mode="ablate")
    assert not minus.any(), "only strictly negative scores may be ablated"


def test_sparse_sum_matches_dense():
    torch.manual_seed(0)
    acc = SparseSum(6, 5)
    dense = torch.zeros(6, 5, dtype=torch.float64)
    for _ in range(5):
        g = torch.relu(torch.randn(3, 6))
        d = torch.randn(3, 5) * (torch.rand(3, 5) > 0.5)
        acc.add_outer(g, d)
        dense += g.double().T @ d.double()
    torch.testing.assert_close(acc.dense(), dense)


def _tiny_saes(d=64, m_in=48, m_out=40, l_in=1, l_out=2):
    torch.manual_seed(3)
    saes = []
    for m, layer in ((m_in, l_in), (m_out, l_out)):
        sae = SAE(SAEConfig(d_in=d, d_sae=m, architecture="topk", k=6, hook_name=f"blocks.{layer}.hook_resid_post"))
        with torch.no_grad():
            sae.W_enc.normal_()
            w = torch.randn(m, d)
            sae.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
        saes.append(sae.eval())
    return saes


def test_fit_matches_definition_and_merges():
    model = build_tiny("llama")
    tok = _CharTok()
    sae_in, sae_out = _tiny_saes()
    triples = _triples(10)
    opts = FitOptions(batch_size=3, exclude_sinks=False)
    full = fit_map(model, tok, sae_in, sae_out, triples, opts, progress=False)
    # brute force: per triple, g delta^T
    from saealign.data import collate_pairs, render_triples

    want = torch.zeros(sae_in.d_sae, sae_out.d_sae, dtype=torch.float64)
    want_repe = torch.zeros(sae_out.d_in, dtype=torch.float64)
    want_delta = torch.zeros(sae_out.d_sae, dtype=torch.float64)
    for r in render_triples(tok, triples):
        dens, mean_h = {}, {}
        for which in ("chosen", "rejected"):
            b = collate_pairs([r], tok, which, "right")
            h = read_residuals(model, b["input_ids"], b["attention_mask"], [1, 2])
            resp = b["response_mask"][0]
            if which == "chosen":
                g = (sae_in.encode(h[1][0][~resp]) > 0).double().mean(0)
            dens[which] = (sae_out.encode(h[2][0][resp]) > 0).double().mean(0)
            mean_h[which] = h[2][0][resp].double().mean(0)
        want += torch.outer(g, dens["chosen"] - dens["rejected"])
        want_repe += mean_h["chosen"] - mean_h["rejected"]
        want_delta += dens["chosen"] - dens["rejected"]
    torch.testing.assert_close(full.a_sum.dense(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(full.repe_vector().double(), want_repe / len(triples), rtol=1e-4, atol=1e-5)
    assert full.count == 10
    a = fit_map(model, tok, sae_in, sae_out, triples[:4], opts, progress=False)
    b = fit_map(model, tok, sae_in, sae_out, triples[4:], opts, progress=False)
    merged = merge_maps([a, b])
    torch.testing.assert_close(merged.matrix(), full.matrix())
    torch.testing.assert_close(full.delta_sum, want_delta)
    torch.testing.assert_close(merged.matrix(center=True), full.matrix(center=True))
    centred = full.matrix(center=True).double()
    g_mean = full.g_sum / 10
    torch.testing.assert_close(centred, want / 10 - torch.outer(g_mean, want_delta / 10), rtol=1e-5, atol=1e-6)


def test_map_save_load_and_refusal(tmp_path):
    model = build_tiny("llama")
    sae_in, sae_out = _tiny_saes()
    m = fit_map(model, _CharTok(), sae_in, sae_out, _triples(6), FitOptions(batch_size=4), progress=False)
    m.save(tmp_path / "map")
    loaded = DSPAMap.load(tmp_path / "map")
    torch.testing.assert_close(loaded.matrix(), m.matrix())
    torch.testing.assert_close(loaded.matrix(center=True), m.matrix(center=True))
    other_out = _tiny_saes(m_out=40)[1]
    with torch.no_grad():
        other_out.W_dec.add_(0.01)
    with pytest.raises(ValueError, match="sae_out: map was fitted with SAE"):
        DSPA(loaded, sae_in, other_out)
    other_model = build_tiny("llama", seed=1)
    other_model.config.saealign_model_id = "tiny-other"
    with pytest.raises(ValueError, match="model: map was fitted on 'tiny-llama'"):
        loaded.check_compatible(other_model)


def test_threshold_sparsifies():
    sae_in, sae_out = _tiny_saes()
    m = fit_map(build_tiny("llama"), _CharTok(), sae_in, sae_out, _triples(8), FitOptions(batch_size=4), progress=False)
    a0, a1 = m.matrix(0.0), m.matrix(0.05)
    assert (a1 != 0).sum() < (a0 != 0).sum()
    assert (a1[a1 != 0].abs() >= 0.05).all()


def _dspa(mode="ablate", alpha=0.5, k_diff=8, **kw):
    model = build_tiny("llama")
    sae_in, sae_out = _tiny_saes()
    m = fit_map(model, _CharTok(), sae_in, sae_out, _triples(12), FitOptions(batch_size=4), progress=False)
    return model, DSPA(m, sae_in, sae_out, SteerConfig(mode=mode, alpha=alpha, k_diff=k_diff, k_prompt=16, **kw))


def test_steering_edits_equal_formula_and_only_generation():
    model, dspa = _dspa(record=True, k_diff=40)
    ids = torch.randint(3, 500, (1, 7))
    with torch.no_grad():
        clean = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        seq = clean  # teacher-force the clean continuation to compare the edit with the formula
        resp = torch.zeros_like(seq, dtype=torch.bool)
        resp[:, 7:] = True
        h_clean = read_residuals(model, seq, None, [2])[2]
        dspa.records.clear()
        with dspa.apply(model, positions=resp):
            h_steer = read_residuals(model, seq, None, [2])[2]
    minus, plus = dspa.latent_sets()
    assert minus.any(), "no latents selected; the test would prove nothing"
    assert torch.equal(h_clean[:, :7], h_steer[:, :7]), "prompt positions were edited"
    f = dspa.sae_out.encode(h_clean[0, 7:])
    f_new = edit_latents(f, minus[0].expand_as(f), plus[0].expand_as(f), dspa.cfg.alpha)
    want = h_clean[0, 7:] + (f_new - f) @ dspa.sae_out.W_dec
    # only the first edited position has an unedited input; later ones see earlier edits
    torch.testing.assert_close(h_steer[0, 7], want[0], rtol=1e-5, atol=1e-5)
    assert not torch.equal(h_steer[0, 7:], h_clean[0, 7:]), "nothing was edited; the test would prove nothing"
    assert dspa.records and all(r.position >= 7 for r in dspa.records)
    first = [r for r in dspa.records if r.position == 7][0]
    assert set(first.latents) == set((f_new[0] != f[0]).nonzero().flatten().tolist())


def test_steering_off_equals_base_and_batch_equals_single():
    model, dspa = _dspa(alpha=0.6)
    torch.manual_seed(5)
    prompts = [torch.randint(3, 500, (n,)).tolist() for n in (5, 9, 6)]
    width = max(map(len, prompts))
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        base = model.generate(input_ids=ids, attention_mask=mask, **kw)
        with dspa.apply(model):
            steered = model.generate(input_ids=ids, attention_mask=mask, **kw)
            edited = dspa.edited_tokens
            singles = [model.generate(input_ids=torch.tensor([p]), **kw)[0, len(p):] for p in prompts]
            uncached = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kw)
        again = model.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(base, again), "hooks left behind after the context exited"
    # 3 rows x 4 fed-back tokens can be edited in generate (the first new token comes from the prompt)
    assert 0 < edited <= 12, "DSPA edited no generated token: steering silently off"
    assert not torch.equal(steered, base), "steering changed no token; the comparisons below would prove nothing"
    for row, single in zip(steered[:, width:], singles):
        assert torch.equal(row, single)
    assert torch.equal(steered, uncached)


def test_zero_alpha_is_bit_exact():
    model, dspa = _dspa(alpha=0.0)
    ids = torch.randint(3, 500, (2, 6))
    resp = torch.ones_like(ids, dtype=torch.bool)
    resp[:, :3] = False
    with torch.no_grad():
        clean = model(input_ids=ids).logits
        with dspa.apply(model, positions=resp):
            steered = model(input_ids=ids).logits
    assert torch.equal(clean, steered)


def test_static_sae_uses_one_set_for_all_prompts():
    model, dspa = _dspa()
    static = StaticSAE(dspa.map, dspa.sae_out, SteerConfig(k_diff=8, alpha=0.5))
    minus, plus = static._static_sets
    assert minus.shape == (1, dspa.sae_out.d_sae) and minus.any()
    ids = torch.randint(3, 500, (2, 6))
    with torch.no_grad(), static.apply(model):
        model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    m, _ = static.latent_sets()
    assert torch.equal(m[0], m[1])


def test_token_without_selected_active_latent_is_unchanged():
    model, dspa = _dspa(alpha=0.5, k_diff=1)
    ids = torch.randint(3, 500, (2, 10))
    resp = torch.zeros_like(ids, dtype=torch.bool)
    resp[:, 5:] = True
    with torch.no_grad():
        clean = read_residuals(model, ids, None, [2])[2]
        with dspa.apply(model, positions=resp):
            steered = read_residuals(model, ids, None, [2])[2]
    minus, _ = dspa.latent_sets()
    f = dspa.sae_out.encode(clean[:, 5])
    hit = (f > 0) & minus
    for row in range(2):  # the first edited position sees an unedited input, so the rule is exact there
        if not hit[row].any():
            assert torch.equal(steered[row, 5], clean[row, 5])
        else:
            assert not torch.equal(steered[row, 5], clean[row, 5])


def test_dense_and_sparse_storage_roundtrip(tmp_path):
    for density in (0.05, 0.9):
        torch.manual_seed(1)
        acc = SparseSum(30, 20)
        g = torch.relu(torch.randn(4, 30)) * (torch.rand(4, 30) < density)
        d = torch.randn(4, 20) * (torch.rand(4, 20) < density)
        acc.add_outer(g, d)
        meta = MapMetadata(model="tiny", l_in=1, l_out=2, sae_in={"d_sae": 30}, sae_out={"d_sae": 20}, m_in=30,
                           m_out=20, options=FitOptions(), data_fingerprint="abc")
        m = DSPAMap(acc, g.sum(0).double(), 4, meta)
        m.save(tmp_path / str(density))
        loaded = DSPAMap.load(tmp_path / str(density))
        torch.testing.assert_close(loaded.a_sum.dense(), acc.dense())
        assert loaded.count == 4
        assert loaded.a_sum.is_dense == (density > 0.5)


def test_sum_switches_to_dense_and_stays_exact():
    torch.manual_seed(2)
    sparse, filling, want = SparseSum(30, 20), SparseSum(30, 20), torch.zeros(30, 20, dtype=torch.float64)
    for step in range(6):
        g = torch.relu(torch.randn(3, 30)) * (torch.rand(3, 30) < 0.1)
        d = torch.randn(3, 20) * (torch.rand(3, 20) < 0.1)
        sparse.add_outer(g, d)
        g2, d2 = torch.relu(torch.randn(3, 30)), torch.randn(3, 20)
        filling.add_outer(g2, d2)
        filling.coalesce()
        want += g2.double().T @ d2.double()
    assert filling.is_dense and not sparse.is_dense
    torch.testing.assert_close(filling.dense(), want)
    merged = SparseSum(30, 20)
    merged += sparse
    merged += filling
    torch.testing.assert_close(merged.dense(), want + sparse.dense())


@pytest.mark.parametrize("sink_factor", [10.0, 1.05])
def test_repe_fit_equals_the_vector_a_dspa_fit_accumulates(sink_factor):
    """`dspa repe` and the RepE vector of a DSPA map are one definition: the same response tokens, with
    sinks dropped by the same rule (a factor near 1 makes the rule drop many tokens)."""
    from saealign.dspa import RepE

    model, tok = build_tiny("llama"), _CharTok()
    sae_in, sae_out = _tiny_saes()
    triples = _triples(6)
    opts = FitOptions(batch_size=6, sink_factor=sink_factor)
    from_map = fit_map(model, tok, sae_in, sae_out, triples, opts, progress=False).repe_vector()
    fitted = RepE.fit(model, tok, triples, layer=sae_out.layer, batch_size=6, progress=False, sink_factor=sink_factor)
    torch.testing.assert_close(fitted.vector.float(), from_map, rtol=1e-4, atol=1e-5)


def _grid_saes(d=64):
    """SAEs at layers 0..3 of the tiny model, for a grid of every pair l_in < l_out."""
    torch.manual_seed(5)
    saes = {}
    for layer, m in ((0, 32), (1, 48), (2, 40), (3, 36)):
        sae = SAE(SAEConfig(d_in=d, d_sae=m, architecture="topk", k=6, hook_name=f"blocks.{layer}.hook_resid_post"))
        with torch.no_grad():
            sae.W_enc.normal_()
            sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(m, d), dim=1))
        saes[layer] = sae.eval()
    return saes


def test_fit_maps_of_a_layer_grid_equal_one_fit_per_pair_from_fewer_passes(tmp_path, monkeypatch):
    import saealign.dspa.map as map_mod
    from saealign.dspa import fit_maps

    model, tok, saes = build_tiny("llama"), _CharTok(), _grid_saes()
    triples, opts = _triples(10), FitOptions(batch_size=4)
    pairs = [(saes[i], saes[o]) for i in range(4) for o in range(4) if i < o]
    passes = []
    real = map_mod.read_residuals
    monkeypatch.setattr(map_mod, "read_residuals", lambda *a, **k: passes.append(1) or real(*a, **k))
    joint = fit_maps(model, tok, pairs, triples, opts, [tmp_path / f"p{n}" for n in range(len(pairs))], progress=False)
    joint_passes = len(passes)
    singles = [fit_map(model, tok, a, b, triples, opts, progress=False) for a, b in pairs]
    assert joint_passes == 2 * 3 and len(passes) - joint_passes == len(pairs) * joint_passes  # 3 batches, 2 passes each
    for m, single, (a, b) in zip(joint, singles, pairs):
        assert (m.meta.l_in, m.meta.l_out) == (a.layer, b.layer) and m.count == 10
        assert single.a_sum.dense().abs().sum() > 0, "an empty map would make the comparison vacuous"
        torch.testing.assert_close(m.a_sum.dense(), single.a_sum.dense())
        torch.testing.assert_close(m.g_sum, single.g_sum)
        torch.testing.assert_close(m.repe_sum, single.repe_sum)
    for n, m in enumerate(joint):  # each map saved in its own directory, loadable as any fit
        torch.testing.assert_close(DSPAMap.load(tmp_path / f"p{n}").matrix(), m.matrix())
    from saealign.dspa.diagnostics import held_out_features, held_out_statistics

    g, delta = held_out_features(model, tok, [saes[0], saes[1]], [saes[2], saes[3]], _triples(6), opts, progress=False)
    single = held_out_statistics(model, tok, saes[1], saes[3], _triples(6), opts, progress=False)
    assert single.g.abs().sum() > 0 and single.delta.abs().sum() > 0
    torch.testing.assert_close(g[1], single.g)
    torch.testing.assert_close(delta[1], single.delta)


def test_fit_maps_resumes_maps_that_stopped_at_different_points(tmp_path, monkeypatch):
    import saealign.dspa.map as map_mod
    from saealign.dspa import fit_maps

    model, tok, saes = build_tiny("llama"), _CharTok(), _grid_saes()
    triples, opts = _triples(12), FitOptions(batch_size=4)
    pairs = [(saes[0], saes[2]), (saes[1], saes[2]), (saes[1], saes[3])]
    dirs = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    fit_map(model, tok, *pairs[0], triples, opts, checkpoint_dir=dirs[0], progress=False)  # finished
    calls = []
    real = map_mod.pair_statistics

    def dies_on_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected")
        return real(*a, **k)

    monkeypatch.setattr(map_mod, "pair_statistics", dies_on_second)
    with pytest.raises(RuntimeError, match="injected"):  # pair b: checkpointed after 4 triples
        fit_map(model, tok, *pairs[1], triples, opts, checkpoint_dir=dirs[1], checkpoint_every=4, progress=False)
    monkeypatch.undo()
    assert (dirs[1] / "partial").exists() and not dirs[2].exists()
    done = fit_maps(model, tok, pairs, triples, opts, dirs, checkpoint_every=4, progress=False)
    for m, (a, b) in zip(done, pairs):
        clean = fit_map(model, tok, a, b, triples, opts, progress=False)
        assert m.count == 12
        torch.testing.assert_close(m.a_sum.dense(), clean.a_sum.dense())
    assert not any((d / "partial").exists() for d in dirs)
    with pytest.raises(ValueError, match="2 SAE pairs but 1 checkpoint"):
        fit_maps(model, tok, pairs[:2], triples, opts, dirs[:1], progress=False)


def test_run_fits_shares_passes_records_each_fit_and_refuses_other_data(tmp_path):
    from saealign.dspa.fitting import DSPAFitConfig, run_fit, run_fits

    model, tok, saes = build_tiny("llama"), _CharTok(), _grid_saes()
    for layer, sae in saes.items():
        sae.save(tmp_path / f"sae{layer}")
    data = tmp_path / "triples.jsonl"
    data.write_text("".join(json.dumps({"prompt": t.prompt[0]["content"], "chosen": t.chosen, "rejected": t.rejected}) + "\n"
                            for t in _triples(9)))
    common = dict(data=str(data), batch_size=4, max_length=64)
    cfgs = [DSPAFitConfig(**common, sae_in=str(tmp_path / f"sae{i}"), sae_out=str(tmp_path / f"sae{o}"),
                          output=str(tmp_path / f"map{i}{o}"), threshold=0.01 * i) for i, o in ((0, 2), (1, 2), (1, 3))]
    maps = run_fits(cfgs, model, tok)
    for m, cfg in zip(maps, cfgs):
        alone = run_fit(dataclasses.replace(cfg, output=str(tmp_path / "alone" / Path(cfg.output).name)), model, tok)
        saved = DSPAMap.load(cfg.output)
        assert saved.meta.threshold == cfg.threshold and saved.meta.data.source == str(data) and saved.count == 9
        assert alone.a_sum.dense().abs().sum() > 0
        torch.testing.assert_close(saved.a_sum.dense(), alone.a_sum.dense())
    with pytest.raises(ValueError, match=r"may differ only in sae_in.*n None there, 4 now"):
        run_fits([cfgs[0], dataclasses.replace(cfgs[1], n=4)], model, tok)


def test_centred_steering_selects_per_prompt_latents_and_is_fixed_on_a_server():
    from saealign.cli.dspa_cmd import _remote_replies
    from saealign.config import ConfigError

    model = build_tiny("llama")
    sae_in, sae_out = _tiny_saes()
    m = fit_map(model, _CharTok(), sae_in, sae_out, _triples(12), FitOptions(batch_size=4), progress=False)
    plain = DSPA(m, sae_in, sae_out, SteerConfig(mode="both", k_diff=4, k_prompt=16))
    centred = DSPA(m, sae_in, sae_out, SteerConfig(mode="both", k_diff=4, k_prompt=16, center=True))
    assert plain.cfg.center is False and centred.cfg.center is True
    assert not torch.equal(plain.A, centred.A)
    torch.testing.assert_close(centred.A, m.matrix(center=True))
    g = torch.rand(3, sae_in.d_sae) * (torch.rand(3, sae_in.d_sae) > 0.5)
    dev = g - m.mean_g()
    keep = torch.zeros_like(dev, dtype=torch.bool).scatter_(-1, dev.abs().topk(16, dim=-1).indices, True)
    torch.testing.assert_close(centred.scores(g), torch.where(keep, dev, 0.0) @ m.matrix(center=True))
    mean_prompt = m.mean_g().expand(2, -1)
    assert not centred.scores(mean_prompt).any()  # the average prompt: nothing to condition on, nothing edited
    assert plain.scores(mean_prompt).any()
    from saealign.steering import check_options

    with pytest.raises(ConfigError, match="center"):  # static-sae's scores are what centring removes
        check_options("static-sae", {"center": True})
    with pytest.raises(ConfigError, match="center"):
        _remote_replies("http://localhost:1", "dspa", {"center": True}, None, 8, 0.0)
