"""`saealign report`: result files -> a markdown table (methods x benchmarks, 95% intervals) and PNG plots.

Reads the one result-file shape (`saealign.results`), whichever evaluator wrote it. Cells show each
estimate with its 95 % bootstrap interval (`saealign.stats`). Deltas against a baseline method are the
paired per-unit differences a record carries against that baseline; otherwise the unpaired difference
(sqrt(se_a^2 + se_b^2), no interval), which ignores the pairing of units and so errs on the wide side.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from saealign.results import NotAResultFile, ResultRecord, format_estimate, read_results
from saealign.stats import Estimate, unpaired_difference

log = logging.getLogger(__name__)


def load_results(paths: Sequence[str | Path]) -> list[tuple[Path, ResultRecord]]:
    """(file, record) for every record in the result files named, or in the `*result*.json` files under
    the directories named (other JSON files there are skipped)."""
    found: list[tuple[Path, ResultRecord]] = []
    for p in map(Path, paths):
        if p.is_file():
            found += [(p, r) for r in read_results(p)]
        elif p.is_dir():
            for f in sorted(f for f in p.rglob("*.json") if "result" in f.name):
                try:
                    found += [(f, r) for r in read_results(f)]
                except NotAResultFile:
                    log.info("skipping %s: not a saealign result file", f)
        else:
            raise FileNotFoundError(f"no result file or directory at {p}")
    if not found:
        raise ValueError(f"no saealign result files among {[str(p) for p in paths]}")
    return found


def _index(results: Sequence[tuple[Path, ResultRecord]]) -> dict[tuple[str, str], ResultRecord]:
    """`(method, benchmark) -> record`. Files of one method and benchmark are merged (multiple-choice
    tasks run in separate invocations, say); a metric in both is taken from the later file, with a warning."""
    out: dict[tuple[str, str], ResultRecord] = {}
    for path, r in results:
        key = (r.method, r.benchmark)
        if key not in out:
            out[key] = replace(r, metrics=dict(r.metrics), headline=list(r.headline), deltas=dict(r.deltas))
            continue
        merged = out[key]
        clash = sorted(merged.metrics.keys() & r.metrics.keys())
        if clash:
            log.warning("%s on %s: %s appear twice; using %s", *key, ", ".join(clash), path)
        merged.metrics.update(r.metrics)
        merged.headline = _ordered([*merged.headline, *r.headline])
        if r.baseline == merged.baseline:
            merged.deltas.update(r.deltas)
    return out


def _ordered(values: Sequence) -> list:
    return list(dict.fromkeys(values))


def alignment_costs(results: Sequence[tuple[Path, ResultRecord]]) -> dict[str, dict]:
    """`{method: cost}` from the alignment-stage cost records carry (`details["alignment_cost"]`, read from
    the method's artifact by the evaluator)."""
    return {r.method: r.details["alignment_cost"] for _, r in results if r.details.get("alignment_cost")}


def markdown_table(results: Sequence[tuple[Path, ResultRecord]]) -> str:
    """Methods as rows; each benchmark's headline metrics as columns; the alignment stage's counted FLOPs and
    wall time beside them when the methods' artifacts recorded them."""
    index = _index(results)
    methods = _ordered([r.method for _, r in results])
    columns = _ordered([(r.benchmark, h) for _, r in results for h in r.headline or list(r.metrics)])
    costs = alignment_costs(results)
    cost_header = " alignment FLOPs | alignment wall s |" if costs else ""
    header = "| method | " + " | ".join(f"{b} {m}" for b, m in columns) + " |" + cost_header
    lines = [header, "|" + "---|" * (len(columns) + 1 + 2 * bool(costs))]
    for method in methods:
        cells = [format_estimate(index[(method, b)].metrics.get(m) if (method, b) in index else None)
                 for b, m in columns]
        if costs:
            cost = costs.get(method)
            cells += [f"{cost['flops']['total']:.3g}", f"{cost['wall_seconds']:.0f}"] if cost else ["—", "—"]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _bar_groups(ax, groups: list[str], series: dict[str, list[Estimate | None]]) -> None:
    """Grouped bars with their 95 % intervals as error bars (none where an estimate has no interval)."""
    width = 0.8 / max(1, len(series))
    for k, (label, points) in enumerate(series.items()):
        xs = [g + (k - (len(series) - 1) / 2) * width for g in range(len(groups))]
        values = [math.nan if e is None or e.value is None else e.value for e in points]
        errors = [[0.0, 0.0] if e is None or e.ci95 is None else [e.value - e.ci95[0], e.ci95[1] - e.value]
                  for e in points]
        ax.bar(xs, values, width, yerr=list(zip(*errors)), capsize=2, label=label)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right")
    ax.legend(fontsize="small")


def plot_mt_bench_categories(records: Sequence[ResultRecord], path: str | Path) -> Path | None:
    """Grouped bars: MT-Bench score per category (and overall) per method, 95% error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in records if r.benchmark == "mt-bench"]
    if not runs:
        return None
    categories = sorted({k.split("/")[1] for r in runs for k in r.metrics
                         if k.count("/") == 1 and k.startswith("category/")})
    groups = [*categories, "overall"]
    keys = [f"category/{c}" for c in categories] + ["score"]
    series = {r.method: [r.metrics.get(k) for k in keys] for r in runs}
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


def deltas(results: Sequence[tuple[Path, ResultRecord]], baseline: str) -> dict[str, dict[str, Estimate]]:
    """`{method: {"benchmark metric": difference}}` for every headline metric the baseline also has:
    the record's paired difference against `baseline` where it carries one, else the unpaired one."""
    index = _index(results)
    out: dict[str, dict[str, Estimate]] = {}
    for (method, benchmark), r in index.items():
        base = index.get((baseline, benchmark))
        if method == baseline or base is None:
            continue
        for name in r.headline:
            a, b = r.metrics.get(name), base.metrics.get(name)
            if a is None or b is None or a.value is None or b.value is None:
                continue
            paired = r.deltas.get(name) if r.baseline == baseline else None
            out.setdefault(method, {})[f"{benchmark} {name}"] = paired or unpaired_difference(a, b)
    return out


def plot_deltas(results: Sequence[tuple[Path, ResultRecord]], baseline: str, path: str | Path) -> Path | None:
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
        _bar_groups(ax, [g.split(" ", 1)[1] for g in groups], {m: [per.get(g) for g in groups] for m, per in table.items()})
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_title(benchmark)
    axes[0][0].set_ylabel(f"change vs {baseline} (paired 95% CI)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(paths: Sequence[str | Path], out_dir: str | Path, baseline: str | None = None) -> Path:
    """Write `report.md` (+ PNG plots) into `out_dir`; the baseline defaults to the first run's method."""
    from saealign._io import atomic_path

    results = load_results(paths)
    records = [r for _, r in results]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    baseline = baseline or records[0].method
    if baseline not in {r.method for r in records}:
        raise ValueError(f"baseline {baseline!r} is none of the methods {sorted({r.method for r in records})}")
    lines = ["# saealign report", "",
             "Cells: value [95% bootstrap interval] (`saealign.stats`); (SE x): a difference of estimates on "
             f"different units, without an interval. Baseline for deltas: `{baseline}`.", "",
             markdown_table(results), ""]
    table = deltas(results, baseline)
    if table:
        lines += ["## Deltas against the baseline", "", "| method | metric | delta |", "|---|---|---|"]
        for method, per in table.items():
            for name, d in per.items():
                lines.append(f"| {method} | {name} | {format_estimate(d)} |")
        lines.append("")
    for title, plotted in (("MT-Bench by category", plot_mt_bench_categories(records, out / "mt_bench_categories.png")),
                           ("Deltas", plot_deltas(results, baseline, out / "deltas.png"))):
        if plotted is not None:
            lines += [f"## {title}", "", f"![{title}]({plotted.name})", ""]
    lines += ["## Sources", ""] + [f"- `{p}`: {r.benchmark}, {r.method}" for p, r in results]
    path = out / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path
