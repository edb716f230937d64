"""AlpacaEval: template, both-order pairwise judging, win rate, the offline LC GLM on synthetic data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from saealign.eval.alpaca_eval import (AlpacaEvalConfig, judge_pairs, length_controlled_win_rate, load_outputs,
                                       load_template, parse_label, render_template, run_alpaca_eval, win_rate)
from saealign.eval.judges import HFJudge, RewardModelJudge
from saealign.results import read_results
from test_judges import LABELS, Replay, reward_model_dir, tiny_chat  # noqa: F401  (reward_model_dir is a fixture)

FIXTURES = Path(__file__).parent / "fixtures" / "judge"


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


# ---------------------------------------------------------------- win rates


def test_win_rate_follows_alpaca_eval():
    prefs = [2.0, 1.0, 1.5, 1.75, 1.2]
    got = win_rate(prefs)
    p = np.array(prefs) - 1
    assert got["win_rate"] == pytest.approx(p.mean() * 100)
    assert got["standard_error"] == pytest.approx(p.std(ddof=1) / math.sqrt(5) * 100)
    assert (got["n_wins"], got["n_wins_base"], got["n_draws"], got["n_total"]) == (2, 2, 1, 5)
    assert got["discrete_win_rate"] == pytest.approx(50.0)
    with pytest.raises(ValueError):
        win_rate([0.5])


def _synthetic(rng, n, intercept, length_coef, mean_delta):
    """Model outputs `mean_delta` characters longer on average; the judge's log-odds rise with length."""
    len_ref = rng.integers(200, 1500, n)
    len_model = np.maximum(1, len_ref + rng.normal(mean_delta, 400, n)).astype(int)
    delta = len_model - len_ref
    true_p = _sigmoid(intercept + length_coef * np.tanh(delta / delta.std(ddof=1)))
    return true_p, len_model, len_ref


def test_lc_recovers_the_known_length_effect_exactly_on_soft_labels():
    rng = np.random.default_rng(0)
    true_p, len_model, len_ref = _synthetic(rng, 600, intercept=-0.8, length_coef=1.5, mean_delta=300)
    lc = length_controlled_win_rate(true_p, len_model, len_ref)
    assert lc["glm_intercept"] == pytest.approx(-0.8, abs=1e-3)
    assert lc["glm_length_coef"] == pytest.approx(1.5, abs=1e-3)
    assert lc["length_controlled_winrate"] == pytest.approx(_sigmoid(-0.8) * 100, abs=0.05)
    assert true_p.mean() * 100 > lc["length_controlled_winrate"] + 10  # the raw rate is inflated by length


def test_lc_interval_covers_the_truth_on_hard_labels():
    """Bernoulli verdicts drawn from a known GLM: the raw win rate is biased, the LC estimate is not, and its
    95% interval covers the truth about 95% of the time."""
    rng = np.random.default_rng(1)
    truth = _sigmoid(0.4) * 100
    covered, estimates, raw = 0, [], []
    for _ in range(200):
        true_p, len_model, len_ref = _synthetic(rng, 400, intercept=0.4, length_coef=-1.2, mean_delta=-350)
        y = (rng.random(400) < true_p).astype(float)
        lc = length_controlled_win_rate(y, len_model, len_ref)
        estimates.append(lc["length_controlled_winrate"])
        raw.append(y.mean() * 100)
        covered += abs(lc["length_controlled_winrate"] - truth) <= 1.96 * lc["lc_standard_error"]
    assert abs(np.mean(estimates) - truth) < 1.0
    assert np.mean(raw) > truth + 10  # shorter outputs win here: the raw rate overstates the model
    assert 0.90 <= covered / 200 <= 0.99


def test_lc_without_length_effect_matches_raw_rate():
    rng = np.random.default_rng(2)
    _, len_model, len_ref = _synthetic(rng, 500, 0, 0, 0)
    y = rng.random(500) < 0.3
    lc = length_controlled_win_rate(y.astype(float), len_model, len_ref)
    assert lc["length_controlled_winrate"] == pytest.approx(y.mean() * 100, abs=2.0)
    assert lc["lc_standard_error"] == pytest.approx(win_rate(1 + y.astype(float))["standard_error"], rel=0.1)


