"""Held-out comparison of a trained policy with its reference: the FPO paper's metrics and ours.

Per pair (teacher-forced, no gradients, both models on the same batch):
- the preference metrics of `saealign eval pref` (`eval.pref.preference_metrics`, same keys, tie rule
  and intervals) with the reference as the base: `pref_acc_norm` (the FPO paper's preference
  accuracy, length-normalised log-probs), `pref_acc_sum`, `reward_acc` (`r(y+) > r(y-)` with
  `r = log pi(y|x) - log pi_ref(y|x)` summed over response tokens; a tie counts one half, so the
  reference itself scores 50 %), `reward_tie_rate` and `reward_margin`;
- predictive entropy: mean next-token entropy over response tokens (per response, then averaged);
- feature MSE to the reference: mean over all SAE latents of `(cbar_theta - cbar_ref)^2` per response
  (`feature_mse`), and FPO's top-k `D(y)` (`feature_mse_topk`);
- KL to the reference: mean per-token `KL(pi_ref || pi_theta)` over response tokens (`kl_to_reference`)
  and its sum per response (`seq_kl_to_reference`, TDPO's SeqKL).
Every metric is a `saealign.stats` estimate: the mean with its bootstrap interval over pairs (the
per-response metrics are averaged over each pair's two responses first, so the pair stays the unit).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from saealign.config import check_config
from saealign.data import RenderedTriple
from saealign.fpo import losses as L
from saealign.fpo.batching import collate, pairs_fingerprint
from saealign.fpo.objective import run_model
from saealign.models import DEFAULT_MODEL, model_option
from saealign.results import ResultRecord
from saealign.stats import N_BOOT, Estimate, mean_estimate

@torch.no_grad()
def compare_to_reference(policy: torch.nn.Module, reference: torch.nn.Module, tokenizer: Any,
                         pairs: Sequence[RenderedTriple], sae: Any = None, topk: int = 50, batch_size: int = 2,
                         show_progress: bool = True, n_boot: int = N_BOOT, seed: int = 0) -> dict[str, Estimate]:
    """Metrics of `policy` against `reference` on `pairs` (see module docstring)."""
    from saealign.eval.pref import preference_metrics
    from saealign.runtime.scoring import SequenceScores

    device = next(policy.parameters()).device
    cols: dict[str, list[torch.Tensor]] = {name: [] for name in (
        "lp_sum", "length", "ref_sum", "entropy", "kl_mean", "kl_sum", "mse", "mse_topk")}
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
        cols["length"].append(mask.sum(-1))
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
    per_pair = {name: ((chosen[name] + rejected[name]) / 2).double().numpy() for name in chosen}

    def scores(lp: str) -> SequenceScores:
        return SequenceScores(chosen[lp].double().numpy(), rejected[lp].double().numpy(),
                              chosen["length"].numpy(), rejected["length"].numpy())

    out = preference_metrics(scores("lp_sum"), scores("ref_sum"), n_boot, seed)
    names = {"entropy": "entropy", "kl_to_reference": "kl_mean", "seq_kl_to_reference": "kl_sum"}
    if sae is not None:
        names.update(feature_mse="mse", feature_mse_topk="mse_topk")
    out.update({metric: mean_estimate(per_pair[column], n_boot, seed) for metric, column in names.items()})
    return out


@dataclass
class CompareConfig:
    """`saealign fpo eval`: a trained model against its reference on held-out pairs."""

    model: str | None = field(default=None, metadata={"help": "the trained model (directory, alias or hub id)"})
    reference: str = field(default=DEFAULT_MODEL, metadata={"help": "the reference (initial) model"})
    data: str | None = field(default=None, metadata={"help": "held-out preference data, or the shared data root with --data-role"})
    data_role: str | None = field(default=None, metadata={"help": "HH-RLHF role of SPLITS.md, e.g. test_helpful or validation"})
    split_seed: int = field(default=0, metadata={"help": "seed of the HH-RLHF fit/validation split"})
    n: int | None = field(default=None, metadata={
        "help": "a seeded draw of this many pairs, stratified by subset: the same draw as `eval pref --n`", "ge": 1})
    seed: int = field(default=0, metadata={"help": "seed of the --n draw and of the bootstrap"})
    sae: str | None = field(default="default:out", metadata={"help": "SAE for the feature MSE ('' for none)"})
    fpo_topk: int = field(default=50, metadata={"help": "latents kept per token in the feature MSE", "ge": 1})
    max_length: int = field(default=512, metadata={"help": "tokens per prompt + response", "ge": 2})
    max_prompt_length: int = field(default=256, metadata={"help": "tokens kept of the prompt", "ge": 1})
    system_prompt: str | None = field(default=None, metadata={
        "help": "system turn put before every prompt when pairs are rendered (as in training; default: none)"})
    batch_size: int = field(default=2, metadata={"help": "pairs per forward pass", "ge": 1})
    n_boot: int = field(default=N_BOOT, metadata={"help": "bootstrap resamples of each interval", "ge": 1})
    device: str | None = model_option("device")
    output: str | None = field(default=None, metadata={"help": "JSON file the result record is written to"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def __post_init__(self) -> None:
        check_config(self)


def run_comparison(cfg: CompareConfig) -> ResultRecord:
    """Load both models, the pairs and the SAE per `cfg`; return (and optionally write) the result record."""
    from saealign.data import render_triples, sample, select_triples
    from saealign.eval.pref import PREF_HEADLINE
    from saealign.models import load_model, model_id
    from saealign.results import write_results

    if cfg.model is None:
        raise ValueError("pass --model (the trained model)")
    available = select_triples(cfg.data, cfg.data_role, split_seed=cfg.split_seed)  # refused before the models load
    triples = sample(available, None if cfg.n is None else min(cfg.n, len(available)), cfg.seed)
    policy, tokenizer = load_model(cfg.model, device=cfg.device, dtype="float32")
    reference, _ = load_model(cfg.reference, device=cfg.device, dtype="float32")
    pairs = render_triples(tokenizer, triples, cfg.system_prompt, cfg.max_length, cfg.max_prompt_length)
    sae = None
    if cfg.sae:
        from saealign.sae import load_sae

        sae = load_sae(cfg.sae, device=next(policy.parameters()).device)
    metrics = compare_to_reference(policy, reference, tokenizer, pairs, sae, cfg.fpo_topk, cfg.batch_size,
                                   cfg.progress, cfg.n_boot, cfg.seed)
    headline = [*PREF_HEADLINE, "entropy", "kl_to_reference"] + (["feature_mse"] if sae is not None else [])
    record = ResultRecord("fpo-reference-comparison", model_id(policy), metrics, headline, asdict(cfg),
                          data={"source": cfg.data, "role": cfg.data_role, "split_seed": cfg.split_seed,
                                "sample_seed": cfg.seed, "n": len(pairs), "fingerprint": pairs_fingerprint(pairs)},
                          details={"reference": cfg.reference, "sae": sae.describe() if sae is not None else None})
    if cfg.output:
        write_results(cfg.output, [record])
    return record
