"""`saealign dspa fit` as a Python API: data selection, single- or multi-process fitting, artifact."""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import torch

from saealign.config import check_config, differing_settings
from saealign.data import in_draw_order, select_triples
from saealign.dspa.map import DSPAMap, FitData, FitOptions, fit_maps, merge_maps
from saealign.models import ModelOptions

log = logging.getLogger(__name__)


@dataclass
class DSPAFitConfig(ModelOptions):
    """`saealign dspa fit`: the DSPA map of a model's SAE pair on preference triples."""

    data: str = field(default="", metadata={"help": "Preference triples: a file, a HF dataset name, or an HH-RLHF directory (with --data-role)."})
    output: str = field(default="", metadata={"help": "Directory for the map artifact."})
    data_role: str | None = field(default=None, metadata={"help": "Role when --data is an HH-RLHF directory (SPLITS.md): fit, validation, test_helpful, harmless_fit, harmless_validation, test_harmless (the test half of harmless-base), harmless_all (all of it: published pre-split numbers)."})
    sae_in: str = field(default="default:in", metadata={"help": "Input SAE (early/middle layer)."})
    sae_out: str = field(default="default:out", metadata={"help": "Output SAE (late layer, where editing happens)."})
    n: int | None = field(default=None, metadata={"help": "Fit on a seeded nested uniform draw of this many triples (with one seed, a smaller n is a subset of a larger one; default: all).", "ge": 1})
    seed: int = field(default=0, metadata={"help": "Seed of the --n draw (and of the snapshot order)."})
    stat: Literal["density", "mean"] = field(default="density", metadata={"help": "Prompt statistic: density (paper) or mean."})
    threshold: float = field(default=0.0, metadata={"help": "Recommended tau stored with the map (|A_ij| < tau dropped when steering).", "ge": 0})
    batch_size: int = field(default=8, metadata={"help": "Triples per forward batch.", "ge": 1})
    max_length: int = field(default=1024, metadata={"help": "Tokens per [prompt; response] (prompt end and response start kept).", "ge": 2})
    checkpoint_every: int = field(default=256, metadata={"help": "Triples between resumable checkpoints.", "ge": 1})
    snapshots: list[int] = field(default_factory=list, metadata={"help": "Also save the map of the seeded n-draw to OUTPUT/snapshot_n (nested N-restrictions, one pass).", "ge": 1})
    overwrite: bool = field(default=False, metadata={"help": "Start afresh when OUTPUT holds a fit (or checkpoint) with other settings."})

    def __post_init__(self) -> None:
        check_config(self)


class _SingleProcess:
    num_processes, process_index, is_main_process, device = 1, 0, True, None


def _launch_state():
    """accelerate's process state under `accelerate launch`; a plain single-process stand-in otherwise
    (creating accelerate's global state in-process would pin settings that later trainers want)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _SingleProcess()
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def run_fit(cfg: DSPAFitConfig, model=None, tokenizer=None) -> DSPAMap:
    """Fit and save a map. Under `accelerate launch` each process fits a shard and rank 0 merges them."""
    return run_fits([cfg], model, tokenizer)[0]


# What a set of fits may differ in and still share their forward passes.
PER_FIT = ("sae_in", "sae_out", "output", "threshold")


def run_fits(cfgs: Sequence[DSPAFitConfig], model=None, tokenizer=None) -> list[DSPAMap]:
    """Fit and save maps that differ only in their SAE pair, output and threshold (a layer grid, say), all from
    the same forward passes (`fit_maps`). Under `accelerate launch` each process fits a shard of the triples
    and rank 0 merges them (the other ranks return their shards)."""
    from saealign.models import load_model
    from saealign.sae import load_sae

    if not cfgs:
        raise ValueError("run_fits needs at least one fit")
    cfg = cfgs[0]
    if not cfg.data or any(not c.output for c in cfgs):
        raise ValueError("dspa fit needs --data and --output")
    shared = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in PER_FIT}
    for other in cfgs[1:]:
        diffs = differing_settings(shared, {k: v for k, v in dataclasses.asdict(other).items() if k not in PER_FIT})
        if diffs:
            raise ValueError(f"fits sharing their passes may differ only in {', '.join(PER_FIT)}; "
                             f"{other.output} differs from {cfg.output}: {diffs}")
    # the data before the model: an empty selection fails before anything heavy loads
    options = FitOptions(stat=cfg.stat, batch_size=cfg.batch_size, max_length=cfg.max_length)
    triples = select_triples(cfg.data, cfg.data_role, cfg.n, cfg.seed)
    if not triples:
        raise ValueError(f"{cfg.data}: no preference triples selected (role {cfg.data_role!r}, n {cfg.n})")
    if cfg.snapshots:  # snapshot_n = the map of the seeded n-draw (`--n n --seed s`), from the same pass
        triples = in_draw_order(triples, cfg.seed)
    state = _launch_state()
    if model is None:
        device = state.device if state.num_processes > 1 else cfg.device
        model, tokenizer = load_model(cfg.model, device=device, dtype=cfg.dtype)
    saes = {spec: load_sae(spec) for spec in dict.fromkeys(s for c in cfgs for s in (c.sae_in, c.sae_out))}
    pairs = [(saes[c.sae_in], saes[c.sae_out]) for c in cfgs]
    outs = [Path(c.output) for c in cfgs]
    if state.num_processes == 1:
        maps = fit_maps(model, tokenizer, pairs, triples, options, outs, checkpoint_every=cfg.checkpoint_every,
                        snapshots=cfg.snapshots, seed=cfg.seed, overwrite=cfg.overwrite)
    else:  # each shard is saved to its directory by fit_maps
        shard = triples[state.process_index:: state.num_processes]
        parts = fit_maps(model, tokenizer, pairs, shard, options, [out / f"shard_{state.process_index}" for out in outs],
                         checkpoint_every=cfg.checkpoint_every, seed=cfg.seed, progress=state.is_main_process,
                         overwrite=cfg.overwrite)
        state.wait_for_everyone()
        if not state.is_main_process:
            return parts
        # shards are disjoint by construction (equal fingerprints only if the data repeats itself)
        maps = [merge_maps([DSPAMap.load(out / f"shard_{r}") for r in range(state.num_processes)], allow_overlap=True)
                for out in outs]
    for dspa_map, c, out in zip(maps, cfgs, outs):
        dspa_map.meta.threshold = c.threshold
        dspa_map.meta.data = FitData(c.data, c.data_role, len(triples), c.seed)
        dspa_map.save(out)
    return maps
