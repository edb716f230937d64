"""`saealign sae describe` (latent descriptions) and `saealign audit MAP` (the feature audit)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from saealign.audit.describe import DESCRIPTIONS, DescribeConfig, run_describe
from saealign.cli import app, sae_app
from saealign.cli._config import config_command, config_flags
from saealign.models import DEFAULT_MODEL
from saealign.steering import LatentSteering

console = Console()


@config_command(sae_app, "describe", DescribeConfig, required=("output", "data"))
def describe(cfg: DescribeConfig) -> None:
    """Describe SAE latents from a corpus: top contexts, quantiles, density, logit lens, token classes, category."""
    from collections import Counter

    result = run_describe(cfg)
    counts = Counter(d["category"] for d in result["latents"].values())
    console.print(f"{len(result['latents'])} latents described over {result['tokens']} tokens of {result['texts']} texts "
                  f"({result['tokens_per_second']} tokens/s this run) -> {Path(cfg.output) / DESCRIPTIONS}")
    console.print("categories: " + ", ".join(f"{c} {n}" for c, n in counts.most_common()))


@app.command("audit")
@config_flags(LatentSteering, "steering")
def audit(
    map_dir: str = typer.Argument(..., metavar="MAP", help="DSPA map directory."),
    prompts: list[str] = typer.Option(..., "--prompts", help="Prompt source [KIND=]ROLE_OR_FILE (repeat); KIND is "
                                      "harmful or benign, e.g. harmful=FILE benign=FILE (.txt lines, or jsonl 'prompt')."),
    output: str = typer.Option("runs/audit", help="Directory for index.html, latents/, report.md, audit.json, the PNG."),
    descriptions: Optional[str] = typer.Option(None, help="`sae describe` output (directory or descriptions.json) "
                                               "of the map's output SAE."),
    data: Optional[str] = typer.Option(None, help="HH-RLHF directory when a prompt source names a data role."),
    n: Optional[int] = typer.Option(None, help="Seeded uniform draw of this many prompts per source (default: all).", min=1),
    max_new_tokens: int = typer.Option(64, help="Tokens generated per prompt (greedy).", min=1),
    model_name: str = typer.Option(DEFAULT_MODEL, "--model", help="Model the map was fitted on."),
    seed: int = typer.Option(0, help="Seed of the prompt draw and of the bootstrap."),
    device: Optional[str] = None,
    *, steering: LatentSteering,
) -> None:
    """Which latents DSPA selects and edits on a prompt set, by category, as a static HTML report."""
    from saealign.audit.audit import audit_map

    if not descriptions:
        console.print("[yellow]no --descriptions: edited latents count as 'undescribed'; run `saealign sae describe` for category shares[/yellow]")
    result, index = audit_map(map_dir, prompts, output, descriptions, data, n, max_new_tokens, model_name, seed, device,
                              **steering.steering_options())
    console.print(f"{len(result['prompts'])} prompts, {result['edited_tokens']} of {result['generated_tokens']} generated tokens "
                  f"edited; report -> {index}")
    for category, share in result["category_shares"].items():
        console.print(f"  {category:15s} {100 * share['share']:5.1f} %  [{100 * share['low']:.1f}, {100 * share['high']:.1f}]")
