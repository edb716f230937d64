"""MT-Bench (FastChat `llm_judge` conventions): two-turn answers, single-answer grading 1-10 by a judge.

Files follow FastChat so its tooling reads them: answers in `model_answer/<model>.jsonl`
(`{question_id, answer_id, model_id, choices: [{index, turns}], tstamp}`, one choice per seed),
judgments in `model_judgment/<judge>_single.jsonl`
(`{question_id, model, judge: [judge, prompt name], user_prompt, judgment, score, turn, tstamp}`,
with `choice` and `category` added). Judge prompts come from FastChat's `judge_prompts.jsonl`;
math, reasoning and coding are graded against the reference answers (`single-math-v1*`).

Ratings are parsed like FastChat (`[[x]]`, then `[x]`); we also reject ratings outside 1-10. A
judgment without a usable rating is retried once: the judge sees its own judgment and is asked for
the rating alone (a greedy judge would repeat itself if simply asked again). A rating still missing
is recorded as -1 (FastChat's marker), counted and reported, and never averaged in as a score.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import uuid
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from tqdm.auto import tqdm

from saealign._io import require_file, safe_name, start_run
from saealign.data import read_records, select_subset
from saealign.runtime.generation import Sampling, generate_chat
from saealign.eval.judged import JudgedBenchmarkConfig
from saealign.eval.judges import CHAT, CONTINUATIONS, Judge, check_judge_config
from saealign.results import ResultRecord, write_results
from saealign.stats import Estimate, mean_estimate
from saealign.steering import default_name, load_policy, policy_cost

log = logging.getLogger(__name__)

# FastChat `common.py`: sampling temperature per category, and the categories graded against references.
TEMPERATURE_BY_CATEGORY = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                           "reasoning": 0.0, "stem": 0.1, "humanities": 0.1, "arena-hard-200": 0.0}
NEED_REF_CATS = ("math", "reasoning", "coding", "arena-hard-200")
MISSING = -1
RATING_PREFIX = "Rating: [["  # how FastChat's judge prompts ask the verdict to be written
RATINGS = tuple(range(1, 11))
GENERATION_FIELDS = ("model", "intervention", "name", "temperature", "max_new_tokens")  # what answers depend on

_RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_RATING_FALLBACK = re.compile(r"\[(\d+\.?\d*)\]")
REPAIR_PROMPT = ('Your evaluation did not end with a valid rating. Reply with only the rating of the response '
                 'on a scale of 1 to 10, strictly in this format: "[[rating]]", for example: "Rating: [[5]]".')


def parse_rating(judgment: str | None) -> float | None:
    """The 1-10 rating in a judgment: the first `[[x]]`, else the first `[x]`; None when absent or out of range."""
    if not judgment:
        return None
    match = _RATING.search(judgment) or _RATING_FALLBACK.search(judgment)
    if match is None:
        return None
    value = float(match.group(1))
    return value if 1 <= value <= 10 else None


def _read_jsonl(path: Path, required: Sequence[str]) -> list[dict[str, Any]]:
    records = []
    for lineno, record in read_records(path):
        missing = [k for k in required if k not in record]
        if missing:
            raise ValueError(f"{path}:{lineno}: missing field(s) {missing}")
        records.append(record)
    return records


def load_questions(path: str | Path, categories: Sequence[str] = (), limit: int | None = None,
                   subset_seed: int = 0) -> list[dict[str, Any]]:
    """FastChat `question.jsonl`, optionally restricted to `categories` and a seeded subset of `limit`."""
    path = require_file(path, "MT-Bench questions")
    questions = _read_jsonl(path, ("question_id", "category", "turns"))
    for q in questions:
        if not isinstance(q["turns"], list) or len(q["turns"]) != 2:
            raise ValueError(f"{path}: question {q['question_id']}: expected 2 turns, got {q['turns']!r:.80}")
    if categories:
        unknown = set(categories) - {q["category"] for q in questions}
        if unknown:
            raise ValueError(f"{path}: no questions in categories {sorted(unknown)}")
        questions = [q for q in questions if q["category"] in categories]
    return select_subset(questions, limit, subset_seed)


def load_judge_prompts(path: str | Path) -> dict[str, dict[str, Any]]:
    path = require_file(path, "judge prompts")
    return {p["name"]: p for p in _read_jsonl(path, ("name", "system_prompt", "prompt_template", "output_format"))}


def load_reference_answers(path: str | Path) -> dict[int, list[str]]:
    """`{question_id: [turn-1 answer, turn-2 answer]}` from a FastChat answer file (first choice)."""
    path = require_file(path, "reference answers")
    return {r["question_id"]: r["choices"][0]["turns"] for r in _read_jsonl(path, ("question_id", "choices"))}


def read_answers(path: str | Path) -> dict[int, dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return {}
    return {r["question_id"]: r for r in _read_jsonl(path, ("question_id", "choices"))}


def write_jsonl(path: str | Path, records: Sequence[dict[str, Any]]) -> None:
    from saealign._io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def generate_answers(model, tokenizer, questions: Sequence[dict[str, Any]], *, model_name: str,
                     seeds: Sequence[int] = (0,), max_new_tokens: int = 1024, batch_size: int = 8,
                     intervention=None, temperature: float | None = None,
                     progress: bool = True) -> list[dict[str, Any]]:
    """Two-turn answers, batched over questions that share a temperature (FastChat's per-category
    temperatures unless `temperature` overrides them). One choice per seed; greedy categories are
    decoded once and the choice repeated, since every seed would give the same text."""
    if not seeds:
        raise ValueError("at least one seed is needed")
    groups: dict[float, list[dict[str, Any]]] = defaultdict(list)
    for q in questions:
        temp = temperature if temperature is not None else TEMPERATURE_BY_CATEGORY.get(q["category"], 0.7)
        groups[temp].append(q)
    turns: dict[int, list[list[str]]] = {q["question_id"]: [] for q in questions}
    for temp, group in sorted(groups.items()):
        for index, seed in enumerate(seeds):
            if temp == 0 and index > 0:
                for q in group:
                    turns[q["question_id"]].append(list(turns[q["question_id"]][0]))
                continue
            sampling = Sampling(temperature=temp, max_new_tokens=max_new_tokens)
            first = generate_chat(model, tokenizer, [[{"role": "user", "content": q["turns"][0]}] for q in group],
                                  sampling, seed=seed * 1000 + 1, batch_size=batch_size, intervention=intervention,
                                  progress=progress, desc=f"mt-bench t={temp} seed {seed} turn 1")
            second = generate_chat(
                model, tokenizer,
                [[{"role": "user", "content": q["turns"][0]}, {"role": "assistant", "content": a1},
                  {"role": "user", "content": q["turns"][1]}] for q, a1 in zip(group, first)],
                sampling, seed=seed * 1000 + 2, batch_size=batch_size, intervention=intervention, progress=progress,
                desc=f"mt-bench t={temp} seed {seed} turn 2")
            for q, a1, a2 in zip(group, first, second):
                turns[q["question_id"]].append([a1, a2])
    return [{"question_id": q["question_id"], "answer_id": uuid.uuid4().hex[:22], "model_id": model_name,
             "choices": [{"index": i, "turns": t, "seed": s}
                         for i, (t, s) in enumerate(zip(turns[q["question_id"]], seeds))],
             "tstamp": time.time()} for q in questions]


def judge_prompt_name(category: str, turn: int) -> str:
    name = "single-math-v1" if category in NEED_REF_CATS else "single-v1"
    return name + ("-multi-turn" if turn == 2 else "")


def build_judge_prompt(template: dict[str, Any], question: dict[str, Any], answer_turns: Sequence[str], turn: int,
                       reference: Sequence[str] | None) -> str:
    fields: dict[str, str] = {}
    if reference is not None:
        fields["ref_answer_1"] = reference[0]
        if turn == 2:
            fields["ref_answer_2"] = reference[1]
    if turn == 1:
        fields.update(question=question["turns"][0], answer=answer_turns[0])
    else:
        fields.update(question_1=question["turns"][0], question_2=question["turns"][1],
                      answer_1=answer_turns[0], answer_2=answer_turns[1])
    try:
        return template["prompt_template"].format(**fields)
    except KeyError as err:
        raise ValueError(f"judge prompt {template['name']!r} needs field {err} (reference answers missing?)") from err


def judge_answers(questions: Sequence[dict[str, Any]], answers: dict[int, dict[str, Any]], judge: Judge,
                  judge_prompts: dict[str, dict[str, Any]], references: dict[int, list[str]], *,
                  max_tokens: int = 2048, progress: bool = True, mode: str = "generate") -> list[dict[str, Any]]:
    """Grade both turns of every choice; returns FastChat judgment records (score -1 = missing).
    `mode`: 'generate' (FastChat: the judgment text, parsed for [[rating]]) or 'likelihood' (see
    `_likelihood_judgments`)."""
    if mode == "generate" and not judge.supports(CHAT):
        raise ValueError(f"judge {judge.name!r} cannot generate judgments; MT-Bench needs a chat judge")
    tasks = []
    for q in questions:
        qid = q["question_id"]
        if qid not in answers:
            raise ValueError(f"no answer for question {qid}")
        reference = None
        if q["category"] in NEED_REF_CATS:
            if qid not in references:
                raise ValueError(f"question {qid} ({q['category']}) needs a reference answer; "
                                 "none in the reference file")
            reference = references[qid]
        for choice in answers[qid]["choices"]:
            for turn in (1, 2):
                name = judge_prompt_name(q["category"], turn)
                if name not in judge_prompts:
                    raise ValueError(f"judge prompt {name!r} missing from the judge prompts file")
                template = judge_prompts[name]
                user_prompt = build_judge_prompt(template, q, choice["turns"], turn, reference)
                tasks.append({"question": q, "choice": choice["index"], "turn": turn, "prompt_name": name,
                              "user_prompt": user_prompt,
                              "conversation": [{"role": "system", "content": template["system_prompt"]},
                                               {"role": "user", "content": user_prompt}]})
    if mode == "likelihood":
        return _likelihood_judgments(tasks, answers, judge, progress)
    if mode != "generate":
        raise ValueError(f"judge mode must be 'generate' or 'likelihood', got {mode!r}")
    texts = judge.chat([t["conversation"] for t in tasks], max_tokens=max_tokens, progress=progress)
    retry = [i for i, text in enumerate(texts) if parse_rating(text) is None]
    first_texts = list(texts)
    if retry:
        log.info("retrying %d of %d judgments without a usable rating", len(retry), len(tasks))
        conversations = [tasks[i]["conversation"] if texts[i] is None else
                         [*tasks[i]["conversation"], {"role": "assistant", "content": texts[i]},
                          {"role": "user", "content": REPAIR_PROMPT}] for i in retry]
        for i, text in zip(retry, judge.chat(conversations, max_tokens=max_tokens, progress=progress)):
            texts[i] = text
    records, retried = [], set(retry)
    for i, (task, text) in enumerate(zip(tasks, texts)):
        rating = parse_rating(text)
        record = _judgment_record(task, answers, judge, text or "", MISSING if rating is None else rating)
        if i in retried:
            record["first_judgment"] = first_texts[i] or ""
        records.append(record)
    return records


def _judgment_record(task: dict[str, Any], answers: dict[int, dict[str, Any]], judge: Judge, text: str,
                     score: float) -> dict[str, Any]:
    """One FastChat `model_judgment` record."""
    qid = task["question"]["question_id"]
    return {"question_id": qid, "model": answers[qid]["model_id"], "judge": [judge.name, task["prompt_name"]],
            "user_prompt": task["user_prompt"], "judgment": text, "score": score, "turn": task["turn"],
            "tstamp": time.time(), "choice": task["choice"], "category": task["question"]["category"]}


def _likelihood_judgments(tasks: list[dict[str, Any]], answers: dict[int, dict[str, Any]], judge: Judge,
                          progress: bool) -> list[dict[str, Any]]:
    """Ratings read off the judge's likelihoods: its reply is taken to begin with FastChat's 'Rating: [[' and
    the rating is the most likely of '1]]' .. '10]]' after it. Never missing, so usable with small local
    judges that do not keep to the format; the distribution over the ten ratings is kept in each record."""
    if not judge.supports(CONTINUATIONS):
        raise ValueError(f"judge {judge.name!r} cannot score continuations; use judge mode 'generate'")
    rows = judge.continuation_logprobs([t["conversation"] for t in tasks], RATING_PREFIX,
                                       [f"{r}]]" for r in RATINGS], progress=progress)
    records = []
    for task, row in zip(tasks, rows, strict=True):
        if row is None:
            records.append(_judgment_record(task, answers, judge, "", MISSING))
            continue
        top = max(row)
        weights = [math.exp(v - top) for v in row]
        probs = [w / sum(weights) for w in weights]
        rating = RATINGS[max(range(len(RATINGS)), key=row.__getitem__)]
        record = _judgment_record(task, answers, judge, f"{RATING_PREFIX}{rating}]]", rating)
        record["rating_probs"] = {str(r): round(p, 6) for r, p in zip(RATINGS, probs)}
        record["expected_rating"] = sum(r * p for r, p in zip(RATINGS, probs))
        records.append(record)
    return records


def summarize(judgments: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Scores per turn, per category and overall (missing ratings dropped, as FastChat's `show_result`).

    Means are over all valid judgments (FastChat's numbers); intervals and standard errors treat the
    question as the unit (`stats.mean_estimate` with the question as the unit: its turns and seeds
    are resampled together).
    """
    valid = [j for j in judgments if j["score"] != MISSING]

    def stat(rows: Sequence[dict[str, Any]]) -> Estimate:
        return mean_estimate([r["score"] for r in rows], units=[r["question_id"] for r in rows])

    metrics = {"score": stat(valid), "turn1": stat([j for j in valid if j["turn"] == 1]),
               "turn2": stat([j for j in valid if j["turn"] == 2])}
    for category in sorted({j["category"] for j in judgments}):
        rows = [j for j in valid if j["category"] == category]
        metrics[f"category/{category}"] = stat(rows)
        for turn in (1, 2):
            metrics[f"category/{category}/turn{turn}"] = stat([r for r in rows if r["turn"] == turn])
    by_choice = {}
    for choice in sorted({j["choice"] for j in judgments}):
        rows = [j for j in valid if j["choice"] == choice]
        by_choice[str(choice)] = sum(r["score"] for r in rows) / len(rows) if rows else None
    return {"metrics": metrics, "n_judgments": len(judgments), "n_missing": len(judgments) - len(valid),
            "n_retried": sum("first_judgment" in j for j in judgments), "score_by_choice": by_choice}


