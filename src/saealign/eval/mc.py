"""Multiple-choice accuracy by log-likelihood scoring: MMLU, ARC-Easy/Challenge, HellaSwag, TruthfulQA
MC1/MC2 and WinoGrande, base or steered.

Prompts, answer continuations and metrics follow lm-evaluation-harness 0.4.13 (`LM_EVAL_REFERENCE`), so the
base-model numbers can be checked item by item against lm-eval run on the same model
(`saealign.eval.mc_tasks.lm_eval_peer`): target delimiter " ", trailing context whitespace moved into the
continuation, the continuation's tokens taken from the encoding of context + continuation, `acc_norm`
dividing the log-likelihood by the answer's length in characters (lm-eval's `completion_len`; its byte
version is `acc_bytes`), MMLU's zero-shot "subject description + question + lettered options + Answer:"
format, WinoGrande's partial scoring (one context per option, the same continuation after the blank) and
TruthfulQA's 6-shot QA primer with MC2 = normalised probability mass on the true answers.

Scoring is `saealign.runtime.scoring.score_requests` (how an intervention meets the answer tokens is
described there).
"""

from __future__ import annotations

import csv
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np

from saealign._io import text_fingerprint
from saealign.data import read_records, select_subset, stratified_subset
from saealign.runtime.scoring import SteerPositions, score_requests
from saealign.results import ResultRecord, read_results, write_results
from saealign.stats import Estimate, mean_estimate, paired_difference
from saealign.steering import PolicyOptions, default_name, load_policy, policy_cost, system_prompt_of

log = logging.getLogger(__name__)

LM_EVAL_REFERENCE = "0.4.13"  # the lm-eval release whose task definitions these prompts follow
DEFAULT_TASKS = ("mmlu", "arc_easy", "hellaswag", "truthfulqa_mc2", "winogrande")
Subset = Literal["first", "stratified"]


# ---------------------------------------------------------------------------------------------------
# Items
# ---------------------------------------------------------------------------------------------------
@dataclass
class MCItem:
    """One question: a (context, continuation) request per choice, and what counts as right."""

    id: str
    requests: list[tuple[str, str]]
    choices: list[str]  # the answer strings whose character length `acc_norm` divides by (lm-eval)
    gold: int
    labels: list[int] | None = None  # TruthfulQA MC2: 1 for every true answer
    stratum: str | None = None


_TQA_PRIMER = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain."
)


def hellaswag_preprocess(text: str) -> str:
    """HellaSwag text cleaning as lm-eval does it: WikiHow bracket markers out, `[title]` to a full stop."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _choice_requests(context: str, choices: list[str]) -> list[tuple[str, str]]:
    return [(context, " " + choice) for choice in choices]


def _build_mmlu(doc: dict) -> MCItem:
    subject = doc["subject"].replace("_", " ")
    letters = "ABCD"
    options = "".join(f"\n{letter}. {text}" for letter, text in zip(letters, doc["choices"], strict=True))
    context = (f"The following are multiple choice questions (with answers) about {subject}.\n\n"
               f"{doc['question'].strip()}{options}\nAnswer:")
    return MCItem(doc["doc_id"], _choice_requests(context, list(letters)), list(letters), doc["answer"],
                  stratum=doc["subject"])


def _build_mmlu_continuation(doc: dict) -> MCItem:
    """lm-eval's `mmlu_continuation` (cloze): the answer texts are scored, not their letters."""
    context = (f"The following are questions (with answers) about {doc['subject'].replace('_', ' ')}.\n\n"
               f"Question: {doc['question'].strip()}\nAnswer:")
    choices = list(doc["choices"])
    return MCItem(doc["doc_id"], _choice_requests(context, choices), choices, doc["answer"], stratum=doc["subject"])


def _build_arc(doc: dict) -> MCItem:
    choices = list(doc["choices"]["text"])
    gold = list(doc["choices"]["label"]).index(doc["answerKey"])
    return MCItem(doc["doc_id"], _choice_requests(f"Question: {doc['question']}\nAnswer:", choices), choices, gold)


