"""The restricted-data sweep (issue #14): each method aligned on nested seeded draws of N fit-pool triples,
scored by the judge-free HH-RLHF protocol on one fixed helpful-test sample, beside what its alignment stage cost.

- DSPA, static-sae and RepE (at l_out) come from one DSPA fit with `--snapshots` (the snapshot at N is the map
  of the seeded N-draw, and its `cost` is what that N cost: the same passes serve all three). Their settings
  were chosen on validation once, at the full pool (`benchmarks/results/dspa_sweep_val.json`), and are held
  fixed across N.
- DPO (`saealign fpo train --loss dpo`, reference from the offline cache, settings of the FPO benchmark's
  validation grid) and RAHF-SCIT (`saealign rahf train`) are trained per N on the same draws (seed 0).
- Every method is scored against the base model on the same test triples: reward accuracy, with its 95 %
  bootstrap interval (`saealign.eval.pref.preference_metrics`).

Resumable: finished runs are kept in the JSON and in --workdir and are not redone.

    python benchmarks/restricted_sweep.py --map /work/runs/map_full --ns 100 250 500 1000 full \
        --methods dspa static-sae repe dpo rahf-scit --workdir runs/sweep
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from saealign._io import read_json, versions, write_json
from saealign.data import sample, select_triples
from saealign.eval.pref import preference_metrics
from saealign.eval.pref_cache import ScoringCache
from saealign.models import DEFAULT_MODEL, load_model
from saealign.rahf import RAHFConfig
from saealign.runtime.scoring import base_scores_cached, score_triples
from saealign.steering import load_method

ROOT = Path(__file__).resolve().parents[1]
STEERED = ("dspa", "static-sae", "repe")
TRAINED = ("dpo", "rahf-scit")
VALIDATION_CHOICE = ROOT / "benchmarks" / "results" / "dspa_sweep_val.json"
# DPO as the FPO benchmark chose it on validation (learning rate from its grid, global batch 8 = 2 pairs x 4
# micro-batches), one epoch.
DPO_FLAGS = ["--loss", "dpo", "--reference", "cache", "--learning-rate", "1e-5", "--num-train-epochs", "1"]
DPO_BATCH = (2, 4)


def batch_flags(method: str, scale: int) -> list[str]:
    """Micro-batch and accumulation flags of a trained method: its global batches (DPO_BATCH; RAHF-SCIT's config
    defaults for both steps) with `scale` times larger micro-batches and as many fewer accumulation steps. The
    same optimizer steps in fewer, larger passes: a GPU's use (1 on CPU)."""
    if method == "dpo":
        batches = [("", *DPO_BATCH)]
    else:
        defaults = {f.name: f.default for f in dataclasses.fields(RAHFConfig)}
        batches = [(step, defaults[f"{step}per_device_train_batch_size"], defaults[f"{step}gradient_accumulation_steps"])
                   for step in ("step1_", "step2_")]
    flags = []
    for step, micro, accumulation in batches:
        if accumulation % scale:
            raise ValueError(f"batch scale {scale} must divide {method}'s {accumulation} accumulation steps")
        flag = step.replace("_", "-")
        flags += [f"--{flag}per-device-train-batch-size", str(micro * scale),
                  f"--{flag}gradient-accumulation-steps", str(accumulation // scale)]
    return flags


def map_at(map_dir: Path, n: str) -> Path:
    return map_dir if n == "full" else map_dir / f"snapshot_{n}"


def train(method: str, n: str, data: list[str], out: Path, max_length: int, save_steps: int = 5,
          mixed_precision: str = "no", batch_scale: int = 1) -> Path:
    """Train `method` on the seeded N-draw of `data` (CLI data flags) in a subprocess (the CLI a user runs);
    a finished run is reused, an interrupted one resumed."""
    if (out / "train_summary.json").exists():
        return out
    common = [*data, "--seed", "0", "--max-length", str(max_length), "--output", str(out), "--save-steps",
              str(save_steps), "--mixed-precision", mixed_precision, "--no-progress"]
    if (out / "step1").exists() or any(out.glob("checkpoint-*")):
        common += ["--resume-from-checkpoint", "latest"]
    if n != "full":
        common += ["--n", n]
    command = (["fpo", "train", *DPO_FLAGS] if method == "dpo" else ["rahf", "train"]) + batch_flags(method, batch_scale)
    command += common
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "saealign", *command], check=True)
    print(f"{method} N={n}: trained in {time.time() - t0:.0f} s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--map", type=Path, required=True, help="DSPA fit of the fit pool with --snapshots at the N values")
    ap.add_argument("--ns", nargs="+", default=["100", "250", "500", "1000", "full"])
    ap.add_argument("--methods", nargs="+", default=[*STEERED, *TRAINED], choices=[*STEERED, *TRAINED])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--n", type=int, default=300, help="helpful-test triples (a seeded sample, fixed for every run)")
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "sweep")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtype", default="float32", help="dtype of every model scored (float32: comparable across devices)")
    ap.add_argument("--mixed-precision", default="no", help="the trainers' --mixed-precision (no: fp32, as on CPU)")
    ap.add_argument("--save-steps", type=int, default=5, help="the trainers' checkpoint interval (steps)")
    ap.add_argument("--batch-scale", type=int, default=1, help="micro-batches this many times larger, with as many "
                    "fewer accumulation steps (same global batch; a GPU's use, see batch_flags)")
    ap.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "restricted_sweep.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)

    result = read_json(args.output) if args.output.exists() else {}
    chosen = read_json(VALIDATION_CHOICE)["chosen"]
    result.update({"benchmark": "restricted-data sweep", "model": DEFAULT_MODEL, "test_role": "test_helpful",
                   "test_n": args.n, "seed": 0, "max_length": args.max_length, "map": str(args.map),
                   "settings": {"chosen_on": f"validation, N = full ({VALIDATION_CHOICE.name})", **chosen,
                                "dpo": " ".join(DPO_FLAGS + batch_flags("dpo", 1))},
                   "versions": versions()})
    device = "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name()
    runs, own = result.setdefault("runs", {}), set()  # own: the runs this process adds

    model, tok = load_model(DEFAULT_MODEL, dtype=args.dtype)
    test = sample(select_triples(str(args.data), "test_helpful"), args.n, 0)
    base = base_scores_cached(model, tok, test, args.max_length)

    def record(key: str, method: str, n: str, triples: int, scores, cost: dict, started: float) -> None:
        metrics = preference_metrics(scores, base)
        own.add(key)
        runs[key] = {"method": method, "n": n, "triples": triples, "metrics": {k: v.to_json() for k, v in metrics.items()},
                     "cost": cost, "eval_seconds": round(time.time() - started, 1), "device": device,
                     **({"batch_scale": args.batch_scale} if method in TRAINED else {})}
        keep_other_runs(runs, args.output, own)
        write_json(args.output, result)
        acc = metrics["reward_acc"]
        print(f"{key}: reward acc {100 * acc.value:.1f} [{100 * acc.ci95[0]:.1f}, {100 * acc.ci95[1]:.1f}], "
              f"{cost['flops']['total']:.3g} FLOPs", flush=True)

    steered = [(m, n) for n in args.ns for m in args.methods if m in STEERED and f"{m}@{n}" not in runs]
    if steered:
        reader = load_method(f"dspa:{map_at(args.map, steered[0][1])}", model=model)  # any map: they share l_out
        cache = ScoringCache.build(model, tok, test, reader.sae_out.layer, reader, args.max_length)
        for method, n in steered:
            started = time.time()
            where = map_at(args.map, n)
            intervention = load_method(f"{method}:{where}", model=model, **chosen[method])
            scores = cache.score(model, intervention, desc=f"score {method} N={n}")
            config = read_json(where / "config.json")
            record(f"{method}@{n}", method, n, config["count"], scores, config["cost"], started)
    for n in args.ns:
        for method in (m for m in args.methods if m in TRAINED):
            if f"{method}@{n}" in runs:
                continue
            out = train(method, n, ["--data", str(args.data), "--data-role", "fit"], args.workdir / f"{method}_n{n}",
                        args.max_length, args.save_steps, args.mixed_precision, args.batch_scale)
            started = time.time()
            policy, _ = load_model(str(out), dtype=args.dtype)
            scores = score_triples(policy, tok, test, None, args.max_length, desc=f"score {method} N={n}")
            del policy
            summary = read_json(out / "train_summary.json")
            trained_on = summary["n_pairs"] if method == "dpo" else summary["n_triples"]
            record(f"{method}@{n}", method, n, trained_on, scores, summary["cost"], started)
    plot_sweep(list(runs.values()), "metrics/reward_acc", "reward accuracy vs base, % (95% CI)", 50,
               f"Restricted-data sweep, {result['test_n']} helpful-test triples", args.output.with_suffix(".png"), 100)
    args.output.with_suffix(".md").write_text(table(result))


