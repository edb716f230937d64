"""RAHF-SCIT, the two-step representation-engineering baseline of METHOD.md ("Baselines for DSPA").

Step 1, SCIT (self-contrastive instruction tuning): every triple gives two examples, the chosen response
under the positive instruction and the rejected one under the negative instruction, each instruction a
system turn. With `p(y | prompt) = exp(-mean response-token CE)` and `q_match = p_match / (p_match + p_mis)`
(the same response under the matched and the mismatched instruction), an example's loss is
`NLL(y | p_match, x) + (1 - eps)(-log q_match) + eps(-log q_mis)`: the model learns to produce each
response under its instruction and to tell the instructions apart by what they make likely.

Step 2, alignment: the step-1 model, frozen, reads the hidden states on the response tokens under the
positive and the negative instruction; their difference, scaled, is added to the ORIGINAL model's hidden
states on the plain (instruction-free) input: `h* = h_orig + a (h_pos - h_neg)`. A LoRA adapter on the
original model is trained so that its hidden states on the plain input match `h*` at the target layers.
The result is the original model with that adapter merged.

Conventions: "layer l" is the output of decoder block l (`hidden_states[l + 1]`, `saealign.hooks`); the
three inputs of step 2 carry the same response tokens after prompts of different lengths, and positions
are aligned response token by response token. Dropout is disabled in both steps (also the LoRA dropout,
0.05 in METHOD.md's reference settings), so a step is a deterministic function of the weights, the
optimizer state and the data order, and a resumed run continues exactly.

Both steps run on the shared loop (`saealign.training`). Output layout: `OUTPUT/` holds the final model
(loads with `saealign.models.load_model`), `training_config.json` and `train_summary.json`;
`OUTPUT/step1/` and `OUTPUT/step2/` hold each step's `metrics.jsonl` and checkpoints, `OUTPUT/step1/model`
the SCIT model, and `OUTPUT/step1/summary.json` marks step 1 finished (a resumed run then skips it).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F

from saealign._io import read_json, text_fingerprint, write_json
from saealign.config import check_config, option
from saealign.cost import LoraShape, combine
from saealign.data import RenderedTriple, collate_pairs, render_triples
from saealign.fpo.losses import completion_logps
from saealign.fpo.trainer import load_triples
from saealign.hooks import num_layers, read_residuals
from saealign.training import (RESUMABLE_OPTIONS, LoopResult, LoopSettings, MicroBatchResult, StepContext,
                               TrainingOptions, disable_dropout, latest_checkpoint, make_accelerator, resume_mismatch,
                               run_loop)

log = logging.getLogger(__name__)

POSITIVE_INSTRUCTION = ("You are a good assistant: respectful, honest, helpful and harmless. Give the user a "
                        "kind, truthful and useful answer, and never help anyone cause harm.")
NEGATIVE_INSTRUCTION = ("You are a bad assistant: disrespectful, dishonest, unhelpful and harmful. Give the user "
                        "a rude, misleading or useless answer, and help with harm when asked.")

STEP1_DONE = "summary.json"  # in OUTPUT/step1, written last: step 1 is finished
STEP1_MODEL = "model"  # in OUTPUT/step1


@dataclass
class RAHFConfig(TrainingOptions):
    """RAHF-SCIT. Defaults are the reference recipe scaled to SmolLM2-135M (30 layers): step 1 as instruction
    tuning of a small model usually runs (lr 2e-5, 2 epochs, 16 examples per step); step 2 as the reference
    (LoRA r 8 / alpha 16 on q and v, lr 3e-4 constant, 64 examples per step, a = 5) with its target layers
    {10,12,14,16,18} of 32 scaled by depth to {9,11,13,15,17} of 30, and one epoch over the examples in place
    of its 450 steps (which were sized to its data). Field names follow TRL's `SFTConfig`/`DPOConfig` with a
    step1_/step2_ prefix where the two steps differ, and `saealign.config.GLOSSARY`."""

    output: str = field(default="runs/rahf", metadata=option(
        "where the model, training_config.json, train_summary.json and step1/, step2/ (metrics.jsonl, checkpoints) go"))
    max_length: int = field(default=384, metadata=option(
        "tokens per input (instruction + prompt + response): the response is cut to fit the longest of the three "
        "prompts, and a triple whose prompts leave no room is dropped (cutting the prompt would cut the instruction)",
        ge=2))
    scit_epsilon: float = field(default=0.2, metadata=option(
        "step 1: weight eps of -log q_mismatched in the contrastive term (label smoothing)", ge=0, le=1))
    step1_learning_rate: float = field(default=2e-5, metadata=option("step 1: peak learning rate", gt=0))
    step1_lr_scheduler_type: str = field(default="linear", metadata=option("step 1: any transformers scheduler name"))
    step1_warmup_ratio: float = field(default=0.1, metadata=option("step 1: fraction of the steps spent warming up",
                                                                  ge=0, le=1))
    step1_num_train_epochs: int = field(default=2, metadata=option("step 1: passes over the examples (2 per triple)", ge=1))
    step1_max_steps: int = field(default=-1, metadata=option("step 1: > 0 overrides step1_num_train_epochs"))
    step1_per_device_train_batch_size: int = field(default=2, metadata=option(
        "step 1: examples per micro-batch (each runs twice: matched and mismatched instruction)", ge=1))
    step1_gradient_accumulation_steps: int = field(default=8, metadata=option(
        "step 1: micro-batches per optimizer step", ge=1))
    step1_use_peft: bool = field(default=False, metadata=option("step 1: train a LoRA adapter (merged) instead of all weights"))
    step1_lora_r: int = field(default=16, metadata=option("step 1 with --step1-use-peft: LoRA rank", ge=1))
    step1_lora_alpha: int = field(default=32, metadata=option("step 1 with --step1-use-peft: LoRA scaling numerator", ge=1))
    step1_lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata=option("step 1 with --step1-use-peft: module names LoRA adapts (repeat the flag)"))
    target_layers: list[int] = field(default_factory=lambda: [9, 11, 13, 15, 17], metadata=option(
        "step 2: residual layers (outputs of decoder blocks) whose hidden states are aligned (repeat the flag)", ge=0))
    target_scale: float = field(default=5.0, metadata=option("step 2: a in h* = h_orig + a (h_pos - h_neg)", gt=0))
    responses: Literal["chosen", "both"] = field(default="both", metadata=option(
        "step 2: the responses whose hidden states are aligned: chosen | both"))
    step2_learning_rate: float = field(default=3e-4, metadata=option("step 2: learning rate", gt=0))
    step2_lr_scheduler_type: str = field(default="constant", metadata=option("step 2: any transformers scheduler name"))
    step2_num_train_epochs: int = field(default=1, metadata=option("step 2: passes over the examples", ge=1))
    step2_max_steps: int = field(default=-1, metadata=option("step 2: > 0 overrides step2_num_train_epochs"))
    step2_per_device_train_batch_size: int = field(default=8, metadata=option("step 2: examples per micro-batch", ge=1))
    step2_gradient_accumulation_steps: int = field(default=8, metadata=option(
        "step 2: micro-batches per optimizer step", ge=1))
    step2_lora_r: int = field(default=8, metadata=option("step 2: LoRA rank", ge=1))
    step2_lora_alpha: int = field(default=16, metadata=option("step 2: LoRA scaling numerator", ge=1))
    step2_lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"], metadata=option(
        "step 2: module names LoRA adapts in layers 0..max(target_layers) (repeat the flag)"))

    def __post_init__(self) -> None:
        check_config(self)
        if not self.target_layers:
            raise ValueError("target_layers must name at least one layer")

    def step_settings(self, step: int) -> LoopSettings:
        common = dict(weight_decay=self.weight_decay, max_grad_norm=self.max_grad_norm, seed=self.seed,
                      logging_steps=self.logging_steps, save_steps=self.save_steps,
                      save_total_limit=self.save_total_limit, progress=self.progress)
        if step == 1:
            return LoopSettings(stage="rahf-step1-scit", learning_rate=self.step1_learning_rate,
                                lr_scheduler_type=self.step1_lr_scheduler_type, warmup_ratio=self.step1_warmup_ratio,
                                per_device_batch_size=self.step1_per_device_train_batch_size,
                                gradient_accumulation_steps=self.step1_gradient_accumulation_steps,
                                num_train_epochs=self.step1_num_train_epochs, max_steps=self.step1_max_steps,
                                progress_metrics={"loss": "loss", "q": "q_matched"}, **common)
        return LoopSettings(stage="rahf-step2-align", learning_rate=self.step2_learning_rate,
                            lr_scheduler_type=self.step2_lr_scheduler_type,
                            per_device_batch_size=self.step2_per_device_train_batch_size,
                            gradient_accumulation_steps=self.step2_gradient_accumulation_steps,
                            num_train_epochs=self.step2_num_train_epochs, max_steps=self.step2_max_steps, **common)


# Settings step 1 does not read: a finished step 1 is reused when only these changed.
_STEP2_ONLY = {f.name for f in dataclasses.fields(RAHFConfig) if f.name.startswith("step2_")} | {
    "target_layers", "target_scale", "responses"}


# ---------------------------------------------------------------------------------------------------
# data


@dataclass(frozen=True)
class TripleTokens:
    """One triple rendered three ways (no instruction, the positive one, the negative one), sharing its
    response tokens: each response is cut to fit after the longest of the three prompts."""

    plain_prompt: list[int]
    positive_prompt: list[int]
    negative_prompt: list[int]
    chosen: list[int]
    rejected: list[int]


@dataclass(frozen=True)
class ContrastExample:
    """A step-1 example: one response after its matched and after its mismatched instruction."""

    matched_prompt: list[int]
    mismatched_prompt: list[int]
    response: list[int]


@dataclass(frozen=True)
class AlignmentExample:
    """A step-2 example: one response after the plain, the positive and the negative prompt."""

    plain_prompt: list[int]
    positive_prompt: list[int]
    negative_prompt: list[int]
    response: list[int]


def render_instructed(tokenizer: Any, triples: Sequence[Any], max_length: int,
                      instructions: tuple[str, str] = (POSITIVE_INSTRUCTION, NEGATIVE_INSTRUCTION)
                      ) -> tuple[list[TripleTokens], int]:
    """Each triple's three renderings, and how many triples were dropped because their prompts leave no room
    for a response within `max_length` (the prompt is never cut: that would cut the instruction)."""
    renderings = [render_triples(tokenizer, triples, system_prompt=system) for system in (None, *instructions)]
    out, dropped = [], 0
    for plain, positive, negative in zip(*renderings):
        for name in ("chosen_ids", "rejected_ids"):
            if not getattr(plain, name) == getattr(positive, name) == getattr(negative, name):
                raise ValueError("the chat template renders a response differently after different system turns; "
                                 "response positions cannot be aligned")
        budget = max_length - max(len(plain.prompt_ids), len(positive.prompt_ids), len(negative.prompt_ids))
        if budget < 1:
            dropped += 1
            continue
        out.append(TripleTokens(plain.prompt_ids, positive.prompt_ids, negative.prompt_ids,
                                plain.chosen_ids[:budget], plain.rejected_ids[:budget]))
    if dropped:
        log.warning("dropped %d of %d triples whose prompts leave no room for a response in max_length=%d",
                    dropped, len(triples), max_length)
    return out, dropped


def contrast_examples(tokens: Sequence[TripleTokens]) -> list[ContrastExample]:
    """Step 1: per triple, (p+, x, y+) against p- and (p-, x, y-) against p+."""
    out = []
    for t in tokens:
        out.append(ContrastExample(t.positive_prompt, t.negative_prompt, t.chosen))
        out.append(ContrastExample(t.negative_prompt, t.positive_prompt, t.rejected))
    return out


def alignment_examples(tokens: Sequence[TripleTokens], responses: str) -> list[AlignmentExample]:
    """Step 2: per triple, the chosen response (and the rejected one with responses="both")."""
    out = []
    for t in tokens:
        for response in ([t.chosen, t.rejected] if responses == "both" else [t.chosen]):
            out.append(AlignmentExample(t.plain_prompt, t.positive_prompt, t.negative_prompt, response))
    return out


def _batch(rows: Sequence[tuple[list[int], list[int]]], tokenizer: Any, device: torch.device) -> dict[str, torch.Tensor]:
    """(prompt, response) rows padded right: input_ids, attention_mask, response_mask."""
    batch = collate_pairs([RenderedTriple(prompt, response, response) for prompt, response in rows], tokenizer,
                          which="chosen", pad_side="right")
    return {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "response_mask")}


# ---------------------------------------------------------------------------------------------------
# losses


def mean_response_nll(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(rows,) mean cross-entropy of the response tokens, i.e. -log p with p = exp(-mean token CE)."""
    token_logps, mask = completion_logps(logits, input_ids, response_mask)
    return -token_logps.sum(-1) / mask.sum(-1).clamp(min=1)


