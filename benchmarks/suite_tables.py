"""Tables of an evaluation-suite run (`benchmarks/eval_suite.sh`): multiple-choice accuracy of base vs
DSPA in points with the paired per-item delta, and the MT-Bench / AlpacaEval summaries with the judge's
missing rate. Writes a compact JSON (no per-item records) and a markdown file.

    python benchmarks/suite_tables.py runs/eval_suite --output benchmarks/results/eval_suite
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from saealign._io import write_json
from saealign.results import format_estimate, read_results
from saealign.stats import Estimate, mean_estimate


def percent_cell(m: dict) -> str:
    return format_estimate(Estimate.from_json(m), digits=1, scale=100)


def delta(m: dict) -> str:
    ci = m.get("ci95") or [m["value"], m["value"]]
    return f"{100 * m['value']:+.2f} [{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]"


def mc_rows(suite: Path) -> list[dict]:
    rows = []
    for part in ("full", "subset"):
        base_path, dspa_path = suite / f"mc-{part}-base/results.json", suite / f"mc-{part}-dspa/results.json"
        if not (base_path.exists() and dspa_path.exists()):
            continue
        (base,), (dspa,) = read_results(base_path), read_results(dspa_path)
        for task, summary in base.details["tasks"].items():
            for key in [k for k in base.metrics if k.startswith(f"{task}/")]:
                rows.append({"task": task, "metric": key.split("/", 1)[1], "n": summary["n"],
                             "available": summary["available"], "base": base.metrics[key].to_json(),
                             "dspa": dspa.metrics[key].to_json(), "delta": dspa.deltas[key].to_json(),
                             "seconds_base": summary["seconds"], "seconds_dspa": dspa.details["tasks"][task]["seconds"]})
    return rows


def _expected_ratings(run: Path, result) -> dict:
    """(question, turn, choice) -> expected rating, from an MT-Bench likelihood-mode judgment file."""
    path = run / "model_judgment" / Path(result.details.get("judgments", "none")).name
    if result.benchmark != "mt-bench" or not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return {(j["question_id"], j["turn"], j["choice"]): j["expected_rating"] for j in records if "expected_rating" in j}


def paired_expected_rating(suite: Path) -> dict | None:
    """DSPA minus base expected MT-Bench rating over the judgments both have (likelihood mode)."""
    ratings = []
    for method in ("base", "dspa"):
        path = suite / f"mt-bench-{method}/results.json"
        ratings.append(_expected_ratings(path.parent, read_results(path)[0]) if path.exists() else {})
    common = sorted(ratings[0].keys() & ratings[1].keys())
    return mean_estimate([ratings[1][k] - ratings[0][k] for k in common]).to_json() if len(common) > 1 else None


def generation_rows(suite: Path) -> list[dict]:
    rows = []
    for bench in ("mt-bench", "alpaca-eval"):
        for method in ("base", "dspa"):
            path = suite / f"{bench}-{method}/results.json"
            if not path.exists():
                continue
            (r,) = read_results(path)
            n = r.details.get("n_judgments") or 2 * r.data["n"]
            expected = _expected_ratings(suite / f"{bench}-{method}", r)
            rows.append({"benchmark": bench, "method": method, "judge": r.details.get("judge"),
                         "judge_mode": r.config["judge_mode"], "max_new_tokens": r.config.get("max_new_tokens"),
                         "metrics": {k: v.to_json() for k, v in r.metrics.items() if "/" not in k},
                         "n_missing": r.details.get("n_missing"), "n_judged": n, "n_retried": r.details.get("n_retried"),
                         "n_items": r.data["n"], "device": r.versions.get("device"), "timings": r.details.get("timings"),
                         **({"expected_rating": mean_estimate(list(expected.values())).to_json()} if expected else {})})
    return rows


def markdown(mc: list[dict], gen: list[dict]) -> str:
    lines = ["| task | metric | items | base % [95% CI] | DSPA % [95% CI] | DSPA - base, points (paired 95% CI) |",
             "|---|---|---|---|---|---|"] if mc else []
    for r in mc:
        lines.append(f"| {r['task']} | {r['metric']} | {r['n']} of {r['available']} | {percent_cell(r['base'])} | "
                     f"{percent_cell(r['dspa'])} | {delta(r['delta'])} |")
    if gen:
        lines += ([""] if lines else []) + ["| benchmark | method | items | judge | score | missing judgments |",
                                            "|---|---|---|---|---|---|"]
        for r in gen:
            head = "score" if r["benchmark"] == "mt-bench" else "win_rate"
            value = format_estimate(Estimate.from_json(r["metrics"][head]))
            extra = f" (LC {r['metrics']['lc_win_rate']['value']:.2f})" if r["benchmark"] == "alpaca-eval" else (
                f"; expected rating {format_estimate(Estimate.from_json(r['expected_rating']), 3)}"
                if "expected_rating" in r else "")
            lines.append(f"| {r['benchmark']} | {r['method']} | {r['n_items']} | {r['judge']} ({r['judge_mode']}) | "
                         f"{head} {value}{extra} | "
                         f"{r['n_missing']} of {r['n_judged']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suites", nargs="+", type=Path, help="eval_suite.sh output folders (later ones add rows)")
    parser.add_argument("--output", type=Path, required=True, help="path stem: writes STEM.json and STEM.md")
    args = parser.parse_args()
    mc = [row for suite in args.suites for row in mc_rows(suite)]
    gen = [row for suite in args.suites for row in generation_rows(suite)]
    paired = [d for suite in args.suites if (d := paired_expected_rating(suite))]
    write_json(args.output.with_suffix(".json"), {"suites": [str(s) for s in args.suites], "mc": mc, "generation": gen,
                                               "mt_bench_expected_rating_dspa_minus_base": paired})
    text = markdown(mc, gen) + "".join(
        f"\nMT-Bench expected rating, DSPA - base, paired over {d['n']} judgments: {d['value']:+.3f} "
        f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]\n" for d in paired)
    args.output.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
