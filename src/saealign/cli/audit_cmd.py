"""`saealign sae describe` (latent descriptions) and `saealign audit MAP` (the feature audit)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from saealign.audit.describe import DESCRIPTIONS, DescribeOptions
from saealign.cli import app, sae_app
from saealign.cli._config import config_command, config_flags
from saealign.steering import LatentSteering

console = Console()


@dataclass
class DescribeConfig(DescribeOptions):
    output: str = field(default="", metadata={"help": "Directory for the resumable statistics and descriptions.json."})
    data: str = field(default="", metadata={"help": "Shared data root (HH-RLHF roles and the generic text)."})
    roles: list[str] = field(default_factory=lambda: ["fit", "generic"], metadata={
        "help": "Corpus: data roles and/or `generic` (ARC train, MMLU dev/val, self-instruct seeds); never a test role."})
    sae: str = field(default="default:out", metadata={"help": "SAE whose latents are described."})
    model: str = field(default="smollm2-135m-instruct", metadata={"help": "Model the SAE belongs to."})
    map: Optional[str] = field(default=None, metadata={
        "help": "Describe only the latents of this DSPA map's SAE that have a non-zero entry in its (thresholded) map."})
    latents: list[int] = field(default_factory=list, metadata={"help": "Describe only these latents (repeat)."})
    max_texts: Optional[int] = field(default=2000, metadata={"help": "Seeded sample of at most this many texts.", "ge": 1})
    seed: int = field(default=0, metadata={"help": "Seed of the text sample."})
    dtype: Optional[str] = field(default=None, metadata={"help": "Model dtype (default: bf16 on CUDA, fp32 on CPU)."})
    device: Optional[str] = None
    overwrite: bool = field(default=False, metadata={"help": "Start afresh when OUTPUT holds statistics of other settings."})


def _map_latents(map_dir: str, sae) -> list[int]:
    """Latents of `sae` (the map's input or output SAE) with a non-zero entry in the thresholded map."""
    from saealign.dspa.map import DSPAMap

    dspa_map = DSPAMap.load(map_dir)
    a = dspa_map.matrix()
    for side, axis in (("sae_out", 0), ("sae_in", 1)):
        if getattr(dspa_map.meta, side)["fingerprint"] == sae.fingerprint():
            return (a != 0).any(axis).nonzero().squeeze(1).tolist()
    raise ValueError(f"{map_dir}: the map was fitted with neither this SAE ({sae.fingerprint()}) as input nor as output")


@config_command(sae_app, "describe", DescribeConfig, required=("output", "data"))
def describe(cfg: DescribeConfig) -> None:
    """Describe SAE latents from a corpus: top contexts, quantiles, density, logit lens, token classes, category."""
    from collections import Counter

    from saealign.audit.describe import corpus_texts, describe_latents
    from saealign.corpus import sample_texts
    from saealign.models import load_model, load_tokenizer
    from saealign.sae import load_sae

    tokenizer = load_tokenizer(cfg.model)
    texts = sample_texts(corpus_texts(cfg.data, tokenizer, cfg.roles), cfg.max_texts, cfg.seed)
    sae = load_sae(cfg.sae)
    latents = _map_latents(cfg.map, sae) if cfg.map else (cfg.latents or None)
    model, _ = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    sae.check_model(model)
    options = DescribeOptions(**{f.name: getattr(cfg, f.name) for f in fields(DescribeOptions)})
    result = describe_latents(model, tokenizer, sae, texts, cfg.output, latents, options, overwrite=cfg.overwrite)
    counts = Counter(d["category"] for d in result["latents"].values())
    console.print(f"{len(result['latents'])} latents described over {result['tokens']} tokens of {len(texts)} texts "
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
    n: Optional[int] = typer.Option(None, help="Seeded draw of N prompts per source.", min=1),
    max_new_tokens: int = typer.Option(64, help="Tokens generated per prompt (greedy).", min=1),
    model_name: str = typer.Option("smollm2-135m-instruct", "--model", help="Model the map was fitted on."),
    seed: int = typer.Option(0, help="Seed of the prompt draw and of the bootstrap."),
    device: Optional[str] = None,
    *, steering: LatentSteering,
) -> None:
    """Which latents DSPA selects and edits on a prompt set, by category, as a static HTML report."""
    from saealign._io import read_json
    from saealign.audit.audit import run_audit
    from saealign.audit.html import write_report
    from saealign.best_of_k import load_prompts
    from saealign.dspa import DSPA
    from saealign.eval.generation import Sampling
    from saealign.models import load_model

    chosen = load_prompts(prompts, data, n, seed)
    described = None
    if not descriptions:
        console.print("[yellow]no --descriptions: edited latents count as 'undescribed'; run `saealign sae describe` for category shares[/yellow]")
    if descriptions:
        path = Path(descriptions)
        described = read_json(path / DESCRIPTIONS if path.is_dir() else path)
    model, tokenizer = load_model(model_name, device=device)
    dspa = DSPA.load(map_dir, model, record=True, **steering.steering_options())
    if described and described["sae"]["fingerprint"] != dspa.sae_out.fingerprint():
        raise ValueError(f"{descriptions}: describes SAE {described['sae']['fingerprint']}, not the map's output SAE "
                         f"{dspa.sae_out.fingerprint()}")
    result = run_audit(model, tokenizer, dspa, [(p.kind, p.conversation) for p in chosen], described,
                       Sampling(max_new_tokens=max_new_tokens), seed=seed)
    index = write_report(result, described, output)
    console.print(f"{len(chosen)} prompts, {result['edited_tokens']} of {result['generated_tokens']} generated tokens "
                  f"edited; report -> {index}")
    for category, share in result["category_shares"].items():
        console.print(f"  {category:15s} {100 * share['share']:5.1f} %  [{100 * share['low']:.1f}, {100 * share['high']:.1f}]")