def table(result: dict) -> str:
    """Reward accuracy and counted alignment-stage cost per method and N."""
    lines = [f"Reward accuracy vs the base model on {result['test_n']} helpful-test triples (95 % CI), and the "
             "alignment stage's counted FLOPs, wall time and peak memory on the device that ran it (fp32 everywhere).", "",
             "| method | N | reward acc. % [95% CI] | FLOPs (fwd + bwd) | wall s | peak MB | device |",
             "|---|---|---|---|---|---|---|"]
    for key, run in sorted(result["runs"].items(), key=lambda kv: (kv[1]["method"], _as_number(kv[1]["n"]))):
        acc, cost = run["metrics"]["reward_acc"], run["cost"]
        lines.append(f"| {run['method']} | {run['n']} | {100 * acc['value']:.1f} [{100 * acc['ci95'][0]:.1f}, "
                     f"{100 * acc['ci95'][1]:.1f}] | {cost['flops']['total']:.3g} | {cost['wall_seconds']:.0f} | "
                     f"{cost['peak_memory_mb']:.0f} | {run.get('device', result.get('device', 'cpu'))} |")
    return "\n".join(lines) + "\n"


def _as_number(n: str) -> float:
    return float("inf") if n == "full" else float(n)


def keep_other_runs(runs: dict, path: Path, own: set[str]) -> None:
    """Make `runs` the runs at `path` as other sweep processes left them (their new runs and removals included)
    plus this process's `own` runs, so that processes sharing one file never write back each other's stale rows."""
    if path.exists():
        mine = {key: runs[key] for key in own}
        runs.clear()
        runs.update(read_json(path)["runs"])
        runs.update(mine)