def test_lc_clusters_seeds_of_one_instruction():
    rng = np.random.default_rng(3)
    true_p, len_model, len_ref = _synthetic(rng, 300, 0.2, 1.0, 200)
    y = (rng.random(300) < true_p).astype(float)
    single = length_controlled_win_rate(y, len_model, len_ref)
    tripled = [np.tile(a, 3) for a in (y, len_model, len_ref)]
    clustered = length_controlled_win_rate(*tripled, clusters=np.tile(np.arange(300), 3))
    naive = length_controlled_win_rate(*tripled)
    assert clustered["length_controlled_winrate"] == pytest.approx(single["length_controlled_winrate"], abs=0.01)
    assert clustered["lc_standard_error"] == pytest.approx(single["lc_standard_error"], rel=0.01)
    assert naive["lc_standard_error"] == pytest.approx(single["lc_standard_error"] / math.sqrt(3), rel=0.02)


def test_lc_stays_finite_on_separable_data():
    lc = length_controlled_win_rate([1.0] * 20, list(range(100, 120)), [50] * 20)
    assert 99 < lc["length_controlled_winrate"] <= 100 and math.isfinite(lc["glm_intercept"])


# ---------------------------------------------------------------- template and parsing


@pytest.fixture(scope="module")
def template_path(shared_data):
    return shared_data / "alpaca-eval" / "evaluator_prompts" / "alpaca_eval_clf_gpt4_turbo" / "alpaca_eval_clf.txt"


def test_template_parses_chat_turns_and_keeps_literal_braces(template_path, tmp_path):
    template = load_template(template_path)
    assert [m["role"] for m in template] == ["system", "user"]
    conv = render_template(template, instruction="Say {hi}", output_1="ONE", output_2="TWO")
    user = conv[1]["content"]
    assert '"""Say {hi}"""' in user and '"""ONE"""' in user and '"""TWO"""' in user
    assert user.index("ONE") < user.index("TWO") and '"model_identifier": "m"' in user and "{output_1}" not in user
    bad = tmp_path / "bad.txt"
    bad.write_text("Compare {output_1} and {output_2}.")
    with pytest.raises(ValueError, match="instruction"):
        load_template(bad)


@pytest.mark.parametrize("record", json.loads((FIXTURES / "pairwise_texts.json").read_text()), ids=lambda r: r["name"])
def test_parse_label_on_recorded_verdicts(record):
    assert parse_label(record["text"], LABELS) == record["expected"]


# ---------------------------------------------------------------- judging


ITEMS = [("What is the capital of France?", "Paris.", "The capital of France is Paris."),
         ("Write a haiku about rain.", "Rain on the roof / a soft grey drumming / sleep comes", "rain"),
         ("Name a prime number.", "7", "Seven is prime; so are 2, 3 and 5.")]


@pytest.fixture(scope="module")
def label_judge(smol_tokenizer):
    ids = [smol_tokenizer.encode(label, add_special_tokens=False)[0] for label in LABELS]
    return HFJudge(tiny_chat(smol_tokenizer, seed=5, favour_ids=tuple(ids)), smol_tokenizer)


def test_both_orders_cancel_position_bias(label_judge, template_path):
    template = load_template(template_path)
    forward = judge_pairs(label_judge, template, ITEMS, progress=False)
    swapped = judge_pairs(label_judge, template, [(i, m, r) for i, r, m in ITEMS], progress=False)
    for f, s in zip(forward, swapped):
        assert f["p_model"] == pytest.approx(1 - s["p_model"], abs=1e-9)  # symmetric by construction
        assert set(f["per_order"]) == {"reference_first", "model_first"} and all(0 < m <= 1 for m in f["label_mass"])
    # this judge prefers the first position strongly: one order alone would be far from the average
    f = forward[0]["per_order"]
    assert abs(f["reference_first"] - f["model_first"]) > 0.2




def test_generative_pairwise_judge_with_retry(template_path):
    template = load_template(template_path)
    # item 0: model wins in both orders; item 1: reference first -> garbage, retried -> "m" (reference wins)
    judge = Replay([["M", "m", "I'm unsure", "`m`"], ["m"]])
    got = judge_pairs(judge, template, ITEMS[:2], mode="chat", progress=False)
    assert got[0]["p_model"] == 1.0
    assert got[1]["per_order"] == {"reference_first": 0.0, "model_first": 1.0} and got[1]["p_model"] == 0.5
    assert judge.calls[1][0][-1]["role"] == "user" and "m or M" in judge.calls[1][0][-1]["content"]
    judge = Replay([["M", "m", "Both", "Neither"], ["no idea", "M"]])
    got = judge_pairs(judge, template, ITEMS[:2], mode="chat", progress=False)
    assert got[1]["per_order"]["reference_first"] is None and got[1]["p_model"] == 0.0
    with pytest.raises(ValueError, match="cannot judge pairs"):
        judge_pairs(judge, template, ITEMS, mode="label_probs", progress=False)


