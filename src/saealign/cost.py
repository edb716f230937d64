"""What an alignment stage cost: FLOPs counted on the real passes, an analytic FLOP model beside them,
wall time and peak memory.

Why both counts: the counter (torch's `FlopCounterMode`, matrix products and attention, forward and
backward apart) says what our runs did; the analytic model (parameter shapes, tokens, passes, LoRA rank)
says what the same recipe costs on a model we cannot run here (Gemma-2-9B, an 8B dense model), and it is
trusted for that only where it matches the counter on our own runs. Both count what the counter counts:
matrix products and attention (2 FLOPs per multiply-add, full T x T score matrices as the kernels
compute them), not element-wise work.

Every pass of a stage is wrapped in `CostMeter.forward(...)` (which also adds the pass's analytic
forward and backward FLOPs) and every `.backward()` in `CostMeter.backward()`. `result()` goes into a
checkpoint and `CostMeter(..., resume=result)` continues from it, so a resumed run reports its whole cost.
"""

from __future__ import annotations

import resource
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Sequence

import torch

Grad = Literal["none", "full", "lora"]


@dataclass(frozen=True)
class ArchShape:
    """The shapes a decoder-only transformer's FLOPs depend on (gated MLP: gate, up and down matrices)."""

    n_layers: int
    d_model: int
    d_ff: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    # Backward of attention over its forward: fused kernels (sdpa, flash) recompute the scores (2.5x);
    # eager attention keeps them and takes the two gradients of each of its two products (2x).
    attention_backward: float = 2.5

    @classmethod
    def from_model(cls, model: Any) -> "ArchShape":
        config = model.config
        config = getattr(config, "text_config", None) or config
        heads = config.num_attention_heads
        return cls(n_layers=config.num_hidden_layers, d_model=config.hidden_size, d_ff=config.intermediate_size,
                   n_heads=heads, n_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads, vocab=config.vocab_size,
                   attention_backward=2.0 if getattr(config, "_attn_implementation", None) == "eager" else 2.5)

    def layer_matrix_params(self) -> int:
        """Weights of one block's matrix products: q, k, v, o and the three MLP matrices."""
        q = self.d_model * self.n_heads * self.head_dim
        kv = 2 * self.d_model * self.n_kv_heads * self.head_dim
        return 2 * q + kv + 3 * self.d_model * self.d_ff

    def module_shape(self, module: str) -> tuple[int, int]:
        """(in, out) features of a projection a LoRA adapter may wrap."""
        shapes = {"q_proj": (self.d_model, self.n_heads * self.head_dim),
                  "k_proj": (self.d_model, self.n_kv_heads * self.head_dim),
                  "v_proj": (self.d_model, self.n_kv_heads * self.head_dim),
                  "o_proj": (self.n_heads * self.head_dim, self.d_model),
                  "gate_proj": (self.d_model, self.d_ff), "up_proj": (self.d_model, self.d_ff),
                  "down_proj": (self.d_ff, self.d_model)}
        if module not in shapes:
            raise ValueError(f"no FLOP model for a LoRA adapter on {module!r} (known: {', '.join(shapes)})")
        return shapes[module]


# Published configurations, for the analytic model at the paper's scale (config.json of each model).
GEMMA2_9B = ArchShape(n_layers=42, d_model=3584, d_ff=14336, n_heads=16, n_kv_heads=8, head_dim=256, vocab=256000)
QWEN3_8B = ArchShape(n_layers=36, d_model=4096, d_ff=12288, n_heads=32, n_kv_heads=8, head_dim=128, vocab=151936)


@dataclass(frozen=True)
class LoraShape:
    """Where LoRA adapters sit: their rank, the decoder layers and the projection names."""

    rank: int
    layers: Sequence[int]
    modules: Sequence[str]


