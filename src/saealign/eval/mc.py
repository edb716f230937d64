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

Scoring runs in two forward calls per batch, the way generation does: a prefill of the context, then the
continuation tokens on top of its KV cache. So `intervention.apply(model)` sees the answer tokens as
*generated* positions and the context as the prompt, with no special position mask, and the score is the
steered model's teacher-forced log-likelihood of the answer. With `steer_positions="generated"` (default)
the first answer token is predicted by the unsteered last prompt position, exactly as in steered
generation, so single-token answers (MMLU letters) do not move under generation-only steering;
`"scored"` moves the last context token into the second call so that every scored position is steered.
Without an intervention one prefill is shared by all choices of an item (the cache is expanded per
choice); with one, each choice gets its own prefill row, because steering state is kept per prefill row.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import inspect
import json
import logging
import math
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from saealign.config import check_config
from saealign._io import text_fingerprint
from saealign.eval import default_name, load_policy, select_subset
from saealign.eval.generation import left_pad, max_positions, model_device
from saealign.models import cache_argument, returned_cache
from saealign.results import ResultRecord, read_results, write_results
from saealign.stats import Estimate, mean_estimate, paired_difference
from saealign.steering import system_prompt_of

log = logging.getLogger(__name__)

LM_EVAL_REFERENCE = "0.4.13"  # the lm-eval release whose task definitions these prompts follow
DEFAULT_TASKS = ("mmlu", "arc_easy", "hellaswag", "truthfulqa_mc2", "winogrande")
SteerPositions = Literal["generated", "scored"]
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
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        if path.name.endswith((".jsonl", ".jsonl.gz")):
            records = []
            for line, text in enumerate(fh, start=1):
                if text.strip():
                    try:
                        records.append(json.loads(text))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}: line {line}: invalid JSON: {err.msg}") from err
            return records
        records = json.load(fh)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records")
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


def stratified_subset(items: Sequence[Any], limit: int, key: Callable[[Any], str], seed: int = 0) -> list[Any]:
    """`limit` items drawn per stratum in proportion to its size (largest remainder), seeded, original order."""
    if limit >= len(items):
        return list(items)
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    strata: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        strata.setdefault(key(item), []).append(index)
    names = sorted(strata)
    exact = {name: limit * len(strata[name]) / len(items) for name in names}
    quota = {name: int(exact[name]) for name in names}
    by_remainder = sorted(names, key=lambda n: (-(exact[n] - quota[n]), n))
    for name in by_remainder[: limit - sum(quota.values())]:
        quota[name] += 1
    rng = random.Random(seed)
    keep = [i for name in names for i in rng.sample(strata[name], quota[name])]
    return [items[i] for i in sorted(keep)]


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
# Scoring engine
# ---------------------------------------------------------------------------------------------------
@dataclass
class _Group:
    """Requests that share one context token sequence."""

    context: list[int]
    rows: list[tuple[int, list[int]]] = field(default_factory=list)  # (request index, continuation ids)

    @property
    def length(self) -> int:
        return len(self.context) + max(len(cont) for _, cont in self.rows)


