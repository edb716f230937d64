"""The published validation sweep: `saealign dspa tune` (the library's grid and rule) on the README's data, with
one torch thread, the choice copied to other maps (the N = 1,000 snapshot), the sweep saved as JSON and plotted.

    python benchmarks/dspa_sweep.py --map /work/runs/map_full --n 200 --also /work/runs/map_full/snapshot_1000
    python benchmarks/dspa_sweep.py --plot-only benchmarks/results/dspa_sweep_val.json
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from saealign._io import read_json, write_json
from saealign.dspa import TuneConfig, read_metadata, run_tune
from saealign.dspa.map import record_recommended

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--map", required=True, help="DSPA map directory (fit on the fit role)")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--n", type=int, default=300, help="validation pairs (stratified seeded sample)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--also", nargs="*", default=[], metavar="MAP", help="record the same choice in these maps")
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "dspa_sweep_val.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    chosen = run_tune(TuneConfig(map=args.map, data=args.data, data_role="validation", n=args.n, seed=args.seed, max_length=args.max_length),
                      on_entry=lambda e: print(e.method, e.setting.steering_options(), e.metrics["reward_acc"]["value"],
                                               flush=True))
    for other in args.also:
        record_recommended(other, dataclasses.replace(chosen, source=f"saealign dspa tune {args.map}"))
    write_json(args.output, dataclasses.asdict(read_metadata(args.map).recommended))
    plot(Path(args.output))


def plot(path: Path) -> None:
    """One panel per axis: validation reward accuracy around the grid's centre (the first setting scored)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = read_json(path)["sweep"]
    entries = sweep["entries"]
    centre = entries[0]["setting"]
    axes = ["mode", "alpha", "k_diff", "k_prompt", "threshold", "coef"]
    fig, panels = plt.subplots(1, len(axes), figsize=(3.2 * len(axes), 3.2), sharey=True)
    for panel, axis in zip(panels, axes):
        for method, colour in (("dspa", "C0"), ("static-sae", "C1"), ("repe", "C2")):
            pts = [e for e in entries if e["method"] == method and e["setting"][axis] is not None
                   and all(e["setting"][k] == centre[k] for k in axes if k not in (axis, "coef") and method != "repe")]
            if pts:
                acc = [e["metrics"]["reward_acc"] for e in pts]
                ys = [100 * a["value"] for a in acc]
                err = [[y - 100 * a["ci95"][0] for y, a in zip(ys, acc)], [100 * a["ci95"][1] - y for y, a in zip(ys, acc)]]
                panel.errorbar([str(e["setting"][axis]) for e in pts], ys, yerr=err, fmt="o-", color=colour,
                               label=method, capsize=3)
        panel.axhline(50, color="grey", lw=0.8, ls="--")
        panel.set_title(axis)
    panels[0].set_ylabel(f"validation reward acc. % (n={sweep['data']['n']})")
    panels[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    if sys.argv[1:2] == ["--plot-only"]:
        plot(Path(sys.argv[2]))
    else:
        main()