def pass_flops(arch: ArchShape, batch: int, seq_len: int, layers: int | None = None, lm_head: bool = True,
               grad: Grad = "none", lora: LoraShape | None = None,
               extra: Sequence[tuple[int, int, int]] = ()) -> tuple[float, float]:
    """(forward, backward) FLOPs of one pass over a padded (batch, seq_len) block through the first `layers`
    decoder blocks (all by default), the LM head if `lm_head`, and `extra` matrix products (rows, in, out)
    such as SAE encoders.

    Backward, as autograd runs it: `full` computes input and weight gradients of every product (2x its
    forward); `lora` only input gradients through the frozen products above the lowest adapted layer (1x)
    plus the adapters' own (2x); attention's backward is `arch.attention_backward` times its forward. `extra`
    products are frozen (input gradients only, 1x) whenever the pass has a backward."""
    layers = arch.n_layers if layers is None else layers
    tokens = batch * seq_len
    linear = 2.0 * tokens * arch.layer_matrix_params()
    attention = 4.0 * batch * arch.n_heads * seq_len * seq_len * arch.head_dim
    head = 2.0 * tokens * arch.d_model * arch.vocab if lm_head else 0.0
    extra_flops = sum(2.0 * rows * d_in * d_out for rows, d_in, d_out in extra)
    adapters = 0.0
    if lora is not None:
        per_layer = sum(2.0 * tokens * lora.rank * sum(arch.module_shape(m)) for m in lora.modules)
        adapters = per_layer * sum(1 for layer in lora.layers if layer < layers)
    forward = layers * (linear + attention) + head + extra_flops + adapters
    if grad == "none":
        return forward, 0.0
    if grad == "full":
        return forward, 2.0 * (layers * linear + head) + arch.attention_backward * layers * attention + extra_flops
    if lora is None:
        raise ValueError("grad='lora' needs the LoRA shape")
    graded = layers - min(lora.layers)  # no gradient flows below the lowest adapted layer
    return forward, graded * (linear + arch.attention_backward * attention) + head + 2.0 * adapters + extra_flops


def _cpu_attention_formulas() -> dict[Any, Any]:
    """The CPU flash-attention kernels are not in torch's FLOP registry; count them as the GPU kernels are."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    formulas = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        def forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
            return sdpa_flop_count(query, key, value)

        def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
            return sdpa_backward_flop_count(grad_out, query, key, value)

        formulas[aten._scaled_dot_product_flash_attention_for_cpu] = forward
        formulas[aten._scaled_dot_product_flash_attention_for_cpu_backward] = backward
    return formulas


@contextmanager
def _counting() -> Iterator[Any]:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=_cpu_attention_formulas())
    with counter:
        yield counter


def peak_memory_mb(device: torch.device | str) -> float:
    """CUDA: peak allocated tensor memory; CPU: the process's peak resident set size (Linux reports KiB)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory_kind(device: torch.device | str) -> str:
    return "cuda max allocated" if torch.device(device).type == "cuda" else "process max RSS"


@dataclass
class _Totals:
    forward: float = 0.0
    backward: float = 0.0
    analytic_forward: float = 0.0
    analytic_backward: float = 0.0
    passes: int = 0
    tokens: int = 0  # padded tokens of all passes
    wall_seconds: float = 0.0
    peak_memory_mb: float = 0.0


