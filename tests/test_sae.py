"""SAE module, loaders (SAELens, sparsify, Gemma Scope), trainer and evaluation on tiny models."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import build_tiny
from saealign.sae import SAE, SAEConfig, load_sae
from saealign.sae.evaluate import evaluate_sae, reconstruction_metrics


def _random_sae(arch="topk", d_in=16, d_sae=32, layer=1, seed=0):
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, architecture=arch, k=4 if arch == "topk" else None,
                        hook_name=f"blocks.{layer}.hook_resid_post"))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    return sae


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk"])
def test_encode_rules(arch):
    sae = _random_sae(arch)
    x = torch.randn(5, 16)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    f = sae.encode(x)
    assert (f >= 0).all()
    if arch == "standard":
        torch.testing.assert_close(f, torch.relu(pre))
    elif arch == "jumprelu":
        torch.testing.assert_close(f, torch.relu(pre) * (pre > sae.threshold))
    else:
        assert ((f > 0).sum(-1) <= 4).all()
        top = pre.topk(4, dim=-1).indices
        assert torch.equal(torch.sort(top).values, torch.sort(pre.topk(4, dim=-1).indices).values)
        torch.testing.assert_close(f.gather(-1, top), torch.relu(pre.gather(-1, top)))
    torch.testing.assert_close(sae.decode(f), f @ sae.W_dec + sae.b_dec)


def test_saelens_roundtrip_and_fingerprint(tmp_path):
    sae = _random_sae("jumprelu")
    sae.save(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post" and cfg["architecture"] == "jumprelu"
    loaded = load_sae(tmp_path / "s")
    assert loaded.fingerprint() == sae.fingerprint() and loaded.layer == 1
    x = torch.randn(3, 16)
    torch.testing.assert_close(loaded.encode(x), sae.encode(x))
    other = _random_sae("jumprelu", seed=1)
    assert other.fingerprint() != sae.fingerprint()


def test_saelens_v5_config(tmp_path):
    sae = _random_sae("topk")
    save_file({k: v.contiguous() for k, v in sae.state_dict().items()}, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({"d_in": 16, "d_sae": 32, "hook_name": "blocks.1.hook_resid_post",
                                                   "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 4},
                                                   "apply_b_dec_to_input": True}))
    loaded = load_sae(tmp_path)
    assert loaded.cfg.architecture == "topk" and loaded.cfg.k == 4


def test_gemma_scope_npz(tmp_path):
    sae = _random_sae("jumprelu", layer=5)
    folder = tmp_path / "layer_5" / "width_16k" / "average_l0_50"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **{k: v.numpy() for k, v in sae.state_dict().items()})
    loaded = load_sae(folder / "params.npz")
    assert loaded.layer == 5 and not loaded.cfg.apply_b_dec_to_input
    x = torch.randn(3, 16)
    pre = x @ sae.W_enc + sae.b_enc  # Gemma Scope does not subtract b_dec
    torch.testing.assert_close(loaded.encode(x), torch.relu(pre) * (pre > sae.threshold))


def test_sparsify_dir(tmp_path):
    sae = _random_sae("topk", layer=2)
    folder = tmp_path / "layers.2"
    folder.mkdir()
    save_file({"encoder.weight": sae.W_enc.T.contiguous(), "encoder.bias": sae.b_enc.contiguous(),
               "W_dec": sae.W_dec.contiguous(), "b_dec": sae.b_dec.contiguous()}, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"activation": "topk", "k": 4, "num_latents": 32, "d_in": 16,
                                                 "expansion_factor": 2, "normalize_decoder": True}))
    loaded = load_sae(folder)
    assert loaded.layer == 2
    x = torch.randn(3, 16)
    torch.testing.assert_close(loaded.encode(x), sae.encode(x))


def test_bad_inputs_named(tmp_path):
    sae = _random_sae("topk")
    sae.save(tmp_path / "s")
    state = {k: v for k, v in sae.state_dict().items() if k != "b_enc"}
    save_file(state, str(tmp_path / "s" / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match="missing tensor 'b_enc'"):
        load_sae(tmp_path / "s")
    with pytest.raises(ValueError, match="not an SAE directory"):
        load_sae(tmp_path)
    with pytest.raises(ValueError, match="unsupported hook name"):
        SAEConfig(d_in=4, d_sae=8, k=2, hook_name="blocks.1.attn.hook_z")


def test_trainer_learns_and_resumes(tmp_path, monkeypatch):
    """Train a TopK SAE on a tiny model's layer-1 activations; FVU must drop well below 1."""
    from saealign.activations import ActivationCache, tokenize_texts
    from saealign.sae.train import SAETrainConfig, _Trainer

    model = build_tiny("llama")
    torch.manual_seed(0)
    seqs = [torch.randint(3, 500, (int(n),)).tolist() for n in torch.randint(20, 60, (200,))]
    cache = ActivationCache(tmp_path / "acts", [1], 64)
    stats = cache.fill(model, seqs, batch_tokens=2048)
    assert cache.rows == stats.tokens_kept and stats.tokens_kept < stats.tokens_seen  # first tokens excluded
    cfg = SAETrainConfig(layers=[1], d_sae=128, k=8, batch_size=256, epochs=6, checkpoint_every=10, val_fraction=0.1)
    trainer = _Trainer(cfg, cache, 1, tmp_path, "tiny", torch.device("cpu"))
    sae = trainer.train()
    metrics = reconstruction_metrics(sae, trainer.validation())
    assert metrics["fvu"] < 0.5 and metrics["l0"] <= 8
    # resume: a fresh trainer picks up the last checkpoint instead of starting over
    again = _Trainer(cfg, cache, 1, tmp_path, "tiny", torch.device("cpu"))
    assert again.step == (trainer.step // 10) * 10 and again.step > 0
    saved = torch.load(tmp_path / "checkpoint.pt")["seconds"]
    assert saved > 0 and again.seconds() >= saved  # a resumed run counts the earlier runs' training time
    # the exported SAE encodes raw (unscaled) activations
    x = trainer.validation()[:50]
    assert torch.allclose(sae.decode(sae.encode(x)).norm(dim=-1), x.norm(dim=-1), rtol=0.5)


def test_evaluate_sae_splice(tmp_path):
    model = build_tiny("llama")

    class Tok:
        pad_token_id = 0

        def __call__(self, texts, **kw):
            return {"input_ids": [[3 + (ord(c) % 400) for c in t] for t in texts]}

    identity_like = _random_sae("topk", d_in=64, d_sae=64, layer=1)
    texts = ["hello world, this is a test " * 3, "another sentence for the SAE evaluation"]
    res = evaluate_sae(identity_like, model, Tok(), texts, progress=False)
    assert res.tokens > 0 and res.excluded_tokens >= len(texts)
    assert res.loss_spliced != res.loss_clean and res.fvu > 0
    estimates = res.estimates()  # the result record's metrics: pooled figures, no interval
    assert estimates["loss_increase"].value == pytest.approx(res.loss_increase) and estimates["fvu"].ci95 is None
    assert "loss_zero_ablated" not in estimates and estimates["l0"].n == res.tokens


def test_shipped_saes_are_recorded_as_default_and_found_by_an_old_path(tmp_path):
    from saealign.sae.core import DEFAULT_SAES, default_sae_dir

    shipped = load_sae("default:in")
    assert shipped.describe()["source"] == "default:in"  # artifacts name it portably, not by this install's path
    elsewhere = tmp_path / "gone" / "saealign" / "resources" / "saes" / DEFAULT_SAES["in"]  # a removed install
    again = load_sae(str(elsewhere))
    assert again.fingerprint() == shipped.fingerprint() and again.describe()["source"] == "default:in"
    with pytest.raises(FileNotFoundError, match="SAE not found"):
        load_sae(str(tmp_path / "saes" / "not-shipped"))
    assert default_sae_dir("out").exists()
