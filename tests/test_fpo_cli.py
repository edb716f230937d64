"""`saealign fpo cache | train | eval` end to end on a tiny model saved to disk, with chat-format data."""

import json

import pytest
from typer.testing import CliRunner

import saealign.cli.fpo_cmd  # noqa: F401  (registers the fpo commands)
from conftest import build_tiny
from saealign.cli import app
from saealign.results import read_results
from test_fpo_support import tiny_sae, tiny_tokenizer

TEMPLATE = ("{% for m in messages %}{{ 't3 ' + m['content'] + ' t4 ' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ 't3 ' }}{% endif %}")


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    monkeypatch.setenv("SAEALIGN_CACHE", str(tmp_path / "cache"))
    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    build_tiny("llama").save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    tiny_sae().save(tmp_path / "sae")
    with open(tmp_path / "pairs.jsonl", "w") as fh:
        for i in range(8):
            fh.write(json.dumps({"prompt": [{"role": "user", "content": f"t{10 + i} t{30 + i}"}],
                                 "chosen": [{"role": "assistant", "content": f"t{50 + i} t{70 + i} t{90 + i}"}],
                                 "rejected": [{"role": "assistant", "content": f"t{110 + i}"}]}) + "\n")
    return tmp_path


def invoke(*args):
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def test_cache_train_eval_round_trip(workspace):
    common = ["--model", str(workspace / "base"), "--data", str(workspace / "pairs.jsonl"), "--sae",
              str(workspace / "sae"), "--device", "cpu", "--no-progress", "--ref-cache", str(workspace / "ref")]
    invoke("fpo", "cache", *common)
    meta = json.loads((workspace / "ref" / "cache.json").read_text())
    assert meta["n_pairs"] == 8 and meta["d_sae"] == 96
    out = workspace / "trained"
    invoke("fpo", "train", "--loss", "fpo", *common, "--output", str(out), "--learning-rate", "1e-3",
           "--per-device-train-batch-size", "2", "--gradient-accumulation-steps", "2")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and "fpo/mse_chosen" in rows[0]
    assert json.loads((out / "train_summary.json").read_text())["ref_cache"] == str(workspace / "ref")

    result_path = workspace / "compare.json"
    invoke("fpo", "eval", "--model", str(out), "--reference", str(workspace / "base"), "--data",
           str(workspace / "pairs.jsonl"), "--sae", str(workspace / "sae"), "--device", "cpu", "--no-progress",
           "--output", str(result_path))
    (record,) = read_results(result_path)
    metrics = record.metrics
    assert record.data["n"] == 8
    assert 0 <= metrics["pref_acc_norm"].ci95[0] <= metrics["pref_acc_norm"].value
    assert metrics["kl_to_reference"].value > 0 and metrics["feature_mse"].value > 0

    from saealign.models import load_model

    model, tok = load_model(str(out), device="cpu")
    assert tok.chat_template == TEMPLATE


def test_eval_of_the_reference_against_itself_is_zero_distance(workspace):
    result_path = workspace / "self.json"
    invoke("fpo", "eval", "--model", str(workspace / "base"), "--reference", str(workspace / "base"), "--data",
           str(workspace / "pairs.jsonl"), "--sae", str(workspace / "sae"), "--device", "cpu", "--no-progress",
           "--output", str(result_path))
    metrics = read_results(result_path)[0].metrics
    assert abs(metrics["kl_to_reference"].value) < 1e-6
    assert metrics["feature_mse"].value == 0.0
    # every pair ties (reward 0 on both responses): one half each, as in `eval pref`
    assert metrics["reward_acc"].value == 0.5 and metrics["reward_tie_rate"].value == 1.0


def test_missing_data_is_a_usage_error(workspace):
    result = CliRunner().invoke(app, ["fpo", "train", "--model", str(workspace / "base")])
    assert result.exit_code != 0
    assert "--data" in result.output
