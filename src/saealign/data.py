"""Preference data: loading, the fixed HH-RLHF data roles, seeded draws, chat rendering and batching.

Every method (DSPA fitting, FPO/DPO training, evaluation) consumes `PreferenceTriple`s, so the
format quirks of each source are resolved here once:

* HH-RLHF raw records hold two whole dialogues (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``). The shared
  prompt conversation is their longest common prefix that ends with an ``"\\n\\nAssistant:"`` marker;
  the responses are what follows. (Splitting at the *last* marker of each string, as the derived
  ``prompt_chosen_rejected`` files do, is wrong for the 17 test records whose responses themselves
  contain turn markers: it gives chosen and rejected different prompts.)
* TRL "standard" records: ``prompt``/``chosen``/``rejected`` strings (a prompt string in HH format is
  parsed into turns). TRL "conversational" records: message lists, with the prompt either in its own
  field or as the shared prefix of full ``chosen``/``rejected`` conversations (UltraFeedback binarized).

Bad records raise `PreferenceDataError` naming file, line and field (or, with ``errors="drop"``, are
dropped and counted). Pairs whose responses are identical are always dropped, counted and logged.
Nothing is dropped silently: every decision lands in a `LoadReport`.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import random
import re
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Sequence

import numpy as np
import torch

from saealign._io import text_fingerprint

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
_HH_MARKER = re.compile(r"\n\n(Human|Assistant):")
_HH_ASSISTANT = "\n\nAssistant:"
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}
_LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz")
_PATH_SUFFIXES = (".jsonl", ".json", ".parquet", ".gz", ".txt", ".csv", ".tsv", ".arrow")  # never hub names

HH_SUBSETS = ("helpful-base", "helpful-online", "helpful-rejection-sampled", "harmless-base")
FIT_SUBSETS = ("helpful-online", "helpful-rejection-sampled")
DATA_ROLES = ("fit", "validation", "test_helpful", "test_harmless")
# SPLITS.md's seeded split of harmless-base over dialogues: 40 % fit, 10 % validation, 50 % test (the test
# part is DATA_ROLES' `test_harmless`). `harmless_all` is the whole of harmless-base: the harmless test set of
# the numbers published before the split, kept only to reproduce them (it overlaps the fit part).
HARMLESS_ROLES = ("harmless_fit", "harmless_validation", "test_harmless")
LEGACY_ROLES = ("harmless_all",)
HARMLESS_FRACTIONS = (0.4, 0.1)


# --------------------------------------------------------------------------------------------
# Records and reports
# --------------------------------------------------------------------------------------------

@dataclass
class PreferenceTriple:
    """One preference pair: a prompt conversation and two final assistant replies.

    `prompt` is a list of ``{"role", "content"}`` messages ending with a user turn; earlier turns of
    multi-turn dialogues stay in it. `meta` holds provenance: ``source``, ``line`` (1-based record
    number), ``id``, ``subset``, ``format`` and ``extra`` (the record's other fields, e.g. scores).
    """

    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Problem:
    """A finding about one record and what was done with it (`action`: "raised", "dropped" or "kept")."""

    source: str
    line: int | None
    field: str | None
    reason: str
    message: str
    action: Literal["raised", "dropped", "kept"] = "dropped"

    def __str__(self) -> str:
        where = self.source + (f":{self.line}" if self.line is not None else "")
        what = f"field {self.field!r}: " if self.field else ""
        return f"{where}: {what}{self.message}"


class PreferenceDataError(ValueError):
    """A preference record that cannot be used; the message names file, line and field."""

    def __init__(self, problem: Problem):
        super().__init__(str(problem))
        self.problem = problem


class _FieldError(Exception):
    """A bad record (raised while parsing, or yielded by `read_records`); the loader adds file and line."""

    def __init__(self, field: str | None, message: str, reason: str = "invalid_field"):
        super().__init__(message)
        self.field, self.message, self.reason = field, message, reason


@dataclass
class LoadReport:
    """What happened while loading: counts per outcome and every problem found."""

    read: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> records not kept
    warnings: Counter = field(default_factory=Counter)  # reason -> records kept with a warning
    formats: Counter = field(default_factory=Counter)  # detected format -> records kept
    problems: list[Problem] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def merge(self, other: LoadReport) -> None:
        self.read += other.read
        self.kept += other.kept
        self.dropped.update(other.dropped)
        self.warnings.update(other.warnings)
        self.formats.update(other.formats)
        self.problems.extend(other.problems)
        self.sources.extend(other.sources)

    def summary(self) -> dict[str, Any]:
        """JSON-ready counts (no problem texts) for result files."""
        return {"read": self.read, "kept": self.kept, "dropped": dict(self.dropped),
                "warnings": dict(self.warnings), "formats": dict(self.formats), "sources": list(self.sources)}


# --------------------------------------------------------------------------------------------
# Parsing one record
# --------------------------------------------------------------------------------------------

def _hh_turns(text: str, field_name: str) -> list[dict[str, str]]:
    """Turns of an HH-RLHF dialogue prefix that ends with ``"\\n\\nAssistant:"`` (the marker is dropped).

    Consecutive turns of the same speaker (a few HH dialogues have them) are joined, because most
    chat templates require alternating roles.
    """
    parts = _HH_MARKER.split("\n\n" + text.lstrip())
    if parts[0].strip() or len(parts) < 3 or parts[1] != "Human":
        raise _FieldError(field_name, "not an HH-RLHF dialogue: expected it to start with '\\n\\nHuman:'", "unknown_format")
    if parts[-2] != "Assistant" or parts[-1].strip():
        raise _FieldError(field_name, "HH-RLHF prompt must end with '\\n\\nAssistant:'")
    messages: list[dict[str, str]] = []
    for speaker, content in zip(parts[1:-2:2], parts[2:-2:2]):
        role, content = _HH_ROLE[speaker], content.strip()
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n\n" + content
        else:
            messages.append({"role": role, "content": content})
    return messages


def _is_hh(text: str) -> bool:
    """An HH-RLHF dialogue: starts with a Human turn and has an Assistant turn."""
    return text.lstrip().startswith("Human:") and _HH_ASSISTANT in text


def _common_prefix_length(a: str, b: str) -> int:
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:  # binary search on C-level slice comparisons: fast on long dialogues
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _split_hh(chosen: str, rejected: str, c_key: str) -> tuple[list[dict[str, str]], str, str]:
    """Shared prompt = longest common prefix of the two dialogues that ends at an Assistant marker."""
    chosen, rejected = "\n\n" + chosen.lstrip(), "\n\n" + rejected.lstrip()
    cut = chosen.rfind(_HH_ASSISTANT, 0, _common_prefix_length(chosen, rejected))
    if cut < 0:
        raise _FieldError(c_key, "chosen and rejected dialogues share no turn ending in '\\n\\nAssistant:'")
    cut += len(_HH_ASSISTANT)
    return _hh_turns(chosen[:cut], c_key), chosen[cut:], rejected[cut:]


def _messages(value: Any, field_name: str) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise _FieldError(field_name, f"expected a list of messages, got {type(value).__name__}")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise _FieldError(f"{field_name}[{i}]", "expected a message {'role': ..., 'content': ...}")
        if msg["role"] not in ROLES:
            raise _FieldError(f"{field_name}[{i}].role", f"unknown role {msg['role']!r}; expected one of {ROLES}")
        if not isinstance(msg["content"], str):
            raise _FieldError(f"{field_name}[{i}].content", f"expected a string, got {type(msg['content']).__name__}")
        out.append({"role": msg["role"], "content": msg["content"].strip()})
    return out


def _prompt_messages(value: Any, field_name: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return _hh_turns(value, field_name) if _is_hh(value) else [{"role": "user", "content": value.strip()}]
    return _messages(value, field_name)


def _split_conversations(prompt: list[dict[str, str]] | None, chosen: list[dict[str, str]],
                         rejected: list[dict[str, str]], keys: tuple[str, str, str]):
    """Prompt + one final assistant message each, from completion-only or full conversations."""
    p_key, c_key, r_key = keys
    full = []
    for conv, key in ((chosen, c_key), (rejected, r_key)):
        if not conv:
            raise _FieldError(key, "empty message list", "empty_response")
        if conv[0]["role"] == "assistant":  # completion only: the prompt is its own field
            if prompt is None:
                raise _FieldError(p_key, f"missing, and {key!r} holds only the assistant reply")
            conv = prompt + conv
        full.append(conv)
    shared = 0
    while shared < min(len(full[0]), len(full[1])) - 1 and full[0][shared] == full[1][shared]:
        shared += 1
    for conv, key in zip(full, (c_key, r_key)):
        if len(conv) != shared + 1 or conv[-1]["role"] != "assistant":
            raise _FieldError(key, "expected the two conversations to share every message except one final "
                                   f"assistant reply; they share {shared} of {len(conv)}")
    return full[0][:shared], full[0][-1]["content"], full[1][-1]["content"]


def _parse_record(record: Any, keys: tuple[str, str, str]) -> tuple[list[dict[str, str]], str, str, str]:
    """`(prompt, chosen, rejected, format)` of one record, raising `_FieldError` on bad input."""
    p_key, c_key, r_key = keys
    if not isinstance(record, dict):
        raise _FieldError(None, f"expected an object with {c_key!r}/{r_key!r} fields, got {type(record).__name__}")
    for key in (c_key, r_key):
        if key not in record or record[key] is None:
            raise _FieldError(key, "missing", "missing_field")
    chosen, rejected, prompt = record[c_key], record[r_key], record.get(p_key)
    if isinstance(chosen, str) and isinstance(rejected, str):
        if prompt is None:
            if not (_is_hh(chosen) and _is_hh(rejected)):
                raise _FieldError(p_key, "missing, and chosen/rejected are not HH-RLHF dialogues "
                                         "('\\n\\nHuman: ... \\n\\nAssistant: ...'), so the prompt is unknown", "missing_field")
            messages, c, r = _split_hh(chosen, rejected, c_key)
            return messages, c, r, "hh-rlhf"
        fmt = "standard" if isinstance(prompt, str) else "conversational"
        if isinstance(prompt, str) and _is_hh(prompt):
            fmt = "hh-rlhf-split"
        return _prompt_messages(prompt, p_key), chosen, rejected, fmt
    if isinstance(chosen, list) and isinstance(rejected, list):
        prompt_msgs = None if prompt is None else _prompt_messages(prompt, p_key)
        messages, c, r = _split_conversations(prompt_msgs, _messages(chosen, c_key), _messages(rejected, r_key), keys)
        return messages, c, r, "conversational" if prompt is not None else "conversational-implicit"
    raise _FieldError(c_key, f"expected strings or message lists, got {type(chosen).__name__}/{type(rejected).__name__}")


# --------------------------------------------------------------------------------------------
# Reading sources
# --------------------------------------------------------------------------------------------

_GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """`(1-based line number, text without its line ending)` of a local file, gunzipped if ``.gz``.

    Every local route reads through here, so every route refuses bad bytes the same way: a UTF-8 BOM
    is accepted, and undecodable bytes or a truncated gzip stream raise one ValueError naming the
    file and the line (decoding line by line is what makes the line number known).
    """
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    number = 0
    try:
        with opener(path, "rb") as fh:
            for number, raw in enumerate(fh, start=1):
                try:
                    text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as err:
                    raise ValueError(f"{path}:{number}: not UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
                                     "the file must be UTF-8") from None
                yield number, text.rstrip("\r\n")
    except _GZIP_ERRORS as err:
        raise ValueError(f"{path}:{number + 1}: truncated or corrupt gzip file ({err})") from None


def read_records(path: Path, strict: bool = True) -> Iterator[tuple[int, Any]]:
    """`(1-based line or record number, record)` of a local .jsonl/.json/.parquet file (optionally ``.gz``).

    A record that cannot be used at all (malformed JSON, a .json file that is not a list) raises a
    ValueError naming file and line; with ``strict=False`` it is yielded as a `_FieldError` instead,
    so that ``load_preferences(errors="drop")`` can count it and go on.
    """
    for number, record in _records(path):
        if strict and isinstance(record, _FieldError):
            raise ValueError(f"{path}:{number}: {record.message}")
        yield number, record


def _records(path: Path) -> Iterator[tuple[int, Any]]:
    name = path.name.lower()
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
            rows = (row for batch in batches for row in batch.to_pylist())
            yield from enumerate(rows, start=1)
        except pa.ArrowException as err:
            raise ValueError(f"{path}: not a readable parquet file ({err})") from None
    elif name.endswith((".jsonl", ".jsonl.gz")):
        for number, line in read_lines(path):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                yield number, _FieldError(None, f"malformed JSON ({err.msg} at column {err.colno}); "
                                                "expected one JSON object per line", "malformed_json")
    elif name.endswith((".json", ".json.gz")):
        text = "\n".join(line for _, line in read_lines(path))
        expected = "expected a JSON list of records (or {'data': [...]})"
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            yield err.lineno, _FieldError(None, f"malformed JSON ({err.msg} at column {err.colno}); {expected}",
                                          "malformed_json")
            return
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            yield 1, _FieldError(None, f"{expected}, got {type(data).__name__}")
            return
        yield from enumerate(data, start=1)
    else:
        raise ValueError(f"{path}: unsupported file type; expected one of {', '.join(_LOCAL_SUFFIXES)}")


def _iter_hub(name: str, split: str | None, hf_kwargs: dict[str, Any]) -> Iterator[tuple[int, Any]]:
    from datasets import load_dataset

    dataset = load_dataset(name, split=split or "train", **hf_kwargs)
    yield from enumerate(dataset, start=1)


def local_path(source: str | Path) -> Path | None:
    """`source` as an existing local path, or None when it names a Hugging Face dataset.

    A missing path is refused here rather than handed to the hub loader, whose "couldn't find any data
    file" hides the typo. It looks local when it is a `Path`, starts with ``.``, ``/`` or ``~``, has more
    separators than a hub ``owner/name``, ends in a data-file suffix, or its parent folder exists.
    """
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        return path
    if (isinstance(source, Path) or text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1
            or text.lower().endswith(_PATH_SUFFIXES) or ("/" in text and path.parent.is_dir())):
        raise FileNotFoundError(f"no such file or directory: {text}")
    return None


def load_preferences(source: str | Path, split: str | None = None, limit: int | None = None, *,
                     subset: str | None = None, errors: Literal["raise", "drop"] = "raise",
                     allow_empty: bool = False, columns: dict[str, str] | None = None,
                     hf_kwargs: dict[str, Any] | None = None, report: LoadReport | None = None) -> list[PreferenceTriple]:
    """Load preference triples from a local jsonl/json/parquet file (optionally ``.gz``) or a HF dataset.

    The format is detected per record (HH-RLHF raw, TRL standard, TRL conversational). `split` and
    `hf_kwargs` (e.g. ``{"data_dir": "helpful-base"}``) apply to HF datasets only; `limit` caps the
    number of triples returned; `subset` is recorded in each triple's meta (used for stratified
    splits); `columns` renames fields, e.g. ``{"prompt": "question"}``.

    `errors="raise"` stops at the first bad record with a `PreferenceDataError`; `"drop"` drops it
    and records the problem in `report`. Empty responses are errors unless `allow_empty` (kept with
    a warning). Identical chosen/rejected responses are always dropped with a warning. A source that
    yields no triple is an error here, so that callers fail before loading a model.
    """
    if errors not in ("raise", "drop"):
        raise ValueError(f"errors must be 'raise' or 'drop', got {errors!r}")
    columns = columns or {}
    keys = (columns.get("prompt", "prompt"), columns.get("chosen", "chosen"), columns.get("rejected", "rejected"))
    path = local_path(source)
    if path is not None and path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory; pass one data file")
    if path is not None and (split is not None or hf_kwargs):
        raise ValueError(f"{source}: split/hf_kwargs apply to Hugging Face datasets, not local files")
    records = read_records(path, strict=False) if path is not None else _iter_hub(str(source), split, hf_kwargs or {})
    label = str(source) if path is not None or split is None else f"{source}[{split}]"
    local_report = LoadReport(sources=[label])
    id_prefix = subset or (path.name if path is not None else label)
    triples: list[PreferenceTriple] = []

    def note(line: int, field_name: str | None, reason: str, message: str,
             outcome: Literal["error", "drop", "keep"]) -> None:
        """Record a problem: "error" raises or drops per `errors`; "drop"/"keep" always do that."""
        action = {"error": "raised" if errors == "raise" else "dropped", "drop": "dropped", "keep": "kept"}[outcome]
        problem = Problem(label, line, field_name, reason, message, action)
        local_report.problems.append(problem)
        (local_report.warnings if action == "kept" else local_report.dropped)[reason] += 1
        if action == "raised":
            raise PreferenceDataError(problem)

    for line, record in records:
        if limit is not None and len(triples) >= limit:
            break
        local_report.read += 1
        if isinstance(record, _FieldError):
            note(line, record.field, record.reason, record.message, "error")
            continue
        try:
            prompt, chosen, rejected, fmt = _parse_record(record, keys)
        except _FieldError as err:
            note(line, err.field, err.reason, err.message, "error")
            continue
        if not prompt or prompt[-1]["role"] != "user":
            note(line, keys[0], "invalid_field", "the prompt conversation must end with a user message", "error")
            continue
        empty = [(key, text) for key, text in zip(keys[1:], (chosen, rejected)) if not text.strip()]
        chosen, rejected = chosen.strip(), rejected.strip()
        if empty:
            key, text = empty[0]
            note(line, key, "empty_response", f"expected a non-empty response, got {text!r}",
                 "keep" if allow_empty else "error")
            if not allow_empty:
                continue
        if chosen == rejected:
            note(line, keys[1], "identical", "chosen and rejected responses are identical; pair dropped", "drop")
            continue
        marked = [key for key, text in zip(keys[1:], (chosen, rejected)) if fmt == "hh-rlhf" and _HH_MARKER.search(text)]
        if marked:
            note(line, marked[0], "turn_markers_in_response",
                 "a response contains '\\n\\nHuman:'/'\\n\\nAssistant:' text; kept as part of the reply", "keep")
        extra = {k: v for k, v in record.items() if k not in keys}
        meta = {"source": label, "line": line, "id": extra.get("id", f"{id_prefix}/{line - 1}"),
                "subset": subset, "format": fmt, "extra": extra}
        triples.append(PreferenceTriple(prompt, chosen, rejected, meta))
        local_report.formats[fmt] += 1
    local_report.kept = len(triples)
    for reason, count in sorted(local_report.dropped.items()):
        log.warning("%s: dropped %d record(s): %s", label, count, reason)
    for reason, count in sorted(local_report.warnings.items()):
        log.warning("%s: kept %d record(s) with a warning: %s", label, count, reason)
    if not triples:
        raise ValueError(f"no preference triples in {label}: {_why_empty(local_report)}")
    if report is not None:
        report.merge(local_report)
    return triples


def _why_empty(report: LoadReport) -> str:
    if not report.read:
        return "it holds no records"
    dropped = ", ".join(f"{reason} {count}" for reason, count in sorted(report.dropped.items()))
    return f"all {report.read} record(s) dropped ({dropped}); first: {report.problems[0]}"


def drop_ties(triples: Sequence[PreferenceTriple], report: LoadReport | None = None) -> list[PreferenceTriple]:
    """Keep strict preferences: drop pairs whose chosen/rejected scores are equal (UltraFeedback ties).

    Scores are read from ``meta["extra"]`` (``score_chosen``/``score_rejected``, top level or under
    ``metadata``); a triple without scores is an error.
    """
    kept = []
    for t in triples:
        extra = t.meta.get("extra", {})
        scores = extra if "score_chosen" in extra else extra.get("metadata") or {}
        if "score_chosen" not in scores or "score_rejected" not in scores:
            raise ValueError(f"{t.meta.get('source')}:{t.meta.get('line')}: field 'score_chosen': missing; cannot detect ties")
        if scores["score_chosen"] == scores["score_rejected"]:
            if report is not None:
                report.dropped["score_tie"] += 1
                report.kept -= 1
            continue
        kept.append(t)
    if len(kept) < len(triples):
        log.warning("dropped %d score tie(s) of %d pairs", len(triples) - len(kept), len(triples))
    return kept


# --------------------------------------------------------------------------------------------
# Seeded draws and the fixed data roles
# --------------------------------------------------------------------------------------------

def _groups(triples: Sequence[PreferenceTriple], key: str) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, t in enumerate(triples):
        groups[str(t.meta.get(key))].append(i)
    return dict(sorted(groups.items()))


def _stratified(triples: Sequence[PreferenceTriple], sizes: dict[str, int], seed: int, key: str) -> list[int]:
    """Indices: `sizes[g]` drawn from each group g with a per-group seeded shuffle, in original order."""
    picked: list[int] = []
    for group, members in _groups(triples, key).items():
        order = list(members)
        random.Random(f"{seed}/{group}").shuffle(order)  # str seeds are stable across processes
        picked.extend(order[:sizes[group]])
    return sorted(picked)


def split_validation(triples: Sequence[PreferenceTriple], fraction: float = 0.15, seed: int = 0,
                     key: str = "subset") -> tuple[list[PreferenceTriple], list[PreferenceTriple]]:
    """`(fit, validation)`: a seeded `fraction` of each `meta[key]` group (rounded half up) is validation."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    sizes = {g: math.floor(fraction * len(m) + 0.5) for g, m in _groups(triples, key).items()}
    val = set(_stratified(triples, sizes, seed, key))
    return [t for i, t in enumerate(triples) if i not in val], [triples[i] for i in sorted(val)]


