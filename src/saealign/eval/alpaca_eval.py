"""AlpacaEval: outputs for the instructions, a pairwise judge against reference outputs, the win rate and
an offline length-controlled (LC) win rate.

Files follow AlpacaEval: `model_outputs-seed{S}.json` (`[{instruction, output, generator, dataset}]`)
and `annotations.json` (`output_1`/`generator_1` = reference, `output_2`/`generator_2` = model,
`preference` in [1, 2], 2 = the model wins).

Judging. Each pair is judged in both orders (reference first, then model first) and the model's win
probability is averaged over the orders, which cancels the judge's position bias. With a judge that
exposes label probabilities (a local LM, or an endpoint with `logprobs`) the probability is soft,
`P(label of the model) / (P(m) + P(M))` as AlpacaEval 2's weighted annotator; a judge that only
generates gives 0/1 per order (unparseable: retried once, then missing); a reward model gives
`sigmoid(r_model - r_reference)` (order-free).

LC win rate (AlpacaEval 2, `metrics/glm_winrate.py`), offline. We fit the logistic GLM
`logit P(model wins) = b0 + b1 * tanh(delta_len / sd(delta_len))` on the soft preferences, with
`delta_len` the model-minus-reference output length in characters, and report `sigmoid(b0)` — the win
rate predicted at zero length difference. Dropped from AlpacaEval 2 because they need its hub file
`df_gamed.csv`: the per-instruction difficulty term, and the regularisation towards its "gamed"
(verbosity-prompted) baselines; without them the L1 penalty chosen by 5-fold CV has nothing to select
among two coefficients, so we fit by maximum likelihood with a negligible ridge (1e-4, only to keep
separable data finite). Without the difficulty term every instruction gets the same prediction, so
AlpacaEval's LC standard error (the SEM of the per-instruction predictions) would be 0; we report the
delta-method standard error of `sigmoid(b0)` from the sandwich covariance, clustered by instruction
(the seeds of one instruction are not independent), in `details["alpaca_eval"]` beside AlpacaEval's
other summary fields.

The result record's estimates follow `saealign.stats`, with the instruction as the unit (its seeds are
resampled together): the win rate and the discrete win rate (a draw counts one half) as means, the LC
win rate by refitting the GLM on each bootstrap resample of instructions.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
from tqdm.auto import tqdm

from saealign._io import read_json, require_file, start_run
from saealign.data import select_subset
from saealign.runtime.generation import Conversation, Sampling, generate_chat
from saealign.config import ConfigError
from saealign.eval.judged import JudgedBenchmarkConfig
from saealign.eval.judges import CHAT, LABEL_PROBS, REWARD, Judge, check_judge_config
from saealign.results import ResultRecord, write_results
from saealign.stats import Estimate, bootstrap_estimate, mean_estimate, standard_error, wins
from saealign.steering import default_name, load_policy, policy_cost

log = logging.getLogger(__name__)

_CHATML = re.compile(r"<\|im_start\|>(system|user|assistant)\s*\n(.*?)<\|im_end\|>", re.S)
FIELDS = ("instruction", "output_1", "output_2")
REPAIR_PROMPT = "Answer with the identifier of the best model only: {labels}."
ORDERS = ("reference_first", "model_first")
GENERATION_FIELDS = ("model", "intervention", "name", "temperature", "top_p", "max_new_tokens")


# ---------------------------------------------------------------- files


def load_outputs(path: str | Path) -> list[dict[str, Any]]:
    """An AlpacaEval outputs file: a JSON list of `{instruction, output, generator[, dataset]}`."""
    path = require_file(path, "AlpacaEval outputs")
    records = read_json(path)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of {{instruction, output, generator}}")
    for i, r in enumerate(records):
        missing = [k for k in ("instruction", "output") if k not in r]
        if missing:
            raise ValueError(f"{path}: record {i}: missing field(s) {missing}")
    return records


def load_template(path: str | Path) -> list[dict[str, str]]:
    """A pairwise judge prompt with `{instruction}`, `{output_1}`, `{output_2}`; AlpacaEval writes its chat
    turns as `<|im_start|>role ... <|im_end|>` blocks, a file without them is one user message."""
    path = require_file(path, "judge template")
    text = path.read_text()
    messages = [{"role": role, "content": content.strip()} for role, content in _CHATML.findall(text)]
    if not messages:
        messages = [{"role": "user", "content": text.strip()}]
    joined = "".join(m["content"] for m in messages)
    missing = [f for f in FIELDS if "{" + f + "}" not in joined]
    if missing:
        raise ValueError(f"{path}: template lacks the placeholder(s) {['{' + f + '}' for f in missing]}")
    return messages


def render_template(template: Sequence[dict[str, str]], **values: str) -> Conversation:
    """Fill the placeholders by plain replacement: the templates hold literal braces (JSON-like text)."""
    out = []
    for message in template:
        content = message["content"]
        for key in FIELDS:
            content = content.replace("{" + key + "}", values[key])
        out.append({"role": message["role"], "content": content})
    return out


# ---------------------------------------------------------------- judging


def parse_label(text: str | None, labels: Sequence[str]) -> str | None:
    """The label a generative judge chose: the whole answer, else the first label standing alone."""
    if not text:
        return None
    stripped = text.strip().strip("`'\"*. \n")
    if stripped in labels:
        return stripped
    pattern = "|".join(re.escape(label) for label in labels)
    match = re.search(rf"(?<![\w'’])({pattern})(?![\w'’])", text)
    return match.group(1) if match else None


def _pair_conversations(template, items, labels) -> list[Conversation]:
    convs = []
    for instruction, reference, output in items:
        convs.append(render_template(template, instruction=instruction, output_1=reference, output_2=output))
        convs.append(render_template(template, instruction=instruction, output_1=output, output_2=reference))
    return convs


def _p_model(per_order: dict[str, float | None]) -> float | None:
    values = [v for v in per_order.values() if v is not None]
    return sum(values) / len(values) if values else None


def judge_pairs(judge: Judge, template: Sequence[dict[str, str]], items: Sequence[tuple[str, str, str]], *,
                labels: Sequence[str] = ("m", "M"), mode: str = "auto", max_tokens: int = 16,
                progress: bool = True) -> list[dict[str, Any]]:
    """Judge `(instruction, reference output, model output)` triples.

    Returns per item `p_model` (the model's win probability, None = missing), `per_order` and, for
    label probabilities, `label_mass` (the judge's total probability on the two labels, a format check).
    `mode`: auto (label_probs > reward > chat, by what the judge supports), label_probs, reward or chat.
    """
    if len(labels) != 2 or labels[0] == labels[1]:
        raise ValueError(f"need two distinct labels, got {labels}")
    if mode == "auto":
        mode = next((m for m in (LABEL_PROBS, REWARD, CHAT) if judge.supports(m)), "")
    if mode not in (LABEL_PROBS, REWARD, CHAT) or not judge.supports(mode):
        raise ValueError(f"judge {judge.name!r} cannot judge pairs in mode {mode!r} "
                         f"(supports {sorted(judge.capabilities)})")
    first, second = labels
    if mode == REWARD:
        convs = [[{"role": "user", "content": instr}, {"role": "assistant", "content": out}]
                 for instr, ref, mod in items for out in (ref, mod)]
        rewards = judge.reward(convs, progress=progress)
        results = []
        for k in range(len(items)):
            r_ref, r_mod = rewards[2 * k], rewards[2 * k + 1]
            p = None if r_ref is None or r_mod is None else 1 / (1 + math.exp(-(r_mod - r_ref)))
            results.append({"p_model": p, "per_order": {"reward": p}, "rewards": [r_ref, r_mod]})
        return results
    convs = _pair_conversations(template, items, labels)
    if mode == LABEL_PROBS:
        probs = judge.label_probs(convs, labels, progress=progress)
        results = []
        for k in range(len(items)):
            per_order, mass = {}, []
            for order, model_label, p in zip(ORDERS, (second, first), probs[2 * k:2 * k + 2]):
                total = None if p is None else p[first] + p[second]
                per_order[order] = p[model_label] / total if total else None
                mass.append(total)
            results.append({"p_model": _p_model(per_order), "per_order": per_order, "label_mass": mass})
        return results
    texts = judge.chat(convs, max_tokens=max_tokens, progress=progress)
    retry = [i for i, t in enumerate(texts) if parse_label(t, labels) is None]
    if retry:
        repair = REPAIR_PROMPT.format(labels=" or ".join(labels))
        again = judge.chat([convs[i] if texts[i] is None else
                            [*convs[i], {"role": "assistant", "content": texts[i]}, {"role": "user", "content": repair}]
                            for i in retry], max_tokens=max_tokens, progress=progress)
        for i, text in zip(retry, again):
            texts[i] = text
    results = []
    for k in range(len(items)):
        per_order = {}
        for order, model_label, text in zip(ORDERS, (second, first), texts[2 * k:2 * k + 2]):
            chosen = parse_label(text, labels)
            per_order[order] = None if chosen is None else float(chosen == model_label)
        results.append({"p_model": _p_model(per_order), "per_order": per_order, "judgments": texts[2 * k:2 * k + 2]})
    return results


# ---------------------------------------------------------------- metrics


def win_rate(preferences: Sequence[float]) -> dict[str, float | int | None]:
    """AlpacaEval's head-to-head summary of preferences in [1, 2] (2 = model wins): the mean of
    `preference - 1` in percent, its standard error (SEM, ddof 1), wins / losses / exact draws, and the
    discrete win rate (each preference rounded to a win, loss or draw)."""
    p = np.asarray(preferences, dtype=float) - 1
    if p.size == 0:
        return {"win_rate": None, "standard_error": None, "n_wins": 0, "n_wins_base": 0, "n_draws": 0, "n_total": 0,
                "discrete_win_rate": None}
    if np.any((p < 0) | (p > 1)):
        raise ValueError("preferences must lie in [1, 2]")
    wins, losses, draws = int((p > 0.5).sum()), int((p < 0.5).sum()), int((p == 0.5).sum())
    se = standard_error(p * 100)
    return {"win_rate": float(p.mean() * 100), "standard_error": se,
            "n_wins": wins, "n_wins_base": losses, "n_draws": draws, "n_total": int(p.size),
            "discrete_win_rate": float((wins + draws / 2) / p.size * 100)}


def _sigmoid(x: np.ndarray | float) -> np.ndarray | float:
    return 1 / (1 + np.exp(-x))


def fit_soft_logistic(X: np.ndarray, y: np.ndarray, ridge: float = 1e-4, max_iter: int = 100,
                      tol: float = 1e-10) -> tuple[np.ndarray, np.ndarray]:
    """Maximum-likelihood logistic regression on soft labels `y` in [0, 1] by Newton's method (a bounded
    loop). Returns the coefficients and the Hessian of the penalised negative log-likelihood."""
    beta = np.zeros(X.shape[1])
    penalty = ridge * np.eye(X.shape[1])
    for _ in range(max_iter):
        p = _sigmoid(X @ beta)
        grad = X.T @ (y - p) - ridge * beta
        hessian = (X * (p * (1 - p))[:, None]).T @ X + penalty
        step = np.linalg.solve(hessian, grad)
        beta = beta + step
        if np.max(np.abs(step)) < tol:
            break
    else:
        log.warning("logistic GLM did not converge in %d Newton steps (separable data?)", max_iter)
    p = _sigmoid(X @ beta)
    return beta, (X * (p * (1 - p))[:, None]).T @ X + penalty


def length_controlled_win_rate(p_model: Sequence[float], len_model: Sequence[int], len_reference: Sequence[int],
                               clusters: Sequence[Any] | None = None) -> dict[str, float | None]:
    """LC win rate (percent) and its clustered sandwich standard error; see the module docstring.

    `p_model`: the model's (soft) win probability per annotation; `clusters`: the instruction of each
    annotation (default: each its own), so seeds of the same instruction count as one unit.
    """
    y = np.asarray(p_model, dtype=float)
    delta = np.asarray(len_model, dtype=float) - np.asarray(len_reference, dtype=float)
    if not (y.size == delta.size and y.size > 0):
        raise ValueError("p_model and the lengths must be non-empty and equally long")
    if np.any((y < 0) | (y > 1)):
        raise ValueError("p_model must lie in [0, 1]")
    sd = delta.std(ddof=1) if delta.size > 1 else 0.0
    columns = [np.ones_like(y)] + ([np.tanh(delta / sd)] if sd > 0 else [])
    X = np.stack(columns, axis=1)
    beta, hessian = fit_soft_logistic(X, y)
    scores = X * (y - _sigmoid(X @ beta))[:, None]
    groups = np.arange(y.size) if clusters is None else np.unique(np.asarray(clusters, dtype=object).astype(str),
                                                                  return_inverse=True)[1]
    n_clusters = int(groups.max()) + 1
    summed = np.zeros((n_clusters, X.shape[1]))
    np.add.at(summed, groups, scores)
    lc = float(_sigmoid(beta[0]))
    se = None
    if n_clusters > 1:
        bread = np.linalg.inv(hessian)
        cov = bread @ (summed.T @ summed) @ bread * n_clusters / (n_clusters - 1)
        se = float(lc * (1 - lc) * math.sqrt(max(cov[0, 0], 0.0)) * 100)
    return {"length_controlled_winrate": lc * 100, "lc_standard_error": se, "glm_intercept": float(beta[0]),
            "glm_length_coef": float(beta[1]) if sd > 0 else 0.0, "delta_len_sd": float(sd)}


# ---------------------------------------------------------------- run


@dataclass
class AlpacaEvalConfig(JudgedBenchmarkConfig):
    """`saealign eval alpaca-eval`: outputs judged pairwise against a baseline's, in both orders."""

    reference_outputs: Path | None = field(default=None, metadata={
        "help": "AlpacaEval model_outputs.json of the baseline (its instructions are the evaluation set)."})
    judge_template: Path | None = field(default=None, metadata={
        "help": "Pairwise judge prompt with {instruction}, {output_1}, {output_2}, e.g. alpaca_eval_clf.txt."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature of the outputs (0: greedy).",
                                                      "ge": 0})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling: keep the tokens of this much probability.",
                                                "gt": 0, "le": 1})
    judge_mode: Literal["auto", "label_probs", "chat", "reward"] = field(default="auto", metadata={
        "help": "label_probs: the probabilities of the two labels after the prompt; chat: the label the judge "
                "writes; reward: a reward model scores each output; auto: label_probs, else reward, else chat "
                "(what the judge supports)."})
    labels: list[str] = field(default_factory=lambda: ["m", "M"], metadata={
        "help": "Identifiers of output_1 and output_2 in the template's answer."})
    judge_max_tokens: int = field(default=16, metadata={"help": "Most tokens of one judgment in chat mode.", "ge": 1})

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.labels) != 2 or self.labels[0] == self.labels[1]:
            raise ConfigError("labels", f"must be two different identifiers, got {self.labels}")
        check_judge_config(self, None if self.judge_mode == "auto" else self.judge_mode)