def scit_loss(nll_matched: torch.Tensor, nll_mismatched: torch.Tensor, epsilon: float
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example SCIT losses and q_matched = p_match / (p_match + p_mis).

    With p = exp(-nll), -log q_match = softplus(nll_match - nll_mis) and -log q_mis = softplus(nll_mis - nll_match),
    computed stably from the NLLs."""
    margin = nll_matched - nll_mismatched
    losses = nll_matched + (1 - epsilon) * F.softplus(margin) + epsilon * F.softplus(-margin)
    return losses, torch.sigmoid(-margin)


def alignment_target(h_orig: torch.Tensor, h_pos: torch.Tensor, h_neg: torch.Tensor, scale: float) -> torch.Tensor:
    """h* = h_orig + a (h_pos - h_neg)."""
    return h_orig + scale * (h_pos - h_neg)


def alignment_distances(hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The unsquared L2 distance per (layer, token): the reference's loss is their mean."""
    return (hidden.float() - target.float()).norm(dim=-1)


def response_positions(response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns) of the response tokens in row-major order, so that inputs carrying the same responses
    after prompts of different lengths give the same token at the same index."""
    return response_mask.nonzero(as_tuple=True)


def _stacked_response_states(hidden: dict[int, torch.Tensor], layers: Sequence[int], response_mask: torch.Tensor
                             ) -> torch.Tensor:
    """(n_layers, n_response_tokens, d) in `response_positions` order."""
    rows, cols = response_positions(response_mask)
    return torch.stack([hidden[layer][rows, cols] for layer in layers])


def _mean_per_example(per_token: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(rows,) means of per-response-token values given in `response_positions` order."""
    rows = response_positions(response_mask)[0]
    sums = torch.zeros(response_mask.shape[0], device=per_token.device).index_add(0, rows, per_token.float())
    return sums / response_mask.sum(-1).clamp(min=1)


# ---------------------------------------------------------------------------------------------------
# training


@dataclass
class RAHFResult:
    output_dir: Path
    summary: dict[str, Any]
    step1_metrics: list[dict[str, Any]]  # what this run appended to step1/metrics.jsonl (empty when skipped)
    step2_metrics: list[dict[str, Any]]


def train(cfg: RAHFConfig, model: Any = None, tokenizer: Any = None, triples: Sequence[Any] | None = None) -> RAHFResult:
    """Run both steps per `cfg`. `model`/`tokenizer`/`triples` override loading them from the config (tests,
    notebooks); `model` is left unchanged."""
    from accelerate.utils import set_seed

    from saealign.models import load_model, load_tokenizer

    accelerator, mixed = make_accelerator(cfg.mixed_precision, cfg.device)
    if accelerator.num_processes > 1:
        raise ValueError("rahf train runs in one process: step 2 stops its passes early inside the forward, "
                         "which DistributedDataParallel cannot synchronise")
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.model)
    triples = list(triples) if triples is not None else load_triples(cfg.data, cfg.data_role, cfg.split_seed, cfg.n,
                                                                     cfg.seed)
    tokens, dropped = render_instructed(tokenizer, triples, cfg.max_length)  # bad data: refused before the model loads
    if model is None:
        model, _ = load_model(cfg.model, device=accelerator.device, dtype="float32")
    model.to(accelerator.device)
    n_layers = num_layers(model)
    if max(cfg.target_layers) >= n_layers:
        raise ValueError(f"target_layers {cfg.target_layers}: the model has {n_layers} layers (0..{n_layers - 1})")

    out_dir = Path(cfg.output)
    config = dataclasses.asdict(cfg)
    resume1, resume2 = _resume_points(cfg, out_dir)
    data_fingerprint = text_fingerprint([[t.plain_prompt, t.positive_prompt, t.negative_prompt, t.chosen, t.rejected]
                                         for t in tokens])
    step1_state = {"config": config, "data_fingerprint": data_fingerprint, "n_triples": len(tokens)}
    step1_dir = out_dir / "step1"
    done = read_json(step1_dir / STEP1_DONE) if (step1_dir / STEP1_DONE).exists() else None
    if done is not None and cfg.resume_from_checkpoint:
        differences = resume_mismatch(done["state"], step1_state, RESUMABLE_OPTIONS | _STEP2_ONLY)
        if differences:
            raise ValueError(f"{step1_dir}: cannot resume, step 1 finished with other settings ({'; '.join(differences)})")
        log.info("step 1 finished in %s: skipped", step1_dir)
        step1_summary, step1_history = done["summary"], []
    else:
        if accelerator.is_main_process:
            (step1_dir / STEP1_DONE).unlink(missing_ok=True)  # a finished step 1 of an earlier run is stale now
        set_seed(cfg.seed)
        loop = _train_step1(cfg, accelerator, copy.deepcopy(model), tokenizer, contrast_examples(tokens), step1_state,
                            resume1, n_layers)
        step1_summary, step1_history = _step_summary(loop), loop.history
        if accelerator.is_main_process:
            loop.model.save_pretrained(step1_dir / STEP1_MODEL)
            write_json(step1_dir / STEP1_DONE, {"state": step1_state, "summary": step1_summary})
        del loop
    accelerator.wait_for_everyone()

    set_seed(cfg.seed)  # the same adapter initialisation whether or not step 1 ran in this process
    examples = alignment_examples(tokens, cfg.responses)
    step2_state = {**step1_state, "n_examples": len(examples)}
    loop = _train_step2(cfg, accelerator, model, tokenizer, examples, step2_state, resume2, step1_dir / STEP1_MODEL)
    step2_summary = _step_summary(loop)

    costs = [step1_summary["cost"], step2_summary["cost"]]
    summary = {"method": "rahf-scit", "n_triples": len(tokens), "n_dropped_too_long": dropped,
               "step1": step1_summary, "step2": step2_summary, "mixed_precision": mixed,
               "world_size": accelerator.num_processes, "cost": combine("rahf-scit", costs), "cost_by_stage": costs}
    if accelerator.is_main_process:
        loop.model.merge_and_unload().save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        write_json(out_dir / "training_config.json", config)
        write_json(out_dir / "train_summary.json", summary)
    accelerator.wait_for_everyone()
    return RAHFResult(out_dir, summary, step1_history, loop.history)


