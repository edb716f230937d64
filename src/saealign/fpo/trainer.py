"""Preference training for FPO, DPO, SimPO, TDPO-1 and TDPO-2 on the shared loop of `saealign.training`.

Why not a TRL trainer subclass: FPO needs a forward hook for SAE activations and an offline
reference cache keyed by model/SAE/data fingerprints (TRL precomputes reference log-probs only);
TDPO needs the reference logits, which TRL's fused LM head never builds; SimPO lives in TRL's
experimental `CPOTrainer` with different (0.x) internals, so no single TRL subclass covers all five
losses; and exact resume (data order included) and 2-process CPU runs are easier to guarantee in a
loop we own (`saealign.training`, shared with RAHF). TRL's data format (standard or conversational
prompt/chosen/rejected, through `saealign.data`), batch layout (`DataCollatorForPreference`) and metric
names are kept, and the DPO/SimPO losses are checked against TRL's own trainers in the tests.

Choices: dropout is disabled (TRL's `disable_dropout=True`), so a step is a deterministic function
of the weights, the optimizer state and the data order — which is all a checkpoint stores. The cost
(`saealign.cost`) of the training passes and of the reference-cache pass goes into `train_summary.json`
("cost": the alignment stage; "cost_by_stage": each stage). A reused cache contributes the build cost it recorded,
so the cost of a method does not depend on what an earlier run left on disk ("ref_cache_reused" says which).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from saealign._io import write_json
from saealign.config import check_config, option
from saealign.cost import CostMeter, LoraShape, combine, peak_memory_kind, peak_memory_mb
from saealign.data import RenderedTriple
from saealign.fpo import losses as L
from saealign.fpo.batching import collate, pairs_fingerprint
from saealign.fpo.cache import ReferenceCache, load_or_build
from saealign.fpo.objective import ModelReference, Objective, Reference, run_model
from saealign.hooks import num_layers
from saealign.training import METRICS_FILE  # noqa: F401  (re-exported: where the metrics of a run are)
from saealign.training import (RESUMABLE_OPTIONS, LoopSettings, MicroBatchResult, StepContext, TrainingOptions,
                               disable_dropout, make_accelerator, run_loop)


Loss = Literal[L.LOSSES]


@dataclass
class TrainConfig(TrainingOptions):
    """Preference training; field names follow TRL's `DPOConfig` where they overlap, except the names of
    `saealign.config.GLOSSARY` (output, n, split_seed, progress), which every command shares."""

    loss: Loss = field(default="fpo", metadata=option("preference loss"))
    sae: str | None = field(default=None, metadata=option("SAE for FPO (path or spec); default: the shipped late-layer SAE"))
    output: str = field(default="runs/fpo", metadata=option("where the model, checkpoints and metrics.jsonl go"))
    beta: float | None = field(default=None, metadata=option("default per loss: 0.1 (fpo, dpo, tdpo), 2.0 (simpo)", gt=0))
    simpo_gamma: float = field(default=0.5, metadata=option("SimPO target margin"))
    fpo_alpha: float = field(default=0.5, metadata=option("FPO weight of the feature-MSE term", ge=0))
    fpo_topk: int = field(default=50, metadata=option("FPO k of the top-k latent set", ge=1))
    fpo_topk_union: bool = field(default=True, metadata=option("FPO: unite policy and reference top-k (else policy only)"))
    tdpo_alpha: float = field(default=0.5, metadata=option("TDPO-2 weight of the sequential-KL term", ge=0))
    reference: Literal["auto", "cache", "model"] = field(default="auto", metadata=option(
        "auto | cache | model: where reference values come from; auto = cache for fpo, a live model for dpo/tdpo"))
    ref_cache: str | None = field(default=None, metadata=option("reference cache directory (default: keyed in the saealign cache)"))
    learning_rate: float = field(default=1e-6, metadata=option("peak learning rate", gt=0))
    lr_scheduler_type: str = field(default="linear", metadata=option("any transformers scheduler name"))
    warmup_ratio: float = field(default=0.1, metadata=option("fraction of the steps spent warming up", ge=0, le=1))
    per_device_train_batch_size: int = field(default=2, metadata=option("pairs per device and micro-batch", ge=1))
    gradient_accumulation_steps: int = field(default=4, metadata=option("micro-batches per optimizer step", ge=1))
    num_train_epochs: int = field(default=1, metadata=option("passes over the pairs", ge=1))
    max_steps: int = field(default=-1, metadata=option("> 0 overrides num_train_epochs"))
    max_length: int = field(default=512, metadata=option("cap on prompt + response tokens", ge=1))
    max_prompt_length: int = field(default=256, metadata=option("prompt tokens kept (from the end) when a pair is too long", ge=1))
    system_prompt: str | None = field(default=None, metadata=option("system turn put before every prompt when pairs are rendered (default: none)"))
    use_peft: bool = field(default=False, metadata=option("train a LoRA adapter (merged into the saved model)"))
    lora_r: int = field(default=16, metadata=option("LoRA rank", ge=1))
    lora_alpha: int = field(default=32, metadata=option("LoRA scaling numerator", ge=1))
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                                           metadata=option("module names LoRA adapts (repeat the flag)"))
    ref_batch_size: int = field(default=4, metadata=option("batch size of the reference-cache pass", ge=1))

    def __post_init__(self) -> None:
        check_config(self)
        if self.loss in ("tdpo1", "tdpo2") and self.reference == "cache":
            raise ValueError("TDPO needs the reference's per-token distributions, which the cache does not hold; "
                             "use --reference model (or auto)")

    def objective(self) -> Objective:
        return Objective(self.loss, self.beta, self.simpo_gamma, self.fpo_alpha, self.fpo_topk, self.fpo_topk_union,
                         self.tdpo_alpha)

    def reference_source(self) -> str | None:
        if self.loss == "simpo":
            return None
        if self.reference == "auto":
            return "cache" if self.loss == "fpo" else "model"
        return self.reference


# Fields that may change between a run and its resumption (they do not change the trajectory).
_RESUMABLE_CHANGES = RESUMABLE_OPTIONS | {"ref_cache", "ref_batch_size", "per_device_train_batch_size"}


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    metrics: list[dict[str, Any]]  # what metrics.jsonl holds for this run (main process)
    summary: dict[str, Any]


@dataclass
class _Setup:
    accelerator: Any
    mixed_precision: str
    model: Any
    tokenizer: Any
    pairs: list[RenderedTriple]
    sae: Any


def _setup(cfg: TrainConfig, model: Any, tokenizer: Any, pairs: Sequence[RenderedTriple] | None, sae: Any) -> _Setup:
    from accelerate.utils import set_seed

    accelerator, mixed = make_accelerator(cfg.mixed_precision, cfg.device)
    set_seed(cfg.seed)
    from saealign.models import load_model, load_tokenizer

    if model is None:
        tokenizer = load_tokenizer(cfg.model)
    if tokenizer is None:
        raise ValueError("train() needs the tokenizer of the model it is given")
    pairs = list(pairs) if pairs is not None else _load_pairs(cfg, tokenizer)  # bad data: refused before the model loads
    if model is None:
        model, _ = load_model(cfg.model, device=accelerator.device, dtype="float32")
    model.to(accelerator.device)
    if cfg.objective().needs_sae:
        if sae is None:
            from saealign.sae import load_sae

            sae = load_sae(cfg.sae or "default:out", device=accelerator.device)
        sae = sae.to(accelerator.device).requires_grad_(False)
    else:
        sae = None
    return _Setup(accelerator, mixed, model, tokenizer, pairs, sae)


def _reference_cache(cfg: TrainConfig, setup: _Setup, meter: CostMeter | None = None) -> ReferenceCache:
    """Load or build the cache with the initial policy (= the reference); rank 0 builds, the others load.
    With `meter`, every pass of a build is counted."""
    acc = setup.accelerator
    with acc.main_process_first():
        return load_or_build(setup.model, setup.tokenizer, setup.pairs, setup.sae, cfg.ref_cache,
                             dtype=f"{setup.model.dtype}-{setup.mixed_precision}".replace("torch.", ""),
                             batch_size=cfg.ref_batch_size, device=acc.device, autocast=acc.autocast,
                             show_progress=cfg.progress and acc.is_main_process, meter=meter)


def build_cache(cfg: TrainConfig, model: Any = None, tokenizer: Any = None, pairs: Sequence[RenderedTriple] | None = None,
                sae: Any = None) -> ReferenceCache:
    """Only the offline reference pass `train(cfg)` would run (same key, so training then reuses it)."""
    return _reference_cache(cfg, _setup(cfg, model, tokenizer, pairs, sae))


def train(cfg: TrainConfig, model: Any = None, tokenizer: Any = None, pairs: Sequence[RenderedTriple] | None = None,
          sae: Any = None) -> TrainResult:
    """Train per `cfg`. `model`/`tokenizer`/`pairs`/`sae` override loading them from the config (tests, notebooks)."""
    setup = _setup(cfg, model, tokenizer, pairs, sae)
    accelerator, model, tokenizer, pairs, sae = setup.accelerator, setup.model, setup.tokenizer, setup.pairs, setup.sae
    objective = cfg.objective()
    out_dir = Path(cfg.output)
    disable_dropout(model)

    # -- reference: the offline cache, a frozen copy, or (LoRA) the policy with adapters disabled ----------
    source = cfg.reference_source()
    reference: Reference | None = None
    cache_path, cache_reused = None, False
    stage_costs = []
    if source == "cache":
        cache_meter = CostMeter("fpo-reference-cache", model)
        reference = _reference_cache(cfg, setup, cache_meter)
        cache_path = str(reference.path)
        cache_reused = not cache_meter.result()["passes"]
        # the method's alignment stage includes its reference pass whether this run built the cache or found it
        # (a sweep's N values then compare alike): `load_or_build` records the build cost in the cache; caches
        # older than that record add nothing
        if "build_cost" in reference.meta:
            stage_costs.append(reference.meta["build_cost"])
    elif source == "model" and not cfg.use_peft:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        reference = ModelReference(ref_model, sae)

    n_layers = num_layers(model)
    lora = None
    if cfg.use_peft:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                                 target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM"))
        lora = LoraShape(cfg.lora_r, list(range(n_layers)), cfg.lora_target_modules)
        if source == "model":
            reference = ModelReference(model, sae, disable_adapters=True)
    model.train()
    setup_peak_mb = peak_memory_mb(accelerator.device)

    def micro_batch(index: list[int], ctx: StepContext) -> MicroBatchResult:
        batch = {k: v.to(ctx.device) for k, v in collate(pairs, index, tokenizer).items()}
        rows, seq_len = batch["input_ids"].shape
        sae_product = (int(batch["completion_mask"].sum()), sae.d_in, sae.d_sae) if sae is not None else None
        with ctx.meter.forward(batch=rows, seq_len=seq_len, layers=n_layers, lm_head=True,
                               grad="lora" if lora else "full", lora=lora, extra=[sae_product] if sae_product else ()):
            policy = run_model(ctx.model, batch, sae, keep_logits=objective.needs_logits, hook_model=ctx.unwrapped)
        ref = None
        if reference is not None:
            counted = (ctx.meter.forward(batch=rows, seq_len=seq_len, layers=n_layers, lm_head=True,
                                         extra=[sae_product] if sae_product else ())
                       if source == "model" else contextlib.nullcontext())  # the cache runs no pass
            with counted:
                ref = reference(batch, objective.needs_logits, objective.needs_sae)
        out = objective(policy, ref)
        return MicroBatchResult(out.loss, {"loss": out.losses, **out.metrics()},
                                {"entropy": (policy.entropy_sum, policy.n_tokens)})

    settings = LoopSettings(
        stage=cfg.loss, learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_ratio=cfg.warmup_ratio, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        per_device_batch_size=cfg.per_device_train_batch_size, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_train_epochs=cfg.num_train_epochs, max_steps=cfg.max_steps, seed=cfg.seed, logging_steps=cfg.logging_steps,
        save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit,
        resume_from_checkpoint=cfg.resume_from_checkpoint, progress=cfg.progress,
        progress_metrics={"loss": "loss", "acc": "rewards/accuracies"})
    state = {"config": dataclasses.asdict(cfg), "data_fingerprint": pairs_fingerprint(pairs), "n_pairs": len(pairs)}
    loop = run_loop(accelerator, model, len(pairs), micro_batch, settings, out_dir, state, _RESUMABLE_CHANGES)
    stage_costs.append(loop.cost)

    # -- final model -------------------------------------------------------------------------------------
    history = loop.history
    summary = {"loss": cfg.loss, "steps": loop.total_steps, "resumed_from_step": loop.start_step, "n_pairs": len(pairs),
               "global_batch": loop.global_batch, "world_size": accelerator.num_processes,
               "mixed_precision": setup.mixed_precision, "reference": source, "ref_cache": cache_path,
               "ref_cache_reused": cache_reused,
               "mean_step_time_s": loop.mean_step_time_s, "peak_memory_mb": loop.peak_memory_mb,
               "peak_memory_setup_mb": setup_peak_mb, "peak_memory_kind": peak_memory_kind(accelerator.device),
               "final": history[-1] if history else None,
               "cost": combine(cfg.loss, stage_costs) if len(stage_costs) > 1 else stage_costs[0],
               "cost_by_stage": stage_costs}
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = loop.model.merge_and_unload() if cfg.use_peft else loop.model
        final.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        write_json(out_dir / "training_config.json", dataclasses.asdict(cfg))
        write_json(out_dir / "train_summary.json", summary)
    accelerator.wait_for_everyone()
    return TrainResult(out_dir, loop.total_steps, history, summary)


# ---------------------------------------------------------------------------------------------------
# helpers


def load_triples(data: str | None, role: str | None, split_seed: int, n: int | None,
                 seed: int) -> list[Any]:
    """Preference triples from a file/HF dataset, or an HH-RLHF role of the shared data; optionally a seeded draw."""
    from saealign.data import select_triples

    if data is None:
        raise ValueError("no preference data: pass --data")
    return select_triples(data, role, n, seed=seed, split_seed=split_seed)


def _load_pairs(cfg: TrainConfig, tokenizer: Any) -> list[RenderedTriple]:
    from saealign.data import render_triples

    triples = load_triples(cfg.data, cfg.data_role, cfg.split_seed, cfg.n, cfg.seed)
    return render_triples(tokenizer, triples, cfg.system_prompt, cfg.max_length, cfg.max_prompt_length)
