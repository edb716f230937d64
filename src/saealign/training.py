"""The optimisation loop every gradient-trained method shares (FPO and its sibling losses, RAHF's two steps).

A method supplies one function: for the example indices of one micro-batch it runs its forward pass(es)
and returns the loss plus per-example metrics. The loop owns everything else, so that all methods get
the same guarantees: AdamW with a transformers scheduler, a seeded resumable data order (`DataOrder`)
with gradient accumulation, gradient clipping, `metrics.jsonl`, `save_steps` checkpoints with exact
resume (weights, optimizer, scheduler and the cost counted so far), progress, peak memory, time per
step, and the stage's cost (`saealign.cost.CostMeter`: every forward pass is wrapped by the method,
every backward by the loop).

A step is a deterministic function of the weights, the optimizer state and the data order, which is all
a checkpoint stores; callers disable dropout (`disable_dropout`) to keep it so.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from tqdm.auto import tqdm

from saealign._io import atomic_path, read_json, save_tensors, write_json
from saealign.config import option
from saealign.cost import CostMeter, peak_memory_mb
from saealign.models import DEFAULT_MODEL

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
METRICS_FILE = "metrics.jsonl"
TRAINER_STATE = "trainer_state.json"


@dataclass
class TrainingOptions:
    """What every trainer's config shares (FPO and its sibling losses, RAHF-SCIT): the model, the preference
    data and its draw, and how a run is kept (seed, checkpoints, resume, precision, device, progress)."""

    model: str = field(default=DEFAULT_MODEL, metadata=option("model alias, local directory or hub id"))
    data: str | None = field(default=None, metadata=option(
        "preference data: a file or HF dataset saealign.data reads, or the shared data root with --data-role"))
    data_role: str | None = field(default=None, metadata=option(
        "with --data DIR: an HH-RLHF role of SPLITS.md (fit | validation | test_helpful | test_harmless)"))
    split_seed: int = field(default=0, metadata=option("seed of the HH-RLHF fit/validation split"))
    n: int | None = field(default=None, metadata=option(
        "train on a seeded nested uniform draw of this many triples (saealign.data.restrict; default: all)", ge=1))
    output: str = field(default="runs/train", metadata=option("where the model, checkpoints and metrics.jsonl go"))
    weight_decay: float = field(default=0.0, metadata=option("AdamW weight decay", ge=0))
    max_grad_norm: float = field(default=1.0, metadata=option("gradient clipping norm (0: no clipping)", ge=0))
    seed: int = field(default=42, metadata=option(
        "seed of the --n draw, the data order and all torch randomness (accelerate's set_seed)"))
    logging_steps: int = field(default=1, metadata=option("log every K optimizer steps", ge=1))
    save_steps: int = field(default=0, metadata=option("checkpoint every K optimizer steps (0: none)", ge=0))
    save_total_limit: int = field(default=2, metadata=option(
        "keep the newest K checkpoints, deleting older ones once a newer one is complete (0: keep all; a full "
        "fine-tune's checkpoint is ~12 bytes per parameter)", ge=0))
    resume_from_checkpoint: str | None = field(default=None, metadata=option(
        "a checkpoint directory, or 'latest': continue the run in --output where it stopped"))
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = field(default="auto", metadata=option(
        "auto | no | bf16 | fp16; auto = bf16 on CUDA when supported"))
    device: str | None = field(default=None, metadata=option("cpu forces CPU; default: what accelerate picks"))
    progress: bool = field(default=True, metadata=option("show progress bars"))


# The TrainingOptions a resumed run may change: how a run is kept and shown, not its trajectory. Each trainer adds
# its own (`resume_mismatch`'s `resumable`).
RESUMABLE_OPTIONS = frozenset({"output", "resume_from_checkpoint", "save_steps", "save_total_limit", "logging_steps",
                               "progress", "device"})


@dataclass
class LoopSettings:
    """The optimisation settings of one training stage (method configs name them as TRL does)."""

    stage: str  # names the cost stage and the progress bar
    learning_rate: float
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0: no clipping
    per_device_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    num_train_epochs: int = 1
    max_steps: int = -1  # > 0 overrides num_train_epochs
    seed: int = 0  # of the data order
    logging_steps: int = 1
    save_steps: int = 0  # 0: no checkpoints
    save_total_limit: int = 2  # newest checkpoints kept (0: all)
    resume_from_checkpoint: str | None = None  # a checkpoint directory, or 'latest' in the output
    progress: bool = True
    progress_metrics: dict[str, str] = field(default_factory=lambda: {"loss": "loss"})  # bar label -> metric


@dataclass
class StepContext:
    """What a micro-batch function runs on: `model` to call (maybe a DDP wrapper), `unwrapped` to hook."""

    model: torch.nn.Module
    unwrapped: torch.nn.Module
    meter: CostMeter
    device: torch.device


@dataclass
class MicroBatchResult:
    loss: torch.Tensor  # the scalar minimised: the mean over this micro-batch's examples
    per_example: dict[str, torch.Tensor]  # (B,) values; logged as their mean over the step's examples
    ratios: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # (sum, count): logged as
    # the step's total sum over its total count (e.g. a per-token mean over all the step's tokens)


MicroBatchFn = Callable[[list[int], StepContext], MicroBatchResult]


@dataclass
class LoopResult:
    model: torch.nn.Module  # the trained model, unwrapped
    history: list[dict[str, Any]]  # the rows this run appended to metrics.jsonl
    start_step: int
    total_steps: int
    global_batch: int  # examples per optimizer step, all processes together
    mean_step_time_s: float | None
    peak_memory_mb: float | None
    cost: dict[str, Any]  # CostMeter.result(), the resumed-from part included


def run_loop(accelerator: Any, model: torch.nn.Module, n_examples: int, micro_batch: MicroBatchFn,
             settings: LoopSettings, out_dir: Path, state: dict[str, Any],
             resumable: set[str] = frozenset()) -> LoopResult:
    """Train the parameters of `model` that require gradients on `n_examples` examples.

    `state` (JSON) goes into every checkpoint: its "config" (a dict of the run's settings, of which the
    names in `resumable` may change on resume) and any other keys (fingerprints of the data...) must equal
    the checkpoint's for a resume to be accepted.
    """
    from transformers import get_scheduler

    from saealign.fpo.batching import DataOrder  # here: importing saealign.fpo imports its trainer, which imports this

    order = DataOrder(n_examples, settings.per_device_batch_size, accelerator.num_processes,
                      settings.gradient_accumulation_steps, settings.seed)
    total_steps = settings.max_steps if settings.max_steps > 0 else order.steps_per_epoch * settings.num_train_epochs
    if total_steps < 1:
        order.micro_batches(0, 0)  # raises the explanatory error
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    scheduler = get_scheduler(settings.lr_scheduler_type, optimizer,
                              num_warmup_steps=math.ceil(settings.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    state = {**state, "global_micro_batch": order.global_micro, "total_steps": total_steps}
    start_step, resumed_cost = 0, None
    if settings.resume_from_checkpoint:
        saved = _load_checkpoint(_resolve_checkpoint(settings.resume_from_checkpoint, out_dir), model, optimizer,
                                 scheduler, state, resumable)
        start_step, resumed_cost = int(saved["step"]), saved.get("cost")
    meter = CostMeter(settings.stage, model, resume=resumed_cost)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(wrapped)
    context = StepContext(wrapped, unwrapped, meter, accelerator.device)
    is_main = accelerator.is_main_process

    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _trim_metrics(out_dir / METRICS_FILE, start_step)
    history: list[dict[str, Any]] = []
    pending: list[dict[str, float]] = []
    step_times: list[float] = []
    bar = tqdm(total=total_steps, initial=start_step, desc=settings.stage, disable=not (settings.progress and is_main))
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        per_example: dict[str, list[torch.Tensor]] = {}
        ratio_sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        micro_batches = order.micro_batches(step, accelerator.process_index)
        for micro, index in enumerate(micro_batches):
            last = micro == len(micro_batches) - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(wrapped):
                with accelerator.autocast():
                    out = micro_batch(index, context)
                with meter.backward():
                    accelerator.backward(out.loss / len(micro_batches))
            for name, value in out.per_example.items():
                per_example.setdefault(name, []).append(value.detach().float())
            for name, (total, count) in out.ratios.items():
                total_sum, count_sum = ratio_sums.get(name, (0.0, 0.0))
                ratio_sums[name] = (total_sum + total.detach().float(), count_sum + count.detach().float())
        grad_norm = accelerator.clip_grad_norm_(trainable, settings.max_grad_norm) if settings.max_grad_norm > 0 else None
        learning_rate = scheduler.get_last_lr()[0]  # the rate this step uses
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        record = {name: accelerator.gather(torch.cat(values)).mean().item() for name, values in per_example.items()}
        for name, (total, count) in ratio_sums.items():
            record[name] = (accelerator.gather(total).sum() / accelerator.gather(count).sum().clamp(min=1)).item()
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
        if done % settings.logging_steps == 0 or done == total_steps:
            row = {"step": done, "epoch": done / max(order.steps_per_epoch, 1),
                   **{k: sum(r[k] for r in pending) / len(pending) for k in pending[0]}}
            pending.clear()
            history.append(row)
            if is_main:
                with open(out_dir / METRICS_FILE, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
            bar.set_postfix({label: f"{row[name]:.4g}" for label, name in settings.progress_metrics.items() if name in row})
        bar.update(1)
        if settings.save_steps and done % settings.save_steps == 0 and done < total_steps:
            if is_main:
                _save_checkpoint(out_dir / f"{CHECKPOINT_PREFIX}{done}", unwrapped, optimizer, scheduler,
                                 {**state, "step": done, "cost": meter.result()})
                _rotate_checkpoints(out_dir, settings.save_total_limit)
            accelerator.wait_for_everyone()
    bar.close()
    return LoopResult(unwrapped, history, start_step, total_steps, order.global_micro * settings.gradient_accumulation_steps,
                      sum(step_times) / len(step_times) if step_times else None,
                      max((r["memory/peak_mb"] for r in history), default=None), meter.result())


def make_accelerator(mixed_precision: str, device: str | None) -> tuple[Any, str]:
    """An `accelerate.Accelerator` and the mixed precision it runs ("auto": bf16 on CUDA when supported)."""
    from accelerate import Accelerator

    if mixed_precision == "auto":
        cuda = torch.cuda.is_available() and device != "cpu"
        mixed_precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    # Without CUDA, force accelerate's CPU path: under `accelerate launch --multi_gpu --num_processes N` it then
    # joins the N processes with gloo instead of running N independent single-process trainings.
    return Accelerator(mixed_precision=mixed_precision, cpu=device == "cpu" or not torch.cuda.is_available()), mixed_precision


def disable_dropout(model: torch.nn.Module) -> None:
    """As TRL's `disable_dropout=True`: a step then depends only on weights, optimizer state and data order."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def _complete_checkpoints(out_dir: Path) -> list[Path]:
    """The complete checkpoints in `out_dir` (`trainer_state.json` written last), oldest step first."""
    found = [p for p in out_dir.glob(f"{CHECKPOINT_PREFIX}*") if (p / TRAINER_STATE).exists()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step in `out_dir`, if any."""
    found = _complete_checkpoints(out_dir)
    return found[-1] if found else None


def _rotate_checkpoints(out_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (0: keep all), as transformers' save_total_limit;
    the newest is complete before any older one goes, so a stop at any moment leaves one to resume from."""
    if keep <= 0:
        return
    for old in _complete_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old)


