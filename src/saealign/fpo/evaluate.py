"""Held-out comparison of a trained policy with its reference: the FPO paper's metrics and ours.

Per pair (teacher-forced, no gradients, both models on the same batch):
- preference accuracy: `lp(y+) > lp(y-)` with length-normalised log-probs (`preference_accuracy`)
  and summed ones (`preference_accuracy_sum`); reward accuracy: `r(y+) > r(y-)` with
  `r = log pi(y|x) - log pi_ref(y|x)` summed over response tokens (METHOD.md "Evaluation protocol");
  each with a 95% Wilson interval; ties count as wrong (so the reference itself scores 0 reward accuracy);
- predictive entropy: mean next-token entropy over response tokens (per response, then averaged);
- feature MSE to the reference: mean over all SAE latents of `(cbar_theta - cbar_ref)^2` per response
  (`feature_mse`), and FPO's top-k `D(y)` (`feature_mse_topk`);
- KL to the reference: mean per-token `KL(pi_ref || pi_theta)` over response tokens (`kl_to_reference`)
  and its sum per response (`seq_kl_to_reference`, TDPO's SeqKL).
Means carry their standard error over responses (or pairs).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from saealign._io import write_json
from saealign.config import check_config
from saealign.data import RenderedTriple
from saealign.eval import metric
from saealign.fpo import losses as L
from saealign.fpo.batching import collate, pairs_fingerprint
from saealign.fpo.objective import run_model
from saealign.models import DEFAULT_MODEL

Z95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (well behaved near 0 and 1, unlike the normal one)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (centre - half, centre + half)


def _proportion(flags: torch.Tensor) -> dict[str, Any]:
    n, k = flags.numel(), int(flags.sum())
    p = k / n if n else float("nan")
    out = metric(p, math.sqrt(p * (1 - p) / n) if n else None)
    out["ci95"] = list(wilson_interval(k, n))
    out["n"] = n
    return out


def _mean(values: torch.Tensor) -> dict[str, Any]:
    values = values.double()
    n = values.numel()
    se = float(values.std(unbiased=True) / math.sqrt(n)) if n > 1 else None
    out = metric(float(values.mean()), se)
    if se is not None:
        out["ci95"] = [out["value"] - Z95 * se, out["value"] + Z95 * se]
    out["n"] = n
    return out


@torch.no_grad()
def compare_to_reference(policy: torch.nn.Module, reference: torch.nn.Module, tokenizer: Any,
                         pairs: Sequence[RenderedTriple], sae: Any = None, topk: int = 50, batch_size: int = 2,
                         show_progress: bool = True) -> dict[str, dict[str, Any]]:
    """Metrics of `policy` against `reference` on `pairs` (see module docstring)."""
    device = next(policy.parameters()).device
    cols: dict[str, list[torch.Tensor]] = {name: [] for name in (
        "lp_sum", "lp_norm", "ref_sum", "entropy", "kl_mean", "kl_sum", "mse", "mse_topk")}
    was = policy.training, reference.training
    policy.eval()
    reference.eval()
    for start in tqdm(range(0, len(pairs), batch_size), desc="compare to reference", disable=not show_progress):
        index = list(range(start, min(start + batch_size, len(pairs))))
        batch = {k: v.to(device) for k, v in collate(pairs, index, tokenizer).items()}
        pol = run_model(policy, batch, sae, keep_logits=True)
        ref = run_model(reference, batch, sae, keep_logits=True)
        mask = pol.mask
        lens = mask.sum(-1).clamp(min=1)
        cols["lp_sum"].append(L.sequence_logps(pol.token_logps, mask))
        cols["lp_norm"].append(L.sequence_logps(pol.token_logps, mask, normalise=True))
        cols["ref_sum"].append(L.sequence_logps(ref.token_logps, mask))
        cols["entropy"].append(L.token_entropy(pol.logits, mask).sum(-1) / lens)
        kl = L.token_kl(ref.logits, pol.logits, mask)
        cols["kl_sum"].append(kl.sum(-1))
        cols["kl_mean"].append(kl.sum(-1) / lens)
        if sae is not None:
            cols["mse"].append((pol.pooled - ref.pooled).pow(2).mean(-1))
            cols["mse_topk"].append(L.topk_feature_mse(pol.pooled, ref.pooled, topk))
    policy.train(was[0])
    reference.train(was[1])
    # each batch is [chosen..., rejected...]: split per batch before concatenating
    chosen = {name: torch.cat([v.chunk(2)[0] for v in vals]).cpu() for name, vals in cols.items() if vals}
    rejected = {name: torch.cat([v.chunk(2)[1] for v in vals]).cpu() for name, vals in cols.items() if vals}
    both = {name: torch.cat([chosen[name], rejected[name]]) for name in chosen}
    reward_w, reward_l = chosen["lp_sum"] - chosen["ref_sum"], rejected["lp_sum"] - rejected["ref_sum"]
    out = {
        "preference_accuracy": _proportion(chosen["lp_norm"] > rejected["lp_norm"]),
        "preference_accuracy_sum": _proportion(chosen["lp_sum"] > rejected["lp_sum"]),
        "reward_accuracy": _proportion(reward_w > reward_l),
        "reward_margin": _mean(reward_w - reward_l),
        "entropy": _mean(both["entropy"]),
        "kl_to_reference": _mean(both["kl_mean"]),
        "seq_kl_to_reference": _mean(both["kl_sum"]),
    }
    if sae is not None:
        out["feature_mse"] = _mean(both["mse"])
        out["feature_mse_topk"] = _mean(both["mse_topk"])
    return out


@dataclass
class CompareConfig:
    """`saealign fpo eval`: a trained model against its reference on held-out pairs."""

    model: str | None = field(default=None, metadata={"help": "the trained model (directory, alias or hub id)"})
    reference: str = field(default=DEFAULT_MODEL, metadata={"help": "the reference (initial) model"})
    data: str | None = field(default=None, metadata={"help": "held-out preference data, or the shared data root with --data-role"})
    data_role: str | None = field(default=None, metadata={"help": "HH-RLHF role of SPLITS.md, e.g. test_helpful or validation"})
    data_split_seed: int = 0
    max_pairs: int | None = field(default=None, metadata={
        "help": "a seeded draw of this many pairs, stratified by subset: the same draw as `eval pref --n`", "ge": 1})
    seed: int = 0
    sae: str | None = field(default="default:out", metadata={"help": "SAE for the feature MSE ('' for none)"})
    fpo_topk: int = field(default=50, metadata={"help": "latents kept per token in the feature MSE", "ge": 1})
    max_length: int = field(default=512, metadata={"help": "tokens per prompt + response", "ge": 2})
    max_prompt_length: int = field(default=256, metadata={"help": "tokens kept of the prompt", "ge": 1})
    system_prompt: str | None = None
    batch_size: int = field(default=2, metadata={"help": "pairs per forward pass", "ge": 1})
    device: str | None = None
    output: str | None = field(default=None, metadata={"help": "write the result JSON here"})
    show_progress: bool = True

    def __post_init__(self) -> None:
        check_config(self)


def run_comparison(cfg: CompareConfig) -> dict[str, Any]:
    """Load both models, the pairs and the SAE per `cfg`; return (and optionally write) a result record."""
    from saealign.data import render_triples
    from saealign.eval import result_record
    from saealign.data import select_triples
    from saealign.eval.pref import sample_pairs
    from saealign.models import load_model, model_id

    if cfg.model is None:
        raise ValueError("pass --model (the trained model)")
    triples = sample_pairs(select_triples(cfg.data, cfg.data_role, split_seed=cfg.data_split_seed), cfg.max_pairs,
                           cfg.seed)  # bad data: refused before the models load
    policy, tokenizer = load_model(cfg.model, device=cfg.device, dtype="float32")
    reference, _ = load_model(cfg.reference, device=cfg.device, dtype="float32")
    pairs = render_triples(tokenizer, triples, cfg.system_prompt, cfg.max_length, cfg.max_prompt_length)
    sae = None
    if cfg.sae:
        from saealign.sae import load_sae

        sae = load_sae(cfg.sae, device=next(policy.parameters()).device)
    metrics = compare_to_reference(policy, reference, tokenizer, pairs, sae, cfg.fpo_topk, cfg.batch_size,
                                   cfg.show_progress)
    headline = ["preference_accuracy", "reward_accuracy", "entropy", "kl_to_reference"]
    if sae is not None:
        headline.append("feature_mse")
    record = result_record("fpo-reference-comparison", model_id(policy), metrics, headline, asdict(cfg),
                           reference=cfg.reference, sae=sae.describe() if sae is not None else None,
                           n_pairs=len(pairs), data_fingerprint=pairs_fingerprint(pairs))
    if cfg.output:
        write_json(cfg.output, record)
    return record
