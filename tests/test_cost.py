"""Alignment-stage cost: the FLOP counter, the analytic model beside it, resumed totals, and what a DSPA fit records."""

import pytest
import torch

from conftest import CharTok, build_tiny, char_triples
from saealign.cost import ArchShape, CostMeter, LoraShape, combine, pass_flops
from saealign.dspa import DSPAMap, FitOptions, fit_map
from saealign.hooks import read_residuals
from test_dspa import _tiny_saes


def _loss(model, ids):
    return model(input_ids=ids).logits.float().logsumexp(-1).mean()


@pytest.mark.parametrize("arch", ["llama", "gemma2", "qwen3"])
def test_analytic_model_matches_the_counter(arch):
    """Forward with no gradient (whole model and stopped early), full fine-tuning, and LoRA: analytic == counted."""
    model = build_tiny(arch)
    ids = torch.randint(3, 500, (3, 40))
    meter = CostMeter("no grad", model)
    with torch.no_grad():
        with meter.forward(3, 40):
            model(input_ids=ids)
        with meter.forward(3, 40, layers=3, lm_head=False):
            read_residuals(model, ids, torch.ones_like(ids), [1, 2])
    cost = meter.result()
    assert cost["flops"]["forward"] > 0 and cost["flops"]["backward"] == 0
    assert cost["analytic_over_counted"] == pytest.approx(1.0, rel=0.01)
    assert cost["passes"] == 2 and cost["tokens"] == 240

    meter = CostMeter("full", model)
    with meter.forward(3, 40, grad="full"):
        loss = _loss(model, ids)
    with meter.backward():
        loss.backward()
    cost = meter.result()
    assert cost["flops"]["backward"] == pytest.approx(2 * cost["flops"]["forward"], rel=0.1)  # the counter saw a backward
    assert cost["analytic_flops"]["backward"] == pytest.approx(cost["flops"]["backward"], rel=0.02)
    assert cost["analytic_flops"]["forward"] == pytest.approx(cost["flops"]["forward"], rel=0.01)


def test_lora_backward_only_below_the_adapters():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_tiny("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                           layers_to_transform=[1, 2]))
    ids = torch.randint(3, 500, (2, 32))
    lora = LoraShape(4, [1, 2], ["q_proj", "v_proj"])
    meter = CostMeter("lora", model)
    with meter.forward(2, 32, grad="lora", lora=lora):
        loss = _loss(model, ids)
    with meter.backward():
        loss.backward()
    cost = meter.result()
    # no gradient flows into layer 0: the backward is well under a full fine-tuning's 2x
    assert cost["flops"]["backward"] < 1.5 * cost["flops"]["forward"]
    assert cost["analytic_over_counted"] == pytest.approx(1.0, rel=0.05)
    full = pass_flops(ArchShape.from_model(model), 2, 32, grad="full")
    assert cost["analytic_flops"]["backward"] < full[1]


def test_resume_and_combine_add_up():
    model = build_tiny("llama")
    ids = torch.randint(3, 500, (2, 16))
    first = CostMeter("fit", model)
    with torch.no_grad(), first.forward(2, 16):
        model(input_ids=ids)
    saved = first.result()
    resumed = CostMeter("fit", model, resume=saved)
    with torch.no_grad(), resumed.forward(2, 16):
        model(input_ids=ids)
    again = resumed.result()
    assert again["flops"]["forward"] == pytest.approx(2 * saved["flops"]["forward"])
    assert again["passes"] == 2 and again["wall_seconds"] >= saved["wall_seconds"]
    both = combine("two stages", [saved, again])
    assert both["flops"]["total"] == pytest.approx(3 * saved["flops"]["total"])
    assert both["parts"] == ["fit", "fit"] and both["peak_memory_mb"] == max(saved["peak_memory_mb"], again["peak_memory_mb"])


def test_dspa_fit_records_its_cost_in_the_map_and_snapshots(tmp_path):
    model, tok = build_tiny("llama"), CharTok()
    sae_in, sae_out = _tiny_saes()
    fitted = fit_map(model, tok, sae_in, sae_out, char_triples(10), FitOptions(batch_size=3), checkpoint_dir=tmp_path,
                     checkpoint_every=4, snapshots=[6], progress=False)
    cost = fitted.meta.cost
    assert cost["stage"] == "dspa fit" and cost["flops"]["backward"] == 0
    assert cost["flops"]["forward"] > 0 and cost["analytic_over_counted"] == pytest.approx(1.0, rel=0.01)
    snapshot = DSPAMap.load(tmp_path / "snapshot_6").meta.cost
    assert 0 < snapshot["flops"]["forward"] < cost["flops"]["forward"]
    assert DSPAMap.load(tmp_path).meta.cost == cost
