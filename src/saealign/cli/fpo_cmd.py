"""`saealign fpo train | cache | eval`: preference training with FPO, DPO, SimPO, TDPO-1/2."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from saealign.cli import fpo_app
from saealign.cli._config import config_command
from saealign.fpo.evaluate import CompareConfig, run_comparison
from saealign.fpo.trainer import TrainConfig, build_cache, train


@config_command(fpo_app, "train", TrainConfig, required=("data",))
def train_command(cfg: TrainConfig) -> None:
    """Train with --loss fpo|dpo|simpo|tdpo1|tdpo2; the model is saved to --output (loads with load_model)."""
    result = train(cfg)
    s = result.summary
    table = Table(title=f"{cfg.loss}: {s['steps']} steps on {s['n_pairs']} pairs -> {result.output_dir}")
    for column in ("loss", "rewards/accuracies", "rewards/margins", "entropy", "time/step_s", "memory/peak_mb"):
        table.add_column(column, justify="right")
    if s["final"]:
        table.add_row(*(f"{s['final'][c]:.4g}" for c in ("loss", "rewards/accuracies", "rewards/margins", "entropy",
                                                         "time/step_s", "memory/peak_mb")))
    Console().print(table)
    Console().print(f"reference: {s['reference']} {s['ref_cache'] or ''}; mean step {s['mean_step_time_s']:.3g} s; "
                    f"peak memory {s['peak_memory_mb']:.0f} MB ({s['peak_memory_kind']})")


@config_command(fpo_app, "cache", TrainConfig, required=("data",))
def cache_command(cfg: TrainConfig) -> None:
    """Only the offline reference pass of `fpo train` with the same flags (training then reuses it)."""
    cache = build_cache(cfg)
    active = cache.meta.get("mean_active_latents")
    Console().print(f"reference cache {cache.path}: {cache.n_pairs} pairs"
                    + (f", {active:.1f} active latents per response" if active is not None else ""))


@config_command(fpo_app, "eval", CompareConfig, required=("model", "data"))
def eval_command(cfg: CompareConfig) -> None:
    """Compare a trained model with its reference on held-out pairs (accuracy, entropy, feature MSE, KL)."""
    from saealign.results import format_estimate

    record = run_comparison(cfg)
    table = Table(title=f"{record.method} vs {cfg.reference} on {record.data['n']} pairs")
    for column in ("metric", "value [95% interval]"):
        table.add_column(column)
    for name, m in record.metrics.items():
        table.add_row(name, format_estimate(m, digits=4))
    Console().print(table)
    if cfg.output:
        Console().print(f"wrote {cfg.output}")
