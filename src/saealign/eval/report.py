"""`saealign report`: result files -> a markdown table (methods x benchmarks, 95% intervals) and PNG plots.

Reads any result file in the shape of `saealign.eval.result_record` (MT-Bench, AlpacaEval, multiple
choice, preference metrics alike). Intervals are value +- 1.96 SE. Deltas against a baseline method use
the per-item paired differences a result carries (`eval mc --baseline`); otherwise sqrt(se_a^2 + se_b^2),
which ignores the pairing of items and so errs on the wide side.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger(__name__)

Z95 = 1.96


def load_results(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Result files, or directories searched recursively for `results.json` / `*results*.json` files."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*.json") if "result" in f.name))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"no result file or directory at {p}")
    results = []
    for f in files:
        try:
            data = json.loads(f.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{f}: invalid JSON at line {err.lineno}: {err.msg}") from err
        records = as_records(data)
        if not records:
            log.info("skipping %s: not a saealign result file", f)
        for record in records:
            record["_path"] = str(f)
            results.append(record)
    if not results:
        raise ValueError(f"no saealign result files among {[str(p) for p in paths]}")
    return results


PREF_HEADLINE = ("reward_acc", "pref_acc_sum", "pref_acc_norm")
SAE_HEADLINE = ("fvu", "l0", "dead_fraction", "loss_increase")


def as_records(data: Any) -> list[dict[str, Any]]:
    """The result records in one parsed file, whichever saealign command wrote it: a `result_record`
    (MT-Bench, AlpacaEval, multiple choice, FPO comparison) as it is; an `eval pref` file as one record
    per method (benchmark `pref:ROLE`); an `sae eval` report as one record (benchmark `sae-eval`); a file of `records`
    (`eval attributes`: one `result_record` per method) as those records."""
    if not isinstance(data, dict):
        return []
    if {"benchmark", "method", "metrics"} <= data.keys():
        return [data]
    if isinstance(data.get("records"), list):  # several methods in one file (`eval attributes`)
        return [r for r in data["records"] if isinstance(r, dict) and {"benchmark", "method", "metrics"} <= r.keys()]
    if {"triples", "methods"} <= data.keys() and isinstance(data["methods"], dict):
        cfg = data.get("config") or {}
        benchmark = f"pref:{(data.get('data') or {}).get('role') or cfg.get('data_role') or 'triples'}"
        records = []
        for method, metrics in data["methods"].items():
            kept = {k: v for k, v in metrics.items() if isinstance(v, dict) and "value" in v}
            records.append({"benchmark": benchmark, "method": method, "metrics": kept, "config": cfg,
                            "headline": [h for h in PREF_HEADLINE if h in kept], "items": data["triples"]})
        return records
    if {"sae", "layer", "metrics"} <= data.keys():
        metrics = {k: {"value": float(v), "se": None} for k, v in data["metrics"].items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        name = (data.get("config") or {}).get("sae") or f"layer {data['layer']}"
        return [{"benchmark": "sae-eval", "method": f"sae {name}", "metrics": metrics,
                 "headline": [h for h in SAE_HEADLINE if h in metrics], "config": data.get("config") or {}}]
    return []


def _paired(result: dict[str, Any]) -> dict[str, Any]:
    """Per-item paired deltas a result carries against its baseline run (`eval mc --baseline`)."""
    return dict((result.get("paired_vs_baseline") or {}).get("delta") or {})


def _index(results: Sequence[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """`(method, benchmark) -> result`. Files of one method and benchmark are merged (multiple-choice
    tasks run in separate invocations, say); a metric in both is taken from the later file, with a warning."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for r in results:
        key = (r["method"], r["benchmark"])
        if key not in out:
            out[key] = {**r, "metrics": dict(r["metrics"]), "headline": list(r.get("headline") or []),
                        "paired": _paired(r)}
            continue
        merged = out[key]
        clash = sorted(merged["metrics"].keys() & r["metrics"].keys())
        if clash:
            log.warning("%s on %s: %s appear twice; using %s", *key, ", ".join(clash), r["_path"])
        merged["metrics"].update(r["metrics"])
        merged["headline"] = _ordered([*merged["headline"], *(r.get("headline") or [])])
        merged["paired"].update(_paired(r))
    return out


def _ordered(values: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(values))


def fmt_interval(m: dict[str, float | None] | None, digits: int = 2) -> str:
    if m is None or m.get("value") is None:
        return "–"
    if m.get("se") is None:
        return f"{m['value']:.{digits}f}"
    return f"{m['value']:.{digits}f} ± {Z95 * m['se']:.{digits}f}"