def restrict(triples: Sequence[PreferenceTriple], n: int, seed: int = 0) -> list[PreferenceTriple]:
    """Draw `n` triples uniformly with a seed, in original order.

    Draws are nested: with the same seed, ``restrict(x, n)`` is a subset of ``restrict(x, m)`` for
    n <= m, so an N-restriction sweep adds data rather than resampling it.
    """
    if not 0 <= n <= len(triples):
        raise ValueError(f"cannot draw {n} of {len(triples)} triples")
    return [triples[i] for i in sorted(_draw_order(len(triples), seed)[:n])]


def _draw_order(size: int, seed: int) -> list[int]:
    order = list(range(size))
    random.Random(f"restrict/{seed}").shuffle(order)
    return order


def in_draw_order(triples: Sequence[PreferenceTriple], seed: int = 0) -> list[PreferenceTriple]:
    """All triples ordered so that the first n are exactly the set ``restrict(triples, n, seed)``:
    one pass over this order yields every nested N-restriction as a prefix."""
    return [triples[i] for i in _draw_order(len(triples), seed)]


def sample(triples: Sequence[PreferenceTriple], n: int, seed: int = 0, key: str = "subset") -> list[PreferenceTriple]:
    """Draw `n` triples stratified by `meta[key]` (proportional, largest remainder), in original order."""
    if not 0 <= n <= len(triples):
        raise ValueError(f"cannot draw {n} of {len(triples)} triples")
    groups = _groups(triples, key)
    quotas = {g: n * len(m) / len(triples) for g, m in groups.items()}
    sizes = {g: int(q) for g, q in quotas.items()}
    by_remainder = sorted(groups, key=lambda g: (-(quotas[g] - sizes[g]), g))
    for g in by_remainder[:n - sum(sizes.values())]:
        sizes[g] += 1
    return [triples[i] for i in _stratified(triples, sizes, seed, key)]


