"""The one result-record format: every evaluator returns `ResultRecord`s and writes them as
`{"schema": 2, "records": [...]}` (`write_results`), the one file shape `saealign report` reads.

A record names the benchmark and the method, holds each metric as a `stats.Estimate` (value, 95 %
interval, standard error, n), the metrics the report shows (`headline`), optionally the paired
differences to a `baseline` method on the same units (`deltas`), and the provenance: the `config`, the
`data` (source, role, seeds, fingerprint, count), the package `versions`, when and where it finished.
Harness-specific outputs (per-task summaries, per-item scores, judge counts, timings) sit in `details`.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from saealign._io import versions
from saealign.stats import Estimate

RESULT_SCHEMA = 2


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


@dataclass
class ResultRecord:
    benchmark: str
    method: str
    metrics: dict[str, Estimate]
    headline: list[str]
    config: dict[str, Any]
    data: dict[str, Any] = field(default_factory=dict)
    baseline: str | None = None
    deltas: dict[str, Estimate] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=versions)
    finished: str = field(default_factory=_now)
    host: str = field(default_factory=platform.node)

    def __post_init__(self) -> None:
        unknown = [h for h in self.headline if h not in self.metrics]
        if unknown:
            raise ValueError(f"headline metric(s) {unknown} not in metrics {sorted(self.metrics)}")
        if self.deltas and self.baseline is None:
            raise ValueError("paired deltas need the baseline method they are taken against")

    def to_json(self) -> dict[str, Any]:
        return {"benchmark": self.benchmark, "method": self.method,
                "metrics": {k: v.to_json() for k, v in self.metrics.items()}, "headline": list(self.headline),
                "baseline": self.baseline, "deltas": {k: v.to_json() for k, v in self.deltas.items()},
                "config": self.config, "data": self.data, "details": self.details, "versions": self.versions,
                "finished": self.finished, "host": self.host}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ResultRecord":
        return cls(benchmark=data["benchmark"], method=data["method"],
                   metrics={k: Estimate.from_json(v) for k, v in data["metrics"].items()},
                   headline=list(data["headline"]), config=data["config"], data=data["data"],
                   baseline=data["baseline"], deltas={k: Estimate.from_json(v) for k, v in data["deltas"].items()},
                   details=data["details"], versions=data["versions"], finished=data["finished"], host=data["host"])


def write_results(path: str | os.PathLike, records: Sequence[ResultRecord]) -> Path:
    """Write records in the one result-file shape (atomically)."""
    from saealign._io import write_json

    path = Path(path)
    write_json(path, {"schema": RESULT_SCHEMA, "records": [r.to_json() for r in records]})
    return path


class NotAResultFile(ValueError):
    """Valid JSON, but not in the result-file shape (a run's config.json, say)."""


def read_results(path: str | os.PathLike) -> list[ResultRecord]:
    """The records of a result file (`write_results`); another file is refused with its path named."""
    from saealign._io import read_json

    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict) or data.get("schema") != RESULT_SCHEMA or not isinstance(data.get("records"), list):
        raise NotAResultFile(f"{path}: not a saealign result file (schema {RESULT_SCHEMA}, a list of records)")
    try:
        return [ResultRecord.from_json(r) for r in data["records"]]
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: a malformed result record ({err!r})") from err


def format_estimate(e: Estimate | None, digits: int = 2, scale: float = 1.0, missing: str = "–") -> str:
    """A table cell: `52.30 [48.10, 56.40]` with the 95 % interval, `0.31 (SE 0.02)` with only a standard
    error, the bare value for a descriptive figure; `scale` 100 shows a proportion in percent."""
    if e is None or e.value is None:
        return missing
    cell = f"{scale * e.value:.{digits}f}"
    if e.ci95 is not None:
        return cell + f" [{scale * e.ci95[0]:.{digits}f}, {scale * e.ci95[1]:.{digits}f}]"
    return cell + (f" (SE {scale * e.se:.{digits}f})" if e.se is not None else "")
