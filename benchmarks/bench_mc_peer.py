"""Peer check of `saealign eval mc` against lm-evaluation-harness on the real default model, with timings.

Both score the same documents on the same in-memory model: ours through `saealign.eval.mc`, lm-eval through
its `HFLM` and its own task definitions pointed at local copies of the documents
(`saealign.eval.mc_tasks.lm_eval_peer`). Reports, per task: the aggregate metrics of both and their
difference in points (the acceptance bar is 0.5), the largest per-choice log-likelihood difference, the
share of items whose predicted answer agrees, and seconds for each scorer.

    python benchmarks/bench_mc_peer.py                      # full sets (slow on CPU)
    python benchmarks/bench_mc_peer.py --n 100          # stratified 100 items per task
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from saealign._io import write_json
from saealign._io import versions
from saealign.eval.mc import build_items, evaluate_task, get_task, item_metrics, load_docs, select_items
from saealign.eval.mc_tasks.lm_eval_peer import lm_eval_aggregate, lm_eval_scores
from saealign.models import DEFAULT_MODEL, load_model

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
TASKS = ["mmlu", "mmlu_continuation", "arc_easy", "arc_challenge", "hellaswag", "truthfulqa_mc2", "winogrande"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=TASKS)
    parser.add_argument("--n", type=int, default=None, help="stratified items per task (default: all)")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "mc_peer.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model)
    docs = {}
    for task in args.tasks:
        all_docs = load_docs(task, data_dir=args.data)
        keep = {item.id for item in select_items(build_items(task, all_docs), args.n, "stratified", 0)}
        docs[task] = [doc for doc in all_docs if doc["doc_id"] in keep]

    ours, ours_s = {}, {}
    for task, task_docs in docs.items():
        start = time.perf_counter()
        ours[task] = evaluate_task(model, tokenizer, task, task_docs, batch_size=args.batch_size)
        ours_s[task] = time.perf_counter() - start
        summary = {k: round(v["value"], 4) for k, v in ours[task]["summary"]["metrics"].items()}
        print(f"saealign {task}: {len(task_docs)} items, {ours_s[task]:.1f} s, {summary}", flush=True)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        reference = lm_eval_scores(model, tokenizer, docs, work, batch_size=args.batch_size)
    lm_eval_s = time.perf_counter() - start

    report: dict = {"model": args.model, "limit": args.n, "batch_size": args.batch_size,
                    "threads": torch.get_num_threads(), "versions": {**versions(), **reference["versions"]},
                    "lm_eval_seconds_all_tasks": round(lm_eval_s, 1), "tasks": {}}
    for task, task_docs in docs.items():
        items = build_items(task, task_docs)
        ref_lls = reference["lls"][task]
        records = ours[task]["items"]
        diffs = [abs(a - b) for r, ref in zip(records, ref_lls, strict=True) for a, b in zip(r["ll"], ref, strict=True)]
        agree = [int(np.argmax(r["ll"])) == int(np.argmax(ref)) for r, ref in zip(records, ref_lls, strict=True)]
        metrics = {}
        for name in get_task(task).metrics:
            mine = ours[task]["summary"]["metrics"][name]
            theirs = lm_eval_aggregate(reference["results"], task, name)
            recomputed = float(np.mean([item_metrics(task, it, ref)[name] for it, ref in zip(items, ref_lls, strict=True)]))
            metrics[name] = {"saealign": mine["value"], "saealign_ci95": mine["ci95"], "lm_eval": theirs,
                             "lm_eval_lls_with_our_metric": recomputed,
                             "diff_points": round(100 * (mine["value"] - theirs), 4)}
        report["tasks"][task] = {"n": len(items), "choices": len(diffs), "max_abs_ll_diff": max(diffs),
                                 "argmax_agreement": float(np.mean(agree)), "saealign_seconds": round(ours_s[task], 1),
                                 "metrics": metrics}
    write_json(args.output, report)
    print(json.dumps({t: {k: v for k, v in r.items()} for t, r in report["tasks"].items()}, indent=1))
    print(f"lm-eval, all tasks: {lm_eval_s:.1f} s; saealign: {sum(ours_s.values()):.1f} s")


if __name__ == "__main__":
    main()
