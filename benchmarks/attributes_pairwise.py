"""Paired comparisons between the methods of one `saealign eval attributes` run (issue 11's "DSPA beats
static-sae and RepE"): each method's saved answers are scored again with the run's scorer, and the
difference of two methods is the paired bootstrap over prompts of `saealign.stats` (for the conditional
attribute, of the balance-weighted per-prompt correctness, whose mean is the balanced accuracy).

    python benchmarks/attributes_pairwise.py runs/attributes/conditional/test --pairs dspa:static-sae dspa:repe \
        --output benchmarks/results/attributes_conditional_pairwise.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from saealign._io import read_json, write_json
from saealign.best_of_k import AttributePrompt
from saealign.data import read_records
from saealign.eval.attributes import balance_weights, get_scorer
from saealign.results import format_estimate
from saealign.stats import paired_difference


def per_prompt(run: Path, method: str, scorer) -> tuple[list[str], np.ndarray]:
    """(prompt ids, per-prompt contributions to the headline) of one method's saved answers."""
    rows = [r for _, r in read_records(run / "answers" / f"{method}.jsonl")]
    prompts = [AttributePrompt(r["prompt"], r.get("kind")) for r in rows]
    scores = np.array([scorer(p.text, r["answer"], p.kind) for p, r in zip(prompts, rows)])
    if scorer.needs_kind:
        scores = balance_weights([r["kind"] for r in rows]) * scores
    return [r["id"] for r in rows], scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", help="an `eval attributes` output directory (answers/ and config.json)")
    ap.add_argument("--pairs", nargs="+", required=True, help="A:B pairs of method names; the difference is A - B")
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--output", default=None, help="a JSON file for the differences")
    args = ap.parse_args()
    run = Path(args.run)
    scorer = get_scorer(read_json(run / "config.json")["config"]["scorer"])
    rows = []
    for pair in args.pairs:
        a, b = pair.split(":")
        (ids_a, sa), (ids_b, sb) = per_prompt(run, a, scorer), per_prompt(run, b, scorer)
        if ids_a != ids_b:
            raise ValueError(f"{run}: {a} and {b} answered different prompts")
        diff = paired_difference(sa, sb, args.n_boot)
        rows.append({"a": a, "b": b, "metric": "balanced_accuracy" if scorer.needs_kind else scorer.name,
                     "difference": diff.to_json()})
        print(f"{a} - {b} ({rows[-1]['metric']}): {format_estimate(diff, 3)}", flush=True)
    if args.output:
        write_json(Path(args.output), {"run": str(run), "scorer": scorer.provenance(), "pairs": rows})


if __name__ == "__main__":
    main()
