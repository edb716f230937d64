"""`saealign eval mc`: multiple-choice accuracy (MMLU, ARC, HellaSwag, TruthfulQA, WinoGrande)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from saealign.cli import eval_app
from saealign.cli._config import config_command
from saealign.eval.mc import MCConfig, run_mc
from saealign.results import format_estimate
from saealign.stats import Estimate

console = Console()


@config_command(eval_app, "mc", MCConfig)
def mc(cfg: MCConfig) -> None:
    """Multiple-choice accuracy by log-likelihood (lm-eval's prompts and metrics), base or steered."""
    record = run_mc(cfg)
    table = Table(title=f"multiple choice: {record.method} (% with 95% interval)")
    for column in ("task", "n", "metric", "value", f"paired delta vs {record.baseline or 'a baseline'}"):
        table.add_column(column)
    for name, m in record.metrics.items():
        task, metric = name.split("/", 1)
        table.add_row(task, str(m.n), metric, percent(m), percent(record.deltas.get(name)))
    console.print(table)
    if cfg.output is not None:
        console.print(f"written: {cfg.output}/results.json")


def percent(m: Estimate | None) -> str:
    return format_estimate(m, digits=1, scale=100)