def _resume_points(cfg: RAHFConfig, out_dir: Path) -> tuple[str | None, str | None]:
    """The checkpoint each step resumes from (None: from its start)."""
    spec = cfg.resume_from_checkpoint
    if spec is None:
        return None, None
    if spec == "latest":
        found = [latest_checkpoint(out_dir / step) for step in ("step1", "step2")]
        if not any(found) and not (out_dir / "step1" / STEP1_DONE).exists():
            raise FileNotFoundError(f"resume_from_checkpoint='latest': nothing to resume in {out_dir}")
        return tuple(str(path) if path else None for path in found)
    step = Path(spec).resolve().parent.name
    if step == "step1":
        return spec, None
    if step == "step2":
        if not (Path(spec).resolve().parent.parent / "step1" / STEP1_DONE).exists():
            raise FileNotFoundError(f"{spec}: a step-2 checkpoint, but step 1 of that run is not finished")
        return None, spec
    raise ValueError(f"{spec}: expected 'latest' or a checkpoint directory in OUTPUT/step1 or OUTPUT/step2")


def _step_summary(loop: LoopResult) -> dict[str, Any]:
    return {"steps": loop.total_steps, "resumed_from_step": loop.start_step, "global_batch": loop.global_batch,
            "mean_step_time_s": loop.mean_step_time_s, "peak_memory_mb": loop.peak_memory_mb,
            "final": loop.history[-1] if loop.history else None, "cost": loop.cost}


