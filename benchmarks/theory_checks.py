"""DSPA's theory on synthetic data (METHOD.md, "Theory"; setting in `saealign.audit.theory`): convergence of
A^T to c Sigma B M, de-mixing, rare-gate row errors, and top-k ablation against random-k and magnitude-k
for a linear and a saturating utility. Seconds on a CPU.

    python benchmarks/theory_checks.py   # -> benchmarks/results/theory_checks.{json,png}
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from saealign._io import atomic_path, write_json
from saealign.audit.theory import (ablation_gains, accumulate_map, convergence, demixing, rare_gates,
                                   reference_setup)

RESULTS = Path(__file__).resolve().parent / "results"
ALPHAS = [0.02, 0.05, 0.1, 0.2, 0.5, 1.0]


def run(seed: int) -> dict:
    setup = reference_setup(seed)
    gates, responses = setup.gates, setup.responses
    rng = np.random.default_rng(seed + 100)
    g = gates.sample(8000, rng)
    a = accumulate_map(g, responses.sample(g, rng))
    return {
        "seed": seed,
        "convergence": convergence(gates, responses, [250, 500, 1000, 2000, 4000, 8000, 16000, 32000, 64000], seeds=8),
        "demixing": demixing(gates, responses, n=64000, seed=seed),
        "rare_gates": [rare_gates(setup.independent_gates, setup.isotropic_responses, n=n, seeds=8) for n in (2000, 8000, 32000)],
        "ablation": {"map_n": 8000,
                     "linear": ablation_gains(gates, responses, a, ALPHAS, k=4, seed=seed),
                     "saturating": ablation_gains(gates, responses, a, ALPHAS, k=4, saturation=0.3, seed=seed)},
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    conv = result["convergence"]
    axes[0].loglog(conv["sizes"], conv["relative_error"], "o-", label=f"measured (slope {conv['slope']:.3f})")
    ref = np.array(conv["sizes"], dtype=float)
    axes[0].loglog(ref, conv["relative_error"][0] * np.sqrt(ref[0] / ref), "k--", label="1/sqrt(N)")
    axes[0].set(xlabel="N triples", ylabel="||A^T - c Sigma B M|| / ||c Sigma B M||", title="convergence")
    axes[0].legend()
    dem = result["demixing"]
    x = np.arange(len(dem["cosine_demixed"]))
    axes[1].bar(x - 0.2, dem["cosine_raw_rows"], 0.4, label="A^T column vs B_k")
    axes[1].bar(x + 0.2, dem["cosine_demixed"], 0.4, label="Sigma^-1 A^T M^-1 vs B_k")
    axes[1].set(xlabel="gate k", ylabel="cosine", title=f"de-mixing (N={dem['n']})", ylim=(0, 1.05))
    axes[1].legend(loc="lower right")
    for rare in result["rare_gates"]:
        n_p = rare["n"] * np.array(rare["frequency"])
        axes[2].loglog(n_p, rare["row_relative_error"], "o", label=f"N={rare['n']}")
    all_np = np.array([r["n"] * p for r in result["rare_gates"] for p in r["frequency"]])
    all_err = np.array([e for r in result["rare_gates"] for e in r["row_relative_error"]])
    scale = np.exp(np.mean(np.log(all_err * np.sqrt(all_np))))
    grid = np.geomspace(all_np.min(), all_np.max(), 20)
    axes[2].loglog(grid, scale / np.sqrt(grid), "k--", label="∝ 1/sqrt(N p_k)")
    axes[2].set(xlabel="N p_k", ylabel="row relative error", title="rare gates")
    axes[2].legend()
    for kind, style in (("linear", "-"), ("saturating", ":")):
        gains = result["ablation"][kind]
        for name, values in gains["mean_gain"].items():
            axes[3].plot(gains["alphas"], values, style, marker="o", label=f"{name} ({kind})")
    axes[3].set(xscale="log", xlabel="alpha", ylabel="mean utility gain", title="ablating k=4 latents")
    axes[3].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS / "theory_checks.json")
    args = parser.parse_args()
    result = run(args.seed)
    write_json(args.output, result)
    plot(result, args.output.with_suffix(".png"))
    conv, dem = result["convergence"], result["demixing"]
    print(f"slope {conv['slope']:.3f}; de-mixed cosines min {min(dem['cosine_demixed']):.4f} "
          f"(raw rows max {max(dem['cosine_raw_rows']):.3f}); -> {args.output}")
    for rare in result["rare_gates"]:
        err, p = np.array(rare["row_relative_error"]), np.array(rare["frequency"])
        print(f"N={rare['n']}: rare/common row error {err[-1] / err[0]:.2f}, predicted {np.sqrt(p[0] / p[-1]):.2f}")
    for kind in ("linear", "saturating"):
        gains = result["ablation"][kind]["mean_gain"]
        print(kind, {name: [round(v, 3) for v in values] for name, values in gains.items()})


if __name__ == "__main__":
    main()