def _outputs_for_seed(path: Path, instructions: list[str]) -> dict[str, str]:
    if not path.exists():
        return {}
    wanted = set(instructions)
    return {r["instruction"]: r["output"] for r in load_outputs(path) if r["instruction"] in wanted}


def run_alpaca_eval(cfg: AlpacaEvalConfig, model=None, tokenizer=None, intervention=None,
                    judge: Judge | None = None) -> ResultRecord | dict[str, Any]:
    """Generate per seed (resuming from existing output files), judge (resuming from the cache), score.
    A rerun with other generation settings in the same `output` is refused (`saealign.eval.start_run`).
    With `skip_judge`, returns only where the outputs are."""
    from saealign._io import write_json
    from saealign.eval.judges import judge_of

    if cfg.reference_outputs is None or cfg.judge_template is None or cfg.output is None:
        raise ValueError("reference_outputs, judge_template and output are required")
    out = Path(cfg.output)
    start_run(out, asdict(cfg), GENERATION_FIELDS)
    references = select_subset(load_outputs(cfg.reference_outputs), cfg.n, cfg.subset_seed)
    template = load_template(cfg.judge_template)
    model, tokenizer, intervention = load_policy(cfg, model, tokenizer, intervention)
    name = default_name(cfg, model, intervention)
    instructions = [r["instruction"] for r in references]
    outputs: dict[int, dict[str, str]] = {}
    timings: dict[str, float] = {}
    for seed in cfg.seeds:
        path = out / f"model_outputs-seed{seed}.json"
        done = _outputs_for_seed(path, instructions)
        todo = [i for i in instructions if i not in done]
        start = time.perf_counter()
        chunk = 4 * cfg.batch_size  # outputs are saved after every chunk, so an interrupted run resumes
        with tqdm(total=len(todo), desc=f"alpaca-eval outputs, seed {seed}",
                  disable=not cfg.progress or not todo) as bar:
            for index, begin in enumerate(range(0, len(todo), chunk)):
                part = todo[begin:begin + chunk]
                texts = generate_chat(model, tokenizer, [[{"role": "user", "content": i}] for i in part],
                                      Sampling(cfg.temperature, cfg.top_p, cfg.max_new_tokens),
                                      seed=seed * 100_000 + index, batch_size=cfg.batch_size,
                                      intervention=intervention, progress=False)
                done.update(zip(part, texts))
                write_json(path, [{"instruction": r["instruction"], "output": done[r["instruction"]],
                                   "generator": name, "dataset": r.get("dataset", "")}
                                  for r in references if r["instruction"] in done])
                bar.update(len(part))
        if todo:
            timings[f"generate_seed{seed}_s"] = time.perf_counter() - start
        outputs[seed] = done
    if cfg.skip_judge:
        return {"outputs": [str(out / f"model_outputs-seed{s}.json") for s in cfg.seeds], "timings": timings}

    if judge is None:
        judge = judge_of(cfg, Path(cfg.judge_cache or out / "judge_cache.sqlite"), policy=(model, tokenizer))
    rows = [(seed, k) for seed in cfg.seeds for k in range(len(references))]
    items = [(references[k]["instruction"], references[k]["output"], outputs[seed][references[k]["instruction"]])
             for seed, k in rows]
    start = time.perf_counter()
    judged = judge_pairs(judge, template, items, labels=cfg.labels, mode=cfg.judge_mode,
                         max_tokens=cfg.judge_max_tokens, progress=cfg.progress)
    timings["judge_s"] = time.perf_counter() - start
    annotations = []
    for (seed, k), (instruction, reference, output), verdict in zip(rows, items, judged):
        p = verdict["p_model"]
        annotations.append({"instruction": instruction, "dataset": references[k].get("dataset", ""),
                            "output_1": reference, "generator_1": references[k].get("generator", "reference"),
                            "output_2": output, "generator_2": name, "annotator": judge.name,
                            "preference": None if p is None else 1 + p, "seed": seed, "index": k,
                            **{key: value for key, value in verdict.items() if key != "p_model"}})
    write_json(out / "annotations.json", annotations)
    metrics, summary = _score(annotations, cfg.seeds)
    data = {"reference_outputs": str(cfg.reference_outputs), "n": len(references),
            "subset_seed": cfg.subset_seed, "seeds": cfg.seeds}
    record = ResultRecord("alpaca-eval", name, metrics, ["win_rate", "lc_win_rate"], asdict(cfg), data=data,
                          details={"judge": judge.name, "timings": timings, "alpaca_eval": summary,
                                   "alignment_cost": policy_cost(cfg),
                                   "n_missing": sum(a["preference"] is None for a in annotations),
                                   "avg_length": float(np.mean([len(a["output_2"]) for a in annotations]))})
    write_results(out / "results.json", [record])
    return record


