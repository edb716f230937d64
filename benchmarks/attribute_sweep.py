"""The restricted-data sweep's second metric (issue #14): an attribute benchmark's paired change against base,
for the steered methods at each N, beside what the alignment stage cost.

It reads a finished `attributes_protocol.py` run of one attribute (WORK = its OUTPUT/ATTRIBUTE directory):
- the maps are its DSPA fit and the fit's snapshots (`--snapshots`: the map of the seeded N-draw of the
  attribute's fit triples, with its counted `cost`); static-sae and RepE come from the same map;
- the settings are the ones chosen on validation at the full pool (WORK/chosen_on_validation.json), held
  fixed across N;
- DPO and RAHF-SCIT are trained on the same seeded N-draws of the map's fit triples, with the settings of
  `restricted_sweep.py` (its `train`), and evaluated as `model:PATH`;
- the test prompts, scorer and generation settings are the protocol's test run's (WORK/test), and its base
  answers are reused; each (method, N) is one `saealign eval attributes` run in WORK/sweep, except the steered
  methods at the full pool: those are the test run itself (the same map, with the chosen settings recorded in it).

Resumable (answers are kept per method; finished runs are kept in the JSON).

    python benchmarks/attribute_sweep.py --work runs/attributes/refusal --ns 100 250 500 full
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from restricted_sweep import TRAINED, _as_number, keep_other_runs, plot_sweep, train
from saealign._io import read_json, write_json

ROOT = Path(__file__).resolve().parents[1]
STEERED = ("dspa", "static-sae", "repe")
CHOSEN_KEY = {"dspa": "dspa", "static-sae": "static", "repe": "repe"}  # attributes_protocol.py's names
FLAGS = {"alpha": "--alpha", "mode": "--mode", "coef": "--coef"}


def map_at(work: Path, n: str) -> Path:
    return work / "map" if n == "full" else work / "map" / f"snapshot_{n}"


def evaluate(work: Path, method: str, n: str, spec: str, setting: dict, test_config: dict) -> dict:
    """`saealign eval attributes` of METHOD (`spec`) at N on the protocol's test prompts; returns its record."""
    out = work / "sweep" / f"{method}_n{n}"
    base = out / "answers" / "base.jsonl"
    if not base.exists():  # the base answers and their perplexity cache are the test run's
        base.parent.mkdir(parents=True, exist_ok=True)
        for name in ("base.jsonl", "base.nll.json"):
            if (work / "test" / "answers" / name).exists():
                shutil.copy(work / "test" / "answers" / name, base.parent / name)
    c = test_config
    cmd = [sys.executable, "-m", "saealign", "eval", "attributes", "--data", c["data"], "--scorer", c["scorer"]["name"],
           "--n", str(c["n"]), "--max-new-tokens", str(c["max_new_tokens"]), "--batch-size", str(c["batch_size"]),
           "--methods", "base", "--methods", f"{method}={spec}", "--output", str(out)]
    cmd += [a for s in c["sources"] for a in ("--sources", s)] + [a for s in c["exclude"] for a in ("--exclude", s)]
    cmd += [a for key, value in setting.items() for a in (FLAGS[key], str(value))]
    print("+ saealign " + " ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return next(r for r in read_json(out / "results.json")["records"] if r["method"] == method)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="attributes_protocol.py's OUTPUT/ATTRIBUTE directory")
    ap.add_argument("--ns", nargs="+", default=["100", "250", "500", "full"])
    ap.add_argument("--methods", nargs="+", default=list(STEERED), choices=[*STEERED, *TRAINED])
    ap.add_argument("--max-length", type=int, default=384, help="the trained methods' cap on prompt + answer tokens "
                    "(the HH sweep's; prompts run to 200 words, and 256 left no room for an answer at N = 250)")
    ap.add_argument("--output", type=Path, help="default: benchmarks/results/restricted_sweep_<attribute>.json")
    args = ap.parse_args()
    attribute = args.work.name
    output = args.output or ROOT / "benchmarks" / "results" / f"restricted_sweep_{attribute}.json"
    chosen = read_json(args.work / "chosen_on_validation.json")
    test_records = read_json(args.work / "test" / "results.json")["records"]
    test_config = test_records[0]["config"]
    headline = test_records[0]["headline"][0]
    result = read_json(output) if output.exists() else {}
    result.update({"benchmark": f"restricted-data sweep, attribute {attribute}", "headline": headline,
                   "work": str(args.work), "test_sources": test_config["sources"], "test_n": test_config["n_prompts"],
                   "settings": {"chosen_on": "validation, N = full (chosen_on_validation.json)", **chosen}})
    runs, own = result.setdefault("runs", {}), set()  # own: the runs this process adds
    for n in args.ns:
        for method in args.methods:
            key = f"{method}@{n}"
            if key in runs:
                continue
            started = time.time()
            if method in STEERED:
                setting = chosen.get(CHOSEN_KEY[method], {})
                tested = next((r for r in test_records if r["method"] == method), None)
                record = tested if n == "full" and tested else evaluate(  # the full map is the protocol's test run
                    args.work, method, n, f"{method}:{map_at(args.work, n)}", setting, test_config)
                config = read_json(map_at(args.work, n) / "config.json")
                triples, cost = config["count"], config["cost"]
            else:
                setting = {}
                fit = read_json(args.work / "map" / "config.json")["data"]["source"]
                trained = train(method, n, ["--data", fit], args.work / "sweep" / f"{method}_n{n}_model", args.max_length)
                record = evaluate(args.work, method, n, f"model:{trained}", setting, test_config)
                summary = read_json(trained / "train_summary.json")
                triples, cost = summary["n_pairs"] if method == "dpo" else summary["n_triples"], summary["cost"]
            if method in TRAINED:
                setting = {"max_length": read_json(trained / "training_config.json").get("max_length")}
            own.add(key)
            runs[key] = {"method": method, "n": n, "triples": triples, "setting": setting,
                         "value": record["metrics"][headline], "delta": record["deltas"][headline],
                         "perplexity": record["metrics"]["perplexity"]["value"], "cost": cost,
                         "eval_seconds": round(time.time() - started, 1)}
            keep_other_runs(runs, output, own)
            write_json(output, result)
            d = runs[key]["delta"]
            print(f"{key}: Δ {headline} {d['value']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]", flush=True)
    keep_other_runs(runs, output, own)
    output.with_suffix(".md").write_text(table(result))
    plot_sweep(_rows(result), "delta", f"Δ {headline} vs base (95% CI)", 0.0,
               f"Restricted-data sweep, attribute {attribute}, {result['test_n']} test prompts", output.with_suffix(".png"))


def _rows(result: dict):
    return sorted(result["runs"].values(), key=lambda r: (r["method"], _as_number(r["n"])))


def table(result: dict) -> str:
    h = result["headline"]
    lines = [f"Paired change of `{h}` against base on {result['test_n']} test prompts ({', '.join(result['test_sources'])}; "
             "95 % bootstrap CI), settings chosen on validation at the full pool and held fixed; the counted "
             "alignment-stage cost (the map's fit; DPO: its reference cache and training).", "",
             f"| method | N | Δ {h} [95% CI] | perplexity | FLOPs | wall s |", "|---|---|---|---|---|---|"]
    for r in _rows(result):
        d = r["delta"]
        lines.append(f"| {r['method']} | {r['n']} ({r['triples']}) | {d['value']:+.3f} [{d['ci95'][0]:+.3f}, "
                     f"{d['ci95'][1]:+.3f}] | {r['perplexity']:.3f} | {r['cost']['flops']['total']:.3g} | "
                     f"{r['cost']['wall_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