def _build_hellaswag(doc: dict) -> MCItem:
    context = hellaswag_preprocess(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
    choices = [hellaswag_preprocess(ending) for ending in doc["endings"]]
    return MCItem(doc["doc_id"], _choice_requests(context, choices), choices, int(doc["label"]),
                  stratum=doc["activity_label"])


def _tqa_context(doc: dict) -> str:
    return f"{_TQA_PRIMER}\n\nQ: {doc['question']}\nA:"


def _build_tqa_mc1(doc: dict) -> MCItem:
    targets = doc["mc1_targets"]
    choices = list(targets["choices"])
    return MCItem(doc["doc_id"], _choice_requests(_tqa_context(doc), choices), choices, list(targets["labels"]).index(1))


def _build_tqa_mc2(doc: dict) -> MCItem:
    targets = doc["mc2_targets"]
    choices = list(targets["choices"])
    labels = [int(v) for v in targets["labels"]]
    return MCItem(doc["doc_id"], _choice_requests(_tqa_context(doc), choices), choices, labels.index(1), labels=labels)


def _build_winogrande(doc: dict) -> MCItem:
    sentence = doc["sentence"]
    blank = sentence.index("_")
    contexts = [sentence[:blank] + doc["option1"], sentence[:blank] + doc["option2"]]
    continuation = " " + sentence[blank + 1:].strip()
    return MCItem(doc["doc_id"], [(ctx, continuation) for ctx in contexts], contexts, {"1": 0, "2": 1}[doc["answer"]])


# ---------------------------------------------------------------------------------------------------
# Loading: local files (the original releases, or JSON/JSONL in the HF schema) or HF datasets
# ---------------------------------------------------------------------------------------------------
def _norm_mmlu(rec: dict) -> dict:
    answer = rec["answer"]
    if isinstance(answer, str):
        answer = "ABCD".index(answer.strip())
    return {"question": rec["question"], "subject": rec["subject"], "choices": list(rec["choices"]), "answer": int(answer)}


def _norm_arc(rec: dict) -> dict:
    question = rec["question"]
    if isinstance(question, dict):  # the AI2 release: {"question": {"stem", "choices": [{"text", "label"}]}}
        choices = question["choices"]
        return {"id": rec["id"], "question": question["stem"], "answerKey": rec["answerKey"],
                "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]}}
    return {"id": rec["id"], "question": question, "answerKey": rec["answerKey"],
            "choices": {"text": list(rec["choices"]["text"]), "label": list(rec["choices"]["label"])}}


def _norm_hellaswag(rec: dict) -> dict:
    if "query" in rec:  # llama.cpp text export: "activity_label: ctx", without the ctx_a/ctx_b split
        activity, sep, ctx = rec["query"].partition(": ")
        if not sep:
            raise ValueError(f"HellaSwag record {rec.get('idx')}: query has no 'activity label: ' prefix")
        return {"ind": rec["idx"], "activity_label": activity, "ctx_a": ctx, "ctx_b": "",
                "endings": list(rec["endings"]), "label": str(rec["label"])}
    return {"ind": rec["ind"], "activity_label": rec["activity_label"], "ctx_a": rec["ctx_a"], "ctx_b": rec["ctx_b"],
            "endings": list(rec["endings"]), "label": str(rec["label"])}


def _norm_targets(targets: dict) -> dict:
    if isinstance(targets.get("choices"), list) and "labels" in targets:
        return {"choices": list(targets["choices"]), "labels": [int(v) for v in targets["labels"]]}
    return {"choices": list(targets), "labels": [int(v) for v in targets.values()]}  # mc_task.json: {answer: 0|1}


def _norm_tqa(rec: dict) -> dict:
    return {"question": rec["question"], "mc1_targets": _norm_targets(rec["mc1_targets"]),
            "mc2_targets": _norm_targets(rec["mc2_targets"])}


def _norm_winogrande(rec: dict) -> dict:
    return {key: rec[key] for key in ("qID", "sentence", "option1", "option2", "answer")}


@dataclass(frozen=True)
class MCTask:
    """How to load, prompt and score one benchmark."""

    name: str
    hf: tuple[str, str | None, str]  # (dataset, config, split) of the lm-eval task
    local: str  # path under a data directory laid out like shared/data
    normalise: Callable[[dict], dict]  # raw record (local release or HF) -> HF-schema doc
    build: Callable[[dict], MCItem]
    metrics: tuple[str, ...]
    headline: str
    native_id: str | None = None  # doc field that identifies an item; else its position in the set


TASKS: dict[str, MCTask] = {t.name: t for t in (
    MCTask("mmlu", ("cais/mmlu", "all", "test"), "mmlu/data/test", _norm_mmlu, _build_mmlu, ("acc",), "acc"),
    MCTask("mmlu_continuation", ("cais/mmlu", "all", "test"), "mmlu/data/test", _norm_mmlu, _build_mmlu_continuation,
           ("acc", "acc_norm"), "acc"),
    MCTask("arc_easy", ("allenai/ai2_arc", "ARC-Easy", "test"), "arc/ARC-Easy/ARC-Easy-Test.jsonl",
           _norm_arc, _build_arc, ("acc", "acc_norm"), "acc_norm", "id"),
    MCTask("arc_challenge", ("allenai/ai2_arc", "ARC-Challenge", "test"), "arc/ARC-Challenge/ARC-Challenge-Test.jsonl",
           _norm_arc, _build_arc, ("acc", "acc_norm"), "acc_norm", "id"),
    MCTask("hellaswag", ("Rowan/hellaswag", None, "validation"), "hellaswag/hellaswag_val_full.jsonl.gz",
           _norm_hellaswag, _build_hellaswag, ("acc", "acc_norm"), "acc_norm", "ind"),
    MCTask("truthfulqa_mc1", ("truthfulqa/truthful_qa", "multiple_choice", "validation"), "truthfulqa/mc_task.json",
           _norm_tqa, _build_tqa_mc1, ("acc",), "acc"),
    MCTask("truthfulqa_mc2", ("truthfulqa/truthful_qa", "multiple_choice", "validation"), "truthfulqa/mc_task.json",
           _norm_tqa, _build_tqa_mc2, ("mc2",), "mc2"),
    MCTask("winogrande", ("allenai/winogrande", "winogrande_xl", "validation"), "winogrande/winogrande_1.1/dev.jsonl",
           _norm_winogrande, _build_winogrande, ("acc",), "acc", "qID"),
)}


def get_task(name: str) -> MCTask:
    if name not in TASKS:
        raise ValueError(f"unknown multiple-choice task {name!r}; available: {', '.join(TASKS)}")
    return TASKS[name]


def _read_mmlu_csv(path: Path) -> list[dict]:
    subject = re.sub(r"_(test|val|dev)$", "", path.stem)
    rows = []
    with path.open(newline="", encoding="utf-8") as fh:
        for line, row in enumerate(csv.reader(fh), start=1):
            if len(row) != 6:
                raise ValueError(f"{path}: row {line} has {len(row)} fields, expected question,A,B,C,D,answer")
            rows.append({"question": row[0], "choices": row[1:5], "answer": row[5], "subject": subject})
    return rows


def _read_local(path: Path) -> list[dict]:
    if path.is_dir():  # the hendrycks release: one headerless CSV per subject
        files = sorted(path.glob("*.csv"))
        if not files:
            raise FileNotFoundError(f"{path}: no MMLU *.csv files in this directory")
        return [rec for f in files for rec in _read_mmlu_csv(f)]
    if not path.is_file():
        raise FileNotFoundError(f"multiple-choice data not found: {path}")
    if path.suffix == ".csv":
        return _read_mmlu_csv(path)
    records = []
    for line, record in read_records(path, strict=False):
        if isinstance(record, Exception):  # the reader's own problem, said in this module's words
            raise ValueError(f"{path}: line {line}: invalid JSON: {record}")
        records.append(record)
    return records


def _read_hf(name: str, config: str | None, split: str) -> list[dict]:
    import datasets

    return list(datasets.load_dataset(name, config, split=split))


def resolve_source(task: str, source: str | None = None, data_dir: str | Path | None = None) -> str:
    """Where a task's data comes from: `source` (a local path, or `hf:dataset[:config[:split]]`), else the
    file under `data_dir`, else the HF dataset lm-eval uses."""
    spec = get_task(task)
    if source:
        return source
    if data_dir is not None:
        return str(Path(data_dir) / spec.local)
    name, config, split = spec.hf
    return f"hf:{name}:{config or ''}:{split}"


def load_docs(task: str, source: str | None = None, data_dir: str | Path | None = None) -> list[dict]:
    """A task's documents in the HF schema lm-eval's task reads, each with a stable `doc_id`."""
    spec = get_task(task)
    where = resolve_source(task, source, data_dir)
    if where.startswith("hf:"):
        parts = where[3:].split(":")
        name = parts[0]
        config = (parts[1] or None) if len(parts) > 1 else spec.hf[1]
        split = (parts[2] or spec.hf[2]) if len(parts) > 2 else spec.hf[2]
        records = _read_hf(name, config, split)
    else:
        records = _read_local(Path(where))
    docs = []
    for index, record in enumerate(records):
        try:
            doc = spec.normalise(record)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{where}: record {index} is not a {task} item ({type(err).__name__}: {err})") from err
        doc["doc_id"] = str(doc[spec.native_id]) if spec.native_id else str(index)
        docs.append(doc)
    return docs


def select_items(items: list[MCItem], limit: int | None, subset: Subset = "stratified", seed: int = 0) -> list[MCItem]:
    """`first`: lm-eval's `--limit` (the first N); `stratified`: a seeded sample, proportional per stratum
    (MMLU subject, HellaSwag activity) where the task has strata, uniform otherwise."""
    if limit is None:
        return items
    if subset == "first":
        return items[:limit]
    if subset != "stratified":
        raise ValueError(f"subset must be 'first' or 'stratified', got {subset!r}")
    if items and items[0].stratum is not None:
        return stratified_subset(items, limit, key=lambda item: item.stratum, seed=seed)
    return select_subset(items, limit, seed)


def build_items(task: str, docs: Sequence[dict], system_prompt: str | None = None) -> list[MCItem]:
    """Prompt every document; `system_prompt` (the prompt-prefix baseline) goes in front of each context,
    joined by a blank line the way lm-eval joins a system instruction and a task description."""
    spec = get_task(task)
    items = [spec.build(doc) for doc in docs]
    if system_prompt:
        for item in items:
            item.requests = [(_join(system_prompt, ctx), cont) for ctx, cont in item.requests]
    return items


def _join(prefix: str, text: str) -> str:
    return prefix + text if prefix[-1].isspace() or text[:1].isspace() else f"{prefix}\n\n{text}"


# ---------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------
def item_metrics(task: str, item: MCItem, lls: Sequence[float]) -> dict[str, float]:
    """Per-item scores as lm-eval computes them (argmax ties go to the first choice)."""
    spec = get_task(task)
    lls = np.asarray(lls, dtype=np.float64)
    out: dict[str, float] = {}
    if "acc" in spec.metrics:
        out["acc"] = float(int(np.argmax(lls)) == item.gold)
    if "acc_norm" in spec.metrics:
        lengths = np.array([float(len(choice)) for choice in item.choices])
        out["acc_norm"] = float(int(np.argmax(lls / lengths)) == item.gold)
    if "mc2" in spec.metrics:
        probs = np.exp(lls - lls.max())
        out["mc2"] = float(probs[np.asarray(item.labels) == 1].sum() / probs.sum())
    return out


# ---------------------------------------------------------------------------------------------------
# Harness
# ---------------------------------------------------------------------------------------------------
@dataclass
class MCConfig(PolicyOptions):
    """`saealign eval mc`: multiple-choice accuracy by log-likelihood."""

    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS), metadata={
        "help": f"Tasks to evaluate (repeat the flag): {', '.join(TASKS)}."})
    output: Path | None = field(default=None, metadata={
        "help": "Directory for results.json (default: none, the result is only printed)."})
    data: Path | None = field(default=None, metadata={
        "help": "Folder laid out like shared/data (mmlu/, arc/, ...); without it, the HF datasets lm-eval uses."})
    sources: dict[str, str] = field(default_factory=dict, metadata={
        "help": 'Per-task data, JSON {"task": "path" or "hf:dataset[:config[:split]]"}; overrides --data.'})
    n: int | None = field(default=None, metadata={
        "help": "Items evaluated per task, drawn as --subset says (default: all).", "ge": 1})
    subset: Subset = field(default="stratified", metadata={
        "help": "How --n items are drawn: stratified (seeded, proportional per MMLU subject / HellaSwag "
                "activity) or first (the first n in file order)."})
    subset_seed: int = field(default=0, metadata={"help": "Seed of the stratified draw of n items."})
    batch_size: int = field(default=32, metadata={"help": "Continuations scored per forward pass.", "ge": 1})
    steer_positions: SteerPositions = field(default="generated", metadata={
        "help": "generated: answer tokens are steered as generated tokens (the first one is predicted by the "
                "unsteered prompt); scored: the last context token is steered too."})
    save_items: bool = field(default=True, metadata={
        "help": "Store per-item log-likelihoods in results.json (what --baseline needs for paired deltas)."})
    baseline: Path | None = field(default=None, metadata={
        "help": "An earlier `eval mc` results.json (with items) to report paired differences against."})

    def __post_init__(self) -> None:
        super().__post_init__()
        for task in self.tasks:
            get_task(task)
        unknown = set(self.sources) - set(TASKS)
        if unknown:
            raise ValueError(f"sources: unknown task(s) {sorted(unknown)}")


