"""`saealign eval attributes` and `saealign eval map-signal`: the positive-control attribute benchmarks
and the held-out check of a DSPA map (METHOD.md, "Positive controls")."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from saealign.cli import eval_app
from saealign.cli._config import config_command
from saealign.dspa.diagnostics import MapSignalConfig
from saealign.eval.attribute_bench import AttributeEvalConfig

console = Console()


@config_command(eval_app, "attributes", AttributeEvalConfig, required=("output", "scorer", "sources"))
def attributes(cfg: AttributeEvalConfig) -> None:
    """Generate with each method on held-out prompts, score an attribute, and compare with base prompt by
    prompt (paired bootstrap), with a fluency guard (perplexity under base, distinct-2)."""
    from pathlib import Path

    from saealign.eval.attribute_bench import run_attribute_eval

    run_attribute_eval(cfg)
    console.print((Path(cfg.output) / "results.md").read_text(), markup=False)


@config_command(eval_app, "map-signal", MapSignalConfig, required=("maps", "data"))
def map_signal(cfg: MapSignalConfig) -> None:
    """Does a DSPA map predict held-out preferences? Alignment of s(x) with Δρ on the edited latents,
    correlations, a shuffled-prompt control, for each map and snapshot by N."""
    from saealign.dspa.diagnostics import run_map_signal

    result = run_map_signal(cfg)
    table = Table(title=f"held-out signal on {result['n_held_out']} triples (k_prompt {result['k_prompt']}, "
                        f"k_diff {result['k_diff']})")
    for column in ("map", "N fit", "alignment [95%]", "agreement [95%]", "pearson", "spearman",
                   "alignment, shuffled prompts", "edited overlap with static-sae"):
        table.add_column(column, overflow="fold")

    def cell(m: dict) -> str:
        return f"{m['value']:.3g} [{m['ci95'][0]:.3g}, {m['ci95'][1]:.3g}]"

    def corr(v: float | None) -> str:
        return "–" if v is None else f"{v:.3f}"

    for r in result["rows"]:
        table.add_row(r["map"], str(r["n_fit"]), cell(r["alignment"]), cell(r["agreement"]), corr(r["pearson"]),
                      corr(r["spearman"]), cell(r["alignment_shuffled_prompts"]), cell(r["edited_overlap_static"]))
    console.print(table)
    for r in result["rows"]:
        if "by_kind" in r:
            console.print(f"{r['map']}: agreement by prompt kind: " + ", ".join(
                f"{kind} {cell(m['agreement'])} (n {m['agreement']['n']})" for kind, m in r["by_kind"].items()))
    if result["signal"] is None:
        console.print(f"undecided: {result['n_held_out']} held-out triples are too few for an interval "
                      "(saealign.dspa.diagnostics.MIN_HELD_OUT)")
    elif not result["signal"]:
        console.print("no held-out signal: every map's alignment interval includes 0")
