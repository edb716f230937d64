"""Validation sweep of DSPA, static-sae and RepE settings (METHOD.md: tau, alpha and k are chosen on
held-out data; SPLITS.md: on the validation role, never on a test split).

Every setting is scored from one cached base pass (`saealign.eval.pref_cache`). The sweep is
coordinate-wise around the paper's defaults (mode, alpha, k_diff, k_prompt, tau, one axis at a
time), then the best value of each axis combined. The same axes are swept for static-sae, and the
coefficient for RepE. Results are appended to the JSON after every setting, so a rerun resumes.
The choice is the highest validation reward accuracy (ties broken by reward margin).

    python benchmarks/dspa_sweep.py --map /work/runs/map_full --n 200
    python benchmarks/dspa_sweep.py --plot-only benchmarks/results/dspa_sweep_val.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from saealign._io import read_json, write_json
from saealign.data import sample, select_triples
from saealign.dspa import DSPA, DSPAMap, StaticSAE, SteerConfig
from saealign.dspa.map import write_recommended
from saealign.dspa.baselines import RepE
from saealign.eval.pref import preference_metrics
from saealign.eval.pref_cache import ScoringCache
from saealign.models import load_model
from saealign.sae import load_sae

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = {"mode": "ablate", "alpha": 0.2, "k_diff": 16, "k_prompt": 32, "threshold": 0.0}
AXES = {"mode": ["ablate", "augment", "both"], "alpha": [0.1, 0.2, 0.5, 1.0], "k_diff": [16, 64, 256],
        "k_prompt": [32, 128], "threshold": [0.0, 3e-3]}
STATIC_AXES = ("mode", "alpha", "k_diff")
REPE_COEFS = [1.0, 4.0, 16.0]


def key(method: str, setting: dict) -> str:
    return method + ":" + ",".join(f"{k}={setting[k]}" for k in sorted(setting))


def rank(entry: dict) -> tuple[float, float]:
    m = entry["metrics"]
    return m["reward_acc"]["value"], m["reward_margin"]["value"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--map", required=True, help="DSPA map directory (fit on the fit role)")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--n", type=int, default=300, help="validation pairs (stratified seeded sample)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dspa_sweep_val.json"))
    ap.add_argument("--write-recommended", nargs="*", default=[], metavar="MAP",
                    help="record the chosen settings in these maps' configs (default: --map)")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    done = read_json(out)["entries"] if out.exists() else {}
    model, tok = load_model("smollm2-135m-instruct")
    dspa_map = DSPAMap.load(args.map)
    sae_in = load_sae(dspa_map.config["sae_in"]["source"])
    sae_out = load_sae(dspa_map.config["sae_out"]["source"])
    triples = select_triples(args.data, "validation")
    triples = sample(triples, min(args.n, len(triples)), args.seed)
    reader = DSPA(dspa_map, sae_in, sae_out, SteerConfig())
    t0 = time.time()
    cache = ScoringCache.build(model, tok, triples, start=sae_out.layer, prompt_reader=reader,
                               max_length=args.max_length)
    print(f"base pass over {len(triples)} pairs: {time.time() - t0:.0f} s", flush=True)
    header = {"map": str(args.map), "map_count": dspa_map.count, "data_role": "validation", "n": len(triples),
              "seed": args.seed, "max_length": args.max_length, "model": "smollm2-135m-instruct",
              "base": preference_metrics(cache.base, None, n_boot=1000)}

    def run(method: str, setting: dict) -> dict:
        k = key(method, setting)
        if k not in done:
            t = time.time()
            if method == "dspa":
                steer = DSPA(dspa_map, sae_in, sae_out, SteerConfig(**setting))
            elif method == "static-sae":
                steer = StaticSAE(dspa_map, sae_out, SteerConfig(**setting))
            else:
                steer = RepE.from_map(dspa_map, coef=setting["coef"])
            scores = cache.score(model, steer)
            done[k] = {"method": method, "setting": setting, "seconds": round(time.time() - t, 1),
                       "metrics": preference_metrics(scores, cache.base, n_boot=1000)}
            write_json(out, {**header, "entries": done})
            m = done[k]["metrics"]
            print(f"{k}: reward acc {m['reward_acc']['value']:.3f} ties {m['reward_tie_rate']['value']:.3f} "
                  f"margin {m['reward_margin']['value']:+.4f} ({done[k]['seconds']} s)", flush=True)
        return done[k]

    chosen = {}
    for method, axes in (("dspa", list(AXES)), ("static-sae", list(STATIC_AXES))):
        best = {}
        for axis in axes:
            entries = [(v, run(method, {**DEFAULTS, axis: v})) for v in AXES[axis]]
            best[axis] = max(entries, key=lambda e: rank(e[1]))[0]
        run(method, {**DEFAULTS, **best})
        own = [e for e in done.values() if e["method"] == method]
        chosen[method] = max(own, key=rank)["setting"]
    for coef in REPE_COEFS:
        run("repe", {"coef": coef})
    chosen["repe"] = max((e for e in done.values() if e["method"] == "repe"), key=rank)["setting"]
    write_json(out, {**header, "entries": done, "chosen": chosen})
    print("chosen:", chosen)
    for target in args.write_recommended or [args.map]:
        write_recommended(target, chosen["dspa"], chosen["static-sae"], chosen["repe"], source=str(out))
    plot(out)


def plot(path: Path) -> None:
    """One panel per axis: validation reward accuracy of DSPA and static-sae around the defaults."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = read_json(path)
    entries = list(res["entries"].values())
    axes = list(AXES) + ["coef"]
    fig, panels = plt.subplots(1, len(axes), figsize=(3.2 * len(axes), 3.2), sharey=True)
    for panel, axis in zip(panels, axes):
        for method, colour in (("dspa", "C0"), ("static-sae", "C1"), ("repe", "C2")):
            pts = []
            for e in entries:
                s = e["setting"]
                if e["method"] != method or axis not in s:
                    continue
                others = {k: v for k, v in s.items() if k != axis}
                if method != "repe" and others != {k: v for k, v in DEFAULTS.items() if k != axis}:
                    continue
                m = e["metrics"]["reward_acc"]
                pts.append((str(s[axis]), 100 * m["value"], 100 * m["ci95"][0], 100 * m["ci95"][1]))
            if pts:
                values = REPE_COEFS if axis == "coef" else AXES[axis]
                pts.sort(key=lambda p: [str(v) for v in values].index(p[0]))
                x = [[str(v) for v in values].index(p[0]) for p in pts]
                ys = [p[1] for p in pts]
                err = [[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]
                panel.errorbar(x, ys, yerr=err, fmt="o-", color=colour, label=method, capsize=3)
                panel.set_xticks(range(len(values)), [str(v) for v in values])
        panel.axhline(50, color="grey", lw=0.8, ls="--")
        panel.set_title(axis)
    panels[0].set_ylabel(f"validation reward acc. % (n={res['n']})")
    panels[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    if sys.argv[1:2] == ["--plot-only"]:
        plot(Path(sys.argv[2]))
    else:
        main()
