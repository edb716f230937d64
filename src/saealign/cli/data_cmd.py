"""`saealign data`: inspect a preference file or HF dataset, build best-of-K triples, merge best-of-K parts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from saealign.best_of_k import BestOfKConfig
from saealign.cli import data_app
from saealign.cli._config import config_command
from saealign.data import LoadReport, inspect_triples, load_preferences


def _print(info: dict[str, Any], max_problems: int, console: Console) -> None:
    console.print(f"[bold]{', '.join(info['sources'])}[/bold]")
    console.print(f"read {info['read']}, kept {info['kept']}; formats {info['formats'] or '-'}")
    console.print(f"dropped {info['dropped'] or '-'}; kept with warnings {info['warnings'] or '-'}")
    for unit, table_rows in info["lengths"].items():
        table = Table(title=f"length ({unit})")
        for column in ("", "min", "median", "mean", "p95", "max"):
            table.add_column(column, justify="right" if column else "left")
        for name, stats in table_rows.items():
            table.add_row(name, *(str(stats.get(k, "-")) for k in ("min", "median", "mean", "p95", "max")))
        console.print(table)
    console.print(f"user turns in prompt: {info['user_turns']}; with system message: {info['with_system_message']}")
    problems = info["problems"]
    if problems:
        console.print(f"[bold]problems ({len(problems)})[/bold]")
        for line in problems[:max_problems]:
            console.print("  " + line, markup=False)
        if len(problems) > max_problems:
            console.print(f"  ... {len(problems) - max_problems} more (--max-problems, --json)")


@data_app.command("inspect")
def inspect(
    source: str = typer.Argument(..., help="A .jsonl/.json/.parquet file (optionally .gz) or a HF dataset name."),
    split: str | None = typer.Option(None, help="HF dataset split (default: train)."),
    hf_config: str | None = typer.Option(None, help="HF dataset configuration name."),
    hf_data_dir: str | None = typer.Option(None, help="HF dataset data_dir, e.g. helpful-base for Anthropic/hh-rlhf."),
    n: int | None = typer.Option(None, min=1, help="Read the first n usable pairs only (default: all)."),
    model: str | None = typer.Option(None, help="Also report token lengths under this model's chat template "
                                                "(alias, local dir or hub id)."),
    allow_empty: bool = typer.Option(True, help="Count empty responses as warnings rather than errors."),
    max_problems: int = typer.Option(20, min=0, help="Problems to print."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the statistics as JSON here."),
) -> None:
    """Counts, detected formats, prompt/response lengths, turns and every problem of a preference data set."""
    hf_kwargs = {k: v for k, v in (("name", hf_config), ("data_dir", hf_data_dir)) if v is not None}
    report = LoadReport()
    try:
        triples = load_preferences(source, split=split, limit=n, errors="drop", allow_empty=allow_empty,
                                   hf_kwargs=hf_kwargs or None, report=report)
    except (OSError, ValueError) as err:
        raise typer.BadParameter(str(err), param_hint="SOURCE") from err
    tokenizer = None
    if model is not None:
        from transformers import AutoTokenizer

        from saealign.models import model_source

        tokenizer = AutoTokenizer.from_pretrained(model_source(model))
    info = inspect_triples(triples, report, tokenizer)
    _print(info, max_problems, Console())
    if json_out is not None:
        from saealign._io import write_json

        write_json(json_out, info)


@config_command(data_app, "best-of-k", BestOfKConfig, required=("output", "sources", "scorer"))
def best_of_k(cfg: BestOfKConfig) -> None:
    """Preference triples by best-of-K: K sampled base-model answers per prompt, scored by an attribute
    scorer; chosen = best, rejected = worst, ties skipped. Resumable; provenance in OUTPUT/provenance.json."""
    from saealign.best_of_k import build_best_of_k

    counts = build_best_of_k(cfg)["counts"]
    Console().print(f"prompts {counts['prompts']}, triples {counts['triples']}, skipped: tie {counts['skipped_tie']}, "
                    f"margin {counts['skipped_margin']}; by kind {counts['by_kind']}; written to {cfg.output}")


@data_app.command("merge-triples")
def merge_triples(
    parts: list[Path] = typer.Argument(..., help="`data best-of-k` output directories (or their triples.jsonl)."),
    output: Path = typer.Option(..., help="Directory for the merged triples.jsonl and provenance.json."),
    kinds: list[str] | None = typer.Option(None, "--kind", help="Keep triples of this prompt kind only (repeat)."),
) -> None:
    """One triples file from best-of-K parts built apart (e.g. a GPU part and a CPU part of one prompt
    pool): same model, scorer and sampling rule required; each part's provenance kept."""
    from saealign.best_of_k import merge_triples as merge

    try:
        counts = merge([str(p) for p in parts], output, kinds or None)["counts"]
    except (OSError, ValueError) as err:
        raise typer.BadParameter(str(err), param_hint="PARTS") from err
    Console().print(f"triples {counts['triples']} from {counts['prompts']} prompts "
                    f"({counts['duplicates_dropped']} duplicates dropped); by kind {counts['by_kind']}; "
                    f"written to {output}")
