"""A self-contained preference-training loop on `accelerate` for FPO, DPO, SimPO, TDPO-1 and TDPO-2.

Why not a TRL trainer subclass: FPO needs a forward hook for SAE activations and an offline
reference cache keyed by model/SAE/data fingerprints (TRL precomputes reference log-probs only);
TDPO needs the reference logits, which TRL's fused LM head never builds; SimPO lives in TRL's
experimental `CPOTrainer` with different (0.x) internals, so no single TRL subclass covers all five
losses; and exact resume (data order included) and 2-process CPU runs are easier to guarantee in a
loop we own. TRL's data format (standard or conversational prompt/chosen/rejected, through
`saealign.data`), batch layout (`DataCollatorForPreference`) and metric names are kept, and the
DPO/SimPO losses are checked against TRL's own trainers in the tests.

Choices: dropout is disabled (TRL's `disable_dropout=True`), so a step is a deterministic function
of the weights, the optimizer state and the data order — which is all a checkpoint stores.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from tqdm.auto import tqdm

from saealign._io import atomic_path, read_json, save_tensors, write_json
from saealign.config import check_config
from saealign.fpo import losses as L
from saealign.data import RenderedTriple
from saealign.fpo.batching import DataOrder, collate, pairs_fingerprint
from saealign.fpo.cache import ReferenceCache, load_or_build
from saealign.fpo.objective import ModelReference, Objective, Reference, run_model
from saealign.models import DEFAULT_MODEL

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
METRICS_FILE = "metrics.jsonl"


def _help(text: str, **bounds: float) -> dict[str, Any]:
    """Field metadata: the flag's help text and the bounds `check_config` enforces (ge=, gt=, le=, lt=)."""
    return {"help": text, **bounds}


Loss = Literal[L.LOSSES]