@dataclass
class MTBenchConfig(JudgedBenchmarkConfig):
    """`saealign eval mt-bench`: FastChat's two-turn questions, single-answer grading by a judge."""

    data: Path | None = field(default=None, metadata={
        "help": "FastChat mt_bench folder: question.jsonl, reference_answer/gpt-4.jsonl, "
                "judge_prompts.jsonl (here or one level up)."})
    categories: list[str] = field(default_factory=list, metadata={
        "help": "Evaluate only these question categories (repeat the flag; default: all)."})
    temperature: float | None = field(default=None, metadata={
        "help": "Sampling temperature of every answer (default: FastChat's per-category temperatures; 0: greedy).",
        "ge": 0})
    judge_max_tokens: int = field(default=2048, metadata={
        "help": "Most tokens of one judgment in generate mode (FastChat uses 2048; local CPU judges want less).",
        "ge": 1})
    judge_mode: Literal["generate", "likelihood"] = field(default="generate", metadata={
        "help": "generate: FastChat's judgment text, parsed for [[rating]]; likelihood: the most likely of the "
                "ratings 1..10 after 'Rating: [[' (local judges; never missing)."})
    judge_prompts: Path | None = field(default=None, metadata={
        "help": "FastChat judge_prompts.jsonl (default: DATA/judge_prompts.jsonl, else DATA/../judge_prompts.jsonl)."})
    reference_answers: Path | None = field(default=None, metadata={
        "help": "Reference answers for the math, reasoning and coding questions "
                "(default: DATA/reference_answer/gpt-4.jsonl)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_judge_config(self, CONTINUATIONS if self.judge_mode == "likelihood" else CHAT)

    def paths(self) -> dict[str, Path]:
        if self.data is None or self.output is None:
            raise ValueError("data and output are required")
        data = Path(self.data)
        prompts = self.judge_prompts
        if prompts is None:
            candidates = (data / "judge_prompts.jsonl", data.parent / "judge_prompts.jsonl")  # ours, FastChat's
            prompts = next((p for p in candidates if p.exists()), candidates[0])
        return {"questions": data / "question.jsonl", "judge_prompts": Path(prompts),
                "reference_answers": Path(self.reference_answers or data / "reference_answer" / "gpt-4.jsonl"),
                "judge_cache": Path(self.judge_cache or Path(self.output) / "judge_cache.sqlite")}


def run_mt_bench(cfg: MTBenchConfig, model=None, tokenizer=None, intervention=None,
                 judge: Judge | None = None) -> ResultRecord | dict[str, Any]:
    """Generate (resuming from an existing answer file), judge (resuming from the cache), summarise.
    Writes `config.json`, the FastChat files and `results.json` under `cfg.output`; a rerun with other
    generation settings in the same `output` is refused (see `saealign.eval.start_run`). With
    `skip_judge`, returns only where the answers are."""
    from saealign.eval.judges import judge_of

    paths = cfg.paths()
    out = Path(cfg.output)
    start_run(out, asdict(cfg), GENERATION_FIELDS)
    questions = load_questions(paths["questions"], cfg.categories, cfg.n, cfg.subset_seed)
    model, tokenizer, intervention = load_policy(cfg, model, tokenizer, intervention)
    name = default_name(cfg, model, intervention)
    answer_path = out / "model_answer" / f"{safe_name(name)}.jsonl"
    answers = read_answers(answer_path)
    todo = [q for q in questions if len(answers.get(q["question_id"], {}).get("choices", [])) != len(cfg.seeds)]
    todo.sort(key=lambda q: (TEMPERATURE_BY_CATEGORY.get(q["category"], 0.7), q["question_id"]))
    timings: dict[str, float] = {}
    start = time.perf_counter()
    chunk = 4 * cfg.batch_size  # answers are saved after every chunk, so an interrupted run resumes
    with tqdm(total=len(todo), desc="mt-bench answers", disable=not cfg.progress or not todo) as bar:
        for begin in range(0, len(todo), chunk):
            part = todo[begin:begin + chunk]
            fresh = generate_answers(model, tokenizer, part, model_name=name, seeds=cfg.seeds,
                                     max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                                     intervention=intervention, temperature=cfg.temperature, progress=False)
            answers.update({a["question_id"]: a for a in fresh})
            write_jsonl(answer_path, sorted(answers.values(), key=lambda a: a["question_id"]))
            bar.update(len(part))
    if todo:
        timings["generate_s"] = time.perf_counter() - start
    log.info("answers: %d questions (%d generated now) in %s", len(questions), len(todo), answer_path)
    if cfg.skip_judge:
        return {"answers": str(answer_path), "timings": timings}

    if judge is None:
        judge = judge_of(cfg, paths["judge_cache"], policy=(model, tokenizer))
    prompts = load_judge_prompts(paths["judge_prompts"])
    needs_ref = any(q["category"] in NEED_REF_CATS for q in questions)
    references = load_reference_answers(paths["reference_answers"]) if needs_ref else {}
    start = time.perf_counter()
    judgments = judge_answers(questions, answers, judge, prompts, references, max_tokens=cfg.judge_max_tokens,
                              progress=cfg.progress, mode=cfg.judge_mode)
    timings["judge_s"] = time.perf_counter() - start
    if judgments and all(j["score"] == MISSING for j in judgments):
        log.warning("the judge gave no usable rating at all (%d judgments)", len(judgments))
    judgment_path = out / "model_judgment" / f"{safe_name(judge.name)}_single.jsonl"
    write_jsonl(judgment_path, judgments)
    summary = summarize(judgments)
    data = {"questions": str(paths["questions"]), "n": len(questions), "categories": cfg.categories,
            "subset_seed": cfg.subset_seed, "seeds": cfg.seeds}
    record = ResultRecord("mt-bench", name, summary.pop("metrics"), ["score", "turn1", "turn2"], asdict(cfg), data=data,
                          details={"judge": judge.name, "answers": str(answer_path), "judgments": str(judgment_path),
                                   "timings": timings, "alignment_cost": policy_cost(cfg), **summary})
    write_results(out / "results.json", [record])
    return record
