"""One SAE module (ReLU, JumpReLU, TopK) with loaders for the formats users already have.

Formats: SAELens (`cfg.json` + `sae_weights.safetensors`, v5 and v6 configs), Gemma Scope
(`params.npz`), EleutherAI sparsify (`cfg.json` + `sae.safetensors`), and SAELens
`(release, sae_id)` when `sae-lens` is installed. We always save in SAELens format.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from saealign._io import check_values, load_tensors, read_json, save_tensors, tensor_fingerprint, write_json
from saealign.hooks import parse_hook_name

Architecture = Literal["standard", "jumprelu", "topk"]

log = logging.getLogger(__name__)

SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_CFG = "cfg.json"


@dataclass
class SAEConfig:
    """An SAE's shape and where it reads, saved as SAELens' `cfg.json`."""

    d_in: int = field(metadata={"help": "Width of the residual stream it reads (the model's hidden size)."})
    d_sae: int = field(metadata={"help": "Number of latents."})
    architecture: Architecture = field(default="topk", metadata={
        "help": "Activation: topk (the k largest pre-activations), jumprelu (a learned threshold per latent) "
                "or standard (ReLU)."})
    hook_name: str = field(default="blocks.0.hook_resid_post", metadata={
        "help": "SAELens hook it reads: blocks.L.hook_resid_post is the output of decoder block L."})
    k: int | None = field(default=None, metadata={"help": "TopK only: latents active per token."})
    apply_b_dec_to_input: bool = field(default=True, metadata={
        "help": "Subtract the decoder bias from the input before encoding (SAELens' convention)."})
    dtype: str = field(default="float32", metadata={
        "help": "Dtype the weights are stored in; computation runs in the dtype of the input."})
    model_name: str | None = field(default=None, metadata={"help": "Model id the SAE was trained on."})
    metadata: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "Training config, metrics and provenance; `model_fingerprint` (models.model_fingerprint) when known."})

    def __post_init__(self) -> None:
        if self.architecture not in ("standard", "jumprelu", "topk"):
            raise ValueError(f"unsupported SAE architecture {self.architecture!r}; expected standard, jumprelu or topk")
        if self.architecture == "topk" and not self.k:
            raise ValueError("a TopK SAE needs k")
        parse_hook_name(self.hook_name)  # fail early on a hook we cannot attach to

    def to_saelens(self) -> dict[str, Any]:
        """SAELens v6 `cfg.json` layout (metadata holds the hook and model)."""
        cfg = {"d_in": self.d_in, "d_sae": self.d_sae, "dtype": self.dtype, "device": "cpu",
               "apply_b_dec_to_input": self.apply_b_dec_to_input, "normalize_activations": "none",
               "reshape_activations": "none", "architecture": self.architecture,
               "metadata": {**self.metadata, "hook_name": self.hook_name, "model_name": self.model_name}}
        if self.architecture == "topk":
            cfg["k"] = self.k
            cfg["rescale_acts_by_decoder_norm"] = False
        return cfg


class SAE(nn.Module):
    """`f = enc(h) >= 0`, `dec(f) = f @ W_dec + b_dec` (METHOD.md conventions)."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_in))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        if cfg.architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(cfg.d_sae))

    # -- identity ---------------------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def hook_name(self) -> str:
        return self.cfg.hook_name

    @property
    def layer(self) -> int:
        return parse_hook_name(self.cfg.hook_name)[0]

    def fingerprint(self) -> str:
        cfg = self.cfg.to_saelens()
        cfg["metadata"] = {k: cfg["metadata"].get(k) for k in ("hook_name", "model_name")}
        return tensor_fingerprint(dict(self.state_dict()), cfg)

    def describe(self) -> dict[str, Any]:
        """What an artifact built on this SAE records about it."""
        return {"fingerprint": self.fingerprint(), "hook_name": self.hook_name, "d_sae": self.d_sae,
                "architecture": self.cfg.architecture, "source": self.cfg.metadata.get("source")}

    def check_model(self, model) -> None:
        """Refuse, before any work, a model this SAE cannot read: another hidden size, or weights other
        than the ones it records (`metadata.model_fingerprint`; SAEs without one are checked by size only)."""
        from saealign.models import model_fingerprint, model_id

        source, d_model = self.cfg.metadata.get("source", self.hook_name), model.config.hidden_size
        if d_model != self.d_in:
            raise ValueError(f"SAE {source} reads d_in={self.d_in}, but model {model_id(model)!r} has hidden size {d_model}")
        recorded = self.cfg.metadata.get("model_fingerprint")
        if recorded is None:
            if self.cfg.model_name not in (None, model_id(model)):
                log.warning("SAE %s was trained on %r and records no weights fingerprint; cannot check it fits %r",
                            source, self.cfg.model_name, model_id(model))
        elif recorded != model_fingerprint(model):
            trained_on = repr(self.cfg.model_name) if self.cfg.model_name else "a model"
            raise ValueError(f"SAE {source} was trained on {trained_on} (weights {recorded}), "
                             f"got model {model_id(model)!r} (weights {model_fingerprint(model)})")

    # -- maths --------------------------------------------------------------------------------------
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.W_enc.dtype)
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_acts(x)
        arch = self.cfg.architecture
        if arch == "standard":
            return torch.relu(pre)
        if arch == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold)
        values, indices = pre.topk(self.cfg.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, indices, torch.relu(values))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    # -- persistence --------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write SAELens format (`cfg.json` + `sae_weights.safetensors`), atomically; the config records
        the tensors' shapes and checksums (`metadata.tensors`), which loading verifies."""
        path = Path(path)
        dtype = getattr(torch, self.cfg.dtype)
        cfg = self.cfg.to_saelens()
        cfg["metadata"]["tensors"] = save_tensors(path / SAELENS_WEIGHTS, {k: v.to(dtype) for k, v in self.state_dict().items()})
        write_json(path / SAELENS_CFG, cfg)
        return path