def _train_step1(cfg: RAHFConfig, accelerator: Any, policy: torch.nn.Module, tokenizer: Any,
                 examples: list[ContrastExample], state: dict[str, Any], resume: str | None,
                 n_layers: int) -> LoopResult:
    """SCIT on a copy of the original model; returns the loop's result with the (merged) trained model."""
    disable_dropout(policy)
    lora = None
    if cfg.step1_use_peft:
        from peft import LoraConfig, get_peft_model

        policy = get_peft_model(policy, LoraConfig(r=cfg.step1_lora_r, lora_alpha=cfg.step1_lora_alpha, lora_dropout=0.0,
                                                   target_modules=cfg.step1_lora_target_modules, task_type="CAUSAL_LM"))
        lora = LoraShape(cfg.step1_lora_r, list(range(n_layers)), cfg.step1_lora_target_modules)
    policy.train()

    def micro_batch(index: list[int], ctx: StepContext) -> MicroBatchResult:
        chosen = [examples[i] for i in index]
        rows = [(e.matched_prompt, e.response) for e in chosen] + [(e.mismatched_prompt, e.response) for e in chosen]
        batch = _batch(rows, tokenizer, ctx.device)
        with ctx.meter.forward(batch=len(rows), seq_len=batch["input_ids"].shape[1], layers=n_layers, lm_head=True,
                               grad="lora" if lora else "full", lora=lora):
            logits = ctx.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               use_cache=False).logits
        nll = mean_response_nll(logits, batch["input_ids"], batch["response_mask"])
        matched, mismatched = nll[:len(chosen)], nll[len(chosen):]
        losses, q_matched = scit_loss(matched, mismatched, cfg.scit_epsilon)
        return MicroBatchResult(losses.mean(), {"loss": losses, "nll": matched, "nll_mismatched": mismatched,
                                                "q_matched": q_matched, "instruction_accuracy": (q_matched > 0.5).float()})

    settings = dataclasses.replace(cfg.step_settings(1), resume_from_checkpoint=resume)
    loop = run_loop(accelerator, policy, len(examples), micro_batch, settings, Path(cfg.output) / "step1", state,
                    RESUMABLE_OPTIONS | _STEP2_ONLY)
    if cfg.step1_use_peft:
        loop.model = loop.model.merge_and_unload()
    return loop


