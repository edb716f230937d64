"""`saealign eval mc`: multiple-choice accuracy (MMLU, ARC, HellaSwag, TruthfulQA, WinoGrande)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from saealign.cli import eval_app
from saealign.cli._config import config_command
from saealign.eval import percent_cell
from saealign.eval.mc import MCConfig, run_mc

console = Console()


@config_command(eval_app, "mc", MCConfig)
def mc(cfg: MCConfig) -> None:
    """Multiple-choice accuracy by log-likelihood (lm-eval's prompts and metrics), base or steered."""
    result = run_mc(cfg)
    table = Table(title=f"multiple choice: {result['method']} (% with 95% interval)")
    for column in ("task", "n", "metric", "value", "paired delta vs baseline"):
        table.add_column(column)
    deltas = result.get("paired_vs_baseline", {}).get("delta", {})
    for task, summary in result["tasks"].items():
        for name, m in summary["metrics"].items():
            table.add_row(task, str(summary["n"]), name, percent_cell(m), percent_cell(deltas.get(f"{task}/{name}")))
    console.print(table)
    if cfg.out_dir is not None:
        console.print(f"written: {cfg.out_dir}/results.json")