def triples_fingerprint(triples: Sequence[PreferenceTriple]) -> str:
    """Hash of the prompt/chosen/rejected contents (not meta): identifies a data set in artifacts."""
    return text_fingerprint([[t.prompt, t.chosen, t.rejected] for t in triples])


def first_user_turn(triple: PreferenceTriple) -> str:
    return next(m["content"] for m in triple.prompt if m["role"] == "user")


def alpaca_eval_instructions(alpaca_eval_dir: str | Path, dataset: str = "helpful_base") -> set[str]:
    """The AlpacaEval instructions whose `dataset` is `dataset`, read from every ``model_outputs.json``."""
    files = sorted(Path(alpaca_eval_dir).rglob("model_outputs.json"))
    if not files:
        raise FileNotFoundError(f"{alpaca_eval_dir}: no AlpacaEval model_outputs.json found")
    found: set[str] = set()
    for path in files:
        found |= {r["instruction"].strip() for _, r in read_records(path) if r.get("dataset") == dataset}
    return found


class DataRoles(dict):
    """The data roles of SPLITS.md (``fit``, ``validation``, ``test_helpful``, ``test_harmless``).

    A dict of role -> triples, plus `summary()`: the seed, counts and provenance that every result
    file must record.
    """

    def __init__(self, roles: dict[str, list[PreferenceTriple]], seed: int, val_fraction: float,
                 report: LoadReport, contamination: dict[str, Any]):
        super().__init__(roles)
        self.seed, self.val_fraction, self.report, self.contamination = seed, val_fraction, report, contamination

    def summary(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "counts": {role: len(ts) for role, ts in self.items()},
            "counts_by_subset": {role: dict(sorted(Counter(t.meta["subset"] for t in ts).items()))
                                 for role, ts in self.items()},
            "fingerprints": {role: triples_fingerprint(ts) for role, ts in self.items()},
            "alpaca_eval_contamination": self.contamination,
            "load": self.report.summary(),
        }


