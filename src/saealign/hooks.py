"""Residual-stream reads and edits through plain PyTorch forward hooks — no model surgery.

Conventions (METHOD.md): "layer l" is the *output* of decoder block l, i.e.
`hidden_states[l + 1]` of `output_hidden_states=True`, SAELens `blocks.{l}.hook_resid_post`
and TransformerLens v3 `blocks.{l}.hook_out`. `blocks.{l}.hook_resid_pre` is the block's input.

A `HookSession` installs one pre-hook on the whole model that works out, for every forward call,
which positions are prompt and which are generated (left padding, KV cache and no-cache
re-computation included), then runs the per-layer functions with that `CallContext`.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Literal

import torch
from torch import nn
from transformers.cache_utils import Cache

Site = Literal["resid_post", "resid_pre"]
PositionSpec = Literal["prompt", "generation", "all"] | torch.Tensor

_HOOK_PATTERNS: list[tuple[re.Pattern, Site]] = [
    (re.compile(r"^blocks\.(\d+)\.hook_resid_post$"), "resid_post"),
    (re.compile(r"^blocks\.(\d+)\.hook_out$"), "resid_post"),  # TransformerLens v3 name
    (re.compile(r"^blocks\.(\d+)\.hook_resid_pre$"), "resid_pre"),
    (re.compile(r"^blocks\.(\d+)\.hook_in$"), "resid_pre"),
    # HF module paths (SAELens `hf_hook_name` metadata, sparsify hookpoints)
    (re.compile(r"^(?:model\.)?(?:language_model\.)?(?:model\.)?layers\.(\d+)$"), "resid_post"),
    (re.compile(r"^transformer\.h\.(\d+)$"), "resid_post"),
]


def parse_hook_name(name: str) -> tuple[int, Site]:
    """Map a SAELens / TransformerLens / HF hook name to `(layer, site)`."""
    for pattern, site in _HOOK_PATTERNS:
        match = pattern.match(name)
        if match:
            return int(match.group(1)), site
    raise ValueError(
        f"unsupported hook name {name!r}: expected blocks.L.hook_resid_post, blocks.L.hook_out, "
        "blocks.L.hook_resid_pre or an HF module path like model.layers.L"
    )


def hook_name(layer: int, site: Site = "resid_post") -> str:
    return f"blocks.{layer}.hook_{'resid_post' if site == 'resid_post' else 'resid_pre'}"


_LAYER_PATHS = ("model.layers", "model.language_model.layers", "language_model.model.layers", "transformer.h",
                "gpt_neox.layers", "model.decoder.layers")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a causal LM (also through PEFT wrappers)."""
    return _decoder_layers_at(model)[1]


def _decoder_layers_at(model: nn.Module) -> tuple[tuple[nn.Module, str], nn.ModuleList]:
    """((parent module, attribute name), the ModuleList of decoder blocks)."""
    for path in _LAYER_PATHS:
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            parent, _, attr = path.rpartition(".")
            return (model.get_submodule(parent), attr), obj
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and name.split(".")[-1] in ("layers", "h", "blocks"):
            parent, _, attr = name.rpartition(".")
            return (model.get_submodule(parent), attr), module
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}; supported: llama, mistral, "
                     "qwen2/3, gemma2/3, gpt2 and models with a `*.layers` ModuleList")


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def hidden_size(model: nn.Module) -> int:
    cfg = model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    return cfg.hidden_size if hasattr(cfg, "hidden_size") else cfg.n_embd


def _check_layer(model: nn.Module, layer: int) -> nn.Module:
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer {layer} out of range: the model has {len(layers)} decoder layers (0..{len(layers) - 1})")
    return layers[layer]


