"""Artifacts and jobs a user can trust (issue #13): fits resume only with the same settings, checkpoints
are atomic, artifacts are checksummed, models are known by their weights, options validate themselves.
Faults are injected (monkeypatched writes and batches), never timed."""

import dataclasses
import json
import types

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import saealign.dspa.map as map_mod
from conftest import CharTok, build_tiny, char_triples, save_tiny_chat_model
from saealign.dspa import DSPAMap, FitOptions, RepE, fit_map, merge_maps
from saealign.models import model_fingerprint
from saealign.sae import SAE, SAEConfig, load_sae

DEMO = "src/saealign/resources/demo_preferences.jsonl"


def _saes(d=64):
    torch.manual_seed(3)
    saes = []
    for m, layer in ((48, 1), (40, 2)):
        sae = SAE(SAEConfig(d_in=d, d_sae=m, architecture="topk", k=6, hook_name=f"blocks.{layer}.hook_resid_post"))
        with torch.no_grad():
            sae.W_enc.normal_()
            sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(m, d), dim=1))
        saes.append(sae.eval())
    return saes


def _fit(triples, opts=FitOptions(batch_size=4), model=None, **kw):
    return fit_map(model or build_tiny("llama"), CharTok(), *_saes(), triples, opts, progress=False, **kw)


def _fail_on_call(n, fn, error=RuntimeError("injected fault")):
    """`fn`, except that its n-th call raises."""
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise error
        return fn(*args, **kwargs)

    return wrapper


# -- case 1: a resumed or repeated fit with other options --------------------------------------------


def test_rerun_into_finished_output_with_other_options_is_refused(tmp_path):
    triples = char_triples(8)
    first = _fit(triples, checkpoint_dir=tmp_path)
    assert not (tmp_path / "partial").exists(), "checkpoints are removed once the fit is done"
    again = _fit(triples, checkpoint_dir=tmp_path)  # same settings: the finished map, no work
    torch.testing.assert_close(again.a_sum.dense(), first.a_sum.dense())
    other = FitOptions(stat="mean", max_length=64, batch_size=4)
    with pytest.raises(ValueError, match=r"stat 'density' there, 'mean' now.*max_length 1024 there, 64 now"):
        _fit(triples, other, checkpoint_dir=tmp_path)
    fresh = _fit(triples, other, checkpoint_dir=tmp_path, overwrite=True)
    clean = _fit(triples, other)
    torch.testing.assert_close(fresh.a_sum.dense(), clean.a_sum.dense())
    assert DSPAMap.load(tmp_path).meta.options.stat == "mean"


def test_interrupted_fit_resumed_with_other_options_is_refused(tmp_path, monkeypatch):
    triples = char_triples(12)
    monkeypatch.setattr(map_mod, "pair_statistics", _fail_on_call(3, map_mod.pair_statistics))  # dies after 8 triples
    with pytest.raises(RuntimeError, match="injected"):
        _fit(triples, checkpoint_dir=tmp_path, checkpoint_every=4)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"partial: holds a fit with other settings \(stat 'density' there, 'mean' now"):
        _fit(triples, FitOptions(stat="mean", batch_size=4), checkpoint_dir=tmp_path, checkpoint_every=4)
    resumed = _fit(triples, checkpoint_dir=tmp_path, checkpoint_every=4)
    torch.testing.assert_close(resumed.a_sum.dense(), _fit(triples).a_sum.dense())


def test_fit_seconds_cover_every_segment(tmp_path, monkeypatch):
    clock = [0.0]

    def slow_batch(*args):
        clock[0] += 10.0  # each batch "takes" 10 s
        return real_batch(*args)

    real_batch = map_mod.pair_statistics
    monkeypatch.setattr(map_mod, "time", types.SimpleNamespace(time=lambda: clock[0]))
    monkeypatch.setattr(map_mod, "pair_statistics", _fail_on_call(2, slow_batch))
    with pytest.raises(RuntimeError, match="injected"):
        _fit(char_triples(12), checkpoint_dir=tmp_path, checkpoint_every=4)  # 1 batch done and checkpointed
    monkeypatch.setattr(map_mod, "pair_statistics", slow_batch)
    resumed = _fit(char_triples(12), checkpoint_dir=tmp_path, checkpoint_every=4)  # 2 more batches
    assert resumed.meta.fit_seconds == 30.0


# -- case 2: a checkpoint's tensors and config are one atomic step --------------------------------------


def test_kill_between_checkpoint_tensors_and_config_resumes_exactly(tmp_path, monkeypatch):
    triples = char_triples(12)
    # the second checkpoint dies after its tensors are written, before its config
    monkeypatch.setattr(map_mod, "write_json", _fail_on_call(2, map_mod.write_json))
    with pytest.raises(RuntimeError, match="injected"):
        _fit(triples, checkpoint_dir=tmp_path, checkpoint_every=4)
    monkeypatch.undo()
    resumed = _fit(triples, checkpoint_dir=tmp_path, checkpoint_every=4)
    clean = _fit(triples)
    assert resumed.count == clean.count == 12
    torch.testing.assert_close(resumed.a_sum.dense(), clean.a_sum.dense())
    torch.testing.assert_close(resumed.g_sum, clean.g_sum)


