"""The DSPA test table (issue protocol): base, DSPA (whole fit pool and N = 1,000), static-sae, RepE
and prompt-prefix on fixed seeded samples of the helpful and harmless test splits, with the
settings chosen on validation and recorded in the maps (`saealign dspa tune`, or `dspa_sweep.py`); a map
without a recorded choice is tuned first (`run_tune` on --val-n validation pairs), so nothing is tuned on test.

    python benchmarks/dspa_test_table.py --map /work/runs/map_full --map-1000 /work/runs/map_full/snapshot_1000
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import replace
from pathlib import Path

import torch

from saealign._io import read_json, write_json
from saealign.data import sample, select_triples
from saealign.dspa import DSPA, TuneConfig, read_metadata, run_tune
from saealign.dspa.map import record_recommended
from saealign._io import versions
from saealign.eval.pref import evaluate_preferences, markdown_table
from saealign.eval.pref_cache import ScoringCache
from saealign.models import DEFAULT_MODEL, load_model
from saealign.results import ResultRecord
from saealign.steering import load_method

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--map", required=True)
    ap.add_argument("--map-1000", required=True)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--helpful", type=int, default=600)
    ap.add_argument("--harmless", type=int, default=300)
    ap.add_argument("--harmless-role", default="harmless_all",
                    help="harmless_all: the pre-split set of the published table; test_harmless: SPLITS.md's test half")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--val-n", type=int, default=200, help="validation pairs when the maps have no recorded choice")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-prefix", action="store_true", help="leave out prompt-prefix (a full pass per split)")
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "dspa_test_table.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok = load_model(DEFAULT_MODEL)
    if read_metadata(args.map).recommended.sweep is None:
        chosen = run_tune(TuneConfig(map=args.map, data=args.data, data_role="validation", n=args.val_n, seed=args.seed,
                                     max_length=args.max_length), model, tok)
        record_recommended(args.map_1000, dataclasses.replace(chosen, source=f"saealign dspa tune {args.map}"))
    splits = {role: sample(select_triples(args.data, role), n, args.seed)
              for role, n in (("test_helpful", args.helpful), (args.harmless_role, args.harmless))}
    reader = DSPA.load(args.map, model=model)
    caches = {}
    for role, triples in splits.items():
        t0 = time.time()
        caches[role] = ScoringCache.build(model, tok, triples, reader.sae_out.layer, reader, args.max_length)
        print(f"{role}: base pass over {len(triples)} pairs in {time.time() - t0:.0f} s", flush=True)
    specs = {"DSPA (fit pool)": f"dspa:{args.map}", "DSPA (N=1000)": f"dspa:{args.map_1000}",
             "static-sae": f"static-sae:{args.map}", "RepE (mean diff., l_out)": f"repe:{args.map}"}
    methods = {"base": None, **{name: load_method(spec, model=model) for name, spec in specs.items()}}
    out = Path(args.output)
    result = read_json(out) if out.exists() else {}
    recommended = read_metadata(args.map).recommended
    result.update({"settings": {"dspa": recommended.dspa.steering_options(),
                                "static-sae": recommended.static_sae.steering_options(),
                                "repe": recommended.repe.steering_options()},
                   "methods": specs, "max_length": args.max_length, "seed": args.seed, "versions": versions()})
    records: dict[str, list[ResultRecord]] = {}
    for role, triples in splits.items():  # the methods served by the cached base pass first
        t0 = time.time()
        records[role] = [replace(r, benchmark=f"pref:{role}") for r in
                         evaluate_preferences(model, tok, triples, methods, args.max_length, cache=caches[role])]
        result[role] = {"records": [r.to_json() for r in records[role]], "seconds": round(time.time() - t0, 1)}
        write_json(out, result)
        print(markdown_table(records[role], role), flush=True)
    if not args.skip_prefix:  # a system prompt changes every token: a full pass per split
        for role in (args.harmless_role, "test_helpful"):
            res = evaluate_preferences(model, tok, splits[role], {"prompt-prefix": load_method("prompt-prefix")},
                                       args.max_length, cache=caches[role])
            records[role] += [replace(r, benchmark=f"pref:{role}") for r in res]
            result[role]["records"] = [r.to_json() for r in records[role]]
            write_json(out, result)
    out.with_suffix(".md").write_text("\n".join(markdown_table(records[r], r) for r in splits))

if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