@dataclass
class TrainConfig:
    """Preference training; field names follow TRL's `DPOConfig` where they overlap, except the names of
    `saealign.config.GLOSSARY` (output, n, split_seed, progress), which every command shares."""

    loss: Loss = field(default="fpo", metadata=_help("preference loss"))
    model: str = field(default=DEFAULT_MODEL, metadata=_help("model alias, local directory or hub id"))
    data: str | None = field(default=None, metadata=_help(
        "preference data: a file or HF dataset saealign.data reads, or the shared data root with --data-role"))
    data_role: str | None = field(default=None, metadata=_help(
        "with --data DIR: an HH-RLHF role of SPLITS.md (fit | validation | test_helpful | test_harmless)"))
    split_seed: int = field(default=0, metadata=_help("seed of the HH-RLHF fit/validation split"))
    sae: str | None = field(default=None, metadata=_help("SAE for FPO (path or spec); default: the shipped late-layer SAE"))
    output: str = field(default="runs/fpo", metadata=_help("where the model, checkpoints and metrics.jsonl go"))
    n: int | None = field(default=None, metadata=_help("train on a seeded nested uniform draw of this many pairs (saealign.data.restrict; default: all)", ge=1))
    beta: float | None = field(default=None, metadata=_help("default per loss: 0.1 (fpo, dpo, tdpo), 2.0 (simpo)", gt=0))
    simpo_gamma: float = field(default=0.5, metadata=_help("SimPO target margin"))
    fpo_alpha: float = field(default=0.5, metadata=_help("FPO weight of the feature-MSE term", ge=0))
    fpo_topk: int = field(default=50, metadata=_help("FPO k of the top-k latent set", ge=1))
    fpo_topk_union: bool = field(default=True, metadata=_help("FPO: unite policy and reference top-k (else policy only)"))
    tdpo_alpha: float = field(default=0.5, metadata=_help("TDPO-2 weight of the sequential-KL term", ge=0))
    reference: Literal["auto", "cache", "model"] = field(default="auto", metadata=_help(
        "auto | cache | model: where reference values come from; auto = cache for fpo, a live model for dpo/tdpo"))
    ref_cache: str | None = field(default=None, metadata=_help("reference cache directory (default: keyed in the saealign cache)"))
    learning_rate: float = field(default=1e-6, metadata=_help("peak learning rate", gt=0))
    lr_scheduler_type: str = field(default="linear", metadata=_help("any transformers scheduler name"))
    warmup_ratio: float = field(default=0.1, metadata=_help("fraction of the steps spent warming up", ge=0, le=1))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay", ge=0))
    max_grad_norm: float = field(default=1.0, metadata=_help("gradient clipping norm (0: no clipping)", ge=0))
    per_device_train_batch_size: int = field(default=2, metadata=_help("pairs per device and micro-batch", ge=1))
    gradient_accumulation_steps: int = field(default=4, metadata=_help("micro-batches per optimizer step", ge=1))
    num_train_epochs: int = field(default=1, metadata=_help("passes over the pairs", ge=1))
    max_steps: int = field(default=-1, metadata=_help("> 0 overrides num_train_epochs"))
    max_length: int = field(default=512, metadata=_help("cap on prompt + response tokens", ge=1))
    max_prompt_length: int = field(default=256, metadata=_help("prompt tokens kept (from the end) when a pair is too long", ge=1))
    system_prompt: str | None = field(default=None, metadata=_help("system turn put before every prompt when pairs are rendered (default: none)"))
    seed: int = field(default=42, metadata=_help("seed of the --n draw, the data order and all torch randomness (accelerate's set_seed)"))
    logging_steps: int = field(default=1, metadata=_help("log every K optimizer steps", ge=1))
    save_steps: int = field(default=0, metadata=_help("checkpoint every K optimizer steps (0: none)", ge=0))
    resume_from_checkpoint: str | None = field(default=None, metadata=_help("a checkpoint directory, or 'latest' in --output"))
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = field(default="auto", metadata=_help("auto | no | bf16 | fp16; auto = bf16 on CUDA when supported"))
    use_peft: bool = field(default=False, metadata=_help("train a LoRA adapter (merged into the saved model)"))
    lora_r: int = field(default=16, metadata=_help("LoRA rank", ge=1))
    lora_alpha: int = field(default=32, metadata=_help("LoRA scaling numerator", ge=1))
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                                           metadata=_help("module names LoRA adapts (repeat the flag)"))
    ref_batch_size: int = field(default=4, metadata=_help("batch size of the reference-cache pass", ge=1))
    device: str | None = field(default=None, metadata=_help("cpu forces CPU; default: what accelerate picks"))
    progress: bool = field(default=True, metadata=_help("show progress bars"))

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
_RESUMABLE_CHANGES = {"output", "resume_from_checkpoint", "save_steps", "logging_steps", "progress", "device",
                      "ref_cache", "ref_batch_size", "per_device_train_batch_size"}


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
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    mixed = cfg.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() and cfg.device != "cpu" else "no"
    # Without CUDA, force accelerate's CPU path: under `accelerate launch --multi_gpu --num_processes N` it then
    # joins the N processes with gloo instead of running N independent single-process trainings.
    accelerator = Accelerator(mixed_precision=mixed, cpu=cfg.device == "cpu" or not torch.cuda.is_available())
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