def plot_sweep(runs: list[dict], estimate: str, ylabel: str, reference: float, title: str, path: Path,
               scale: float = 1.0) -> None:
    """Two panels, `estimate` (a run's {value, ci95}, found by key path "a/b", times `scale`) against N and
    against the counted alignment-stage FLOPs, one line per method, with a dashed reference level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def est(run: dict) -> dict:
        for key in estimate.split("/"):
            run = run[key]
        return {"value": scale * run["value"], "ci95": [scale * c for c in run["ci95"]]}

    fig, (by_n, by_flops) = plt.subplots(1, 2, figsize=(12, 4.5))
    for k, method in enumerate(dict.fromkeys(r["method"] for r in runs)):
        rows = sorted((r for r in runs if r["method"] == method), key=lambda r: _as_number(r["n"]))
        ns = [r["triples"] * 1.04 ** k for r in rows]  # nudged apart: methods share the N values
        values = [est(r)["value"] for r in rows]
        err = [[v - est(r)["ci95"][0] for v, r in zip(values, rows)], [est(r)["ci95"][1] - v for v, r in zip(values, rows)]]
        flops = [r["cost"]["flops"]["total"] for r in rows]
        by_n.errorbar(ns, values, yerr=err, marker="o", capsize=3, label=method)
        by_flops.errorbar(flops, values, yerr=err, marker="o", capsize=3, label=method)
    for ax, label in ((by_n, "N (fit triples; methods nudged apart)"), (by_flops, "alignment-stage FLOPs (counted)")):
        ax.set_xscale("log")
        ax.axhline(reference, color="grey", lw=0.8, ls="--")
        ax.set_xlabel(label)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_grad_enabled(False)
    main()