def evaluate_task(model, tokenizer, task: str, docs: Sequence[dict], *, intervention=None, batch_size: int = 32,
                  steer_positions: SteerPositions = "generated") -> dict[str, Any]:
    """Score one task's documents: aggregate metrics (`saealign.stats` estimates over items) and per-item records."""
    items = build_items(task, docs, system_prompt_of(intervention))
    requests = [request for item in items for request in item.requests]
    lls = score_requests(model, tokenizer, requests, batch_size=batch_size, intervention=intervention,
                         steer_positions=steer_positions, desc=task)
    records, start = [], 0
    for item in items:
        item_lls = lls[start: start + len(item.requests)]
        start += len(item.requests)
        records.append({"id": item.id, "gold": item.gold, "ll": item_lls, **item_metrics(task, item, item_lls),
                        **({"stratum": item.stratum} if item.stratum is not None else {})})
    spec = get_task(task)
    summary: dict[str, Any] = {"n": len(items), "metrics": {m: mean_estimate([r[m] for r in records]) for m in spec.metrics}}
    if task.startswith("mmlu"):
        by_subject: dict[str, list[float]] = {}
        for r in records:
            by_subject.setdefault(r["stratum"], []).append(r["acc"])
        summary["subjects"] = {s: {"n": len(v), "acc": float(np.mean(v))} for s, v in sorted(by_subject.items())}
    return {"summary": summary, "items": records}


