"""DSPA from the command line on a tiny local model: fit, info, merge, generate, eval pref, and a
2-process `accelerate launch` fit that must equal the single-process map."""

import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from conftest import save_tiny_chat_model

from saealign.dspa import DSPAMap
from saealign.sae import SAE, SAEConfig

DEMO = "src/saealign/resources/demo_preferences.jsonl"


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory, smol_tokenizer):
    """A tiny llama with the real SmolLM2 tokenizer saved as a local model directory, plus two SAEs."""
    root = tmp_path_factory.mktemp("tiny")
    save_tiny_chat_model(root / "model", smol_tokenizer)
    for name, layer, m in (("in", 1, 48), ("out", 2, 40)):
        sae = SAE(SAEConfig(d_in=64, d_sae=m, architecture="topk", k=6, hook_name=f"blocks.{layer}.hook_resid_post"))
        with torch.no_grad():
            sae.W_enc.normal_()
            sae.W_dec.normal_()
            sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)
        sae.save(root / f"sae_{name}")
    return root


def _fit_args(root, out, n=24):
    return ["dspa", "fit", "--data", DEMO, "--n", str(n), "--model", str(root / "model"), "--sae-in", str(root / "sae_in"),
            "--sae-out", str(root / "sae_out"), "--output", str(out), "--batch-size", "4", "--max-length", "256"]


def _cli():
    from saealign.cli import _register, app

    _register()
    return app


def test_fit_info_merge_generate_eval(tiny_setup, tmp_path):
    runner = CliRunner()
    app = _cli()
    res = runner.invoke(app, _fit_args(tiny_setup, tmp_path / "map"))
    assert res.exit_code == 0, res.output
    m = DSPAMap.load(tmp_path / "map")
    assert m.count == 24 and m.meta.model == str(tiny_setup / "model")
    res = runner.invoke(app, ["dspa", "info", str(tmp_path / "map")])
    assert res.exit_code == 0 and "most negative" in res.output
    res = runner.invoke(app, ["dspa", "merge", str(tmp_path / "map"), str(tmp_path / "map"), "--allow-overlap",
                              "--output", str(tmp_path / "double")])
    assert res.exit_code == 0, res.output
    torch.testing.assert_close(DSPAMap.load(tmp_path / "double").matrix(), m.matrix())  # means are unchanged
    res = runner.invoke(app, ["generate", "--model", str(tiny_setup / "model"), "--method", f"dspa:{tmp_path / 'map'}",
                              "--compare", "--max-new-tokens", "5", "-p", "Hello there"])
    assert res.exit_code == 0, res.output
    assert "base:" in res.output
    res = runner.invoke(app, ["eval", "pref", "--data", DEMO, "--n", "8", "--model", str(tiny_setup / "model"),
                              "--methods", "base", "--methods", f"dspa:{tmp_path / 'map'}", "--methods", "prompt-prefix",
                              "--n-boot", "200", "--output", str(tmp_path / "eval")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "eval" / "results.md").read_text().count("|") > 10
    # `saealign report` reads what `eval pref` wrote: one row per method, the reward-accuracy column filled
    res = runner.invoke(app, ["report", str(tmp_path / "eval"), "--output", str(tmp_path / "report")])
    assert res.exit_code == 0, res.output
    table = (tmp_path / "report" / "report.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert {"base", "prompt-prefix"} <= rows.keys() and any(k.startswith("dspa") for k in rows)
    assert "pref:" in table and "reward_acc" in table
    dspa_row = next(v for k, v in rows.items() if k.startswith("dspa"))
    assert dspa_row.split("|")[2].strip() not in ("", "–")


def test_mismatched_sae_is_refused(tiny_setup, tmp_path):
    runner = CliRunner()
    app = _cli()
    assert runner.invoke(app, _fit_args(tiny_setup, tmp_path / "map", n=8)).exit_code == 0
    res = runner.invoke(app, ["generate", "--model", str(tiny_setup / "model"), "--method", f"dspa:{tmp_path / 'map'}",
                              "-p", "hi", "--max-new-tokens", "2"])
    assert res.exit_code == 0, res.output
    other = SAE(SAEConfig(d_in=64, d_sae=40, architecture="topk", k=6, hook_name="blocks.2.hook_resid_post"))
    other.save(tmp_path / "other")
    from saealign.dspa import DSPA

    with pytest.raises(ValueError, match="sae_out"):
        DSPA.load(tmp_path / "map", sae_out=str(tmp_path / "other"))


@pytest.mark.multiprocess
def test_two_process_fit_equals_single(tiny_setup, tmp_path):
    runner = CliRunner()
    assert runner.invoke(_cli(), _fit_args(tiny_setup, tmp_path / "single", n=16)).exit_code == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "saealign"] + _fit_args(tiny_setup, tmp_path / "multi", n=16)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, multi = DSPAMap.load(tmp_path / "single"), DSPAMap.load(tmp_path / "multi")
    assert multi.count == single.count == 16
    torch.testing.assert_close(multi.matrix(), single.matrix(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(multi.mean_g(), single.mean_g(), rtol=1e-5, atol=1e-7)
