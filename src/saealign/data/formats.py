"""Preference data formats: reading local files and hub datasets, and parsing each record into a triple.

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
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

from saealign._io import text_fingerprint

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
_HH_MARKER = re.compile(r"\n\n(Human|Assistant):")
_HH_ASSISTANT = "\n\nAssistant:"
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}
_LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz")
_PATH_SUFFIXES = (".jsonl", ".json", ".parquet", ".gz", ".txt", ".csv", ".tsv", ".arrow")  # never hub names


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


def triples_fingerprint(triples: Sequence[PreferenceTriple]) -> str:
    """Hash of the prompt/chosen/rejected contents (not meta): identifies a data set in artifacts."""
    return text_fingerprint([[t.prompt, t.chosen, t.rejected] for t in triples])


def first_user_turn(triple: PreferenceTriple) -> str:
    return next(m["content"] for m in triple.prompt if m["role"] == "user")