def paired_deltas(items: dict[str, list[dict[str, Any]]], baseline: dict[str, list[dict[str, Any]]]) -> dict[str, Estimate]:
    """Per task and metric (`task/metric`): the paired difference to the baseline's per-item records
    over the items both scored."""
    out: dict[str, Estimate] = {}
    for task, records in items.items():
        base = {r["id"]: r for r in baseline.get(task, [])}
        common = [r for r in records if r["id"] in base]
        if not common:
            continue
        for name in get_task(task).metrics:
            out[f"{task}/{name}"] = paired_difference([r[name] for r in common], [base[r["id"]][name] for r in common])
    return out


def run_mc(cfg: MCConfig, model=None, tokenizer=None, intervention=None) -> ResultRecord:
    """Run every task of `cfg`; return the result record and write it to `cfg.output/results.json` when set."""
    model, tokenizer, intervention = load_policy(cfg, model, tokenizer, intervention)
    tasks: dict[str, Any] = {}
    items: dict[str, Any] = {}
    metrics: dict[str, Estimate] = {}
    for task in cfg.tasks:
        source = resolve_source(task, cfg.sources.get(task), cfg.data)
        all_docs = load_docs(task, cfg.sources.get(task), cfg.data)
        chosen = {item.id for item in select_items(build_items(task, all_docs), cfg.n, cfg.subset, cfg.subset_seed)}
        docs = [doc for doc in all_docs if doc["doc_id"] in chosen]
        log.info("%s: %d of %d items from %s", task, len(docs), len(all_docs), source)
        start = time.perf_counter()
        result = evaluate_task(model, tokenizer, task, docs, intervention=intervention, batch_size=cfg.batch_size,
                               steer_positions=cfg.steer_positions)
        summary = result["summary"]
        metrics.update({f"{task}/{name}": value for name, value in summary.pop("metrics").items()})
        summary.update(source=source, available=len(all_docs), data_fingerprint=text_fingerprint(docs),
                       seconds=round(time.perf_counter() - start, 2))
        tasks[task] = summary
        items[task] = result["items"]
    headline = [f"{task}/{get_task(task).headline}" for task in cfg.tasks]
    details: dict[str, Any] = {"tasks": tasks, "lm_eval_conventions": LM_EVAL_REFERENCE,
                               "system_prompt": system_prompt_of(intervention), "alignment_cost": policy_cost(cfg)}
    if cfg.save_items:
        details["items"] = items
    baseline, deltas = None, {}
    if cfg.baseline is not None:
        (base_record,) = read_results(cfg.baseline)
        if "items" not in base_record.details:
            raise ValueError(f"{cfg.baseline}: paired differences need per-item records: run the baseline with save_items")
        baseline, deltas = base_record.method, paired_deltas(items, base_record.details["items"])
        details["baseline_file"] = str(cfg.baseline)
    data = {"tasks": {t: {k: tasks[t][k] for k in ("source", "n", "available", "data_fingerprint")} for t in tasks},
            "subset": cfg.subset, "subset_seed": cfg.subset_seed}
    record = ResultRecord("mc", default_name(cfg, model), metrics, headline, asdict(cfg), data=data,
                          baseline=baseline, deltas=deltas, details=details)
    if cfg.output is not None:
        write_results(Path(cfg.output) / "results.json", [record])
    return record