def _resolve_checkpoint(spec: str, out_dir: Path) -> Path:
    if spec != "latest":
        path = Path(spec)
        if not (path / TRAINER_STATE).exists():
            raise FileNotFoundError(f"{path}: not a complete checkpoint (no {TRAINER_STATE})")
        return path
    found = latest_checkpoint(out_dir)
    if found is None:
        raise FileNotFoundError(f"resume_from_checkpoint='latest': no complete checkpoint in {out_dir}")
    return found


def _save_checkpoint(path: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any, state: dict[str, Any]) -> None:
    """Trainable weights, optimizer and scheduler state; `trainer_state.json` last marks it complete."""
    save_tensors(path / "trainable.safetensors", {n: p for n, p in model.named_parameters() if p.requires_grad})
    with atomic_path(path / "optimizer.pt") as tmp:
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp)
    write_json(path / TRAINER_STATE, state)


def resume_mismatch(saved: dict[str, Any], state: dict[str, Any], resumable: set[str]) -> list[str]:
    """How the run described by `state` differs from the `saved` one it would continue ([] when it continues
    it exactly): its "config" apart from the `resumable` settings, and every other key of `state`."""
    diffs = [f"{k}: checkpoint {saved['config'].get(k)!r}, now {v!r}" for k, v in state["config"].items()
             if k not in resumable and saved["config"].get(k) != v]
    return diffs + [f"{key}: checkpoint {saved.get(key)!r}, now {value!r}" for key, value in state.items()
                    if key != "config" and saved.get(key) != value]


def _load_checkpoint(path: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any, state: dict[str, Any],
                     resumable: set[str]) -> dict[str, Any]:
    """Restore a checkpoint into the run described by `state`, refusing one that would not continue it
    exactly; returns the checkpoint's saved state (its "step" and "cost")."""
    from safetensors.torch import load_file

    saved = read_json(path / TRAINER_STATE)
    diffs = resume_mismatch(saved, state, resumable)
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
    return saved


def _trim_metrics(path: Path, keep_through_step: int) -> None:
    """On resume, drop logged steps after the checkpoint (they are re-run)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= keep_through_step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(row + "\n" for row in rows))