def test_reward_model_pairwise(reward_model_dir, template_path):  # noqa: F811
    judge = RewardModelJudge(reward_model_dir)
    got = judge_pairs(judge, load_template(template_path), ITEMS, progress=False)
    for g in got:
        r_ref, r_mod = g["rewards"]
        assert g["p_model"] == pytest.approx(1 / (1 + math.exp(r_ref - r_mod)))


def test_run_files_metrics_and_cli(label_judge, smol_tokenizer, template_path, shared_data, tmp_path):
    refs = load_outputs(shared_data / "alpaca-eval" / "results" / "gpt4_1106_preview" / "model_outputs.json")
    short = [dict(r, output=r["output"][:300]) for r in refs[:40]]
    ref_path = tmp_path / "refs.json"
    ref_path.write_text(json.dumps(short))
    cfg = AlpacaEvalConfig(reference_outputs=ref_path, judge_template=template_path, output=tmp_path / "run",
                           name="tiny", seeds=[0, 1], n=3, max_new_tokens=5, judge="self", progress=False)
    result = run_alpaca_eval(cfg, model=label_judge.model, tokenizer=smol_tokenizer)
    annotations = json.loads((tmp_path / "run" / "annotations.json").read_text())
    assert len(annotations) == 6 and {a["seed"] for a in annotations} == {0, 1}
    a = annotations[0]
    assert a["generator_1"] == "gpt4_1106_preview" and a["generator_2"] == "tiny" and 1 <= a["preference"] <= 2
    for seed in (0, 1):
        outputs = json.loads((tmp_path / "run" / f"model_outputs-seed{seed}.json").read_text())
        assert len(outputs) == 3 and set(outputs[0]) == {"instruction", "output", "generator", "dataset"}
    m = result.metrics
    per_instruction = {}
    for ann in annotations:
        per_instruction.setdefault(ann["index"], []).append(ann["preference"] - 1)
    assert m["win_rate"].value == pytest.approx(100 * np.mean([np.mean(v) for v in per_instruction.values()]))
    assert m["win_rate"].n == 3  # the instruction is the unit: its two seeds are resampled together
    assert m["lc_win_rate"].value is not None and result.headline == ["win_rate", "lc_win_rate"]
    assert m["lc_win_rate"].ci95[0] <= m["lc_win_rate"].value <= m["lc_win_rate"].ci95[1]
    assert result.details["alpaca_eval"]["n_total"] == 6 and result.details["n_missing"] == 0

    from typer.testing import CliRunner

    from saealign.cli import app
    from saealign.cli import eval_gen_cmd  # noqa: F401

    model_dir = tmp_path / "model"
    label_judge.model.save_pretrained(model_dir)
    smol_tokenizer.save_pretrained(model_dir)
    out = CliRunner().invoke(app, ["eval", "alpaca-eval", "--reference-outputs", str(ref_path), "--judge-template",
                                   str(template_path), "--output", str(tmp_path / "cli"), "--model", str(model_dir),
                                   "--n", "2", "--max-new-tokens", "3", "--judge", "self", "--no-progress"])
    assert out.exit_code == 0, out.output
    assert read_results(tmp_path / "cli" / "results.json")[0].data["n"] == 2


def test_outputs_resume_from_a_partial_file(label_judge, smol_tokenizer, template_path, shared_data, tmp_path):
    refs = load_outputs(shared_data / "alpaca-eval" / "results" / "gpt4_1106_preview" / "model_outputs.json")[:3]
    ref_path = tmp_path / "refs.json"
    ref_path.write_text(json.dumps(refs))
    out = tmp_path / "run"
    out.mkdir()
    (out / "model_outputs-seed0.json").write_text(json.dumps(
        [{"instruction": refs[1]["instruction"], "output": "PRESET", "generator": "tiny", "dataset": ""}]))
    cfg = AlpacaEvalConfig(reference_outputs=ref_path, judge_template=template_path, output=out, name="tiny",
                           max_new_tokens=3, batch_size=1, skip_judge=True, progress=False)
    run_alpaca_eval(cfg, model=label_judge.model, tokenizer=smol_tokenizer)
    outputs = json.loads((out / "model_outputs-seed0.json").read_text())
    assert [o["instruction"] for o in outputs] == [r["instruction"] for r in refs]
    assert outputs[1]["output"] == "PRESET" and all(o["generator"] == "tiny" for o in outputs)
