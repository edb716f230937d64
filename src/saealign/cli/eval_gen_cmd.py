"""`saealign eval mt-bench`, `saealign eval alpaca-eval` and `saealign report`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from saealign.cli import app, eval_app
from saealign.cli._config import config_command
from saealign.eval.alpaca_eval import AlpacaEvalConfig, run_alpaca_eval
from saealign.eval.mt_bench import MTBenchConfig, run_mt_bench
from saealign.results import ResultRecord, format_estimate

console = Console()


def _show(result: ResultRecord | dict) -> None:
    if not isinstance(result, ResultRecord):  # generation only: where the outputs are
        console.print(result)
        return
    table = Table(title=f"{result.benchmark}: {result.method} (judge {result.details.get('judge')})")
    table.add_column("metric")
    table.add_column("value [95% interval]")
    for name, m in result.metrics.items():
        table.add_row(name, format_estimate(m))
    console.print(table)
    extras = {k: result.details[k] for k in ("n_missing", "n_judgments", "n_retried", "timings") if k in result.details}
    console.print(extras)


@config_command(eval_app, "mt-bench", MTBenchConfig, required=("data", "output"))
def mt_bench(cfg: MTBenchConfig) -> None:
    """MT-Bench: two-turn answers (FastChat files), single-answer grading by a judge, scores per turn/category."""
    _show(run_mt_bench(cfg))


@config_command(eval_app, "alpaca-eval", AlpacaEvalConfig, required=("reference_outputs", "judge_template", "output"))
def alpaca_eval(cfg: AlpacaEvalConfig) -> None:
    """AlpacaEval: outputs, pairwise judging in both orders, win rate and offline length-controlled win rate."""
    _show(run_alpaca_eval(cfg))


@app.command("report")
def report(runs: list[Path] = typer.Argument(..., help="result JSON files or run directories"),
           output: Path = typer.Option(Path("report"), "--output", help="Directory for report.md and the plots."),
           baseline: str | None = typer.Option(None, "--baseline", help="method the deltas compare against "
                                                                          "(default: the first run's)")) -> None:
    """Turn result files into a markdown table (methods x benchmarks, 95% intervals) and PNG plots."""
    from saealign.eval.report import write_report

    path = write_report(runs, output, baseline)
    console.print(path.read_text())
    console.print(f"written: {path}")