def encode_requests(tokenizer, requests: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) per request, tokenised as lm-eval's HFLM does: trailing context
    whitespace joins the continuation, and the continuation ids are the tail of encode(context + continuation)
    after len(encode(context)), so word-boundary merges tokenise as in running text."""
    prefix = tokenizer.bos_token or tokenizer.eos_token
    cache: dict[str, list[int]] = {}

    def encode(text: str) -> list[int]:
        special = not (prefix and text.startswith(prefix))  # no second BOS when the text carries one
        return tokenizer.encode(text, add_special_tokens=special)

    out = []
    for index, (context, continuation) in enumerate(requests):
        if not context:
            raise ValueError(f"request {index}: empty context (every multiple-choice prompt has one)")
        n_space = len(context) - len(context.rstrip())
        if n_space:
            context, continuation = context[:-n_space], context[-n_space:] + continuation
        if context not in cache:  # every choice of an item shares its context
            cache[context] = encode(context)
        context_ids = cache[context]
        whole = encode(context + continuation)
        continuation_ids = whole[len(context_ids):]
        if not continuation_ids:
            raise ValueError(f"request {index}: continuation {continuation!r} adds no tokens to its context")
        out.append((context_ids, continuation_ids))
    return out


def _group(pairs: list[tuple[list[int], list[int]]], max_length: int, split_last: bool) -> list[_Group]:
    groups: dict[tuple[int, ...], _Group] = {}
    truncated = 0
    for index, (context, continuation) in enumerate(pairs):
        if len(continuation) > max_length:
            raise ValueError(f"request {index}: continuation of {len(continuation)} tokens exceeds the model's "
                             f"context length {max_length}")
        keep = max_length + 1 - len(continuation)  # the input is context + continuation[:-1]
        if len(context) > keep:
            context, truncated = context[-keep:], truncated + 1
        if split_last and len(context) < 2:
            raise ValueError(f"request {index}: steer_positions='scored' needs a context of at least 2 tokens")
        key = tuple(context)
        groups.setdefault(key, _Group(context)).rows.append((index, continuation))
    if truncated:
        log.warning("%d requests exceed the context length %d: their contexts lose their oldest tokens",
                    truncated, max_length)
    return list(groups.values())


def _batches(groups: list[_Group], batch_size: int) -> list[list[_Group]]:
    """Longest first (out-of-memory shows at once and padding stays small); whole groups, about
    `batch_size` continuation rows per batch."""
    batches: list[list[_Group]] = []
    rows = 0
    for group in sorted(groups, key=lambda g: -g.length):
        if batches and rows + len(group.rows) <= batch_size:
            batches[-1].append(group)
            rows += len(group.rows)
        else:
            batches.append([group])
            rows = len(group.rows)
    return batches


def _steering(model, intervention):
    """The one place where an intervention is switched on around the scoring forward passes."""
    return intervention.apply(model) if intervention is not None else contextlib.nullcontext()


def _takes_logits_to_keep(model) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


@torch.no_grad()
def _score_batch(model, groups: list[_Group], pad_id: int, split_last: bool, per_row_prefill: bool,
                 keep_last: bool) -> list[tuple[int, float]]:
    device = model_device(model)
    rows = [(g, index, cont) for g, group in enumerate(groups) for index, cont in group.rows]
    heads = [group.context[:-1] if split_last else group.context for group in groups]
    # second-call inputs: the answer tokens that are fed back, as in generation (plus the last context token)
    tails = [([groups[g].context[-1]] if split_last else []) + cont[:-1] for g, _, cont in rows]
    second_call = any(tails)
    per_row = per_row_prefill and second_call
    prefill_of_row = list(range(len(rows))) if per_row else [g for g, _, _ in rows]
    prefill = [heads[g] for g, _, _ in rows] if per_row else heads

    ids, mask = left_pad(prefill, pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    extra = {"logits_to_keep": 1} if keep_last else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=second_call, **extra)
    totals = [0.0] * len(rows)
    if not split_last:
        last = out.logits[:, -1].float().log_softmax(-1)
        first = last[torch.tensor(prefill_of_row, device=device), torch.tensor([c[0] for _, _, c in rows], device=device)]
        totals = first.tolist()
    if second_call:
        second_rows = list(range(len(rows))) if per_row else [r for r, tail in enumerate(tails) if tail]
        index = torch.tensor([prefill_of_row[r] for r in second_rows], device=device)
        cache = returned_cache(out)
        if not per_row:
            cache.reorder_cache(index)  # one copy of the shared context per continuation
        width = max(1, max(len(tails[r]) for r in second_rows))
        x = torch.full((len(second_rows), width), pad_id, dtype=torch.long)
        x_mask = torch.zeros((len(second_rows), width), dtype=torch.long)
        targets = torch.zeros((len(second_rows), width), dtype=torch.long)
        for k, r in enumerate(second_rows):
            tail, cont = tails[r], rows[r][2]
            scored = cont if split_last else cont[1:]
            x[k, : len(tail)] = torch.tensor(tail, dtype=torch.long)
            x_mask[k, : len(tail)] = 1
            targets[k, : len(scored)] = torch.tensor(scored, dtype=torch.long)
        x, x_mask, targets = x.to(device), x_mask.to(device), targets.to(device)
        start = mask.sum(-1)[index].unsqueeze(1)
        logits = model(input_ids=x, attention_mask=torch.cat([mask[index], x_mask], dim=1),
                       position_ids=start + torch.arange(width, device=device),
                       use_cache=True, **cache_argument(model, cache)).logits.float()
        token_lp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
        sums = (token_lp * x_mask).sum(-1).tolist()
        for k, r in enumerate(second_rows):
            totals[r] += sums[k]
    return [(index, total) for (_, index, _), total in zip(rows, totals, strict=True)]


def score_requests(model, tokenizer, requests: Sequence[tuple[str, str]], *, batch_size: int = 32,
                   intervention=None, steer_positions: SteerPositions = "generated", max_length: int | None = None,
                   desc: str = "scoring") -> list[float]:
    """Log-likelihood of each continuation given its context (summed over the continuation's tokens)."""
    if steer_positions not in ("generated", "scored"):
        raise ValueError(f"steer_positions must be 'generated' or 'scored', got {steer_positions!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    split_last = steer_positions == "scored"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    limit = max_length or max_positions(model) or 2048
    groups = _group(encode_requests(tokenizer, requests), limit, split_last)
    keep_last = _takes_logits_to_keep(model)
    scores = [math.nan] * len(requests)
    with tqdm(total=len(requests), desc=desc, unit="choice", leave=False) as bar:
        for batch in _batches(groups, batch_size):
            with _steering(model, intervention):
                results = _score_batch(model, batch, pad_id, split_last, intervention is not None, keep_last)
            for index, value in results:
                scores[index] = value
            bar.update(len(results))
    return scores


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
class MCConfig:
    """`saealign eval mc`: multiple-choice accuracy by log-likelihood."""

    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS),
                             metadata={"help": f"tasks: {', '.join(TASKS)}"})
    out_dir: Path | None = field(default=None, metadata={"help": "where results.json goes (none: return only)"})
    model: str = field(default="smollm2-135m-instruct", metadata={"help": "alias, local dir or hub id"})
    intervention: str | None = field(default=None, metadata={"help": "steering artifact path (saealign.steering)"})
    name: str | None = field(default=None, metadata={"help": "method name in the result (default: model[+intervention])"})
    data_dir: Path | None = field(default=None, metadata={
        "help": "folder laid out like shared/data (mmlu/, arc/, ...); without it, the HF datasets lm-eval uses"})
    sources: dict[str, str] = field(default_factory=dict, metadata={
        "help": 'per-task data, JSON {"task": "path" or "hf:dataset[:config[:split]]"}; overrides --data-dir'})
    limit: int | None = field(default=None, metadata={"help": "items per task (default: all)", "ge": 1})
    subset: Subset = field(default="stratified", metadata={
        "help": "with --limit: 'stratified' (seeded, proportional per MMLU subject / HellaSwag activity) or 'first'"})
    subset_seed: int = 0
    batch_size: int = field(default=32, metadata={"help": "continuations per forward pass", "ge": 1})
    steer_positions: SteerPositions = field(default="generated", metadata={
        "help": "'generated': answer tokens are steered as generated tokens (the first one is predicted by the "
                "unsteered prompt); 'scored': the last context token is steered too"})
    save_items: bool = field(default=True, metadata={"help": "store per-item log-likelihoods (for paired deltas)"})
    baseline: Path | None = field(default=None, metadata={
        "help": "an earlier `eval mc` results.json (with items) to report paired differences against"})
    device: str | None = None
    dtype: str | None = None

    def __post_init__(self) -> None:
        check_config(self)
        for task in self.tasks:
            get_task(task)
        unknown = set(self.sources) - set(TASKS)
        if unknown:
            raise ValueError(f"sources: unknown task(s) {sorted(unknown)}")
        if self.subset not in ("first", "stratified"):
            raise ValueError(f"subset must be 'first' or 'stratified', got {self.subset!r}")
        if self.steer_positions not in ("generated", "scored"):
            raise ValueError(f"steer_positions must be 'generated' or 'scored', got {self.steer_positions!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


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
    """Run every task of `cfg`; return the result record and write it to `cfg.out_dir/results.json` when set."""
    model, tokenizer, intervention = load_policy(cfg, model, tokenizer, intervention)
    tasks: dict[str, Any] = {}
    items: dict[str, Any] = {}
    metrics: dict[str, Estimate] = {}
    for task in cfg.tasks:
        source = resolve_source(task, cfg.sources.get(task), cfg.data_dir)
        all_docs = load_docs(task, cfg.sources.get(task), cfg.data_dir)
        chosen = {item.id for item in select_items(build_items(task, all_docs), cfg.limit, cfg.subset, cfg.subset_seed)}
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
                               "system_prompt": system_prompt_of(intervention)}
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
    if cfg.out_dir is not None:
        write_results(Path(cfg.out_dir) / "results.json", [record])
    return record