@dataclass
class CallContext:
    """What a layer function knows about the current forward call.

    `mask` (batch, seq) marks the positions this hook should act on; `attention_mask` (batch, seq)
    marks real (non-pad) tokens among the current positions; `past_len` is the KV-cache length;
    `prompt_len` the (padded) length of the prompt this generation started from.
    """

    input_ids: torch.Tensor | None
    attention_mask: torch.Tensor
    past_len: int
    prompt_len: int
    is_prefill: bool
    mask: torch.Tensor | None = None

    @property
    def seq_len(self) -> int:
        return self.attention_mask.shape[1]

    def generation_mask(self) -> torch.Tensor:
        """Positions at absolute index >= prompt_len (generated tokens)."""
        pos = torch.arange(self.past_len, self.past_len + self.seq_len, device=self.attention_mask.device)
        return (pos >= self.prompt_len).unsqueeze(0).expand_as(self.attention_mask) & self.attention_mask

    def prompt_mask(self) -> torch.Tensor:
        pos = torch.arange(self.past_len, self.past_len + self.seq_len, device=self.attention_mask.device)
        return (pos < self.prompt_len).unsqueeze(0).expand_as(self.attention_mask) & self.attention_mask

    def resolve(self, spec: PositionSpec) -> torch.Tensor:
        if isinstance(spec, torch.Tensor):
            if spec.shape != self.attention_mask.shape:
                raise ValueError(f"explicit position mask has shape {tuple(spec.shape)}, but this forward call "
                                 f"has (batch, seq) = {tuple(self.attention_mask.shape)}")
            return spec.to(device=self.attention_mask.device, dtype=torch.bool)
        if spec == "all":
            return self.attention_mask
        if spec == "prompt":
            return self.prompt_mask()
        if spec == "generation":
            return self.generation_mask()
        raise ValueError(f"positions must be 'prompt', 'generation', 'all' or a (batch, seq) bool tensor, got {spec!r}")


def _past_length(kwargs: dict, attention_mask: torch.Tensor | None, seq: int) -> int:
    """Tokens already in the KV cache for this forward call.

    Read from things every transformers 5.x release provides, never from a kwarg's name: the cache
    is found by its type (`transformers.cache_utils.Cache`) among the keyword arguments, since its
    name has moved (`past_key_values` until 5.23, `cache` from 5.24) and may move again. Without a
    cache object, a 2-D attention mask wider than the new tokens covers past + current positions
    (as `generate` passes it). Neither present: a fresh forward with no past.
    """
    for value in kwargs.values():
        if isinstance(value, Cache):
            return int(value.get_seq_length())
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[1] > seq:
        return int(attention_mask.shape[1] - seq)
    return 0


# A layer function gets the residual (batch, seq, d) and the call context; it returns a replacement
# tensor (edit) or None (read only). Edits are applied only where ctx.mask is True.
LayerFn = Callable[[torch.Tensor, CallContext], "torch.Tensor | None"]


class StopForward(Exception):
    """Raised from a hook to end a forward pass early once the needed layers have been read."""


