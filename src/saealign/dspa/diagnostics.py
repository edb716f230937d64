"""Does a DSPA map predict held-out preferences? (METHOD.md, "Map diagnostics")

The map accumulates `A = mean_n g(x_n) Δρ_n^T` (dspa/map.py), with `g` the input-SAE prompt
statistic and `Δρ = ρ(x,y+) - ρ(x,y-)` the difference of output-SAE firing densities over the
chosen and rejected responses. Steering turns a prompt into scores `s(x) = A^T TopK_{k_prompt}(g(x))`
and edits the k_diff latents with the most negative (ablate) or positive (augment) scores. So the map's
claim about a held-out triple is that `s(x)` points the way `Δρ(x,y+,y-)` does on the latents it edits.
On held-out triples (never the fitting data), with g and Δρ computed exactly as in fitting
(`map.pair_statistics`), this module measures:

- `alignment`: per triple, `Σ_{j in E(x)} s_j(x) Δρ_j` over the edited set E(x) (the k_diff latents of
  largest |s_j(x)|, the union of S- and S+ of mode "both"), averaged with its bootstrap 95 % interval
  (`saealign.stats`); `agreement`: the share of triples where it is positive (ties, e.g. Δρ = 0 on
  E, count one half, the `saealign.stats` tie rule);
- `pearson` / `spearman`: correlation of s_j(x) with Δρ_j over all (triple, j in E(x)) pairs;
- `*_shuffled_prompts`: the same with each triple's Δρ paired with another triple's s (a fixed
  derangement): the part of the signal that is not prompt-conditional survives it, so
  `alignment - alignment_shuffled_prompts` is what conditioning on the prompt adds.

- `edited_overlap_static`: per triple, the Jaccard overlap of E(x) with the set static-sae edits (scores
  `A^T mean g`, the same for every prompt); 1 means the map selects the same latents whatever the prompt, so
  DSPA cannot differ from static-sae (`center=True` scores with the centred map and prompt statistic, see
  `steer.prompt_scores`); `prompt_latents_overlap_mean`: the same for TopK_{k_prompt}(g(x)) against
  the top latents of the mean prompt (prompts whose densest latents are all shared, template tokens say, leave
  nothing to condition on).

`signal` is False when the alignment interval includes 0: the map then has no held-out signal,
and steering with it cannot be expected to move held-out preferences. Under MIN_HELD_OUT triples a
bootstrap interval means little, and `signal` is None (undecided).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from saealign.config import check_config
from saealign.dspa.map import DSPAMap, FitOptions, pair_statistics
from saealign.dspa.steer import SteerConfig, prompt_scores
from saealign.models import Dtype, model_option
from saealign.steering import steering_field

MIN_HELD_OUT = 20


@dataclass
class HeldOutStatistics:
    """Per held-out triple: g(x) (n, m_in) and Δρ (n, m_out), as the map's fit computes them."""

    g: torch.Tensor
    delta: torch.Tensor


def held_out_statistics(model, tokenizer, sae_in, sae_out, triples, options: FitOptions,
                        progress: bool = True) -> HeldOutStatistics:
    g, delta = held_out_features(model, tokenizer, [sae_in], [sae_out], triples, options, progress)
    return HeldOutStatistics(g[0], delta[0])


