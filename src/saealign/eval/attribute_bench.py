"""`saealign eval attributes`: does a method move a deterministic attribute on held-out prompts?

For each method (`base`, any `load_method` spec, or `model:PATH` for a trained model) the answers to
the same prompts are generated, scored, and compared with base prompt by prompt:
- the attribute's mean (a rate for 0/1 scorers) with its bootstrap interval over prompts;
- the paired difference to base, mean of per-prompt differences, with its bootstrap interval
  (both `saealign.stats`);
- for a scorer that needs the prompt's kind (`refuse_iff_harmful`), the balanced accuracy of
  "refused iff harmful" and each half; it is the mean of per-prompt correctness weighted by
  N / (2 N_kind) (`attributes.balance_weights`), so its interval and its paired difference use the
  same bootstrap (prompt kinds are not fixed per resample; with equal halves that is negligible);
- fluency guard: perplexity of the generated answers under the base model (exp of the mean token
  NLL over all answers, the end-of-turn token included) and corpus-level distinct-2.

Answers are saved per method in OUT/answers/METHOD.jsonl after every batch of prompts and reused on a
rerun; a rerun with other generation settings is refused (`eval.start_run`). Results: OUT/results.json
(one `saealign.results.ResultRecord` per method, read by `saealign report`), OUT/results.md and
OUT/deltas.png.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from saealign._io import safe_name, start_run
from saealign.data import read_records
from saealign.config import check_config
from saealign.eval.attributes import Scorer, balance_weights, distinct_n, get_scorer
from saealign.models import DEFAULT_MODEL, ModelOptions
from saealign.steering import STEERING_OPTIONS, SteeringOptions, split_method_entry
from saealign.results import ResultRecord, format_estimate, write_results
from saealign.stats import Estimate, mean_estimate, paired_difference

GENERATION_FIELDS = ("model", "sources", "data", "n", "seed", "split_seed", "max_prompt_words", "exclude", "temperature",
                     "top_p", "max_new_tokens", "batch_size", "batch_prompts", *STEERING_OPTIONS)


@dataclass
class AttributeEvalConfig(SteeringOptions, ModelOptions):
    """`eval attributes`: the steering knobs (each method gets those it takes) and what to generate and score."""

    output: str = field(default="", metadata={"help": "Directory for answers/, results.json, results.md, deltas.png."})
    scorer: str = field(default="", metadata={"help": "Attribute scorer by name (saealign.eval.attributes)."})
    sources: list[str] = field(default_factory=list, metadata={"help": "Held-out prompt sources [KIND=]ROLE_OR_FILE (repeat), e.g. harmful=test_harmless, benign=test_helpful."})
    methods: list[str] = field(default_factory=lambda: ["base"], metadata={"help": "base, dspa:MAP, static-sae:MAP, repe:DIR, prompt-prefix[:TEXT], model:PATH (repeat); NAME=SPEC names it."})
    data: str | None = field(default=None, metadata={"help": "HH-RLHF directory when a source names a role."})
    n: int | None = field(default=None, metadata={"help": "Seeded uniform draw of this many prompts per source (default: all).", "ge": 1})
    seed: int = field(default=0, metadata={"help": "Seed of the --n draw, of sampling (batch b samples with seed + b) and of the bootstrap."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the HH-RLHF fit/validation split (sources naming those roles)."})
    max_prompt_words: int | None = field(default=200, metadata={"help": "Drop longer prompts (before the draw).", "ge": 1})
    exclude: list[str] = field(default_factory=list, metadata={"help": "Drop prompts whose text occurs in these sources (repeat), e.g. the fit roles: held-out means unseen."})
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "The base model (steered methods steer it; perplexity is measured under it)."})
    temperature: float = field(default=0.0, metadata={"help": "Sampling temperature (0: greedy).", "ge": 0})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling: keep the tokens of this much probability.", "gt": 0, "le": 1})
    max_new_tokens: int = field(default=48, metadata={"help": "Most tokens per answer.", "ge": 1})
    batch_size: int = field(default=16, metadata={"help": "Sequences per generate call.", "ge": 1})
    batch_prompts: int = field(default=64, metadata={"help": "Prompts between saves of the answers (and per sampling seed).", "ge": 1})
    n_boot: int = field(default=2000, metadata={"help": "Bootstrap resamples of the 95% intervals.", "ge": 1})

    def __post_init__(self) -> None:
        check_config(self)
        for entry in self.methods:
            spec = method_entry(entry)[1]
            if not spec.startswith("model:"):
                from saealign.steering import method_kind

                method_kind(spec)  # a bad spec or a missing artifact fails before a model loads


def method_entry(entry: str) -> tuple[str, str]:
    """`NAME=SPEC` -> (NAME, SPEC); a bare SPEC is its own name."""
    name, spec = split_method_entry(entry)
    return name or spec, spec


def _answers_path(out: Path, name: str) -> Path:
    return out / "answers" / f"{safe_name(name)}.jsonl"


def method_identity(spec: str) -> dict[str, str | None]:
    """What a method's saved answers belong to: its spec and, for an artifact, the checksum of its config
    (steering settings recorded in a map change the answers as much as the map does)."""
    from saealign._io import file_sha256

    config = Path(spec.partition(":")[2] if ":" in spec else spec) / "config.json"
    return {"spec": spec, "artifact_config": file_sha256(config) if config.is_file() else None}


def _read_answers(path: Path, identity: dict[str, str | None]) -> dict[str, str]:
    if not path.exists():
        return {}
    records = [record for _, record in read_records(path)]
    stale = next((r["method"] for r in records if r["method"] != identity), None)
    if stale is not None:
        raise ValueError(f"{path}: answers of another method ({stale} there, {identity} now); "
                         "name the method differently or use a new output directory")
    return {r["id"]: r["answer"] for r in records}


def generate_answers(cfg: AttributeEvalConfig, prompts, name: str, spec: str, base_model, tokenizer, out: Path,
                     progress: bool = True) -> list[str]:
    """The method's answers in prompt order. Prompts go in fixed batches (batch b sampled with
    `batch_seed(seed, b)`), saved after each, so an interrupted run resumes to the same answers."""
    from tqdm.auto import tqdm

    from saealign.best_of_k import batch_seed
    from saealign.runtime.generation import Sampling, generate_chat
    from saealign.eval.mt_bench import write_jsonl

    path, identity = _answers_path(out, name), method_identity(spec)
    saved = _read_answers(path, identity)
    batches = [prompts[i:i + cfg.batch_prompts] for i in range(0, len(prompts), cfg.batch_prompts)]
    todo = [b for b, batch in enumerate(batches) if any(p.id not in saved for p in batch)]
    if todo:
        model, tok, intervention = base_model, tokenizer, None
        if spec.startswith("model:"):
            from saealign.models import load_model

            model, tok = load_model(spec.removeprefix("model:"), device=cfg.device, dtype=cfg.dtype)
        else:
            from saealign.steering import load_method, method_kind, method_options

            options = {k: v for k, v in cfg.steering_options().items() if k in method_options(method_kind(spec))}
            intervention = load_method(spec, model=base_model, **options)
        sampling = Sampling(cfg.temperature, cfg.top_p, cfg.max_new_tokens)
        for b in tqdm(todo, desc=f"answers {name}", disable=not progress):
            texts = generate_chat(model, tok, [p.conversation for p in batches[b]], sampling,
                                  seed=batch_seed(cfg.seed, b), batch_size=cfg.batch_size, intervention=intervention,
                                  progress=False)
            saved.update({p.id: t for p, t in zip(batches[b], texts)})
            write_jsonl(path, [{"id": p.id, "kind": p.kind, "prompt": p.conversation, "answer": saved[p.id],
                                "method": identity} for p in prompts if p.id in saved])
    return [saved[p.id] for p in prompts]


def base_nll(model, tokenizer, prompts, answers: list[str], cache: Path | None = None) -> tuple[float, int]:
    """Summed token NLL of the answers under the (base) model, and the token count. With `cache`, the result
    is kept in that file under a key of the model's weights and the exact (prompt, answer) pairs, so a rerun,
    or a run that adds methods, scores only answers it has not scored (this pass costs about what generating
    them did)."""
    from saealign.data import PreferenceTriple
    from saealign.runtime.scoring import score_triples

    key = None
    if cache is not None:
        from saealign._io import read_json
        from saealign.models import model_fingerprint

        pairs = [[p.conversation, a] for p, a in zip(prompts, answers)]
        key = hashlib.sha256(json.dumps([model_fingerprint(model), pairs], sort_keys=True).encode()).hexdigest()
        saved = read_json(cache) if cache.exists() else {}
        if saved.get("key") == key:
            return saved["nll"], saved["tokens"]
    triples = [PreferenceTriple(p.conversation, a, "") for p, a in zip(prompts, answers)]
    scores = score_triples(model, tokenizer, triples, progress=False)
    nll, tokens = float(-scores.logp_chosen.sum()), int(scores.len_chosen.sum())
    if cache is not None:
        from saealign._io import write_json

        write_json(cache, {"key": key, "nll": nll, "tokens": tokens})
    return nll, tokens


def method_metrics(scorer: Scorer, scores: np.ndarray, base_scores: np.ndarray, kinds: list[str | None],
                   answers: list[str], nll: tuple[float, int], n_boot: int, seed: int
                   ) -> tuple[dict[str, Estimate], dict[str, Estimate], list[str]]:
    """(metrics, paired differences to base, headline) of one method."""
    metrics = {scorer.name: mean_estimate(scores, n_boot, seed)}
    delta = {scorer.name: paired_difference(scores, base_scores, n_boot, seed)}
    headline = [scorer.name]
    if scorer.needs_kind:
        w = balance_weights(kinds)
        k = np.asarray(kinds)
        metrics["balanced_accuracy"] = mean_estimate(w * scores, n_boot, seed)
        metrics["refused_harmful"] = mean_estimate(scores[k == "harmful"], n_boot, seed)
        metrics["answered_benign"] = mean_estimate(scores[k == "benign"], n_boot, seed)
        delta["balanced_accuracy"] = paired_difference(w * scores, w * base_scores, n_boot, seed)
        for half in ("harmful", "benign"):
            name = "refused_harmful" if half == "harmful" else "answered_benign"
            delta[name] = paired_difference(scores[k == half], base_scores[k == half], n_boot, seed)
        headline = ["balanced_accuracy", "refused_harmful", "answered_benign"]
    metrics["perplexity"] = Estimate(math.exp(nll[0] / max(1, nll[1])))
    metrics["distinct_2"] = Estimate(distinct_n(answers, 2))
    metrics["words"] = Estimate(float(np.mean([len(a.split()) for a in answers])))
    return metrics, delta, headline + ["perplexity", "distinct_2"]


def run_attribute_eval(cfg: AttributeEvalConfig, model=None, tokenizer=None, progress: bool = True) -> list[ResultRecord]:
    from saealign.best_of_k import load_prompts
    from saealign.models import load_model

    if not cfg.output or not cfg.scorer or not cfg.sources:
        raise ValueError("eval attributes needs --output, --scorer and --sources")
    scorer = get_scorer(cfg.scorer)
    prompts = load_prompts(cfg.sources, cfg.data, cfg.n, cfg.seed, cfg.split_seed, cfg.max_prompt_words, cfg.exclude)
    kinds = [p.kind for p in prompts]
    if scorer.needs_kind and None in kinds:
        raise ValueError(f"scorer {scorer.name!r} needs each prompt's kind: give sources as KIND=SOURCE")
    entries = [method_entry(e) for e in cfg.methods]
    names = [n for n, _ in entries]
    if "base" not in dict(entries).values() or len(set(names)) != len(names):
        raise ValueError(f"--methods must include base (the paired reference) and name each method once, got {cfg.methods}")
    out = Path(cfg.output)
    start_run(out, asdict(cfg), GENERATION_FIELDS)
    if model is None:
        model, tokenizer = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    answers = {name: generate_answers(cfg, prompts, name, spec, model, tokenizer, out, progress) for name, spec in entries}
    scores = {name: np.array([scorer(p.text, a, p.kind) for p, a in zip(prompts, ans)]) for name, ans in answers.items()}
    base_name = next(name for name, spec in entries if spec == "base")
    benchmark = f"attr:{scorer.name}"
    config = {**asdict(cfg), "scorer": scorer.provenance(), "n_prompts": len(prompts),
              "n_by_kind": {str(k): kinds.count(k) for k in dict.fromkeys(kinds)}}
    data = {"sources": cfg.sources, "data": cfg.data, "n": len(prompts), "sample_seed": cfg.seed,
            "split_seed": cfg.split_seed, "n_by_kind": config["n_by_kind"]}
    records = []
    for name, spec in entries:
        nll = base_nll(model, tokenizer, prompts, answers[name], _answers_path(out, name).with_suffix(".nll.json"))
        metrics, delta, headline = method_metrics(scorer, scores[name], scores[base_name], kinds, answers[name], nll,
                                                  cfg.n_boot, cfg.seed)
        records.append(ResultRecord(benchmark, name, metrics, headline, {**config, "method_spec": spec},
                                    data=data, baseline=base_name, deltas=delta))
    write_results(out / "results.json", records)
    write_markdown(out / "results.md", records, base_name)
    plot_deltas(records, base_name, out / "deltas.png")
    return records


def write_markdown(path: Path, records: list[ResultRecord], base_name: str) -> None:
    from saealign._io import atomic_path

    first = records[0]
    kinds = ", ".join(f"{k} {n}" for k, n in first.config["n_by_kind"].items())
    lines = [f"# {first.benchmark}: {first.config['n_prompts']} prompts ({kinds})", "",
             "Cells: value [95 % bootstrap interval]; Δ: paired difference to "
             f"`{base_name}` [95 % bootstrap interval].", "",
             "| method | " + " | ".join(f"{h} | Δ {h}" if h in first.deltas else h for h in first.headline) + " |",
             "|---|" + "---|" * sum(2 if h in first.deltas else 1 for h in first.headline)]
    for r in records:
        cells = []
        for h in first.headline:
            cells.append(format_estimate(r.metrics[h], 3))
            if h in first.deltas:
                cells.append(format_estimate(r.deltas.get(h), 3))
        lines.append(f"| {r.method} | " + " | ".join(cells) + " |")
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def plot_deltas(records: list[ResultRecord], base_name: str, path: Path) -> Path:
    """Bars of each method's paired difference to base on the headline attribute metric(s), bootstrap intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [h for h in records[0].headline if h in records[0].deltas]
    others = [r for r in records if r.method != base_name]
    fig, axes = plt.subplots(1, len(names), figsize=(max(5, 1.2 * len(others) + 2) * len(names) / 1.5, 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        ds = [r.deltas[name] for r in others]
        values = [d.value for d in ds]
        errors = np.array([[d.value - d.ci95[0], d.ci95[1] - d.value] if d.ci95 else [0.0, 0.0] for d in ds]
                          ).T.reshape(2, -1)
        ax.bar(range(len(others)), values, yerr=errors, capsize=3)
        ax.set_xticks(range(len(others)))
        ax.set_xticklabels([r.method for r in others], rotation=30, ha="right")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_title(f"{records[0].benchmark} {name}")
    axes[0][0].set_ylabel(f"paired change vs {base_name} (95% bootstrap CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
