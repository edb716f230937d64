"""FPO vs DPO, SimPO, TDPO-1 and TDPO-2 on the default model, measured in one run.

Every loss trains on the same draw of the HH-RLHF fit pool with the same budget (pairs, epochs, batch,
the same learning-rate grid), each in a fresh subprocess, so each process's peak memory is its own: on
CUDA the peak allocated tensor memory, on CPU the process's peak resident set size (`ru_maxrss`, which
includes the Python runtime, the weights, the optimizer state and any reference model). The offline
reference pass of FPO runs first, in its own process, and is reported separately: FPO's training
process reads the cache and never loads a reference model. DPO runs as TRL runs it by default (a live
frozen reference copy); `dpo-cache` is DPO reading the same offline cache.

Hyperparameters: each loss trains once per learning rate of `--lrs`; the rate is chosen per loss by
preference accuracy on `--val-pairs` pairs of the validation split (ties: the smaller rate). Only the
chosen models are scored on the helpful test sample: the same seeded draw as `saealign eval pref --n`
and the DSPA tables (`benchmarks/dspa_test_table.py`).

    python benchmarks/bench_fpo.py --pairs 16 --max-length 256 --val-pairs 16 --eval-pairs 16   # smoke
    python benchmarks/bench_fpo.py --pairs 1000 --max-length 512 --lrs 1e-6 5e-6 --val-pairs 200 \
        --eval-pairs 600 --batch 8 --accumulation 1 --device cuda                                 # the issue's run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
VARIANTS = {"fpo": ("fpo", "cache"), "dpo": ("dpo", "model"), "dpo-cache": ("dpo", "cache"), "simpo": ("simpo", "auto"),
            "tdpo1": ("tdpo1", "model"), "tdpo2": ("tdpo2", "model")}


def run_name(variant: str, lr: float) -> str:
    return f"{variant}_lr{lr:g}"


def train_config(args: argparse.Namespace, variant: str, lr: float):
    from saealign.fpo.trainer import TrainConfig

    loss, reference = VARIANTS[variant]
    return TrainConfig(loss=loss, reference=reference, model=args.model, data=str(args.data), data_role="fit",
                       n=args.pairs, sae=args.sae, output=str(args.workdir / run_name(variant, lr)),
                       seed=args.seed, learning_rate=lr, per_device_train_batch_size=args.batch,
                       gradient_accumulation_steps=args.accumulation, num_train_epochs=1, max_length=args.max_length,
                       max_prompt_length=args.max_length // 2, ref_cache=str(args.workdir / "reference-cache"),
                       device=args.device, warmup_ratio=0.1, logging_steps=1, progress=False)


def worker(args: argparse.Namespace) -> None:
    """One measured job in this (fresh) process; writes its result JSON."""
    from saealign.fpo.trainer import build_cache, peak_memory_mb, train

    out = Path(args.result)
    t0 = time.perf_counter()
    if args.job == "cache":
        cache = build_cache(train_config(args, "fpo", args.lrs[0]))
        import torch

        device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
        result = {"job": "cache", "seconds": time.perf_counter() - t0, "peak_memory_mb": peak_memory_mb(device),
                  "n_pairs": cache.n_pairs, "mean_active_latents": cache.meta.get("mean_active_latents"),
                  "path": str(cache.path)}
    elif args.job == "train":
        cfg = train_config(args, args.variant, args.lr)
        trained = train(cfg)
        result = {"job": "train", "variant": args.variant, "lr": args.lr, "seconds": time.perf_counter() - t0,
                  **trained.summary, "config": asdict(cfg)}
    else:
        from saealign.fpo.evaluate import CompareConfig, run_comparison

        role, n = ("validation", args.val_pairs) if args.job == "val" else ("test_helpful", args.eval_pairs)
        model = args.model if args.job == "reference" else str(args.workdir / run_name(args.variant, args.lr))
        record = run_comparison(CompareConfig(model=model,
                                              reference=args.model, data=str(args.data), data_role=role,
                                              n=n, seed=0, sae=args.sae, max_length=args.max_length,
                                              max_prompt_length=args.max_length // 2, batch_size=args.batch,
                                              device=args.device, progress=False))
        result = {"job": args.job, "role": role, "variant": args.variant, "lr": args.lr,
                  "seconds": time.perf_counter() - t0, "metrics": record.to_json()["metrics"],
                  "n_pairs": record.data["n"], "data_fingerprint": record.data["fingerprint"]}
    out.write_text(json.dumps(result, indent=2))


def run_job(args: argparse.Namespace, job: str, variant: str | None = None, lr: float | None = None) -> dict:
    """Run one job in a fresh process (or reuse its result with --reuse) and return its result JSON."""
    result = args.workdir / f"{job}-{run_name(variant, lr) if variant else 'all'}.json"
    options = ["--model", args.model, "--sae", args.sae, "--data", str(args.data), "--pairs", str(args.pairs),
               "--val-pairs", str(args.val_pairs), "--eval-pairs", str(args.eval_pairs),
               "--max-length", str(args.max_length), "--batch", str(args.batch),
               "--accumulation", str(args.accumulation), "--lrs", *map(str, args.lrs), "--seed", str(args.seed),
               "--workdir", str(args.workdir)] + (["--device", args.device] if args.device else [])
    if args.reuse and result.exists():
        print(f"[bench_fpo] {job} {variant or ''} {lr or ''}: reusing {result}", flush=True)
        return json.loads(result.read_text())
    cmd = [sys.executable, __file__, "--job", job, "--result", str(result)] + options
    if variant:
        cmd += ["--variant", variant, "--lr", str(lr)]
    print(f"[bench_fpo] {job} {variant or ''} {lr or ''}", flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    return json.loads(result.read_text())


def chosen_lr(val: dict[float, dict]) -> float:
    """The rate with the best validation preference accuracy; ties go to the smaller rate."""
    return max(sorted(val), key=lambda lr: (val[lr]["metrics"]["pref_acc_norm"]["value"], -lr))


def table(report: dict) -> str:
    kind = report["peak_memory_kind"]
    lines = [f"| loss | lr (chosen on val.) | val. pref. acc. % | test pref. acc. % [95% CI] | reward acc. vs ref. % | "
             f"entropy | feature MSE (top-k) | KL/token to ref. | s/step | peak memory MB ({kind}) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    from saealign.results import format_estimate
    from saealign.stats import Estimate

    def pct(m: dict | None) -> str:
        return format_estimate(None if m is None else Estimate.from_json(m), digits=1, scale=100, missing="-")

    for v, r in report["runs"].items():
        t, m = r["train"], r["test"]["metrics"]
        val = r["val"][str(r["lr"])]["metrics"]["pref_acc_norm"]
        mse = format_estimate(Estimate.from_json(m["feature_mse"]), 5) if m.get("feature_mse") else "-"
        lines.append(f"| {v} | {r['lr']:g} | {100 * val['value']:.1f} | {pct(m['pref_acc_norm'])} | "
                     f"{pct(m['reward_acc'])} | {m['entropy']['value']:.3f} | "
                     f"{mse} | "
                     f"{m['kl_to_reference']['value']:.5f} | {t['mean_step_time_s']:.3f} | {t['peak_memory_mb']:.0f} |")
    base = report.get("reference_test")
    if base:
        lines.append(f"\nThe reference model itself on the same pairs: preference accuracy "
                     f"{pct(base['metrics']['pref_acc_norm'])} %, entropy {base['metrics']['entropy']['value']:.3f}.")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["runs"])
    acc = [report["runs"][v]["test"]["metrics"]["pref_acc_norm"] for v in names]
    mem = [report["runs"][v]["train"]["peak_memory_mb"] for v in names]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    vals = [100 * a["value"] for a in acc]
    err = [[100 * (a["value"] - a["ci95"][0]) for a in acc], [100 * (a["ci95"][1] - a["value"]) for a in acc]]
    ax1.bar(names, vals, yerr=err, capsize=4, color="tab:blue")
    ref = report.get("reference_test")
    if ref:
        ax1.axhline(100 * ref["metrics"]["pref_acc_norm"]["value"], color="gray", ls="--", label="reference")
        ax1.legend()
    ax1.set_ylabel("test preference accuracy % (95% CI)")
    ax1.set_ylim(min(vals) - 10, max(vals) + 10)
    ax2.bar(names, mem, color="tab:orange")
    ax2.set_ylabel(f"peak memory MB ({report['peak_memory_kind']})")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(f"{report['args']['pairs']} fit pairs, 1 epoch; {report['n_test_pairs']} helpful-test pairs; "
                 f"{report['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    from saealign.models import DEFAULT_MODEL

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["fpo", "dpo", "dpo-cache", "simpo", "tdpo1", "tdpo2"],
                        choices=sorted(VARIANTS))
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--sae", default="default:out")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--val-pairs", type=int, default=16, help="validation pairs that choose the learning rate")
    parser.add_argument("--eval-pairs", type=int, default=16, help="helpful-test pairs for the chosen models")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-6], help="learning-rate grid, the same for every loss")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default=None)
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench_fpo")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "fpo.json")
    parser.add_argument("--reuse", action="store_true", help="keep job results already in --workdir (resume a run)")
    parser.add_argument("--job", choices=["cache", "train", "val", "test", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--lr", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        worker(args)
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    cache = run_job(args, "cache") if any(VARIANTS[v][1] == "cache" for v in args.variants) else None
    runs = {}
    for v in args.variants:
        train_runs = {lr: run_job(args, "train", v, lr) for lr in args.lrs}
        val = {lr: run_job(args, "val", v, lr) for lr in args.lrs}
        lr = chosen_lr(val)
        runs[v] = {"lr": lr, "train": train_runs[lr], "val": {str(k): r for k, r in val.items()},
                   "train_all": {str(k): r for k, r in train_runs.items()}}
        print(f"[bench_fpo] {v}: lr {lr:g} chosen on validation", flush=True)
    for v in args.variants:
        runs[v]["test"] = run_job(args, "test", v, runs[v]["lr"])
    reference_test = run_job(args, "reference")

    import torch

    from saealign._io import versions

    report = {"benchmark": "fpo-vs-baselines", "versions": versions(), "device": torch.cuda.get_device_name() if torch.cuda.is_available()
              and args.device != "cpu" else f"cpu ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})",
              "host": platform.node(), "args": {k: str(v) for k, v in vars(args).items() if v is not None},
              "peak_memory_kind": next(iter(runs.values()))["train"]["peak_memory_kind"],
              "n_test_pairs": next(iter(runs.values()))["test"]["n_pairs"],
              "reference_cache": cache, "reference_test": reference_test, "runs": runs, "wall_s": time.time() - started}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    args.output.with_suffix(".md").write_text(table(report))
    plot(report, args.output.with_suffix(".png"))
    print(table(report))
    print(f"wrote {args.output} (.md, .png)")


if __name__ == "__main__":
    main()