# ---------------------------------------------------------------------------------------------------
# Loading


def _from_state(cfg: SAEConfig, state: dict[str, torch.Tensor], source: str, device=None) -> SAE:
    expected = {"W_enc": (cfg.d_in, cfg.d_sae), "W_dec": (cfg.d_sae, cfg.d_in), "b_enc": (cfg.d_sae,), "b_dec": (cfg.d_in,)}
    if cfg.architecture == "jumprelu":
        expected["threshold"] = (cfg.d_sae,)
    for name, shape in expected.items():
        if name not in state:
            raise ValueError(f"{source}: missing tensor {name!r} (have {sorted(state)})")
        if tuple(state[name].shape) != shape:
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(state[name].shape)}, expected {shape}")
    cfg.metadata.setdefault("source", source)
    sae = SAE(cfg)
    sae.load_state_dict({k: state[k].float() for k in expected})
    return sae.to(device or "cpu").eval().requires_grad_(False)


def _saelens_config(raw: dict[str, Any], source: str) -> SAEConfig:
    meta = dict(raw.get("metadata") or {})
    hook = meta.get("hook_name") or raw.get("hook_name") or raw.get("hook_point")
    if hook is None:
        raise ValueError(f"{source}: cfg.json has no hook_name (looked in metadata.hook_name, hook_name, hook_point)")
    arch = raw.get("architecture")
    k = raw.get("k") or (raw.get("activation_fn_kwargs") or {}).get("k")
    if arch is None:  # v5 configs: infer from the activation function
        arch = "topk" if k else ("jumprelu" if raw.get("activation_fn_str") == "jumprelu" else "standard")
    if arch not in ("standard", "jumprelu", "topk"):
        raise ValueError(f"{source}: SAE architecture {arch!r} is not supported (standard, jumprelu, topk)")
    norm = raw.get("normalize_activations", "none")
    if norm not in (None, "none"):
        raise ValueError(f"{source}: normalize_activations={norm!r} is not supported; fold the scaling into the weights first")
    for key in ("hook_name", "model_name", "tensors"):  # the manifest describes the file, not the SAE
        meta.pop(key, None)
    return SAEConfig(d_in=raw["d_in"], d_sae=raw["d_sae"], architecture=arch, hook_name=hook, k=k,
                     apply_b_dec_to_input=raw.get("apply_b_dec_to_input", True), dtype=raw.get("dtype", "float32"),
                     model_name=(raw.get("metadata") or {}).get("model_name") or raw.get("model_name"), metadata=meta)


def _load_saelens_dir(path: Path, device=None) -> SAE:
    raw = read_json(path / SAELENS_CFG)
    cfg = _saelens_config(raw, str(path / SAELENS_CFG))
    state = load_tensors(path / SAELENS_WEIGHTS, (raw.get("metadata") or {}).get("tensors"))  # checksums when saved by saealign
    return _from_state(cfg, state, str(path), device)


def _load_sparsify_dir(path: Path, device=None, layer: int | None = None) -> SAE:
    raw = read_json(path / "cfg.json")
    if raw.get("skip_connection") or raw.get("transcode"):
        raise ValueError(f"{path}: sparsify transcoders / skip connections are not residual SAEs; not supported")
    if raw.get("activation", "topk") != "topk":
        raise ValueError(f"{path}: sparsify activation {raw.get('activation')!r} is not supported (topk only)")
    state = load_tensors(path / "sae.safetensors")
    d_sae, d_in = state["encoder.weight"].shape
    if layer is None:
        match = re.search(r"(\d+)$", path.name)  # sparsify names folders by hookpoint, e.g. layers.10
        if match is None:
            raise ValueError(f"{path}: cannot infer the layer from the folder name; pass layer=")
        layer = int(match.group(1))
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=raw["k"], hook_name=f"blocks.{layer}.hook_resid_post",
                    apply_b_dec_to_input=True, metadata={"format": "sparsify"})
    ours = {"W_enc": state["encoder.weight"].T.contiguous(), "b_enc": state["encoder.bias"],
            "W_dec": state["W_dec"], "b_dec": state["b_dec"]}
    return _from_state(cfg, ours, str(path), device)


