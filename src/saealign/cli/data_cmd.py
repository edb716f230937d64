"""`saealign data inspect`: what a preference file or HF dataset holds, and what is wrong with it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from saealign.best_of_k import BestOfKConfig
from saealign.cli import data_app
from saealign.cli._config import config_command
from saealign.data import LoadReport, PreferenceTriple, load_preferences


def _stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values)
    return {"min": int(arr.min()), "median": round(float(np.median(arr)), 1), "mean": round(float(arr.mean()), 1),
            "p95": round(float(np.percentile(arr, 95)), 1), "max": int(arr.max())}


def inspect_triples(triples: list[PreferenceTriple], report: LoadReport, tokenizer=None) -> dict[str, Any]:
    """Counts, formats, length statistics (chars; tokens with a tokenizer), turn distribution."""
    prompt_chars = [sum(len(m["content"]) for m in t.prompt) for t in triples]
    lengths: dict[str, dict[str, dict[str, float]]] = {"chars": {
        "prompt": _stats(prompt_chars),
        "chosen": _stats([len(t.chosen) for t in triples]),
        "rejected": _stats([len(t.rejected) for t in triples]),
    }}
    if tokenizer is not None and triples:
        from saealign.data import render_triples

        rendered = render_triples(tokenizer, triples)
        lengths["tokens"] = {
            "prompt": _stats([len(r.prompt_ids) for r in rendered]),
            "chosen": _stats([len(r.chosen_ids) for r in rendered]),
            "rejected": _stats([len(r.rejected_ids) for r in rendered]),
            "prompt+longer response": _stats([r.length("both") for r in rendered]),
        }
    turns = Counter(sum(m["role"] == "user" for m in t.prompt) for t in triples)
    return {**report.summary(), "lengths": lengths, "user_turns": dict(sorted(turns.items())),
            "with_system_message": sum(t.prompt[0]["role"] == "system" for t in triples),
            "problems": [str(p) + f" [{p.action}]" for p in report.problems]}


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
    limit: int | None = typer.Option(None, min=1, help="Read at most this many usable pairs."),
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
        triples = load_preferences(source, split=split, limit=limit, errors="drop", allow_empty=allow_empty,
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
