"""`saealign sae train | eval | info`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import typer
from rich.console import Console
from rich.table import Table

from saealign.cli import sae_app
from saealign.cli._config import config_command
from saealign.config import check_config
from saealign.results import ResultRecord, write_results
from saealign.sae.train import SAETrainConfig, train_saes

console = Console()


@config_command(sae_app, "train", SAETrainConfig, required=("layers", "corpus", "output"))
def train(cfg: SAETrainConfig) -> None:
    """Train TopK SAEs on a model's residual stream (one per layer) from a text corpus."""
    results = train_saes(cfg)
    for layer, path in results.items():
        meta = json.loads((path / "cfg.json").read_text())["metadata"]
        console.print(f"layer {layer}: saved to {path}  held-out {meta['heldout_activation_metrics']}")


@dataclass
class SAEEvalConfig:
    sae: str = field(default="default:out", metadata={"help": "SAE directory, params.npz, default:in/default:out, or release:sae_id."})
    corpus: str = field(default="", metadata={"help": "Held-out text corpus (same forms as sae train --corpus)."})
    corpus_role: str | None = field(default=None, metadata={"help": "Data role when --corpus is an HH-RLHF directory (e.g. validation)."})
    model: str = field(default="smollm2-135m-instruct", metadata={"help": "Model the SAE belongs to."})
    limit: int | None = field(default=None, metadata={"help": "Use a seeded sample of at most this many texts.", "ge": 1})
    zero_ablation: bool = field(default=False, metadata={"help": "Also report the loss with the layer zeroed."})
    max_length: int = field(default=512, metadata={"ge": 1})
    dtype: str = "float32"
    seed: int = 0
    output: str | None = field(default=None, metadata={"help": "Write the metrics as JSON here."})
    device: str | None = None

    def __post_init__(self) -> None:
        check_config(self)


SAE_HEADLINE = ["fvu", "l0", "dead_fraction", "loss_increase"]


def run_sae_eval(cfg: SAEEvalConfig) -> ResultRecord:
    from saealign.corpus import load_texts, sample_texts
    from saealign.models import load_model, load_tokenizer
    from saealign.sae import load_sae
    from saealign.sae.evaluate import evaluate_sae

    tok = load_tokenizer(cfg.model)
    texts = sample_texts(load_texts(cfg.corpus, tok, role=cfg.corpus_role), cfg.limit, cfg.seed)
    sae = load_sae(cfg.sae)
    model, _ = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)  # after the corpus and SAE passed their checks
    sae.check_model(model)
    result = evaluate_sae(sae, model, tok, texts, max_length=cfg.max_length, zero_ablation=cfg.zero_ablation)
    record = ResultRecord("sae-eval", f"sae {cfg.sae}", result.estimates(), SAE_HEADLINE, cfg.__dict__,
                          data={"source": cfg.corpus, "role": cfg.corpus_role, "sample_seed": cfg.seed,
                                "texts": result.texts, "tokens": result.tokens,
                                "excluded_tokens": result.excluded_tokens},
                          details={"sae": sae.describe(), "layer": sae.layer})
    if cfg.output:
        write_results(cfg.output, [record])
    return record


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