# -- case 3: integrity of artifacts ---------------------------------------------------------------------


def _corrupt(file, change):
    tensors = load_file(str(file))
    change(tensors)
    save_file(tensors, str(file))


def _first_float(tensors):
    return next(t for t in tensors.values() if t.is_floating_point() and t.numel())


@pytest.mark.parametrize("value, problem", [(float("nan"), "non-finite"), (1e30, "magnitude 1e\\+30")])
def test_map_with_bad_values_is_refused(tmp_path, value, problem):
    _fit(char_triples(6)).save(tmp_path)
    _corrupt(tmp_path / "dspa_map.safetensors", lambda t: _first_float(t).view(-1).__setitem__(0, value))
    with pytest.raises(ValueError, match=f"dspa_map.safetensors: tensor .* {problem}"):
        DSPAMap.load(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["tensors"]  # checked without a checksum too (maps from before checksums)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=problem):
        DSPAMap.load(tmp_path)


def test_map_config_disagreeing_with_tensors_or_changed_tensors_are_refused(tmp_path):
    _fit(char_triples(6)).save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "m_out": 41}))
    with pytest.raises(ValueError, match=r"config.json: m_out=41, but its SAE has d_sae=40"):
        DSPAMap.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    _corrupt(tmp_path / "dspa_map.safetensors", lambda t: t["g_sum"].mul_(1.5))
    with pytest.raises(ValueError, match=r"dspa_map.safetensors: tensor 'g_sum' does not match the checksum"):
        DSPAMap.load(tmp_path)
    (tmp_path / "dspa_map.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ValueError, match=r"dspa_map.safetensors: not a readable safetensors file"):
        DSPAMap.load(tmp_path)


def test_repe_vector_and_sae_integrity(tmp_path):
    RepE.from_map(_fit(char_triples(6))).save(tmp_path / "repe")
    _corrupt(tmp_path / "repe" / "repe.safetensors", lambda t: t["vector"].__setitem__(3, float("inf")))
    with pytest.raises(ValueError, match=r"repe.safetensors: tensor 'vector' has 1 non-finite"):
        RepE.load(tmp_path / "repe")
    sae = _saes()[0]
    sae.save(tmp_path / "sae")
    assert json.loads((tmp_path / "sae" / "cfg.json").read_text())["metadata"]["tensors"]["W_enc"]["shape"] == [64, 48]
    assert load_sae(tmp_path / "sae").fingerprint() == sae.fingerprint()
    _corrupt(tmp_path / "sae" / "sae_weights.safetensors", lambda t: t["W_dec"].__setitem__((0, 0), 0.5))
    with pytest.raises(ValueError, match=r"sae_weights.safetensors: tensor 'W_dec' does not match the checksum"):
        load_sae(tmp_path / "sae")
    # an SAELens-format SAE without checksums still loads, but never with NaNs
    config = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    del config["metadata"]["tensors"]
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(config))
    load_sae(tmp_path / "sae")
    _corrupt(tmp_path / "sae" / "sae_weights.safetensors", lambda t: t["b_enc"].__setitem__(0, float("nan")))
    with pytest.raises(ValueError, match=r"sae_weights.safetensors: tensor 'b_enc' has 1 non-finite"):
        load_sae(tmp_path / "sae")
    for role in ("in", "out"):  # the shipped SAEs carry checksums that match
        load_sae(f"default:{role}")


# -- case 4: model identity by weights ------------------------------------------------------------------


def test_model_known_by_weights_not_by_name(tmp_path):
    dspa_map = _fit(char_triples(6))
    same = build_tiny("llama")
    same.config.saealign_model_id = "/elsewhere/tiny-llama"
    dspa_map.check_compatible(same)  # the same weights by another path
    other = build_tiny("llama", seed=1)  # same name and shapes, other weights
    assert model_fingerprint(other) != model_fingerprint(same) == dspa_map.meta.model_fingerprint
    with pytest.raises(ValueError, match=r"model: map was fitted on 'tiny-llama' \(weights \w+\), got 'tiny-llama'"):
        dspa_map.check_compatible(other)
    same.to(torch.bfloat16)
    assert model_fingerprint(build_tiny("llama").to(torch.bfloat16)) == dspa_map.meta.model_fingerprint
    RepE.from_map(dspa_map).save(tmp_path / "repe")
    with pytest.raises(ValueError, match="RepE vector was fitted on 'tiny-llama'"):
        RepE.load(tmp_path / "repe", model=other)