def _reference_cache(cfg: TrainConfig, setup: _Setup) -> ReferenceCache:
    """Load or build the cache with the initial policy (= the reference); rank 0 builds, the others load."""
    acc = setup.accelerator
    with acc.main_process_first():
        return load_or_build(setup.model, setup.tokenizer, setup.pairs, setup.sae, cfg.ref_cache,
                             dtype=f"{setup.model.dtype}-{setup.mixed_precision}".replace("torch.", ""),
                             batch_size=cfg.ref_batch_size, device=acc.device, autocast=acc.autocast,
                             show_progress=cfg.progress and acc.is_main_process)


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
    is_main = accelerator.is_main_process
    _disable_dropout(model)

    # -- reference: the offline cache, a frozen copy, or (LoRA) the policy with adapters disabled ----------
    source = cfg.reference_source()
    reference: Reference | None = None
    cache_path = None
    if source == "cache":
        reference = _reference_cache(cfg, setup)
        cache_path = str(reference.path)
    elif source == "model" and not cfg.use_peft:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        reference = ModelReference(ref_model, sae)

    if cfg.use_peft:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                                 target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM"))
        if source == "model":
            reference = ModelReference(model, sae, disable_adapters=True)
    model.train()
    setup_peak_mb = peak_memory_mb(accelerator.device)

    # -- optimisation ----------------------------------------------------------------------------------
    from transformers import get_scheduler

    order = DataOrder(len(pairs), cfg.per_device_train_batch_size, accelerator.num_processes,
                      cfg.gradient_accumulation_steps, cfg.seed)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else order.steps_per_epoch * cfg.num_train_epochs
    if total_steps < 1:
        order.micro_batches(0, 0)  # raises the explanatory error
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=math.ceil(cfg.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    state = {"config": dataclasses.asdict(cfg), "data_fingerprint": pairs_fingerprint(pairs), "n_pairs": len(pairs),
             "global_micro_batch": order.global_micro, "total_steps": total_steps}
    start_step = 0
    if cfg.resume_from_checkpoint:
        start_step = _load_checkpoint(_resolve_checkpoint(cfg.resume_from_checkpoint, out_dir), model, optimizer,
                                      scheduler, state)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(wrapped)

    # -- loop ------------------------------------------------------------------------------------------
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _trim_metrics(out_dir / METRICS_FILE, start_step)
    history: list[dict[str, Any]] = []
    pending: list[dict[str, float]] = []
    step_times: list[float] = []
    bar = tqdm(total=total_steps, initial=start_step, desc=f"{cfg.loss} training", disable=not (cfg.progress and is_main))
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        per_pair: dict[str, list[torch.Tensor]] = {}
        entropy_sum = torch.zeros((), device=accelerator.device)
        n_tokens = torch.zeros((), device=accelerator.device)
        micro_batches = order.micro_batches(step, accelerator.process_index)
        for micro, index in enumerate(micro_batches):
            batch = {k: v.to(accelerator.device) for k, v in collate(pairs, index, tokenizer).items()}
            last = micro == len(micro_batches) - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(wrapped):
                with accelerator.autocast():
                    policy = run_model(wrapped, batch, sae, keep_logits=objective.needs_logits, hook_model=unwrapped)
                    ref = reference(batch, objective.needs_logits, objective.needs_sae) if reference is not None else None
                    out = objective(policy, ref)
                accelerator.backward(out.loss / len(micro_batches))
            for name, value in {"loss": out.losses.detach(), **out.metrics()}.items():
                per_pair.setdefault(name, []).append(value.float())
            entropy_sum += policy.entropy_sum.float()
            n_tokens += policy.n_tokens.float()
        grad_norm = accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
        learning_rate = scheduler.get_last_lr()[0]  # the rate this step uses
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        record = {name: accelerator.gather(torch.cat(values)).mean().item() for name, values in per_pair.items()}
        record["entropy"] = (accelerator.gather(entropy_sum).sum() / accelerator.gather(n_tokens).sum().clamp(min=1)).item()
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        record["learning_rate"] = learning_rate
        step_time = time.perf_counter() - t0
        step_times.append(step_time)
        record["time/step_s"] = step_time
        record["memory/peak_mb"] = accelerator.gather(torch.tensor([peak_memory_mb(accelerator.device)],
                                                                   device=accelerator.device)).max().item()
        pending.append(record)
        done = step + 1
        if done % cfg.logging_steps == 0 or done == total_steps:
            row = {"step": done, "epoch": done / max(order.steps_per_epoch, 1),
                   **{k: sum(r[k] for r in pending) / len(pending) for k in pending[0]}}
            pending.clear()
            history.append(row)
            if is_main:
                with open(out_dir / METRICS_FILE, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracies']:.2f}")
        bar.update(1)
        if cfg.save_steps and done % cfg.save_steps == 0 and done < total_steps:
            if is_main:
                _save_checkpoint(out_dir / f"{CHECKPOINT_PREFIX}{done}", unwrapped, optimizer, scheduler, {**state, "step": done})
            accelerator.wait_for_everyone()
    bar.close()

    # -- final model -------------------------------------------------------------------------------------
    summary = {"loss": cfg.loss, "steps": total_steps, "resumed_from_step": start_step, "n_pairs": len(pairs),
               "global_batch": order.global_micro * cfg.gradient_accumulation_steps, "world_size": accelerator.num_processes,
               "mixed_precision": setup.mixed_precision, "reference": source, "ref_cache": cache_path,
               "mean_step_time_s": sum(step_times) / len(step_times) if step_times else None,
               "peak_memory_mb": max((r["memory/peak_mb"] for r in history), default=None),
               "peak_memory_setup_mb": setup_peak_mb,
               "peak_memory_kind": "cuda max allocated" if accelerator.device.type == "cuda" else "process max RSS",
               "final": history[-1] if history else None}
    accelerator.wait_for_everyone()
    if is_main:
        final = unwrapped.merge_and_unload() if cfg.use_peft else unwrapped
        final.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        write_json(out_dir / "training_config.json", dataclasses.asdict(cfg))
        write_json(out_dir / "train_summary.json", summary)
    accelerator.wait_for_everyone()
    return TrainResult(out_dir, total_steps, history, summary)


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


def _disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated tensor memory; CPU: the process's peak resident set size (Linux reports KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _resolve_checkpoint(spec: str, out_dir: Path) -> Path:
    if spec != "latest":
        path = Path(spec)
        if not (path / "trainer_state.json").exists():
            raise FileNotFoundError(f"{path}: not a complete checkpoint (no trainer_state.json)")
        return path
    found = [p for p in out_dir.glob(f"{CHECKPOINT_PREFIX}*") if (p / "trainer_state.json").exists()]
    if not found:
        raise FileNotFoundError(f"resume_from_checkpoint='latest': no complete checkpoint in {out_dir}")
    return max(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))


def _save_checkpoint(path: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any, state: dict[str, Any]) -> None:
    """Trainable weights, optimizer and scheduler state; `trainer_state.json` last marks it complete."""
    save_tensors(path / "trainable.safetensors", {n: p for n, p in model.named_parameters() if p.requires_grad})
    with atomic_path(path / "optimizer.pt") as tmp:
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp)
    write_json(path / "trainer_state.json", state)


