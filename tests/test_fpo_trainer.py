"""The training loop: every loss trains, FPO never loads a reference model, exact resume, accumulation, LoRA."""

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import build_tiny
from saealign.fpo import trainer as T
from saealign.fpo.losses import LOSSES
from test_fpo_support import random_pairs, tiny_sae, tiny_tokenizer

N_PAIRS = 8


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("SAEALIGN_CACHE", str(tmp_path / "cache"))


def config(tmp_path, name, **overrides):
    base = dict(output=str(tmp_path / name), device="cpu", progress=False, learning_rate=1e-3,
                per_device_train_batch_size=2, gradient_accumulation_steps=2, warmup_ratio=0.0)
    return T.TrainConfig(**{**base, **overrides})


def run(tmp_path, name, **overrides):
    return T.train(config(tmp_path, name, **overrides), model=build_tiny("llama"), tokenizer=tiny_tokenizer(),
                   pairs=random_pairs(N_PAIRS, seed=2), sae=tiny_sae())


def read_metrics(path):
    return [json.loads(line) for line in (path / T.METRICS_FILE).read_text().splitlines()]


@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_trains_logs_trl_metrics_and_saves_a_loadable_model(tmp_path, loss):
    result = run(tmp_path, loss, loss=loss, num_train_epochs=2)
    rows = read_metrics(result.output_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # 8 pairs / (2 x 2) = 2 steps per epoch, 2 epochs
    for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                 "logps/chosen", "logps/rejected", "entropy", "time/step_s", "memory/peak_mb", "learning_rate"):
        assert all(torch.isfinite(torch.tensor(r[name])) for r in rows), name
    if loss == "fpo":
        assert "fpo/mse_chosen" in rows[0] and "fpo/mse_rejected" in rows[0]
    if loss.startswith("tdpo"):
        assert "tdpo/seq_kl_rejected" in rows[0]
    # the first step compares the policy with itself: zero implicit reward margins (not for SimPO: no reference)
    if loss != "simpo":
        assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
        assert rows[-1]["rewards/margins"] != pytest.approx(0.0, abs=1e-6)

    from saealign.models import load_model

    reloaded, tok = load_model(str(result.output_dir), device="cpu")
    assert tok.pad_token_id == 0
    summary = json.loads((result.output_dir / "train_summary.json").read_text())
    assert summary["steps"] == 4 and summary["peak_memory_mb"] > 0
    ids = torch.tensor([[5, 6, 7]])
    trained_logits = reloaded(input_ids=ids).logits
    assert not torch.allclose(trained_logits, build_tiny("llama")(input_ids=ids).logits)


