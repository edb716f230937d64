"""TopK SAE training on a model's residual stream (in the spirit of EleutherAI sparsify).

Pipeline: text corpus -> chat-rendered token sequences -> one extraction pass (all requested
layers at once, bf16 by default, sinks excluded) into an on-disk `ActivationCache` -> per layer,
shuffled minibatches from a streaming buffer -> TopK SAE with AuxK dead-latent revival and a
unit-norm decoder. Checkpoints every `checkpoint_every` steps and resumes; `init_from` fine-tunes
an existing SAE on a new corpus (the DSPA paper's preference-domain SAE).

Inputs are scaled by one constant so that their mean norm is sqrt(d_in) while training (so the
learning rate does not depend on the model's residual scale); the constant is folded back into
the saved weights, which therefore take raw residuals.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from saealign._io import atomic_path, write_json
from saealign.config import ConfigError, check_config
from saealign.corpus import load_texts, sample_texts
from saealign.activations import DEFAULT_SINK_FACTOR, ActivationCache, tokenize_texts
from saealign.hooks import hidden_size, hook_name
from saealign.models import ModelOptions
from saealign.sae.core import SAE, SAEConfig, load_sae

log = logging.getLogger(__name__)


@dataclass
class SAETrainConfig(ModelOptions):
    """`saealign sae train`: TopK SAEs on a model's residual stream, one per layer, from one extraction."""

    layers: list[int] = field(default_factory=list, metadata={"help": "Residual layers (block outputs) to train an SAE for.", "ge": 0})
    corpus: str = field(default="", metadata={"help": "Text corpus: .jsonl/.json/.txt/.parquet (also .gz), a preference file, or a HF dataset name."})
    output: str = field(default="", metadata={"help": "Output directory; one SAELens-format folder per layer."})
    corpus_role: str | None = field(default=None, metadata={"help": "Data role when --corpus is an HH-RLHF directory (e.g. fit)."})
    d_sae: int = field(default=2048, metadata={"help": "Number of latents.", "ge": 1})
    k: int = field(default=64, metadata={"help": "Active latents per token (TopK), at most --d-sae.", "ge": 1})
    lr: float | None = field(default=None, metadata={"help": "Adam learning rate (default: 2e-4 * sqrt(16384 / d_sae)).", "gt": 0})
    batch_size: int = field(default=4096, metadata={"help": "Tokens per step.", "ge": 1})
    epochs: float = field(default=4.0, metadata={"help": "Passes over the extracted activations.", "gt": 0})
    max_length: int = field(default=512, metadata={"help": "Tokens per text (truncated).", "ge": 1})
    n: int | None = field(default=None, metadata={"help": "Train on a seeded uniform draw of this many texts (default: all).", "ge": 1})
    batch_tokens: int = field(default=8192, metadata={"help": "Padded tokens per extraction batch.", "ge": 1})
    sink_factor: float = field(default=DEFAULT_SINK_FACTOR, metadata={"help": "Exclude tokens with norm > factor x median.", "gt": 0})
    auxk_coef: float = field(default=1 / 32, metadata={"help": "Weight of the AuxK dead-latent loss.", "ge": 0})
    dead_after_tokens: int = field(default=500_000, metadata={"help": "A latent silent for this many tokens is dead.", "ge": 1})
    buffer_tokens: int = field(default=262_144, metadata={"help": "Shuffle buffer size (tokens).", "ge": 1})
    val_fraction: float = field(default=0.02, metadata={"help": "Fraction of tokens held out for the final metrics.", "gt": 0, "lt": 1})
    checkpoint_every: int = field(default=200, metadata={"help": "Steps between checkpoints.", "ge": 1})
    init_from: str | None = field(default=None, metadata={"help": "Fine-tune this SAE (path or default:in/out) instead of a fresh one."})
    storage_dtype: Literal["float16", "bfloat16", "float32"] = field(default="float16", metadata={"help": "dtype of the saved weights."})
    seed: int = field(default=0, metadata={"help": "Seed of the --n draw, the SAE initialisation and the shuffle."})

    def __post_init__(self) -> None:
        check_config(self)
        if self.k > self.d_sae:
            raise ConfigError("k", f"must be <= --d-sae ({self.d_sae}), got {self.k}")


