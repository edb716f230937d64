"""MT-Bench: FastChat files and prompts, rating parsing on recorded judgments, retry/missing, scores, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from saealign.eval.mt_bench import (MISSING, MTBenchConfig, TEMPERATURE_BY_CATEGORY, build_judge_prompt,
                                    generate_answers, judge_answers, judge_prompt_name, load_judge_prompts,
                                    load_questions, load_reference_answers, parse_rating, run_mt_bench, summarize)
from saealign.results import read_results
from test_judges import Replay, tiny_chat

FIXTURES = Path(__file__).parent / "fixtures" / "judge"
RECORDED = json.loads((FIXTURES / "mt_bench_judgments.json").read_text())


@pytest.fixture(scope="module")
def mt(shared_data):
    return shared_data / "mt-bench"


@pytest.fixture(scope="module")
def model(smol_tokenizer):
    return tiny_chat(smol_tokenizer, seed=4)


@pytest.mark.parametrize("record", RECORDED, ids=lambda r: r["name"])
def test_parse_rating_on_recorded_judgments(record):
    assert parse_rating(record["text"]) == record["expected"]


def test_questions_subset_and_prompts(mt):
    questions = load_questions(mt / "question.jsonl")
    assert len(questions) == 80 and {q["category"] for q in questions} == set(TEMPERATURE_BY_CATEGORY) - {"arena-hard-200"}
    subset = load_questions(mt / "question.jsonl", limit=8, subset_seed=1)
    assert subset == load_questions(mt / "question.jsonl", limit=8, subset_seed=1)
    ids = [q["question_id"] for q in subset]
    assert ids == sorted(ids) and len({q["category"] for q in subset}) > 2  # not just the first category
    assert {q["category"] for q in load_questions(mt / "question.jsonl", categories=["math"])} == {"math"}
    with pytest.raises(ValueError, match="no questions in categories"):
        load_questions(mt / "question.jsonl", categories=["poetry"])

    prompts = load_judge_prompts(mt / "judge_prompts.jsonl")
    refs = load_reference_answers(mt / "reference_answer" / "gpt-4.jsonl")
    math_q = next(q for q in questions if q["category"] == "math")
    name = judge_prompt_name("math", 2)
    assert name == "single-math-v1-multi-turn" and judge_prompt_name("writing", 1) == "single-v1"
    text = build_judge_prompt(prompts[name], math_q, ["ANSWER-ONE", "ANSWER-TWO"], 2, refs[math_q["question_id"]])
    for part in (math_q["turns"][0], math_q["turns"][1], "ANSWER-ONE", "ANSWER-TWO", refs[math_q["question_id"]][1]):
        assert part in text
    with pytest.raises(ValueError, match="reference answers missing"):
        build_judge_prompt(prompts[name], math_q, ["a", "b"], 2, None)


def test_bad_question_file_names_the_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question_id": 1, "category": "writing", "turns": ["a", "b"]}\n{"question_id": 2, "turns": ["a"]}\n')
    with pytest.raises(ValueError, match=r"q.jsonl:2: missing field\(s\) \['category'\]"):
        load_questions(path)


QUESTIONS = [{"question_id": 1, "category": "writing", "turns": ["Write a haiku.", "Now in French."]},
             {"question_id": 2, "category": "math", "turns": ["What is 2+2?", "And 3+3?"]},
             {"question_id": 3, "category": "stem", "turns": ["What is DNA?", "Shorter please."]}]


def test_generate_answers_fastchat_format(model, smol_tokenizer):
    answers = generate_answers(model, smol_tokenizer, QUESTIONS, model_name="tiny", seeds=[0, 1], max_new_tokens=6,
                               progress=False)
    assert [a["question_id"] for a in answers] == [1, 2, 3]
    for a in answers:
        assert a["model_id"] == "tiny" and isinstance(a["answer_id"], str) and a["tstamp"] > 0
        assert [c["index"] for c in a["choices"]] == [0, 1] and [c["seed"] for c in a["choices"]] == [0, 1]
        assert all(len(c["turns"]) == 2 for c in a["choices"])
    by_id = {a["question_id"]: a["choices"] for a in answers}
    assert by_id[2][0]["turns"] == by_id[2][1]["turns"]  # math is greedy: every seed gives the same answer
    assert by_id[1][0]["turns"] != by_id[1][1]["turns"]  # writing samples at 0.7


def _text(name):
    return next(r["text"] for r in RECORDED if r["name"] == name)


def _answers():
    return {q["question_id"]: {"question_id": q["question_id"], "model_id": "m",
                               "choices": [{"index": 0, "turns": ["a1", "a2"]}]} for q in QUESTIONS[:1]}


def test_unparseable_judgment_is_retried_once_then_missing(mt):
    prompts = load_judge_prompts(mt / "judge_prompts.jsonl")
    # turn 1: clean; turn 2: garbage, then the repair answer is garbage again -> missing
    judge = Replay([[_text("clean"), _text("no_brackets")], [_text("truncated")]])
    records = judge_answers(QUESTIONS[:1], _answers(), judge, prompts, {}, progress=False)
    assert [r["score"] for r in records] == [8.0, MISSING]
    assert len(judge.calls) == 2 and len(judge.calls[1]) == 1
    repair = judge.calls[1][0]
    assert [m["role"] for m in repair] == ["system", "user", "assistant", "user"] and "[[rating]]" in repair[-1]["content"]
    assert records[1]["first_judgment"] == _text("no_brackets") and "first_judgment" not in records[0]
    assert records[0]["judge"] == ["replay", "single-v1"] and records[1]["judge"] == ["replay", "single-v1-multi-turn"]
    # the retry succeeds this time
    judge = Replay([[_text("clean"), _text("no_brackets")], [_text("fallback_single_brackets")]])
    assert [r["score"] for r in judge_answers(QUESTIONS[:1], _answers(), judge, prompts, {}, progress=False)] == [8.0, 4.0]


def test_math_needs_references(mt):
    prompts = load_judge_prompts(mt / "judge_prompts.jsonl")
    answers = {2: {"question_id": 2, "model_id": "m", "choices": [{"index": 0, "turns": ["4", "6"]}]}}
    with pytest.raises(ValueError, match="needs a reference answer"):
        judge_answers(QUESTIONS[1:2], answers, Replay([["[[5]]"]]), prompts, {}, progress=False)
    judge = Replay([["[[5]]"]])
    records = judge_answers(QUESTIONS[1:2], answers, judge, prompts, {2: ["REF-1", "REF-2"]}, progress=False)
    assert [r["judge"][1] for r in records] == ["single-math-v1", "single-math-v1-multi-turn"]
    assert "REF-1" in judge.calls[0][0][1]["content"] and "REF-2" in judge.calls[0][1][1]["content"]


def test_summary_drops_missing_and_averages_like_fastchat():
    rows = []
    for qid, cat, s1, s2 in [(1, "writing", 8, 6), (2, "writing", 4, MISSING), (3, "math", 2, 3)]:
        rows += [{"question_id": qid, "category": cat, "turn": 1, "score": s1, "choice": 0},
                 {"question_id": qid, "category": cat, "turn": 2, "score": s2, "choice": 0}]
    s = summarize(rows)
    m = s["metrics"]
    assert s["n_missing"] == 1 and s["n_judgments"] == 6
    assert m["score"].value == pytest.approx((8 + 6 + 4 + 2 + 3) / 5)
    assert m["turn1"].value == pytest.approx(14 / 3) and m["turn2"].value == pytest.approx(4.5)
    assert m["category/writing"].value == pytest.approx(6) and m["category/writing/turn2"].value == 6
    per_question = [7, 4, 2.5]  # SE over questions of their mean scores
    mean = sum(per_question) / 3
    se = (sum((x - mean) ** 2 for x in per_question) / 2 / 3) ** 0.5
    assert m["score"].se == pytest.approx(se)
    assert m["score"].n == 3 and m["score"].ci95[0] < m["score"].value < m["score"].ci95[1]  # questions resampled


def _fake_data_dir(mt, tmp_path):
    data = tmp_path / "mt_bench"
    (data / "reference_answer").mkdir(parents=True)
    (data / "question.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (data / "reference_answer" / "gpt-4.jsonl").write_text(json.dumps(
        {"question_id": 2, "choices": [{"index": 0, "turns": ["4", "6"]}]}) + "\n")
    (tmp_path / "judge_prompts.jsonl").write_text((mt / "judge_prompts.jsonl").read_text())  # FastChat layout
    return data


def test_run_writes_fastchat_files_and_resumes(mt, model, smol_tokenizer, tmp_path):
    data = _fake_data_dir(mt, tmp_path)
    cfg = MTBenchConfig(data=data, output=tmp_path / "run", max_new_tokens=4, judge="self", judge_max_tokens=6,
                        progress=False, name="tiny")
    result = run_mt_bench(cfg, model=model, tokenizer=smol_tokenizer)
    answers = (tmp_path / "run" / "model_answer" / "tiny.jsonl").read_text().splitlines()
    judgments = [json.loads(x) for x in (tmp_path / "run" / "model_judgment" / "tiny-chat-4_single.jsonl").read_text().splitlines()]
    assert len(answers) == 3 and len(judgments) == 6
    assert set(judgments[0]) >= {"question_id", "model", "judge", "user_prompt", "judgment", "score", "turn", "tstamp"}
    # a random tiny judge never writes a rating: all missing, counted, and no score invented
    assert result.details["n_missing"] == 6 and result.metrics["score"].value is None
    assert result.benchmark == "mt-bench" and result.method == "tiny" and "torch" in result.versions
    (saved,) = read_results(tmp_path / "run" / "results.json")
    assert saved.config["max_new_tokens"] == 4 and (tmp_path / "run" / "config.json").exists()

    # resume: answers are reused (same answer ids) and judgments come from the cache
    cache = tmp_path / "run" / "judge_cache.sqlite"
    before = cache.stat().st_mtime_ns
    again = run_mt_bench(cfg, model=model, tokenizer=smol_tokenizer)
    assert (tmp_path / "run" / "model_answer" / "tiny.jsonl").read_text().splitlines() == answers
    assert "generate_s" not in again.details["timings"] and cache.stat().st_mtime_ns == before
    # other generation settings must not be mixed into the same run directory
    with pytest.raises(ValueError, match=r"\['max_new_tokens'\].*new output directory"):
        run_mt_bench(MTBenchConfig(**{**cfg.__dict__, "max_new_tokens": 5}), model=model, tokenizer=smol_tokenizer)


def test_cli(mt, model, smol_tokenizer, tmp_path):
    from typer.testing import CliRunner

    from saealign.cli import app
    from saealign.cli import eval_gen_cmd  # noqa: F401

    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    smol_tokenizer.save_pretrained(model_dir)
    data = _fake_data_dir(mt, tmp_path)
    out = CliRunner().invoke(app, ["eval", "mt-bench", "--data", str(data), "--output", str(tmp_path / "cli"),
                                   "--model", str(model_dir), "--n", "2", "--max-new-tokens", "3",
                                   "--judge", "self", "--judge-max-tokens", "3", "--seeds", "0", "--seeds", "1",
                                   "--no-progress"])
    assert out.exit_code == 0, out.output
    (result,) = read_results(tmp_path / "cli" / "results.json")
    assert result.data["n"] == 2 and result.config["seeds"] == [0, 1] and result.details["n_judgments"] == 8
    missing = CliRunner().invoke(app, ["eval", "mt-bench", "--output", str(tmp_path)])
    assert missing.exit_code != 0 and "--data" in missing.output


def test_likelihood_judge_mode_rates_every_answer_by_the_most_likely_rating(mt, model, smol_tokenizer, tmp_path):
    """A random tiny judge never writes a rating, but in the likelihood mode each judgment gets the rating
    whose continuation the judge finds most likely; an independent scoring of the ten ratings agrees."""
    from saealign.eval.judges import HFJudge
    from saealign.runtime.scoring import score_requests
    from saealign.eval.mt_bench import RATING_PREFIX

    data = _fake_data_dir(mt, tmp_path)
    cfg = MTBenchConfig(data=data, output=tmp_path / "run", max_new_tokens=4, judge="self",
                        judge_mode="likelihood", progress=False, name="tiny")
    result = run_mt_bench(cfg, model=model, tokenizer=smol_tokenizer)
    judgments = [json.loads(x) for x in
                 (tmp_path / "run" / "model_judgment" / "tiny-chat-4_single.jsonl").read_text().splitlines()]
    assert result.details["n_missing"] == 0 and len(judgments) == 6 and result.metrics["score"].value is not None
    prompts = load_judge_prompts(mt / "judge_prompts.jsonl")
    renderer = HFJudge(model, smol_tokenizer)
    for j in judgments:
        conversation = [{"role": "system", "content": prompts[j["judge"][1]]["system_prompt"]},
                        {"role": "user", "content": j["user_prompt"]}]
        scores = score_requests(model, smol_tokenizer, [(renderer._render(conversation) + RATING_PREFIX, f"{r}]]")
                                                        for r in range(1, 11)])
        assert j["score"] == 1 + max(range(10), key=scores.__getitem__)
        assert j["judgment"] == f"{RATING_PREFIX}{j['score']}]]"
        assert abs(sum(j["rating_probs"].values()) - 1) < 1e-4 and 1 <= j["expected_rating"] <= 10
    with pytest.raises(ValueError, match="judge mode"):
        run_mt_bench(MTBenchConfig(**{**cfg.__dict__, "judge_mode": "vote", "output": tmp_path / "r2"}),
                     model=model, tokenizer=smol_tokenizer)
