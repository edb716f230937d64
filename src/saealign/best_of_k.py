"""Preference triples by best-of-K (METHOD.md, "Positive controls"): K sampled answers of the base
model per prompt, scored by a deterministic attribute scorer; chosen = best, rejected = worst.

Prompts come from sources `[KIND=]ROLE_OR_FILE`: a data role of an HH-RLHF directory (`--data`) or a
prompts file (`.txt`, one prompt a line, or `.jsonl` with a `prompt` string or message list). A role's
prompt is its dialogues' first user turn: in harmless-base that turn is the red-team request itself,
and single-turn prompts keep generation short. Duplicate prompts of one kind are kept once.

Output directory: `triples.jsonl` (TRL conversational records, loadable by `load_preferences` and
`saealign dspa fit --data`), `samples.jsonl` (all K answers with their scores, for audit),
`provenance.json` (model, sampling, seeds, scorer and version, counts) and `progress.json`. Prompts
are processed in batches; after each batch both files are appended and `progress.json` (their byte
sizes and the counts) is replaced atomically, so a rerun truncates anything written after the last
record and continues exactly. A rerun with other settings is refused, naming the setting.

Sampling of prompt batch `b` is seeded with `batch_seed(seed, b)`, so the triples do not depend on when a
run was interrupted; they do depend on `batch_prompts` and `batch_size` (recorded, and a change is refused).
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from saealign._io import read_json, text_fingerprint, write_json
from saealign.config import check_config, differing_settings
from saealign.data import read_records, select_subset
from saealign.eval.attributes import KINDS, Scorer, get_scorer
from saealign.models import ModelOptions

log = logging.getLogger(__name__)

SETTINGS = ("model", "data", "sources", "n", "seed", "split_seed", "max_prompt_words", "exclude", "scorer",
            "scorer_version", "k", "k_by_kind", "temperature", "top_p", "max_new_tokens", "min_margin", "batch_prompts",
            "batch_size", "prompts_fingerprint")


def batch_seed(seed: int, batch: int, k: int | None = None) -> int:
    """The sampling seed of one batch of prompts (of its prompts sampled `k` times, when a batch mixes
    kinds with different K). `generate` seeds its own inner batches `s, s+1, ...`, so consecutive
    integers would give two prompt batches the same random streams; a hash keeps them apart."""
    return int(text_fingerprint([seed, batch] if k is None else [seed, batch, k])[:12], 16)


@dataclass(frozen=True)
class AttributePrompt:
    """A prompt conversation and its kind (`harmful` / `benign`, or None when the scorer needs none)."""

    conversation: list[dict[str, str]]
    kind: str | None = None

    @property
    def text(self) -> str:
        return self.conversation[-1]["content"]

    @property
    def id(self) -> str:
        return text_fingerprint([self.conversation, self.kind])[:16]


def _file_prompts(path: Path) -> list[list[dict[str, str]]]:
    from saealign.data import read_records

    if path.suffix == ".txt":
        return [[{"role": "user", "content": line.strip()}] for line in path.read_text().splitlines() if line.strip()]
    out = []
    for line, record in read_records(path):
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if isinstance(prompt, str) and prompt.strip():
            out.append([{"role": "user", "content": prompt}])
        elif isinstance(prompt, list) and prompt and prompt[-1].get("role") == "user":
            out.append(prompt)
        else:
            raise ValueError(f"{path}:{line}: expected a 'prompt' string or a message list ending with a user turn")
    return out


def _conversations(source: str, data: str | None, split_seed: int) -> tuple[str, list[list[dict[str, str]]]]:
    """(kind or "", prompt conversations) of one `[KIND=]ROLE_OR_FILE` source."""
    from saealign.data import DATA_ROLES, HARMLESS_ROLES, LEGACY_ROLES, first_user_turn, select_triples

    kind, _, where = source.rpartition("=")
    if kind and kind not in KINDS:
        raise ValueError(f"prompt source {source!r}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if where in DATA_ROLES + HARMLESS_ROLES + LEGACY_ROLES:
        if not data:
            raise ValueError(f"prompt source {source!r} names a data role: pass --data (the HH-RLHF directory)")
        return kind, [[{"role": "user", "content": first_user_turn(t)}]
                      for t in select_triples(data, where, split_seed=split_seed)]
    path = Path(where)
    if not path.is_file():
        raise FileNotFoundError(f"prompt source {source!r}: neither a data role nor a file")
    return kind, _file_prompts(path)


def load_prompts(sources: list[str], data: str | None = None, n: int | None = None, seed: int = 0,
                 split_seed: int = 0, max_prompt_words: int | None = None,
                 exclude: list[str] = ()) -> list[AttributePrompt]:
    """Prompts from `[KIND=]ROLE_OR_FILE` sources, each a seeded draw of `n` (all when None), in order.

    Dropped before the draw (and logged): prompts over `max_prompt_words` whitespace words (a few pasted
    documents, 1,000+ tokens among prompts of median 11, would set the padded width of their generation
    batch), and prompts whose text occurs in an `exclude` source (HH-RLHF repeats opening turns across
    dialogues: 57 harmless-test openings are also harmless-fit ones), so that held-out means unseen."""
    seen = {c[-1]["content"].strip() for source in exclude for c in _conversations(source, data, split_seed)[1]}
    out: list[AttributePrompt] = []
    for source in sources:
        kind, conversations = _conversations(source, data, split_seed)
        unique = list({json.dumps(c, sort_keys=True): c for c in conversations}.values())
        kept = [c for c in unique if c[-1]["content"].strip() not in seen
                and (max_prompt_words is None or sum(len(m["content"].split()) for m in c) <= max_prompt_words)]
        if len(kept) < len(unique):
            log.warning("%s: dropped %d of %d prompts (over %s words, or in %s)", source, len(unique) - len(kept),
                        len(unique), max_prompt_words, list(exclude) or "no excluded source")
        unique = kept
        unique = select_subset(unique, n, f"prompts/{seed}")
        out += [AttributePrompt(c, kind or None) for c in unique]
    if not out:
        raise ValueError(f"no prompts in {sources}")
    return out


@dataclass
class BestOfKConfig(ModelOptions):
    """`saealign data best-of-k`: preference triples from K sampled answers per prompt, ranked by a scorer."""

    output: str = field(default="", metadata={"help": "Directory for triples.jsonl, samples.jsonl, provenance.json."})
    sources: list[str] = field(default_factory=list, metadata={"help": "Prompt sources [KIND=]ROLE_OR_FILE (repeat), e.g. harmful=harmless_fit, benign=fit, prompts.txt."})
    scorer: str = field(default="", metadata={"help": "Attribute scorer by name (saealign.eval.attributes: repetition, refusal, length, refuse_iff_harmful, or your own)."})
    data: str | None = field(default=None, metadata={"help": "HH-RLHF directory when a source names a role."})
    n: int | None = field(default=None, metadata={"help": "Seeded uniform draw of this many prompts per source (default: all).", "ge": 1})
    seed: int = field(default=0, metadata={"help": "Seed of the prompt draw and of sampling (batch b samples with seed + b)."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the HH-RLHF fit/validation split (sources naming those roles)."})
    max_prompt_words: int | None = field(default=200, metadata={"help": "Drop longer prompts (before the draw).", "ge": 1})
    exclude: list[str] = field(default_factory=list, metadata={"help": "Drop prompts whose text occurs in these sources (repeat), e.g. the fit roles for held-out triples."})
    k: int = field(default=4, metadata={"help": "Answers sampled per prompt.", "ge": 2})
    k_by_kind: list[str] = field(default_factory=list, metadata={"help": "KIND=K overrides (e.g. harmful=16: refusals are rare)."})
    temperature: float = field(default=0.9, metadata={"help": "Sampling temperature of the K answers.", "gt": 0})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling: keep the tokens of this much probability.", "gt": 0, "le": 1})
    max_new_tokens: int = field(default=48, metadata={"help": "Most tokens per sampled answer.", "ge": 1})
    min_margin: float = field(default=0.0, metadata={"help": "Skip prompts whose best-worst score gap is below this (a zero gap, a tie, is always skipped).", "ge": 0})
    batch_prompts: int = field(default=16, metadata={"help": "Prompts per resumable batch.", "ge": 1})
    batch_size: int = field(default=16, metadata={"help": "Sequences per generate call.", "ge": 1})

    def __post_init__(self) -> None:
        check_config(self)
        self.k_of_kind()  # malformed overrides fail before anything loads

    def k_of_kind(self) -> dict[str, int]:
        out = {}
        for entry in self.k_by_kind:
            kind, _, value = entry.partition("=")
            if kind not in KINDS or not value.isdigit() or int(value) < 2:
                raise ValueError(f"--k-by-kind {entry!r}: expected KIND=K with KIND in {KINDS} and K >= 2")
            out[kind] = int(value)
        return out


@dataclass
class Outcome:
    """Chosen/rejected indices among one prompt's samples, or why it yields no triple."""

    chosen: int | None
    rejected: int | None
    skipped: str | None  # "tie" or "margin"


