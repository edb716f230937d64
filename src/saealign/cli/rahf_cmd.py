"""`saealign rahf train`: the RAHF-SCIT baseline (step 1 SCIT, step 2 representation alignment)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from saealign.cli import rahf_app
from saealign.cli._config import config_command
from saealign.rahf import RAHFConfig, train


@config_command(rahf_app, "train", RAHFConfig, required=("data",))
def train_command(cfg: RAHFConfig) -> None:
    """Train RAHF-SCIT on preference triples; the model (step-2 LoRA merged) is saved to --output (loads with load_model)."""
    result = train(cfg)
    s = result.summary
    table = Table(title=f"rahf-scit on {s['n_triples']} triples ({s['n_dropped_too_long']} dropped as too long) "
                        f"-> {result.output_dir}")
    for column in ("step", "steps", "final loss", "mean step (s)", "peak memory (MB)", "FLOPs (counted)"):
        table.add_column(column, justify="right")
    for name in ("step1", "step2"):
        step = s[name]
        final = step["final"]["loss"] if step["final"] else float("nan")
        table.add_row(name, str(step["steps"]), f"{final:.4g}",
                      f"{step['mean_step_time_s']:.3g}" if step["mean_step_time_s"] is not None else "-",
                      f"{step['peak_memory_mb']:.0f}" if step["peak_memory_mb"] is not None else "-",
                      f"{step['cost']['flops']['total']:.3g}")
    Console().print(table)
    Console().print(f"total cost: {s['cost']['flops']['total']:.3g} FLOPs counted, {s['cost']['wall_seconds']:.0f} s")