def hh_rlhf_roles(data_dir: str | Path, seed: int = 0, val_fraction: float = 0.15,
                  alpaca_eval_dir: str | Path | None = None, allow_empty: bool = True) -> DataRoles:
    """Build the fixed HH-RLHF data roles of SPLITS.md.

    `data_dir` is the shared data root (holding ``hh-rlhf/`` and ``alpaca-eval/``) or the ``hh-rlhf``
    folder itself. Identical pairs are dropped (counted in ``summary()["load"]``); empty responses
    are real crowdworker preferences (e.g. silence preferred in harmless-base, 11 in all) and are
    kept with a warning unless `allow_empty` is False; any other bad record is an error. Dialogues whose first Human turn is an AlpacaEval
    ``helpful_base`` instruction are removed from the test and, should any occur there, the fit pool.
    """
    root = Path(data_dir)
    hh = root / "hh-rlhf" if (root / "hh-rlhf").is_dir() else root
    missing = [f"{s}/test.jsonl.gz" for s in HH_SUBSETS if not (hh / s / "test.jsonl.gz").is_file()]
    if missing:
        raise FileNotFoundError(f"{root}: not an HH-RLHF data directory (no {', '.join(missing)}); "
                                "data roles need the shared data root or its hh-rlhf folder")
    alpaca_dir = Path(alpaca_eval_dir) if alpaca_eval_dir else hh.parent / "alpaca-eval"
    report = LoadReport()
    loaded = {s: load_preferences(hh / s / "test.jsonl.gz", subset=s, allow_empty=allow_empty, report=report)
              for s in HH_SUBSETS}
    instructions = alpaca_eval_instructions(alpaca_dir)

    def decontaminate(triples: list[PreferenceTriple]) -> tuple[list[PreferenceTriple], set[str]]:
        hits = {first_user_turn(t) for t in triples} & instructions
        return [t for t in triples if first_user_turn(t) not in hits], hits

    pool_size = sum(len(loaded[s]) for s in FIT_SUBSETS)
    pool, pool_hits = decontaminate([t for s in FIT_SUBSETS for t in loaded[s]])
    test_helpful, test_hits = decontaminate(loaded["helpful-base"])
    fit, val = split_validation(pool, val_fraction, seed)
    contamination = {
        "instructions": len(instructions),
        "instructions_matched": len(test_hits | pool_hits),
        "removed_test_helpful": len(loaded["helpful-base"]) - len(test_helpful),
        "removed_fit_pool": pool_size - len(pool),
    }
    if contamination["removed_fit_pool"]:
        log.warning("removed %d AlpacaEval dialogue(s) from the fit pool", contamination["removed_fit_pool"])
    harmless_test = split_harmless(loaded["harmless-base"], seed)["test_harmless"]
    roles = dict(zip(DATA_ROLES, (fit, val, test_helpful, harmless_test)))
    return DataRoles(roles, seed, val_fraction, report, contamination)