def pick(scores: list[float], goal: str, min_margin: float) -> Outcome:
    """Best and worst sample by the scorer's goal (the first of equals); a zero gap is a tie."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i] if goal == "max" else scores[i], i))
    best = order[0]
    worst = min((i for i in order if scores[i] == scores[order[-1]]))
    gap = abs(scores[best] - scores[worst])
    if gap == 0:
        return Outcome(None, None, "tie")
    if gap < min_margin:
        return Outcome(None, None, "margin")
    return Outcome(best, worst, None)


def trl_record(prompt: AttributePrompt, chosen: str, rejected: str, **extra: Any) -> dict[str, Any]:
    """A TRL conversational preference record (prompt messages, one-message chosen/rejected)."""
    return {"prompt": prompt.conversation, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], **extra}


class _Appender:
    """Files appended per batch whose committed sizes live in progress.json (replaced atomically): on
    resume anything past the committed size is a torn write and is cut off."""

    def __init__(self, out: Path, names: tuple[str, ...], sizes: dict[str, int]):
        self.paths = {n: out / n for n in names}
        for name, path in self.paths.items():
            with open(path, "ab") as f:
                f.truncate(sizes.get(name, 0))

    def append(self, name: str, records: list[dict[str, Any]]) -> None:
        with open(self.paths[name], "ab") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())
            f.flush()
            os.fsync(f.fileno())

    def sizes(self) -> dict[str, int]:
        return {n: p.stat().st_size for n, p in self.paths.items()}


def _settings(cfg: BestOfKConfig, scorer: Scorer, prompts: list[AttributePrompt]) -> dict[str, Any]:
    values = {**asdict(cfg), "scorer_version": scorer.version,
              "prompts_fingerprint": text_fingerprint([[p.conversation, p.kind] for p in prompts])}
    return {k: values[k] for k in SETTINGS}


def _refuse_other_settings(out: Path, settings: dict[str, Any]) -> None:
    path = out / "progress.json"
    if not path.exists():
        return
    detail = differing_settings(read_json(path)["settings"], settings)
    if detail:
        raise ValueError(f"{out}: holds best-of-K triples built with other settings ({detail}); "
                         "use another output directory")


def build_best_of_k(cfg: BestOfKConfig, model=None, tokenizer=None, progress: bool = True) -> dict[str, Any]:
    """Build (or continue) best-of-K triples into `cfg.output`; returns the provenance with its counts."""
    from saealign._io import versions
    from saealign.runtime.generation import Sampling, generate_chat
    from saealign.models import load_model, model_fingerprint, model_id

    if not cfg.output or not cfg.sources or not cfg.scorer:
        raise ValueError("best-of-k needs --output, --sources and --scorer")
    scorer = get_scorer(cfg.scorer)
    prompts = load_prompts(cfg.sources, cfg.data, cfg.n, cfg.seed, cfg.split_seed, cfg.max_prompt_words, cfg.exclude)
    kinds_missing = scorer.needs_kind and any(p.kind is None for p in prompts)
    if kinds_missing:
        raise ValueError(f"scorer {scorer.name!r} needs each prompt's kind: "
                         f"give sources as KIND=SOURCE ({', '.join(KINDS)})")
    out = Path(cfg.output)
    settings = _settings(cfg, scorer, prompts)
    _refuse_other_settings(out, settings)
    out.mkdir(parents=True, exist_ok=True)
    state = read_json(out / "progress.json") if (out / "progress.json").exists() else {
        "batches_done": 0, "sizes": {}, "counts": {"prompts": 0, "triples": 0, "skipped_tie": 0, "skipped_margin": 0}}
    if model is None:
        model, tokenizer = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    sampling = Sampling(cfg.temperature, cfg.top_p, cfg.max_new_tokens)
    k_of = cfg.k_of_kind()
    files = _Appender(out, ("triples.jsonl", "samples.jsonl"), state["sizes"])
    batches = [prompts[i:i + cfg.batch_prompts] for i in range(0, len(prompts), cfg.batch_prompts)]
    counts = state["counts"]
    bar = tqdm(total=len(prompts), initial=min(len(prompts), state["batches_done"] * cfg.batch_prompts),
               desc=f"best-of-K {scorer.name}", unit="prompt", disable=not progress)
    for b in range(state["batches_done"], len(batches)):
        batch = batches[b]
        ks = [k_of.get(p.kind, cfg.k) for p in batch]
        answers_of: dict[int, list[str]] = {}
        mixed = len(set(ks)) > 1
        for k in sorted(set(ks)):
            group = [i for i, ki in enumerate(ks) if ki == k]
            texts = generate_chat(model, tokenizer, [batch[i].conversation for i in group], sampling,
                                  seed=batch_seed(cfg.seed, b, k if mixed else None),
                                  batch_size=cfg.batch_size, progress=False, num_samples=k)
            answers_of.update({i: texts[j * k:(j + 1) * k] for j, i in enumerate(group)})
        triples, samples = [], []
        for i, p in enumerate(batch):
            answers = answers_of[i]
            scores = [scorer(p.text, a, p.kind) for a in answers]
            outcome = pick(scores, scorer.goal, cfg.min_margin)
            counts["prompts"] += 1
            samples.append({"id": p.id, "kind": p.kind, "prompt": p.conversation, "answers": answers, "scores": scores,
                            "skipped": outcome.skipped})
            if outcome.skipped:
                counts[f"skipped_{outcome.skipped}"] += 1
                continue
            counts["triples"] += 1
            triples.append(trl_record(p, answers[outcome.chosen], answers[outcome.rejected], id=p.id, kind=p.kind,
                                      score_chosen=scores[outcome.chosen], score_rejected=scores[outcome.rejected]))
        files.append("triples.jsonl", triples)
        files.append("samples.jsonl", samples)
        state = {"settings": settings, "batches_done": b + 1, "sizes": files.sizes(), "counts": counts}
        write_json(out / "progress.json", state)
        bar.update(len(batch))
    bar.close()
    counts_by_kind = _counts_by_kind(out / "samples.jsonl")
    provenance = {"model": {"id": model_id(model), "fingerprint": model_fingerprint(model)},
                  "sampling": {**asdict(sampling), "seed": cfg.seed, "k": cfg.k, "k_by_kind": k_of,
                               "batch_seed": "best_of_k.batch_seed(seed, prompt batch index)"},
                  "scorer": {**scorer.provenance(), "description": scorer.description},
                  "counts": {**counts, "by_kind": counts_by_kind},
                  "config": asdict(cfg), "settings": settings, "versions": versions()}
    write_json(out / "provenance.json", provenance)
    return provenance


def _counts_by_kind(samples: Path) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for _, s in read_records(samples):
        c = out.setdefault(str(s["kind"]), {"prompts": 0, "triples": 0})
        c["prompts"] += 1
        c["triples"] += s["skipped"] is None
    return out


def write_shuffled_labels(src: str | Path, dst: str | Path, seed: int = 0) -> int:
    """The negative control's data: `src` triples with chosen and rejected swapped for a seeded random half
    (exactly floor(n/2) records, so the swaps cancel the triples' common direction: with a fair coin per
    record, the imbalance, e.g. 7 of 279 records, would leave that share of the real map's direction in the
    control). A map fitted on them should have no held-out signal and no effect. Returns how many were swapped."""
    from saealign.data import read_records
    from saealign.eval.mt_bench import write_jsonl

    partner = {"chosen": "rejected", "rejected": "chosen",
               "score_chosen": "score_rejected", "score_rejected": "score_chosen"}
    records = [record for _, record in read_records(Path(src))]
    swap = set(random.Random(f"shuffled-labels/{seed}").sample(range(len(records)), len(records) // 2))
    write_jsonl(dst, [{k: record.get(partner.get(k, k), v) for k, v in record.items()} if i in swap else record
                      for i, record in enumerate(records)])
    return len(swap)


# What best-of-K parts must share to be one data set: the answers come from one model under one scorer and
# one sampling rule (device, seed, prompts and K may differ: a GPU part and a CPU part of the same pool).
_MERGE_KEYS = (("model", "fingerprint"), ("scorer", "name"), ("scorer", "version"), ("sampling", "temperature"),
               ("sampling", "top_p"), ("sampling", "max_new_tokens"))


def merge_triples(parts: list[str | Path], output: str | Path, kinds: list[str] | None = None) -> dict[str, Any]:
    """One triples file from several `data best-of-k` outputs (directories holding triples.jsonl and
    provenance.json), keeping `kinds` only when given; a prompt in two parts keeps its first triple. Parts
    that differ in model, scorer or sampling rule are refused before anything is written. Returns the
    provenance written beside the merged triples (each part's provenance under `parts`)."""
    if not parts:
        raise ValueError("merge_triples needs at least one part")
    dirs = [Path(p).parent if Path(p).name == "triples.jsonl" else Path(p) for p in parts]
    provs = [read_json(d / "provenance.json") for d in dirs]  # FileNotFoundError names the missing file
    for d, prov in zip(dirs[1:], provs[1:]):
        for section, key in _MERGE_KEYS:
            there, here = provs[0][section][key], prov[section][key]
            if there != here:
                raise ValueError(f"{d / 'provenance.json'}: field {section}.{key} is {here!r}, expected {there!r} "
                                 f"(as in {dirs[0] / 'provenance.json'})")
    records, seen, duplicates = [], set(), 0
    for d in dirs:
        for _, record in read_records(d / "triples.jsonl"):
            if kinds is not None and record.get("kind") not in kinds:
                continue
            key = record.get("id") or json.dumps(record["prompt"], sort_keys=True)
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            records.append(record)
    by_kind: dict[str, dict[str, int]] = {}
    for prov in provs:
        for kind, c in prov["counts"]["by_kind"].items():
            if kinds is None or kind in kinds:
                total = by_kind.setdefault(kind, {"prompts": 0, "triples": 0})
                total["prompts"] += c["prompts"]
    for record in records:
        by_kind.setdefault(str(record.get("kind")), {"prompts": 0, "triples": 0})["triples"] += 1
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    from saealign.eval.mt_bench import write_jsonl

    write_jsonl(out / "triples.jsonl", records)
    provenance = {"model": provs[0]["model"], "scorer": provs[0]["scorer"],
                  "sampling": {key: provs[0]["sampling"][key] for key in ("temperature", "top_p", "max_new_tokens")},
                  "counts": {"prompts": sum(c["prompts"] for c in by_kind.values()), "triples": len(records),
                             "duplicates_dropped": duplicates, "by_kind": by_kind},
                  "kinds": kinds, "parts": [{"path": str(d), **prov} for d, prov in zip(dirs, provs)]}
    write_json(out / "provenance.json", provenance)
    return provenance