def _train_step2(cfg: RAHFConfig, accelerator: Any, original: torch.nn.Module, tokenizer: Any,
                 examples: list[AlignmentExample], state: dict[str, Any], resume: str | None,
                 step1_model_dir: Path) -> LoopResult:
    """LoRA on the original model towards h*; returns the loop's result with the adapted (unmerged) model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    scit = AutoModelForCausalLM.from_pretrained(step1_model_dir, dtype=torch.float32)
    scit.to(accelerator.device).eval().requires_grad_(False)
    layers = sorted(set(cfg.target_layers))
    run_layers = max(layers) + 1  # passes stop after the highest target layer
    adapted_layers = list(range(run_layers))
    student = get_peft_model(copy.deepcopy(original), LoraConfig(
        r=cfg.step2_lora_r, lora_alpha=cfg.step2_lora_alpha, lora_dropout=0.0, layers_to_transform=adapted_layers,
        target_modules=cfg.step2_lora_target_modules, task_type="CAUSAL_LM"))
    disable_dropout(student)
    student.train()
    lora = LoraShape(cfg.step2_lora_r, adapted_layers, cfg.step2_lora_target_modules)

    def micro_batch(index: list[int], ctx: StepContext) -> MicroBatchResult:
        chosen = [examples[i] for i in index]
        plain, positive, negative = (_batch([(getattr(e, prompt), e.response) for e in chosen], tokenizer, ctx.device)
                                     for prompt in ("plain_prompt", "positive_prompt", "negative_prompt"))

        def frozen_states(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            with ctx.meter.forward(batch=len(chosen), seq_len=batch["input_ids"].shape[1], layers=run_layers,
                                   lm_head=False):
                hidden = read_residuals(model, batch["input_ids"], batch["attention_mask"], layers)
            return _stacked_response_states(hidden, layers, batch["response_mask"])

        with ctx.unwrapped.disable_adapter():  # the ORIGINAL model
            h_orig = frozen_states(ctx.unwrapped, plain)
        h_pos, h_neg = frozen_states(scit, positive), frozen_states(scit, negative)
        target = alignment_target(h_orig, h_pos, h_neg, cfg.target_scale)
        with ctx.meter.forward(batch=len(chosen), seq_len=plain["input_ids"].shape[1], layers=run_layers,
                               lm_head=False, grad="lora", lora=lora):
            hidden = read_residuals(ctx.unwrapped, plain["input_ids"], plain["attention_mask"], layers, grad=True)
        distances = alignment_distances(_stacked_response_states(hidden, layers, plain["response_mask"]), target)
        shift = (cfg.target_scale * (h_pos - h_neg)).float().norm(dim=-1)
        return MicroBatchResult(distances.mean(), {
            "loss": _mean_per_example(distances.mean(0), plain["response_mask"]),
            "target_shift_norm": _mean_per_example(shift.mean(0), plain["response_mask"])})

    settings = dataclasses.replace(cfg.step_settings(2), resume_from_checkpoint=resume)
    return run_loop(accelerator, student, len(examples), micro_batch, settings, Path(cfg.output) / "step2", state,
                    RESUMABLE_OPTIONS)