# --------------------------------------------------------------------------------------------
# Chat rendering and batching
# --------------------------------------------------------------------------------------------

@dataclass
class RenderedTriple:
    """Token ids of one triple under a chat template.

    `prompt_ids` ends with the generation prompt; `chosen_ids`/`rejected_ids` are the reply tokens
    the template renders for an assistant message, ending with its end-of-turn token (whitespace
    the template puts after that token, such as ``"\\n"``, is not part of the reply).
    """

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    def length(self, which: Literal["chosen", "rejected", "both"] = "both") -> int:
        """Length of ``[prompt; response]`` (the longer of the two for "both")."""
        responses = {"chosen": (self.chosen_ids,), "rejected": (self.rejected_ids,),
                     "both": (self.chosen_ids, self.rejected_ids)}[which]
        return len(self.prompt_ids) + max(len(r) for r in responses)


class RenderError(ValueError):
    """The chat template does not render the prompt as a token prefix of the full conversation."""


def with_system_prompt(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    """Prepend `system_prompt`; joined with an existing system message rather than adding a second one."""
    if not system_prompt:
        return messages
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": system_prompt + "\n\n" + messages[0]["content"]}] + messages[1:]
    return [{"role": "system", "content": system_prompt}] + messages


def _special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if tok.special)
    return ids