def _load_gemma_scope_npz(path: Path, device=None, layer: int | None = None) -> SAE:
    import numpy as np

    params = np.load(path)
    state = {("W_" + k[2:] if k.startswith("w_") else k): torch.from_numpy(params[k]) for k in params.files}
    check_values(state, path)
    if layer is None:
        match = re.search(r"layer_(\d+)", str(path))
        if match is None:
            raise ValueError(f"{path}: cannot infer the layer from the path (expected layer_N/...); pass layer=")
        layer = int(match.group(1))
    d_in, d_sae = state["W_enc"].shape
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture="jumprelu", hook_name=f"blocks.{layer}.hook_resid_post",
                    apply_b_dec_to_input=False, metadata={"format": "gemma-scope"})
    return _from_state(cfg, state, str(path), device)


def _load_saelens_release(release: str, sae_id: str, device=None) -> SAE:
    try:
        from sae_lens import SAE as LensSAE
    except ImportError as err:
        raise ImportError("loading (release, sae_id) needs SAELens: pip install 'saealign[saelens]'") from err
    loader = getattr(LensSAE, "from_pretrained_with_cfg_and_sparsity", None)
    lens = loader(release, sae_id, device="cpu")[0] if loader else LensSAE.from_pretrained(release, sae_id, device="cpu")
    return from_saelens(lens, source=f"{release}:{sae_id}", device=device)


def from_saelens(lens_sae: Any, source: str = "sae_lens", device=None) -> SAE:
    """Wrap an already loaded SAELens SAE (v5 or v6) as our SAE."""
    cfg = lens_sae.cfg
    raw = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))
    if raw.get("metadata") is not None and not isinstance(raw["metadata"], dict):
        raw["metadata"] = dict(vars(raw["metadata"]))
    state = dict(lens_sae.state_dict())
    check_values(state, source)
    return _from_state(_saelens_config(raw, source), state, source, device)


def load_sae(spec: str | Path | tuple[str, str] | SAE, device=None, layer: int | None = None) -> SAE:
    """Load an SAE from any supported source.

    `spec`: an `SAE`; a directory (SAELens or sparsify layout); a Gemma Scope `params.npz`;
    `default:in` / `default:out` (the SAEs shipped for the default model); or a SAELens
    `(release, sae_id)` pair / `"release:sae_id"` string.
    """
    if isinstance(spec, SAE):
        return spec.to(device or spec.W_dec.device)
    if isinstance(spec, tuple):
        return _load_saelens_release(*spec, device=device)
    text = str(spec)
    if text.startswith("default:"):
        return default_sae(text.split(":", 1)[1], device=device)
    path = Path(text)
    if path.is_file() and path.suffix == ".npz":
        return _load_gemma_scope_npz(path, device, layer)
    if path.is_dir():
        if (path / SAELENS_WEIGHTS).exists():
            return _load_saelens_dir(path, device)
        if (path / "sae.safetensors").exists():
            return _load_sparsify_dir(path, device, layer)
        if (path / "params.npz").exists():
            return _load_gemma_scope_npz(path / "params.npz", device, layer)
        raise ValueError(f"{path}: not an SAE directory (expected {SAELENS_CFG} + {SAELENS_WEIGHTS}, "
                         "cfg.json + sae.safetensors, or params.npz)")
    shipped = {name: role for role, name in DEFAULT_SAES.items()}.get(path.name)
    if shipped and path.parent.name == "saes":  # recorded by path in another install (a worktree since removed, say)
        return default_sae(shipped, device=device)
    if ":" in text and not path.exists():
        release, sae_id = text.split(":", 1)
        return _load_saelens_release(release, sae_id, device=device)
    raise FileNotFoundError(f"SAE not found: {text}")


DEFAULT_SAES = {"in": "smollm2-135m-instruct-in", "out": "smollm2-135m-instruct-out"}


def default_sae_dir(role: str) -> Path:
    if role not in DEFAULT_SAES:
        raise ValueError(f"default SAE role must be one of {sorted(DEFAULT_SAES)}, got {role!r}")
    return Path(__file__).resolve().parent.parent / "resources" / "saes" / DEFAULT_SAES[role]


def default_sae(role: str, device=None) -> SAE:
    """The SAEs shipped for the default model: `in` (early-middle layer) and `out` (late layer). Their source
    is recorded as `default:ROLE`, not this install's path, so artifacts built on them load in any install."""
    path = default_sae_dir(role)
    if not path.exists():
        raise FileNotFoundError(f"shipped SAE {path} is missing; reinstall saealign or train one with `saealign sae train`")
    sae = load_sae(path, device=device)
    sae.cfg.metadata["source"] = f"default:{role}"
    return sae