def markdown_table(results: Sequence[dict[str, Any]]) -> str:
    """Methods as rows; each benchmark's headline metrics as columns."""
    index = _index(results)
    methods = _ordered([r["method"] for r in results])
    columns = _ordered([(r["benchmark"], h) for r in results for h in r.get("headline") or list(r["metrics"])])
    header = "| method | " + " | ".join(f"{b} {m}" for b, m in columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 1)]
    for method in methods:
        cells = [fmt_interval(index.get((method, b), {}).get("metrics", {}).get(m)) for b, m in columns]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _bar_groups(ax, groups: list[str], series: dict[str, list[tuple[float | None, float | None]]]) -> None:
    width = 0.8 / max(1, len(series))
    for k, (label, points) in enumerate(series.items()):
        xs = [g + (k - (len(series) - 1) / 2) * width for g in range(len(groups))]
        values = [math.nan if v is None else v for v, _ in points]
        errors = [0.0 if se is None else Z95 * se for _, se in points]
        ax.bar(xs, values, width, yerr=errors, capsize=2, label=label)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right")
    ax.legend(fontsize="small")


def plot_mt_bench_categories(results: Sequence[dict[str, Any]], path: str | Path) -> Path | None:
    """Grouped bars: MT-Bench score per category (and overall) per method, 95% error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results if r["benchmark"] == "mt-bench"]
    if not runs:
        return None
    categories = sorted({k.split("/")[1] for r in runs for k in r["metrics"]
                         if k.count("/") == 1 and k.startswith("category/")})
    groups = [*categories, "overall"]
    series = {}
    for r in runs:
        keys = [f"category/{c}" for c in categories] + ["score"]
        series[r["method"]] = [(r["metrics"].get(k, {}).get("value"), r["metrics"].get(k, {}).get("se")) for k in keys]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups)), 4))
    _bar_groups(ax, groups, series)
    ax.set_ylabel("MT-Bench score (1-10)")
    ax.set_ylim(0, 10)
    ax.set_title("MT-Bench by category")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def deltas(results: Sequence[dict[str, Any]], baseline: str) -> dict[str, dict[str, tuple[float, float | None]]]:
    """`{method: {"benchmark metric": (delta, se)}}` for every headline metric the baseline also has."""
    index = _index(results)
    out: dict[str, dict[str, tuple[float, float | None]]] = {}
    for (method, benchmark), r in index.items():
        base = index.get((baseline, benchmark))
        if method == baseline or base is None:
            continue
        for name in r["headline"]:
            a, b = r["metrics"].get(name), base["metrics"].get(name)
            if not a or not b or a.get("value") is None or b.get("value") is None:
                continue
            paired = r["paired"].get(name)
            if paired is not None and paired.get("se") is not None:  # same items, per-item differences
                out.setdefault(method, {})[f"{benchmark} {name}"] = (paired["value"], paired["se"])
                continue
            se = None if a.get("se") is None or b.get("se") is None else math.hypot(a["se"], b["se"])
            out.setdefault(method, {})[f"{benchmark} {name}"] = (a["value"] - b["value"], se)
    return out


def plot_deltas(results: Sequence[dict[str, Any]], baseline: str, path: str | Path) -> Path | None:
    """Bars of each method's change against `baseline` on every shared headline metric, 95% error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = deltas(results, baseline)
    if not table:
        return None
    keys = _ordered([k for per in table.values() for k in per])
    benchmarks = _ordered([k.split(" ", 1)[0] for k in keys])  # one panel each: their scales differ
    fig, axes = plt.subplots(1, len(benchmarks), figsize=(max(6, 3.2 * len(benchmarks)), 4), squeeze=False)
    for ax, benchmark in zip(axes[0], benchmarks):
        groups = [k for k in keys if k.split(" ", 1)[0] == benchmark]
        _bar_groups(ax, [g.split(" ", 1)[1] for g in groups],
                    {m: [per.get(g, (None, None)) for g in groups] for m, per in table.items()})
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_title(benchmark)
    axes[0][0].set_ylabel(f"change vs {baseline} (95% CI)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(paths: Sequence[str | Path], out_dir: str | Path, baseline: str | None = None) -> Path:
    """Write `report.md` (+ PNG plots) into `out_dir`; the baseline defaults to the first run's method."""
    from saealign._io import atomic_path

    results = load_results(paths)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    baseline = baseline or results[0]["method"]
    if baseline not in {r["method"] for r in results}:
        raise ValueError(f"baseline {baseline!r} is none of the methods {sorted({r['method'] for r in results})}")
    lines = ["# saealign report", "",
             f"Cells: value ± 95% interval half-width (1.96 SE). Baseline for deltas: `{baseline}`.", "",
             markdown_table(results), ""]
    table = deltas(results, baseline)
    if table:
        lines += ["## Deltas against the baseline", "", "| method | metric | delta |", "|---|---|---|"]
        for method, per in table.items():
            for name, (d, se) in per.items():
                lines.append(f"| {method} | {name} | {fmt_interval({'value': d, 'se': se})} |")
        lines.append("")
    for title, plotted in (("MT-Bench by category", plot_mt_bench_categories(results, out / "mt_bench_categories.png")),
                           ("Deltas", plot_deltas(results, baseline, out / "deltas.png"))):
        if plotted is not None:
            lines += [f"## {title}", "", f"![{title}]({plotted.name})", ""]
    lines += ["## Sources", ""] + [f"- `{r['_path']}`: {r['benchmark']}, {r['method']}" for r in results]
    path = out / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path