def _trim_turn_separator(ids: list[int], special: set[int], tokenizer) -> list[int]:
    """Drop whitespace tokens the template puts after the reply's last special (end-of-turn) token."""
    last = max((i for i, t in enumerate(ids) if t in special), default=None)
    if last is None or last == len(ids) - 1:
        return ids
    if tokenizer.decode(ids[last + 1:]).strip():
        return ids
    return ids[:last + 1]


def _truncate(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int,
              max_prompt_length: int | None) -> tuple[list[int], list[int], list[int], bool]:
    """Fit ``[prompt; response]`` into `max_length`: keep the prompt's end, cut the responses' end.

    The prompt is shortened only as far as needed for the longer response, but keeps at least
    `max_prompt_length` tokens (default: half of `max_length`) when it has them; responses then get
    the rest. Both responses share the same (possibly shortened) prompt.
    """
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest <= max_length:
        return prompt, chosen, rejected, False
    floor = max_length // 2 if max_prompt_length is None else max_prompt_length
    keep = min(len(prompt), max(max_length - longest, floor))
    budget = max_length - keep
    if budget <= 0:
        raise ValueError(f"max_length={max_length} leaves no room for the response after {keep} prompt tokens")
    return prompt[len(prompt) - keep:], chosen[:budget], rejected[:budget], True