class CostMeter:
    """Counts one alignment stage (a fit, a training run, a reference pass) from construction to `result()`."""

    def __init__(self, stage: str, model: Any, resume: dict[str, Any] | None = None):
        self.stage = stage
        self.arch = ArchShape.from_model(model)
        self.device = next(model.parameters()).device
        self._before = _totals_of(resume) if resume else _Totals()
        self._now = _Totals()
        self._t0 = time.perf_counter()

    @contextmanager
    def forward(self, batch: int, seq_len: int, layers: int | None = None, lm_head: bool = True, grad: Grad = "none",
                lora: LoraShape | None = None, extra: Sequence[tuple[int, int, int]] = ()) -> Iterator["_Pass"]:
        """Wrap one forward pass; the arguments describe it for the analytic model (see `pass_flops`). Products
        whose size is known only inside (an SAE encoding the masked tokens) are added with `.extra(...)` on
        what this yields."""
        forward, backward = pass_flops(self.arch, batch, seq_len, layers, lm_head, grad, lora, extra)
        this = _Pass(grad != "none")
        with _counting() as counter:
            yield this
        self._now.forward += counter.get_total_flops()
        self._now.analytic_forward += forward + this.forward
        self._now.analytic_backward += backward + this.backward
        self._now.passes += 1
        self._now.tokens += batch * seq_len

    @contextmanager
    def backward(self) -> Iterator[None]:
        """Wrap one `.backward()` call."""
        with _counting() as counter:
            yield
        self._now.backward += counter.get_total_flops()

    def _totals(self) -> _Totals:
        now, before = self._now, self._before
        merged = _Totals(**{k: getattr(before, k) + getattr(now, k) for k in _Totals.__dataclass_fields__})
        merged.wall_seconds = before.wall_seconds + time.perf_counter() - self._t0
        merged.peak_memory_mb = max(before.peak_memory_mb, peak_memory_mb(self.device))
        return merged

    def result(self) -> dict[str, Any]:
        """The stage's cost so far, as recorded in artifacts, checkpoints and benchmark tables."""
        return stage_cost(self.stage, self._totals(), self.device)


class _Pass:
    """Analytic FLOPs of products inside a pass that `CostMeter.forward`'s arguments could not describe."""

    def __init__(self, graded: bool):
        self.graded, self.forward, self.backward = graded, 0.0, 0.0

    def extra(self, rows: int, d_in: int, d_out: int) -> None:
        """A frozen (rows x d_in) @ (d_in x d_out) product, e.g. an SAE encoder over `rows` tokens."""
        flops = 2.0 * rows * d_in * d_out
        self.forward += flops
        self.backward += flops if self.graded else 0.0


def measured(meter: CostMeter | None, batch: int, seq_len: int, **describe: Any) -> Any:
    """`meter.forward(...)`, or an uncounted stand-in when there is no meter (code paths that may be metered)."""
    return meter.forward(batch, seq_len, **describe) if meter is not None else nullcontext(_Pass(False))


def _totals_of(cost: dict[str, Any]) -> _Totals:
    """The running totals behind a `result()` dict (to resume counting from a checkpoint)."""
    return _Totals(forward=cost["flops"]["forward"], backward=cost["flops"]["backward"],
                   analytic_forward=cost["analytic_flops"]["forward"],
                   analytic_backward=cost["analytic_flops"]["backward"], passes=cost["passes"], tokens=cost["tokens"],
                   wall_seconds=cost["wall_seconds"], peak_memory_mb=cost["peak_memory_mb"])


def stage_cost(stage: str, totals: _Totals, device: torch.device | str) -> dict[str, Any]:
    counted = totals.forward + totals.backward
    analytic = totals.analytic_forward + totals.analytic_backward
    return {"stage": stage, "flops": {"forward": totals.forward, "backward": totals.backward, "total": counted},
            "analytic_flops": {"forward": totals.analytic_forward, "backward": totals.analytic_backward,
                               "total": analytic},
            "analytic_over_counted": analytic / counted if counted else None,
            "passes": totals.passes, "tokens": totals.tokens, "wall_seconds": round(totals.wall_seconds, 3),
            "peak_memory_mb": round(totals.peak_memory_mb, 1), "peak_memory_kind": peak_memory_kind(device),
            "device": str(device)}


def combine(stage: str, costs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The cost of stages run one after another (e.g. a reference pass and training): FLOPs, passes, tokens
    and time add up, peak memory is the largest."""
    if not costs:
        raise ValueError("combine() needs at least one stage cost")
    parts = [_totals_of(c) for c in costs]
    totals = _Totals(**{k: sum(getattr(p, k) for p in parts) for k in _Totals.__dataclass_fields__})
    totals.peak_memory_mb = max(p.peak_memory_mb for p in parts)
    return {**stage_cost(stage, totals, costs[0]["device"]), "parts": [c["stage"] for c in costs]}
