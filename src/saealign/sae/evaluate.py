"""SAE quality: fraction of variance unexplained, L0, dead fraction, and the increase in next-token
loss when the reconstruction is spliced into the model.

All metrics use the token rule of `saealign.activations.keep_mask` (no padding, no first token,
no attention sinks); for the spliced loss, excluded tokens keep their original residual and the
loss is averaged over predictions made at kept positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from saealign.activations import DEFAULT_SINK_FACTOR, keep_mask, padded_batches, tokenize_texts
from saealign.config import check_config
from saealign.hooks import CallContext, attach
from saealign.models import Dtype, ModelOptions, pad_token_id
from saealign.results import ResultRecord, write_results
from saealign.sae.core import SAE
from saealign.stats import Estimate


@torch.no_grad()
def reconstruction_metrics(sae: SAE, acts: torch.Tensor, batch: int = 8192) -> dict[str, float]:
    """FVU, L0 and dead fraction on a (n, d_in) activation matrix."""
    sse = 0.0
    l0 = 0.0
    fired = torch.zeros(sae.d_sae, dtype=torch.bool)
    mean = acts.float().mean(0)
    total = (acts.float() - mean).pow(2).sum().item()
    for start in range(0, acts.shape[0], batch):
        x = acts[start: start + batch].float().to(sae.W_dec.device)
        f = sae.encode(x)
        sse += (x - sae.decode(f)).pow(2).sum().item()
        active = f > 0
        l0 += active.sum().item()
        fired |= active.any(0).cpu()
    return {"fvu": sse / total, "l0": l0 / acts.shape[0], "dead_fraction": 1.0 - fired.float().mean().item(),
            "tokens": int(acts.shape[0])}


@dataclass
class SAEEvalResult:
    fvu: float
    l0: float
    dead_fraction: float
    loss_clean: float
    loss_spliced: float
    loss_zero_ablated: float | None
    tokens: int
    texts: int
    excluded_tokens: int
    extra: dict = field(default_factory=dict)

    @property
    def loss_increase(self) -> float:
        return self.loss_spliced - self.loss_clean

    def estimates(self) -> dict[str, Estimate]:
        """The metrics of `sae eval`'s result record: pooled over all kept tokens, so descriptive figures
        without an interval (`saealign.stats`)."""
        names = ["fvu", "l0", "dead_fraction", "loss_clean", "loss_spliced", "loss_increase"]
        if self.loss_zero_ablated is not None:
            names.append("loss_zero_ablated")
        return {name: Estimate(float(getattr(self, name)), n=self.tokens) for name in names}


@torch.no_grad()
def evaluate_sae(sae: SAE, model, tokenizer, texts: Sequence[str], max_length: int = 512, batch_tokens: int = 8192,
                 sink_factor: float = DEFAULT_SINK_FACTOR, zero_ablation: bool = False, progress: bool = True) -> SAEEvalResult:
    """Evaluate `sae` on held-out `texts` (already chat-rendered) with the model it belongs to.

    `zero_ablation` also measures the loss with the layer's residual zeroed (a reference point for
    the spliced loss; one more forward pass per batch)."""
    sequences = tokenize_texts(tokenizer, texts, max_length)
    layer = sae.layer
    device = next(model.parameters()).device
    sae = sae.to(device)
    totals = dict(sse=0.0, sum_x=None, sum_x2=0.0, n=0, l0=0.0, clean=0.0, spliced=0.0, zero=0.0, preds=0, seen=0)
    fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=device)
    state: dict[str, torch.Tensor] = {}

    def splice(mode: str):
        def fn(hidden: torch.Tensor, ctx: CallContext) -> torch.Tensor | None:
            keep = keep_mask(hidden, ctx.attention_mask, sink_factor)
            state["keep"] = keep
            if mode == "clean":
                x = hidden[keep].float()
                f = sae.encode(x)
                state["x"], state["f"] = x, f
                return None
            out = hidden.clone()
            if mode == "spliced":
                out[keep] = sae.decode(state["f"]).to(hidden.dtype)
            else:
                out[keep] = 0
            return out
        return fn

    bar = tqdm(total=sum(len(s) for s in sequences), unit="tok", desc=f"eval SAE layer {layer}", disable=not progress)
    for _, ids, mask in padded_batches(sequences, batch_tokens, pad_token_id(tokenizer)):
        ids, mask = ids.to(device), mask.to(device)
        losses = {}
        for mode in ("clean", "spliced", "zero") if zero_ablation else ("clean", "spliced"):
            with attach(model, {layer: splice(mode)}, positions="all"):
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            losses[mode] = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none").view(ids.shape[0], -1)
        keep = state["keep"]
        pred_mask = keep[:, :-1] & mask[:, 1:].bool()  # predictions made from kept positions
        for mode, loss in losses.items():
            totals[mode] += loss[pred_mask].sum().item()
        totals["preds"] += int(pred_mask.sum())
        x, f = state["x"], state["f"]
        totals["sse"] += (x - sae.decode(f)).pow(2).sum().item()
        totals["sum_x"] = x.sum(0) if totals["sum_x"] is None else totals["sum_x"] + x.sum(0)
        totals["sum_x2"] += x.pow(2).sum().item()
        totals["n"] += x.shape[0]
        totals["l0"] += (f > 0).sum().item()
        totals["seen"] += int(mask.sum())
        fired |= (f > 0).any(0)
        bar.update(int(mask.sum()))
    bar.close()
    n = totals["n"]
    total_var = totals["sum_x2"] - totals["sum_x"].pow(2).sum().item() / n
    preds = max(1, totals["preds"])
    return SAEEvalResult(fvu=totals["sse"] / total_var, l0=totals["l0"] / n, dead_fraction=1 - fired.float().mean().item(),
                         loss_clean=totals["clean"] / preds, loss_spliced=totals["spliced"] / preds,
                         loss_zero_ablated=totals["zero"] / preds if zero_ablation else None, tokens=n, texts=len(sequences),
                         excluded_tokens=totals["seen"] - n)


@dataclass
class SAEEvalConfig(ModelOptions):
    """`saealign sae eval`: which SAE, on which held-out texts."""

    sae: str = field(default="default:out", metadata={"help": "SAE directory, params.npz, default:in/default:out, or release:sae_id."})
    corpus: str = field(default="", metadata={"help": "Held-out text corpus (same forms as sae train --corpus)."})
    corpus_role: str | None = field(default=None, metadata={"help": "Data role when --corpus is an HH-RLHF directory (e.g. validation)."})
    n: int | None = field(default=None, metadata={"help": "Evaluate on a seeded uniform draw of this many texts (default: all).", "ge": 1})
    zero_ablation: bool = field(default=False, metadata={"help": "Also report the loss with the layer zeroed."})
    max_length: int = field(default=512, metadata={"help": "Tokens per text (longer texts are cut).", "ge": 1})
    dtype: Dtype | None = field(default="float32", metadata={
        "help": "Dtype the model is loaded in (default float32 on every device, so metrics are comparable)."})
    seed: int = field(default=0, metadata={"help": "Seed of the --n draw."})
    output: str | None = field(default=None, metadata={"help": "JSON file the result record is written to (default: none)."})

    def __post_init__(self) -> None:
        check_config(self)


SAE_HEADLINE = ["fvu", "l0", "dead_fraction", "loss_increase"]


def run_sae_eval(cfg: SAEEvalConfig) -> ResultRecord:
    """`saealign sae eval`: evaluate an SAE on a seeded sample of a corpus; the record is written to `cfg.output`."""
    from saealign.corpus import load_texts, sample_texts
    from saealign.models import load_model, load_tokenizer
    from saealign.sae import load_sae

    tok = load_tokenizer(cfg.model)
    texts = sample_texts(load_texts(cfg.corpus, tok, role=cfg.corpus_role), cfg.n, cfg.seed)
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