def render_triples(tokenizer, triples: Sequence[PreferenceTriple], system_prompt: str | None = None,
                   max_length: int | None = None, max_prompt_length: int | None = None,
                   chunk_size: int = 512, progress: bool | None = None) -> list[RenderedTriple]:
    """Render many triples with the tokenizer's chat template (batched tokenization; see `render_triple`)."""
    from tqdm.auto import tqdm

    special = _special_ids(tokenizer)
    out: list[RenderedTriple] = []
    show = len(triples) > 2000 if progress is None else progress
    for start in tqdm(range(0, len(triples), chunk_size), desc="render", disable=not show):
        chunk = triples[start:start + chunk_size]
        prompts = [with_system_prompt(t.prompt, system_prompt) for t in chunk]
        texts = tokenizer.apply_chat_template(prompts, tokenize=False, add_generation_prompt=True)
        for response in ("chosen", "rejected"):
            texts += tokenizer.apply_chat_template(
                [p + [{"role": "assistant", "content": getattr(t, response)}] for p, t in zip(prompts, chunk)],
                tokenize=False)
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        n = len(chunk)
        for i, t in enumerate(chunk):
            prompt_ids, replies = ids[i], []
            for full in (ids[n + i], ids[2 * n + i]):
                if full[:len(prompt_ids)] != prompt_ids:
                    where = f"{t.meta.get('source', '?')}:{t.meta.get('line', '?')}"
                    raise RenderError(f"{where}: the chat template's rendering of the prompt (with generation "
                                      "prompt) is not a token prefix of the rendered full conversation")
                replies.append(_trim_turn_separator(full[len(prompt_ids):], special, tokenizer))
            truncated = False
            if max_length is not None:
                prompt_ids, replies[0], replies[1], truncated = _truncate(prompt_ids, *replies, max_length, max_prompt_length)
            out.append(RenderedTriple(prompt_ids, replies[0], replies[1], truncated, t.meta))
    if max_length is not None and (cut := sum(r.truncated for r in out)):
        log.info("truncated %d of %d triples to max_length=%d", cut, len(out), max_length)
    return out


def render_triple(tokenizer, triple: PreferenceTriple, system_prompt: str | None = None,
                  max_length: int | None = None, max_prompt_length: int | None = None) -> RenderedTriple:
    """Token ids of one triple: the prompt with generation prompt, and each reply with its end-of-turn.

    Replies are derived by rendering the full conversation and taking the tokens after the prompt,
    so no BOS/EOS is doubled; a `RenderError` is raised when the prompt is not a token prefix.
    With `max_length`, see `_truncate` for the policy (prompt start and response ends are cut).
    """
    return render_triples(tokenizer, [triple], system_prompt, max_length, max_prompt_length, progress=False)[0]


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate[0] if isinstance(candidate, list) else candidate)
    raise ValueError("tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")


def collate_pairs(rendered: Sequence[RenderedTriple], tokenizer,
                  which: Literal["chosen", "rejected", "both"] = "chosen",
                  pad_side: Literal["left", "right"] = "left") -> dict[str, torch.Tensor]:
    """Pad ``[prompt; response]`` rows into a batch.

    Returns ``input_ids`` and ``attention_mask`` (int64), ``response_mask`` (bool, True on response
    tokens) and ``position_ids`` (counting from 0 at each row's first real token, so left padding does
    not shift positions). With ``which="both"`` rows are all chosen sequences, then all rejected ones.
    """
    if which not in ("chosen", "rejected", "both"):
        raise ValueError(f"which must be 'chosen', 'rejected' or 'both', got {which!r}")
    if pad_side not in ("left", "right"):
        raise ValueError(f"pad_side must be 'left' or 'right', got {pad_side!r}")
    rows = []
    if which in ("chosen", "both"):
        rows += [(r.prompt_ids, r.chosen_ids) for r in rendered]
    if which in ("rejected", "both"):
        rows += [(r.prompt_ids, r.rejected_ids) for r in rendered]
    width = max((len(p) + len(c) for p, c in rows), default=0)
    input_ids = np.full((len(rows), width), _pad_id(tokenizer), dtype=np.int64)
    attention = np.zeros((len(rows), width), dtype=np.int64)
    response = np.zeros((len(rows), width), dtype=bool)
    for i, (prompt, reply) in enumerate(rows):
        total = len(prompt) + len(reply)
        start = width - total if pad_side == "left" else 0
        input_ids[i, start:start + total] = prompt + reply
        attention[i, start:start + total] = 1
        response[i, start + len(prompt):start + total] = True
    position_ids = np.clip(np.cumsum(attention, axis=1) - 1, 0, None)
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention),
            "response_mask": torch.from_numpy(response), "position_ids": torch.from_numpy(position_ids)}