def test_fpo_uses_the_cache_and_never_a_reference_model(tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("FPO built a reference model")

    monkeypatch.setattr(T, "ModelReference", forbidden)
    monkeypatch.setattr(T, "copy", SimpleNamespace(deepcopy=forbidden))
    first = run(tmp_path, "a", loss="fpo", ref_cache=str(tmp_path / "ref"))
    assert first.summary["reference"] == "cache"
    assert (tmp_path / "ref" / "cache.json").exists()
    # a second run reuses it (no reference pass at all) and trains identically
    from saealign.fpo import cache as C

    monkeypatch.setattr(C, "build_reference_cache", forbidden)
    second = run(tmp_path, "b", loss="fpo", ref_cache=str(tmp_path / "ref"))
    assert [r["loss"] for r in second.metrics] == pytest.approx([r["loss"] for r in first.metrics], abs=1e-6)
    # both runs owe the method its reference pass: the reused cache brings the build cost it recorded
    assert [first.summary["ref_cache_reused"], second.summary["ref_cache_reused"]] == [False, True]
    built = first.summary["cost_by_stage"][0]
    assert built["stage"] == "fpo-reference-cache" and built["passes"] > 0
    assert second.summary["cost_by_stage"][0] == built
    assert second.summary["cost"]["flops"] == first.summary["cost"]["flops"]


def test_fpo_with_cache_equals_fpo_with_live_reference(tmp_path):
    cached = run(tmp_path, "cached", loss="fpo", reference="cache")
    live = run(tmp_path, "live", loss="fpo", reference="model")
    for a, b in zip(cached.metrics, live.metrics):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["fpo/mse_rejected"] == pytest.approx(b["fpo/mse_rejected"], abs=1e-6)


def test_resume_continues_exactly(tmp_path):
    straight = run(tmp_path, "straight", loss="fpo", num_train_epochs=2, save_steps=2)
    assert (straight.output_dir / "checkpoint-2" / "trainer_state.json").exists()
    resumed = run(tmp_path, "resumed", loss="fpo", num_train_epochs=2,
                  resume_from_checkpoint=str(straight.output_dir / "checkpoint-2"))
    assert [r["step"] for r in resumed.metrics] == [3, 4]
    for a, b in zip(straight.metrics[2:], resumed.metrics):
        for key in ("loss", "rewards/margins", "learning_rate", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key
    from transformers import AutoModelForCausalLM

    m1 = AutoModelForCausalLM.from_pretrained(straight.output_dir)
    m2 = AutoModelForCausalLM.from_pretrained(resumed.output_dir)
    for (name, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, rtol=0, atol=1e-6, msg=name)


def test_resume_latest_in_place_trims_the_log_and_refuses_a_changed_run(tmp_path):
    straight = run(tmp_path, "run", loss="dpo", num_train_epochs=2, save_steps=2)
    again = run(tmp_path, "run", loss="dpo", num_train_epochs=2, resume_from_checkpoint="latest")
    assert [r["step"] for r in read_metrics(again.output_dir)] == [1, 2, 3, 4]
    assert read_metrics(again.output_dir)[3]["loss"] == pytest.approx(straight.metrics[3]["loss"], rel=1e-6)
    with pytest.raises(ValueError, match="learning_rate"):
        run(tmp_path, "run", loss="dpo", num_train_epochs=2, resume_from_checkpoint="latest", learning_rate=5e-4)


def test_only_the_newest_checkpoints_are_kept_and_the_run_still_resumes(tmp_path):
    def steps(out):
        return sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))

    kept = run(tmp_path, "kept", loss="dpo", num_train_epochs=2, save_steps=1)  # default save_total_limit 2
    assert steps(kept.output_dir) == [2, 3]
    every = run(tmp_path, "every", loss="dpo", num_train_epochs=2, save_steps=1, save_total_limit=0)
    assert steps(every.output_dir) == [1, 2, 3]
    again = run(tmp_path, "kept", loss="dpo", num_train_epochs=2, resume_from_checkpoint="latest", save_total_limit=1)
    assert [r["step"] for r in read_metrics(again.output_dir)] == [1, 2, 3, 4]
    assert read_metrics(again.output_dir)[3]["loss"] == pytest.approx(kept.metrics[3]["loss"], rel=1e-6)


def test_gradient_accumulation_matches_a_larger_batch(tmp_path):
    big = run(tmp_path, "big", loss="fpo", per_device_train_batch_size=4, gradient_accumulation_steps=1)
    acc = run(tmp_path, "acc", loss="fpo", per_device_train_batch_size=1, gradient_accumulation_steps=4)
    assert len(big.metrics) == len(acc.metrics) == 2
    for a, b in zip(big.metrics, acc.metrics):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_lora_reference_is_the_base_model_and_the_saved_model_is_merged(tmp_path):
    result = run(tmp_path, "lora", loss="dpo", use_peft=True, lora_r=4, lora_alpha=8, num_train_epochs=2)
    assert result.metrics[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-7)  # adapters start at zero
    assert result.metrics[-1]["rewards/margins"] != pytest.approx(0.0, abs=1e-6)
    assert not (result.output_dir / "adapter_config.json").exists()
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(result.output_dir)
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_config_rejects_tdpo_with_a_cache():
    with pytest.raises(ValueError, match="TDPO"):
        T.TrainConfig(loss="tdpo2", reference="cache")
    with pytest.raises(ValueError, match="loss must be"):
        T.TrainConfig(loss="ipo")


def test_too_few_pairs_for_one_step_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="fewer than one optimizer step"):
        T.train(config(tmp_path, "x", loss="simpo", per_device_train_batch_size=4, gradient_accumulation_steps=4),
                model=build_tiny("llama"), tokenizer=tiny_tokenizer(), pairs=random_pairs(3))


@pytest.fixture
def fresh_accelerate_state():
    """accelerate allows one mixed-precision setting per process; reset it around a test that changes it."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def test_bf16_autocast_runs_and_keys_the_cache_by_precision(tmp_path, fresh_accelerate_state):
    result = run(tmp_path, "bf16", loss="fpo", mixed_precision="bf16", ref_cache=str(tmp_path / "ref16"))
    assert result.summary["mixed_precision"] == "bf16"
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.metrics)
    key = json.loads((tmp_path / "ref16" / "cache.json").read_text())["key"]
    assert key["dtype"] == "float32-bf16"