def _load_checkpoint(path: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any, state: dict[str, Any]) -> int:
    from safetensors.torch import load_file

    saved = read_json(path / "trainer_state.json")
    diffs = [f"{k}: checkpoint {saved['config'].get(k)!r}, now {v!r}" for k, v in state["config"].items()
             if k not in _RESUMABLE_CHANGES and saved["config"].get(k) != v]
    for key in ("data_fingerprint", "global_micro_batch", "total_steps"):
        if saved[key] != state[key]:
            diffs.append(f"{key}: checkpoint {saved[key]!r}, now {state[key]!r}")
    if diffs:
        raise ValueError(f"{path}: cannot resume exactly, the run differs from the checkpoint ({'; '.join(diffs)})")
    weights = load_file(str(path / "trainable.safetensors"))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != set(params):
        raise ValueError(f"{path}: trainable parameters differ from the model's "
                         f"(missing {sorted(set(params) - set(weights))[:3]}, extra {sorted(set(weights) - set(params))[:3]})")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(weights[name])
    opt = torch.load(path / "optimizer.pt", map_location=next(model.parameters()).device, weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    log.info("resumed from %s at step %d", path, saved["step"])
    return int(saved["step"])


def _trim_metrics(path: Path, keep_through_step: int) -> None:
    """On resume, drop logged steps after the checkpoint (they are re-run)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= keep_through_step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(row + "\n" for row in rows))