def default_lr(d_sae: int) -> float:
    return 2e-4 / math.sqrt(d_sae / 2**14)


def _init_sae(cfg: SAETrainConfig, layer: int, d_in: int, sample: torch.Tensor, model_name: str) -> SAE:
    sae = SAE(SAEConfig(d_in=d_in, d_sae=cfg.d_sae, architecture="topk", k=cfg.k, hook_name=hook_name(layer),
                        model_name=model_name, dtype=cfg.storage_dtype))
    gen = torch.Generator().manual_seed(cfg.seed + layer)
    w = torch.randn(cfg.d_sae, d_in, generator=gen)
    w /= w.norm(dim=1, keepdim=True)
    with torch.no_grad():
        sae.W_dec.copy_(w)
        sae.W_enc.copy_(w.T)
        sae.b_dec.copy_(sample.mean(0))
    return sae


class _Trainer:
    """Trains one SAE from an `ActivationCache` layer; checkpoint + resume."""

    def __init__(self, cfg: SAETrainConfig, cache: ActivationCache, layer: int, out_dir: Path, model_name: str, device):
        self.cfg, self.layer, self.out_dir, self.device = cfg, layer, out_dir, device
        acts = cache.array(layer)
        n = acts.shape[0]
        rng = np.random.default_rng(cfg.seed)
        n_val = max(1, int(n * cfg.val_fraction))
        self.val_idx = np.sort(rng.choice(n, n_val, replace=False))
        mask = np.ones(n, bool)
        mask[self.val_idx] = False
        self.train_idx = np.nonzero(mask)[0]
        self.acts = acts
        sample = torch.from_numpy(acts[np.sort(rng.choice(self.train_idx, min(20_000, len(self.train_idx)), replace=False))].astype(np.float32))
        self.scale = math.sqrt(acts.shape[1]) / sample.norm(dim=1).mean().item()
        if cfg.init_from:
            base = load_sae(cfg.init_from)
            if base.d_in != acts.shape[1]:
                raise ValueError(f"init_from SAE has d_in={base.d_in}, activations have d={acts.shape[1]}")
            sae = SAE(dataclasses.replace(base.cfg, hook_name=hook_name(layer), dtype=cfg.storage_dtype,
                                          metadata={"fine_tuned_from": base.describe()}))
            sae.load_state_dict(base.state_dict())
            with torch.no_grad():  # move into the scaled training space (see _export for the inverse)
                sae.b_enc.mul_(self.scale)
                sae.b_dec.mul_(self.scale)
        else:
            sae = _init_sae(cfg, layer, acts.shape[1], sample * self.scale, model_name)
        self.sae = sae.to(device).train().requires_grad_(True)
        self.lr = cfg.lr or default_lr(self.sae.d_sae)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=self.lr, betas=(0.9, 0.999))
        self.steps_per_epoch = max(1, len(self.train_idx) // cfg.batch_size)
        self.total_steps = int(self.steps_per_epoch * cfg.epochs)
        self.step = 0
        self.seconds_before = 0.0  # training time of the earlier runs a resumed one continues
        self.started = time.time()
        self.since_fired = torch.zeros(self.sae.d_sae, dtype=torch.long, device=device)
        self.ckpt = out_dir / "checkpoint.pt"
        if self.ckpt.exists():
            self._resume()

    # -- data ----------------------------------------------------------------------------------------
    def _batches(self):
        """Shuffled minibatches: a permutation per epoch, read in buffer-sized chunks, shuffled again."""
        cfg = self.cfg
        epoch = self.step // self.steps_per_epoch
        skip = self.step % self.steps_per_epoch
        while True:
            rng = np.random.default_rng(cfg.seed * 1000 + epoch)
            perm = self.train_idx[rng.permutation(len(self.train_idx))][: self.steps_per_epoch * cfg.batch_size]
            per_buffer = max(1, cfg.buffer_tokens // cfg.batch_size)
            for b0 in range(0, self.steps_per_epoch, per_buffer):
                b1 = min(self.steps_per_epoch, b0 + per_buffer)
                if b1 <= skip:
                    continue
                idx = perm[b0 * cfg.batch_size: b1 * cfg.batch_size]
                order = np.argsort(idx)  # sorted reads from the memmap are much faster
                chunk = torch.from_numpy(self.acts[idx[order]].astype(np.float32))
                chunk = chunk[torch.from_numpy(np.argsort(order))]  # back to the shuffled order
                for b in range(b0, b1):
                    if b < skip:
                        continue
                    start = (b - b0) * cfg.batch_size
                    yield chunk[start: start + cfg.batch_size].to(self.device) * self.scale
            skip = 0
            epoch += 1

    # -- optimisation ----------------------------------------------------------------------------------
    def _loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        sae, cfg = self.sae, self.cfg
        pre = sae.pre_acts(x)
        values, indices = pre.topk(sae.cfg.k, dim=-1)
        values = torch.relu(values)
        # dense decode: on CPU a (batch, d_sae) @ (d_sae, d_in) matmul beats gathering k decoder rows per token
        recon = torch.zeros_like(pre).scatter(-1, indices, values) @ sae.W_dec + sae.b_dec
        err = x - recon
        total_var = (x - x.mean(0)).pow(2).sum()
        fvu = err.pow(2).sum() / total_var
        fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=x.device)
        fired[indices[values > 0]] = True
        self.since_fired += x.shape[0]
        self.since_fired[fired] = 0
        dead = self.since_fired > cfg.dead_after_tokens
        aux = torch.zeros((), device=x.device)
        n_dead = int(dead.sum())
        if n_dead and cfg.auxk_coef > 0:
            k_aux = min(n_dead, x.shape[1] // 2)
            dead_pre = pre.masked_fill(~dead, float("-inf"))
            av, ai = dead_pre.topk(k_aux, dim=-1)
            aux_recon = torch.zeros_like(pre).scatter(-1, ai, torch.relu(av)) @ sae.W_dec
            aux = (err.detach() - aux_recon).pow(2).sum() / err.detach().pow(2).sum().clamp_min(1e-12)
            aux = torch.nan_to_num(aux)
        loss = fvu + cfg.auxk_coef * aux
        return loss, {"fvu": fvu.item(), "auxk": aux.item(), "dead_fraction": n_dead / sae.d_sae}

    def train(self) -> SAE:
        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"SAE layer {self.layer}", unit="step")
        log_path = self.out_dir / "train_log.jsonl"
        t0 = time.time()
        for x in self._batches():
            if self.step >= self.total_steps:
                break
            lr = self.lr * min(1.0, (self.total_steps - self.step) / max(1, self.total_steps // 5))  # linear decay, last 20 %
            for group in self.opt.param_groups:
                group["lr"] = lr
            loss, metrics = self._loss(x)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():  # keep decoder rows unit norm: drop the gradient along them, renormalise after
                w = self.sae.W_dec
                w.grad -= (w.grad * w).sum(1, keepdim=True) * w
            self.opt.step()
            with torch.no_grad():
                self.sae.W_dec /= self.sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
            self.step += 1
            bar.update(1)
            bar.set_postfix(fvu=f"{metrics['fvu']:.3f}", dead=f"{metrics['dead_fraction']:.3f}")
            if self.step % 20 == 0 or self.step == self.total_steps:
                with open(log_path, "a") as fh:
                    fh.write(f'{{"step": {self.step}, "lr": {lr:.3g}, "fvu": {metrics["fvu"]:.5f}, "auxk": {metrics["auxk"]:.5f}, '
                             f'"dead_fraction": {metrics["dead_fraction"]:.4f}, "elapsed_s": {time.time() - t0:.1f}}}\n')
            if self.step % self.cfg.checkpoint_every == 0:
                self._checkpoint()
        bar.close()
        return self._export()

    def _checkpoint(self) -> None:
        with atomic_path(self.ckpt) as tmp:
            torch.save({"step": self.step, "sae": self.sae.state_dict(), "opt": self.opt.state_dict(),
                        "since_fired": self.since_fired, "scale": self.scale, "seconds": self.seconds()}, tmp)

    def _resume(self) -> None:
        state = torch.load(self.ckpt, map_location=self.device)
        self.sae.load_state_dict(state["sae"])
        self.opt.load_state_dict(state["opt"])
        self.since_fired = state["since_fired"]
        self.step = state["step"]
        self.seconds_before = state.get("seconds", 0.0)  # checkpoints of older versions record none
        log.info("resumed layer %d from step %d", self.layer, self.step)

    def seconds(self) -> float:
        """Wall time of this SAE's training over every run (a resumed run adds its checkpoint's)."""
        return self.seconds_before + time.time() - self.started

    def _export(self) -> SAE:
        """Fold the input scale back in, so the saved SAE encodes raw residuals (f scales by 1/scale)."""
        sae = SAE(self.sae.cfg)
        state = {k: v.detach().cpu() for k, v in self.sae.state_dict().items()}
        state["b_enc"] = state["b_enc"] / self.scale
        state["b_dec"] = state["b_dec"] / self.scale
        sae.load_state_dict(state)
        return sae.eval().requires_grad_(False)

    def validation(self) -> torch.Tensor:
        return torch.from_numpy(self.acts[self.val_idx].astype(np.float32))


def train_saes(cfg: SAETrainConfig) -> dict[int, Path]:
    """Extract activations once for all `cfg.layers`, then train and save one SAE per layer."""
    from saealign.models import load_model, load_tokenizer, model_fingerprint, resolve_device

    if not cfg.layers or not cfg.corpus or not cfg.output:
        raise ValueError("sae train needs --layers, --corpus and --output")
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(cfg.model)
    texts = sample_texts(load_texts(cfg.corpus, tokenizer, role=cfg.corpus_role), cfg.n, cfg.seed)
    model, _ = load_model(cfg.model, device=device, dtype=cfg.dtype)  # after the corpus passed its checks
    fingerprint = model_fingerprint(model)
    cache = ActivationCache(out / "activations", cfg.layers, hidden_size(model))
    if not cache.meta["complete"]:
        sequences = tokenize_texts(tokenizer, texts, cfg.max_length)
        t0 = time.time()
        stats = cache.fill(model, sequences, cfg.batch_tokens, cfg.sink_factor)
        cache.meta["extraction"] = {"texts": len(texts), "tokens_seen": stats.tokens_seen,
                                    "tokens_kept": stats.tokens_kept, "seconds": round(time.time() - t0, 1)}
        write_json(cache.meta_path, cache.meta)
    del model
    results = {}
    for layer in cfg.layers:
        layer_dir = out / f"layer_{layer}"
        layer_dir.mkdir(exist_ok=True)
        sae = train_layer(cfg, cache, layer, layer_dir, device, fingerprint)
        results[layer] = layer_dir
        log.info("layer %d: %s", layer, sae.cfg.metadata["heldout_activation_metrics"])
    return results


def train_layer(cfg: SAETrainConfig, cache: ActivationCache, layer: int, out_dir: Path, device: torch.device,
                model_fingerprint: str, **metadata) -> SAE:
    """Train (or resume) the SAE of `layer` from `cache`, record how it was trained (and `metadata`) in its
    cfg.json, and save it to `out_dir`."""
    from saealign.sae.evaluate import reconstruction_metrics

    trainer = _Trainer(cfg, cache, layer, out_dir, cfg.model, device)
    sae = trainer.train()
    sae.cfg.metadata.update({"model_fingerprint": model_fingerprint, "training": dataclasses.asdict(cfg),
                             "lr_used": trainer.lr, "input_scale": trainer.scale, "steps": trainer.step,
                             "train_tokens": int(len(trainer.train_idx)),
                             "heldout_activation_metrics": reconstruction_metrics(sae, trainer.validation()),
                             "extraction": cache.meta.get("extraction"),
                             "train_seconds": round(trainer.seconds(), 3),  # every run's; ms: tiny SAEs train in < 0.1 s
                             **metadata})
    sae.save(out_dir)
    return sae