def length_batches(rendered: Sequence[RenderedTriple], batch_size: int | None = None, max_tokens: int | None = None,
                   which: Literal["chosen", "rejected", "both"] = "both", seed: int | None = None) -> list[list[int]]:
    """Index batches of similar length (longest first) to limit padding.

    Batches hold at most `batch_size` triples and/or at most `max_tokens` padded tokens per
    collated sequence set (rows x longest row; "both" counts two rows per triple). With `seed`,
    the batch order is shuffled (contents stay length-sorted), as training wants.
    """
    if batch_size is None and max_tokens is None:
        raise ValueError("give batch_size and/or max_tokens")
    rows_per = 2 if which == "both" else 1
    lengths = [r.length(which) for r in rendered]
    order = sorted(range(len(rendered)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches:
            current = batches[-1]
            fits_count = batch_size is None or len(current) < batch_size
            # sorted longest first, so the batch's first item sets its padded width
            fits_tokens = max_tokens is None or (len(current) + 1) * rows_per * lengths[current[0]] <= max_tokens
            if fits_count and fits_tokens:
                current.append(i)
                continue
        batches.append([i])
    if seed is not None:
        random.Random(f"batches/{seed}").shuffle(batches)
    return batches


def iter_batches(rendered: Sequence[RenderedTriple], tokenizer, batch_size: int | None = None,
                 max_tokens: int | None = None, which: Literal["chosen", "rejected", "both"] = "both",
                 pad_side: Literal["left", "right"] = "left",
                 seed: int | None = None) -> Iterable[tuple[list[int], dict[str, torch.Tensor]]]:
    """`(indices, collated batch)` over length-bucketed batches (see `length_batches`, `collate_pairs`)."""
    for indices in length_batches(rendered, batch_size, max_tokens, which, seed):
        yield indices, collate_pairs([rendered[i] for i in indices], tokenizer, which, pad_side)


def harmless_roles(data_dir: str | Path, seed: int = 0, allow_empty: bool = True) -> dict[str, list[PreferenceTriple]]:
    """SPLITS.md's harmless-fit / -validation / test parts of harmless-base, plus `harmless_all` (the whole)."""
    root = Path(data_dir)
    path = (root / "hh-rlhf" if (root / "hh-rlhf").is_dir() else root) / "harmless-base" / "test.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{root}: no harmless-base/test.jsonl.gz; harmless roles need the shared data root")
    triples = load_preferences(path, subset="harmless-base", allow_empty=allow_empty)
    return {**split_harmless(triples, seed), "harmless_all": triples}


def split_harmless(triples: list[PreferenceTriple], seed: int = 0) -> dict[str, list[PreferenceTriple]]:
    """A seeded draw over harmless-base dialogues into HARMLESS_ROLES (each part in file order), so harmful
    prompts can be fitted and tuned on without touching test."""
    order = list(range(len(triples)))
    random.Random(f"harmless/{seed}").shuffle(order)
    n_fit = math.floor(HARMLESS_FRACTIONS[0] * len(order) + 0.5)
    n_val = math.floor(HARMLESS_FRACTIONS[1] * len(order) + 0.5)
    parts = (order[:n_fit], order[n_fit:n_fit + n_val], order[n_fit + n_val:])
    return {role: [triples[i] for i in sorted(part)] for role, part in zip(HARMLESS_ROLES, parts)}


def select_triples(data: str | Path, role: str | None = None, n: int | None = None, seed: int = 0,
                   split_seed: int = 0, allow_empty: bool = True) -> list[PreferenceTriple]:
    """Triples from a file / HF dataset, or one role of an HH-RLHF directory (split with `split_seed`,
    the protocol's 0 by default, independent of `seed`), optionally a seeded nested draw of `n`.

    Every route applies the same record rules, `allow_empty` included: its default keeps empty
    responses (with a warning) because the protocol keeps the real ones in HH-RLHF.
    """
    path = local_path(data)
    if role is None and not (path is not None and path.is_dir()):
        triples = load_preferences(data, allow_empty=allow_empty)
    else:
        if path is None:
            raise FileNotFoundError(f"no such file or directory: {data} (a data role needs an HH-RLHF directory)")
        known = list(dict.fromkeys(DATA_ROLES + HARMLESS_ROLES + LEGACY_ROLES))
        if role not in known:  # checked before the whole split is loaded
            raise ValueError(f"{data} is an HH-RLHF directory: pass a role, one of {known}, got {role!r}")
        if role in HARMLESS_ROLES + LEGACY_ROLES:
            triples = harmless_roles(path, seed=split_seed, allow_empty=allow_empty)[role]
        else:
            triples = list(hh_rlhf_roles(path, seed=split_seed, allow_empty=allow_empty)[role])
        if not triples:
            raise ValueError(f"no preference triples in role {role!r} of {data}")
    return restrict(triples, n, seed=seed) if n is not None and n < len(triples) else triples