@torch.no_grad()
def held_out_features(model, tokenizer, sae_ins, sae_outs, triples, options: FitOptions,
                      progress: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """g(x) of every input SAE and Δρ of every output SAE per held-out triple, from shared passes
    (`map.pair_statistics`): `HeldOutStatistics(g[i], delta[j])` serves the map of pair (i, j) of a grid."""
    from tqdm.auto import tqdm

    from saealign.data import collate_pairs, render_triples

    device = next(model.parameters()).device  # SAEs load on the CPU; the passes run where the model is
    sae_ins, sae_outs = [sae.to(device) for sae in sae_ins], [sae.to(device) for sae in sae_outs]
    rendered = render_triples(tokenizer, triples, max_length=options.max_length, progress=False)
    g = [torch.zeros(len(rendered), sae.d_sae) for sae in sae_ins]
    delta = [torch.zeros(len(rendered), sae.d_sae) for sae in sae_outs]
    order = sorted(range(len(rendered)), key=lambda i: rendered[i].length("both"))
    for b0 in tqdm(range(0, len(order), options.batch_size), desc="held-out g, Δρ", disable=not progress):
        idx = order[b0:b0 + options.batch_size]
        items = [rendered[i] for i in idx]
        g_b, d_b, _ = pair_statistics(model, sae_ins, sae_outs, collate_pairs(items, tokenizer, "chosen", "right"),
                                      collate_pairs(items, tokenizer, "rejected", "right"), options)
        for full, part in (*zip(g, g_b), *zip(delta, d_b)):
            full[idx] = part.cpu().float()
    return g, delta


def _rank(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, ranks)
    return (sums / counts)[inverse]  # ties share their mean rank


def correlations(x: np.ndarray, y: np.ndarray) -> dict[str, float | None]:
    """Pearson and Spearman (Pearson of mid-ranks); None when either side is constant."""
    def pearson(u: np.ndarray, v: np.ndarray) -> float | None:
        if len(u) < 2 or u.std() == 0 or v.std() == 0:
            return None
        return float(np.corrcoef(u, v)[0, 1])

    return {"pearson": pearson(x, y), "spearman": pearson(_rank(x), _rank(y))}


def _derangement(n: int, seed: int) -> np.ndarray:
    """A seeded permutation with no fixed point (a cyclic shift of a shuffled order)."""
    order = np.random.default_rng(seed).permutation(n)
    out = np.empty(n, dtype=int)
    out[order] = np.roll(order, 1)
    return out


def signal_metrics(scores: torch.Tensor, delta: torch.Tensor, k_diff: int, n_boot: int = 2000,
                   seed: int = 0) -> dict[str, Any]:
    """Alignment, agreement and correlations of scores s (n, m_out) with realised Δρ (n, m_out) on the edited sets."""
    from saealign.stats import mean_estimate, wins

    edited = scores.abs().topk(min(k_diff, scores.shape[-1]), dim=-1).indices
    s_e, d_e = scores.gather(-1, edited).double().numpy(), delta.gather(-1, edited).double().numpy()
    alignment = (s_e * d_e).sum(-1)
    hits = wins(alignment, np.zeros_like(alignment))
    out: dict[str, Any] = {name: mean_estimate(values, n_boot, seed).to_json()
                           for name, values in (("alignment", alignment), ("agreement", hits))}
    out.update(correlations(s_e.ravel(), d_e.ravel()))
    out["signal"] = bool(out["alignment"]["ci95"][0] > 0) if len(alignment) >= MIN_HELD_OUT else None
    return out


def map_signal(dspa_map: DSPAMap | Sequence[DSPAMap], stats: HeldOutStatistics, k_prompt: int = 32, k_diff: int = 16,
               threshold: float | None = None, n_boot: int = 2000, seed: int = 0, center: bool = False,
               kinds: Sequence[str | None] | None = None) -> list[dict[str, Any]]:
    """Held-out signal of each map (e.g. snapshots at growing N), with the shuffled-prompt control. With `kinds`
    (each triple's prompt kind, e.g. harmful / benign), also by kind: a prompt-conditional attribute needs the map
    right on every kind, and the shuffled-prompt control misses that when one kind dominates (most deranged pairs
    then keep their kind)."""
    maps = [dspa_map] if isinstance(dspa_map, DSPAMap) else list(dspa_map)
    if len(stats.g) < 2:
        raise ValueError("map_signal needs at least 2 held-out triples")
    from saealign.stats import mean_estimate

    shuffled = torch.as_tensor(_derangement(len(stats.g), seed))
    prompt_overlap = jaccard(stats.g, stats.g.mean(0, keepdim=True), k_prompt)
    named = sorted({k for k in kinds or () if k is not None})
    by_kind = {kind: torch.tensor([k == kind for k in kinds]) for kind in named} if len(named) > 1 else {}
    rows = []
    for m in maps:
        scores = prompt_scores(m.matrix(threshold, center), stats.g, k_prompt, m.mean_g() if center else None)
        own = signal_metrics(scores, stats.delta, k_diff, n_boot, seed)
        other = signal_metrics(scores[shuffled], stats.delta, k_diff, n_boot, seed)
        static = m.static_scores(threshold).unsqueeze(0)  # what static-sae edits, whatever `center`
        overlaps = {"edited_overlap_static": jaccard(scores.abs(), static.abs(), k_diff),
                    "prompt_latents_overlap_mean": prompt_overlap}
        row = {"n_fit": m.count, **own, **{f"{k}_shuffled_prompts": v for k, v in other.items() if k != "signal"},
               **{k: mean_estimate(v, n_boot, seed).to_json() for k, v in overlaps.items()}}
        if by_kind:
            row["by_kind"] = {kind: signal_metrics(scores[mask], stats.delta[mask], k_diff, n_boot, seed)
                              for kind, mask in by_kind.items()}
        rows.append(row)
    return rows


def jaccard(values: torch.Tensor, reference: torch.Tensor, k: int) -> np.ndarray:
    """Per row of `values`, the Jaccard overlap of its top-k indices with those of the `reference` row."""
    k = min(k, values.shape[-1])
    top = torch.zeros_like(values, dtype=torch.bool).scatter_(-1, values.topk(k, dim=-1).indices, True)
    ref = torch.zeros_like(reference, dtype=torch.bool).scatter_(-1, reference.topk(k, dim=-1).indices, True)
    both, either = (top & ref).sum(-1), (top | ref).sum(-1)
    return (both / either.clamp_min(1)).double().numpy()


def maps_by_n(path: str | Path) -> list[tuple[str, DSPAMap]]:
    """A map directory's snapshots (`snapshot_N`) and the full map, by growing N; a snapshot of all the
    data (N = the whole set) is the full map and is listed once."""
    root = Path(path)
    full = DSPAMap.load(root)
    found = [(p.name, DSPAMap.load(p)) for p in root.glob("snapshot_*") if p.is_dir()]
    found = [(name, m) for name, m in found if m.meta.data_fingerprint != full.meta.data_fingerprint]
    return sorted([*found, (root.name, full)], key=lambda item: item[1].count)


@dataclass
class MapSignalConfig:
    """`saealign eval map-signal`: how well each map's scores separate chosen from rejected on held-out triples."""

    maps: list[str] = field(default_factory=list, metadata={"help": "Map directories (repeat); each one's snapshot_N maps are included, ordered by N."})
    data: str = field(default="", metadata={"help": "Held-out triples: a file or an HH-RLHF directory (with --data-role validation, never a fit role)."})
    data_role: str | None = field(default=None, metadata={"help": "Data role when --data is an HH-RLHF directory (validation)."})
    n: int | None = field(default=None, metadata={"help": "Seeded nested uniform draw of this many held-out triples (default: all).", "ge": 2})
    seed: int = field(default=0, metadata={"help": "Seed of the --n draw and of the bootstrap."})
    k_prompt: int | None = steering_field("k_prompt")
    k_diff: int | None = steering_field("k_diff")
    threshold: float | None = steering_field("threshold")
    center: bool | None = steering_field("center")
    batch_size: int = field(default=8, metadata={"help": "Triples per forward pass.", "ge": 1})
    n_boot: int = field(default=2000, metadata={"help": "Bootstrap resamples of the 95% intervals.", "ge": 1})
    output: str | None = field(default=None, metadata={"help": "JSON file the rows are written to (default: none)."})
    dtype: Dtype | None = model_option("dtype")
    device: str | None = model_option("device")

    def __post_init__(self) -> None:
        check_config(self)


def run_map_signal(cfg: MapSignalConfig, model=None, tokenizer=None, progress: bool = True) -> dict[str, Any]:
    """Held-out signal of every map named (and its snapshots), all on the same held-out statistics."""
    from saealign.data import select_triples, triples_fingerprint
    from saealign.models import load_model
    from saealign.sae import load_sae

    if not cfg.maps or not cfg.data:
        raise ValueError("map-signal needs --maps and --data")
    maps = [(f"{Path(p).name}/{name}" if name != Path(p).name else name, m) for p in cfg.maps for name, m in maps_by_n(p)]
    triples = select_triples(cfg.data, cfg.data_role, cfg.n, cfg.seed)
    fitted_on = {m.meta.data_fingerprint for _, m in maps}
    if triples_fingerprint(triples) in fitted_on:
        raise ValueError("the held-out triples are a map's own fitting data; "
                         "pass held-out data (e.g. --data-role validation)")
    first = maps[0][1]
    if model is None:
        model, tokenizer = load_model(first.meta.model, device=cfg.device, dtype=cfg.dtype)
    sae_in, sae_out = load_sae(first.meta.sae_in["source"]), load_sae(first.meta.sae_out["source"])
    for name, m in maps:
        m.check_compatible(model, sae_in, sae_out)
        if m.meta.options != first.meta.options:  # g and Δρ are computed once, with the first map's options
            raise ValueError(f"map {name} was fitted with other options ({m.meta.options}) than {maps[0][0]} "
                             f"({first.meta.options}); compare maps fitted alike")
    kinds = [t.meta.get("extra", {}).get("kind") for t in triples]  # best-of-K triples record their prompt's kind
    options = replace(first.meta.options, batch_size=cfg.batch_size)
    stats = held_out_statistics(model, tokenizer, sae_in, sae_out, triples, options, progress)
    recommended = SteerConfig.resolve(first.meta.recommended.dspa)
    k_prompt = cfg.k_prompt or recommended.k_prompt
    k_diff = cfg.k_diff or recommended.k_diff
    center = recommended.center if cfg.center is None else cfg.center
    rows = []
    for name, m in maps:
        row = map_signal(m, stats, k_prompt, k_diff, cfg.threshold, cfg.n_boot, cfg.seed, center, kinds)[0]
        rows.append({"map": name, **row})
    result = {"config": asdict(cfg), "k_prompt": k_prompt, "k_diff": k_diff, "center": center, "n_held_out": len(triples),
              "rows": rows, "signal": None if rows[0]["signal"] is None else any(r["signal"] for r in rows)}
    if cfg.output:
        from saealign._io import write_json

        write_json(cfg.output, result)
    return result