def test_sae_recorded_model_and_size_checked_before_work():
    model, other = build_tiny("llama"), build_tiny("llama", seed=1)
    sae_in, sae_out = _saes()
    sae_in.cfg.metadata["model_fingerprint"] = model_fingerprint(model)
    with pytest.raises(ValueError, match=r"was trained on a model \(weights \w+\), got model 'tiny-llama'"):
        fit_map(other, CharTok(), sae_in, sae_out, char_triples(4), progress=False)
    narrow = _saes(d=32)[1]
    with pytest.raises(ValueError, match=r"reads d_in=32, but model 'tiny-llama' has hidden size 64"):
        fit_map(model, CharTok(), sae_in, narrow, char_triples(4), progress=False)


def test_shipped_saes_refuse_another_model_of_the_same_width():
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=64, hidden_size=576, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=9, num_key_value_heads=3)
    impostor = AutoModelForCausalLM.from_config(cfg)
    for role in ("in", "out"):
        with pytest.raises(ValueError, match="was trained on 'smollm2-135m-instruct'"):
            load_sae(f"default:{role}").check_model(impostor)


@pytest.mark.integration
def test_shipped_saes_accept_the_default_model_by_path():
    from saealign.models import load_model, model_source

    model, _ = load_model(model_source("smollm2-135m-instruct"), device="cpu", dtype="bfloat16")
    for role in ("in", "out"):
        load_sae(f"default:{role}").check_model(model)


def test_merging_the_same_data_twice_is_refused():
    a, b = _fit(char_triples(6)), _fit(char_triples(12)[6:])
    with pytest.raises(ValueError, match=r"maps 1 and 3 were fitted on the same data .*--allow-overlap"):
        merge_maps([a, b, a])
    merged = merge_maps([a, b])
    with pytest.raises(ValueError, match="maps 1 and 2 were fitted on the same data"):
        merge_maps([merged, b])
    assert merge_maps([a, a], allow_overlap=True).count == 12


# -- case 5: options validate themselves; nothing to fit is refused early ------------------------------


def test_fit_options_validate_themselves():
    assert all(f.metadata.get("help") for f in dataclasses.fields(FitOptions))
    with pytest.raises(ValueError, match="stat must be one of density, mean; 'foo'"):
        FitOptions(stat="foo")
    for bad in ({"batch_size": 0}, {"max_length": 1}, {"sink_factor": 0.0}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be"):
            FitOptions(**bad)
    with pytest.raises(ValueError, match="no preference triples"):
        fit_map(None, None, None, None, [], progress=False)  # refused before anything is touched


def test_run_fit_refuses_bad_options_and_empty_data_before_loading_a_model(tmp_path):
    from saealign.dspa.fitting import DSPAFitConfig, run_fit

    with pytest.raises(ValueError, match="stat must be one of"):
        run_fit(DSPAFitConfig(data=DEMO, output=str(tmp_path), model="/no/such/model", stat="foo"))
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        run_fit(DSPAFitConfig(data=DEMO, output=str(tmp_path), model="/no/such/model", n=0))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no preference triples"):
        run_fit(DSPAFitConfig(data=str(tmp_path / "empty.jsonl"), output=str(tmp_path / "m"), model="/no/such/model"))


# -- the same from the command line -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smol_tokenizer):
    """A tiny llama with the real SmolLM2 tokenizer as a local model directory, plus two SAEs."""
    root = tmp_path_factory.mktemp("tiny")
    save_tiny_chat_model(root / "model", smol_tokenizer)
    for name, sae in zip(("in", "out"), _saes()):
        sae.save(root / f"sae_{name}")
    return root


def test_cli_fit_overwrite_and_merge(tiny_dir, tmp_path):
    from saealign.cli import _register, app

    _register()
    runner = CliRunner()
    out = tmp_path / "map"
    args = ["dspa", "fit", "--data", DEMO, "--n", "8", "--model", str(tiny_dir / "model"), "--sae-in",
            str(tiny_dir / "sae_in"), "--sae-out", str(tiny_dir / "sae_out"), "--output", str(out), "--batch-size", "4",
            "--max-length", "128"]
    assert runner.invoke(app, args).exit_code == 0
    res = runner.invoke(app, args + ["--stat", "mean", "--max-length", "64"])
    assert res.exit_code == 2 and "stat 'density' there, 'mean' now" in res.output, res.output
    res = runner.invoke(app, args + ["--stat", "mean", "--max-length", "64", "--overwrite"])
    assert res.exit_code == 0, res.output
    assert DSPAMap.load(out).meta.options.stat == "mean" and not (out / "partial").exists()
    res = runner.invoke(app, args + ["--stat", "foo"])
    assert res.exit_code == 2 and "--stat must be one of density, mean" in res.output, res.output
    res = runner.invoke(app, ["dspa", "merge", str(out), str(out), "--output", str(tmp_path / "double")])
    assert res.exit_code == 2 and "fitted on the same data" in res.output, res.output
    res = runner.invoke(app, ["dspa", "merge", str(out), str(out), "--output", str(tmp_path / "double"), "--allow-overlap"])
    assert res.exit_code == 0, res.output