def _score(annotations: Sequence[dict[str, Any]], seeds: Sequence[int]) -> tuple[dict[str, Estimate], dict[str, Any]]:
    """Estimates over judged annotations, the instruction as the unit (with one seed, the win rate is
    exactly AlpacaEval's number): the win rate (percent), the discrete win rate, the LC win rate pooled
    over seeds, the GLM's length coefficient and each seed's win rate; and AlpacaEval's own summary
    (its standard errors, win/loss/draw counts)."""
    judged = [a for a in annotations if a["preference"] is not None]
    if not judged:
        raise RuntimeError("no usable judgment at all; check the judge (see annotations.json)")
    p = np.array([a["preference"] - 1 for a in judged])
    units = np.array([a["index"] for a in judged])
    len_model = np.array([len(a["output_2"]) for a in judged])
    len_reference = np.array([len(a["output_1"]) for a in judged])
    lc = length_controlled_win_rate(p, len_model, len_reference, clusters=units)
    instructions = np.unique(units)
    rows = [np.flatnonzero(units == k) for k in instructions]

    def lc_of(sample: np.ndarray) -> float:
        picked = np.concatenate([rows[k] for k in sample])
        return length_controlled_win_rate(p[picked], len_model[picked], len_reference[picked])["length_controlled_winrate"]

    metrics = {"win_rate": mean_estimate(100 * p, units=units),
               "lc_win_rate": bootstrap_estimate(lc_of, len(instructions)),
               "discrete_win_rate": mean_estimate(100 * wins(p, np.full_like(p, 0.5)), units=units),
               "glm_length_coef": Estimate(lc["glm_length_coef"])}
    for seed in seeds:
        own = np.array([a["seed"] == seed for a in judged])
        metrics[f"seed{seed}/win_rate"] = mean_estimate(100 * p[own], units=units[own])
    by_instruction: dict[int, list[float]] = {}
    for a in judged:
        by_instruction.setdefault(a["index"], []).append(a["preference"])
    pooled = win_rate([sum(v) / len(v) for v in by_instruction.values()])
    discrete = win_rate([a["preference"] for a in judged])
    summary = {**pooled, **lc, **{k: discrete[k] for k in ("n_wins", "n_wins_base", "n_draws", "n_total",
                                                           "discrete_win_rate")}}
    return metrics, summary