class HookSession:
    """Hooks on one model; use as a context manager or call `.remove()`."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._ctx: CallContext | None = None
        self._prompt_ids: torch.Tensor | None = None
        self._prompt_len = 0
        self.layers: list[int] = []  # the decoder layers hooked, in order added
        self.prefill_calls = 0  # forward calls taken as a new prompt ...
        self.continued_calls = 0  # ... and as a continuation of one (decode steps)
        self._handles.append(model.register_forward_pre_hook(self._on_model_call, with_kwargs=True))

    # -- per-call bookkeeping ------------------------------------------------------------------
    def _on_model_call(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        ref = input_ids if input_ids is not None else embeds
        batch, seq = ref.shape[0], ref.shape[1]
        full_mask = kwargs.get("attention_mask")
        past_len = _past_length(kwargs, full_mask, seq)
        if full_mask is not None and full_mask.dim() == 2:
            attn = full_mask[:, -seq:].bool()
        else:
            attn = torch.ones(batch, seq, dtype=torch.bool, device=ref.device)
        if past_len == 0 and not self._continues_prompt(input_ids):
            self._prompt_len = seq  # a new prompt (prefill)
            self._prompt_ids = input_ids.detach() if input_ids is not None else None
            is_prefill = True
            self.prefill_calls += 1
        else:
            is_prefill = False
            self.continued_calls += 1
        self._ctx = CallContext(input_ids, attn, past_len, self._prompt_len, is_prefill)

    def _continues_prompt(self, input_ids: torch.Tensor | None) -> bool:
        """No-cache generation re-runs prompt + generated tokens; recognise it as a continuation."""
        prev = self._prompt_ids
        if input_ids is None or prev is None or input_ids.shape[0] != prev.shape[0] or input_ids.shape[1] <= prev.shape[1]:
            return False
        return bool(torch.equal(input_ids[:, : prev.shape[1]], prev))

    def reset(self) -> None:
        """Forget the current prompt (the next forward call is treated as a new prefill)."""
        self._prompt_ids, self._prompt_len = None, 0

    # -- hooks -----------------------------------------------------------------------------------
    def add(self, layer: int, fn: LayerFn, positions: PositionSpec = "all", site: Site = "resid_post") -> None:
        module = _check_layer(self.model, layer)
        self.layers.append(layer)
        if site == "resid_post":
            def post_hook(mod, args, output):
                hidden = output[0] if isinstance(output, tuple) else output
                new = self._run(fn, hidden, positions)
                if new is None:
                    return None
                return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

            self._handles.append(module.register_forward_hook(post_hook))
        else:
            def pre_hook(mod, args, kwargs):
                from_kwargs = "hidden_states" in kwargs
                hidden = kwargs["hidden_states"] if from_kwargs else args[0]
                new = self._run(fn, hidden, positions)
                if new is None:
                    return None
                if from_kwargs:
                    return args, {**kwargs, "hidden_states": new}
                return (new,) + tuple(args[1:]), kwargs

            self._handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))

    def _run(self, fn: LayerFn, hidden: torch.Tensor, positions: PositionSpec) -> torch.Tensor | None:
        if self._ctx is None:
            raise RuntimeError("layer hook ran outside a model forward call")
        ctx = CallContext(**{**self._ctx.__dict__, "mask": self._ctx.resolve(positions)})
        new = fn(hidden, ctx)
        if new is None:
            return None
        if new.shape != hidden.shape:
            raise ValueError(f"layer function returned shape {tuple(new.shape)}, expected {tuple(hidden.shape)}")
        # Only masked positions change; everything else stays bit-for-bit identical.
        return torch.where(ctx.mask.unsqueeze(-1), new.to(hidden.dtype), hidden)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> "HookSession":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def attach(model: nn.Module, hooks: dict[int, LayerFn], positions: PositionSpec = "all",
           site: Site = "resid_post") -> HookSession:
    """Attach several layer functions at once; returns a handle with `.remove()` (also a context manager)."""
    session = HookSession(model)
    for layer, fn in hooks.items():
        session.add(layer, fn, positions, site)
    return session


def edit_residual(model: nn.Module, layer: int, fn: LayerFn, positions: PositionSpec = "generation",
                  site: Site = "resid_post") -> HookSession:
    """`with edit_residual(model, l, fn): model.generate(...)` — edit one layer's residual stream."""
    return attach(model, {layer: fn}, positions, site)


def read_residuals(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   layers: list[int] | tuple[int, ...] = (), site: Site = "resid_post",
                   grad: bool = False) -> dict[int, torch.Tensor]:
    """Residual streams at `layers` for one batch, stopping the forward after the last one needed; without
    gradients unless `grad` (then in the autograd graph, for a loss on hidden states)."""
    if not layers:
        raise ValueError("read_residuals needs at least one layer")
    captured: dict[int, torch.Tensor] = {}
    last = max(layers)

    def reader(layer: int) -> LayerFn:
        def fn(hidden: torch.Tensor, ctx: CallContext) -> None:
            captured[layer] = hidden if grad else hidden.detach()
            if layer == last:
                raise StopForward
        return fn

    with attach(model, {layer: reader(layer) for layer in sorted(set(layers))}, "all", site), torch.set_grad_enabled(grad):
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except StopForward:
            pass
    return captured


@contextmanager
def resume_from_layer(model: nn.Module, start: int) -> Iterator[None]:
    """Inside the block, `model(inputs_embeds=h, ...)` runs only decoder blocks `start..L-1` (then the
    final norm and head) on `h`, the residual entering block `start` (its `resid_pre`).

    This lets many edits at layers >= start be scored from one cached base pass. The model's own forward
    still builds masks and positions. The block list is swapped for the tail and restored on exit.
    Hooks must be attached before entering, since layer indices shift inside. The result equals the
    full forward (a test checks llama, gemma2 and qwen3).
    """
    (parent, attr), layers = _decoder_layers_at(model)
    if not 1 <= start < len(layers):
        raise ValueError(f"start layer {start} out of range 1..{len(layers) - 1}")
    setattr(parent, attr, nn.ModuleList(list(layers)[start:]))
    try:
        yield
    finally:
        setattr(parent, attr, layers)
