"""`saealign sae train | suite | eval | info`."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from saealign._io import read_json
from saealign.cli import sae_app
from saealign.cli._config import config_command
from saealign.sae.evaluate import SAEEvalConfig, run_sae_eval
from saealign.sae.suite import SAESuiteConfig, run_suite
from saealign.sae.train import SAETrainConfig, train_saes

console = Console()


@config_command(sae_app, "train", SAETrainConfig, required=("layers", "corpus", "output"))
def train(cfg: SAETrainConfig) -> None:
    """Train TopK SAEs on a model's residual stream (one per layer) from a text corpus."""
    results = train_saes(cfg)
    for layer, path in results.items():
        meta = read_json(path / "cfg.json")["metadata"]
        console.print(f"layer {layer}: saved to {path}  held-out {meta['heldout_activation_metrics']}")


@config_command(sae_app, "suite", SAESuiteConfig, required=("data", "output"))
def suite(cfg: SAESuiteConfig) -> None:
    """Train, score and cache the SAE suite (generic and preference-domain TopK SAEs at several depths); resumable."""
    report = run_suite(cfg)
    table = Table(title=f"SAE suite in {cfg.output}: {len(report['saes'])} SAEs, {report['total_seconds']:.0f} s")
    for col in ("SAE", "FVU", "L0", "dead %", "loss increase (nats)", "bar"):
        table.add_column(col)
    for row in report["saes"]:
        m = row["metrics"]
        table.add_row(row["name"], f"{m['fvu']:.3f}", f"{m['l0']:.1f}", f"{100 * m['dead_fraction']:.1f}",
                      f"{m['loss_increase']:.3f}", "pass" if row["passes"] else "fails")
    console.print(table)
    console.print(f"written: {cfg.output}/suite.json, {cfg.output}/suite.md")


@config_command(sae_app, "eval", SAEEvalConfig, required=("corpus",))
def evaluate(cfg: SAEEvalConfig) -> None:
    """FVU, L0, dead fraction and the next-token loss increase when the SAE is spliced in."""
    record = run_sae_eval(cfg)
    m, d = {k: v.value for k, v in record.metrics.items()}, record.data
    table = Table(title=f"SAE {cfg.sae} (layer {record.details['layer']}) on {d['texts']} texts, {d['tokens']} tokens "
                        f"({d['excluded_tokens']} first/sink tokens excluded)")
    for col in ("FVU", "L0", "dead %", "loss clean", "loss spliced", "increase (nats)", "zero-ablated"):
        table.add_column(col)
    table.add_row(f"{m['fvu']:.4f}", f"{m['l0']:.1f}", f"{100 * m['dead_fraction']:.2f}", f"{m['loss_clean']:.4f}",
                  f"{m['loss_spliced']:.4f}", f"{m['loss_increase']:.4f}",
                  "—" if "loss_zero_ablated" not in m else f"{m['loss_zero_ablated']:.3f}")
    console.print(table)


@sae_app.command("info")
def info(sae: str = typer.Argument(..., help="SAE directory, params.npz or default:in/default:out.")) -> None:
    """Print an SAE's config, fingerprint and shipped metrics."""
    from saealign.sae import load_sae

    loaded = load_sae(sae)
    console.print_json(json.dumps({**loaded.describe(), "layer": loaded.layer, "d_in": loaded.d_in, "k": loaded.cfg.k,
                                   "metadata": loaded.cfg.metadata}, default=str))
