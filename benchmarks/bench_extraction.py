"""Activation-extraction throughput to layer L on the default model, side by side in one run.

Compares: a naive loop (fixed batch of 8, padded to the longest, fp32, full forward with
output_hidden_states), our extractor (length-bucketed, stops after layer L) in fp32 and bf16, and
the bare forward pass of the first L+1 blocks on the same batches (no hooks, no filtering) in both
dtypes. Also measures how far bf16 activations are from fp32 ones (relative error on kept tokens).

    python benchmarks/bench_extraction.py --layer 20 --texts 300
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import time
from pathlib import Path

import torch

from saealign.activations import iter_activations, keep_mask, padded_batches, tokenize_texts
from saealign.hooks import decoder_layers, read_residuals
from saealign.models import load_model

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "hh-rlhf" / "helpful-online" / "test.jsonl.gz"


def texts(n: int) -> list[str]:
    with gzip.open(DATA, "rt") as fh:
        return [json.loads(line)["chosen"] for _, line in zip(range(n), fh)]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@torch.no_grad()
def bare_forward(model, batches, layer: int) -> None:
    """The first layer+1 blocks only: the floor any extractor is measured against."""
    layers = decoder_layers(model)
    saved = list(layers)
    try:
        del layers[layer + 1:]
        for _, ids, mask in batches:
            model.model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        layers.extend(saved[layer + 1:])


@torch.no_grad()
def naive(model, seqs, layer: int, batch: int = 8) -> None:
    for start in range(0, len(seqs), batch):
        chunk = seqs[start: start + batch]
        width = max(map(len, chunk))
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(chunk):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[layer + 1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layer", type=int, default=20)
    parser.add_argument("--texts", type=int, default=300)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "extraction.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {"layer": args.layer, "texts": args.texts, "torch_threads": torch.get_num_threads(),
               "machine": platform.processor() or platform.machine()}
    model32, tok = load_model(dtype="float32")
    model16, _ = load_model(dtype="bfloat16")
    seqs = tokenize_texts(tok, texts(args.texts), args.max_length)
    n_tokens = sum(map(len, seqs))
    results["tokens"] = n_tokens
    batches = list(padded_batches(seqs, 8192, 0))
    results["padding_fraction_bucketed"] = 1 - n_tokens / sum(ids.numel() for _, ids, _ in batches)
    list(iter_activations(model16, seqs[:20], [args.layer], progress=False))  # warm-up
    for name, fn in [
        ("naive_fp32_padded_batch8", lambda: naive(model32, seqs, args.layer)),
        ("bare_forward_fp32", lambda: bare_forward(model32, batches, args.layer)),
        ("bare_forward_bf16", lambda: bare_forward(model16, batches, args.layer)),
        ("saealign_fp32", lambda: list(iter_activations(model32, seqs, [args.layer], progress=False))),
        ("saealign_bf16", lambda: list(iter_activations(model16, seqs, [args.layer], progress=False))),
    ]:
        seconds = timed(fn)
        results[name] = {"seconds": round(seconds, 2), "tokens_per_s": round(n_tokens / seconds, 1)}
        print(name, results[name], flush=True)
    # bf16 vs fp32 activations on the same kept tokens
    errs = []
    for _, ids, mask in batches[:6]:
        a32 = read_residuals(model32, ids, mask, [args.layer])[args.layer]
        a16 = read_residuals(model16, ids, mask, [args.layer])[args.layer].float()
        keep = keep_mask(a32, mask)
        errs.append(((a16 - a32)[keep].norm(dim=-1) / a32[keep].norm(dim=-1)).mean().item())
    results["bf16_relative_error_mean"] = sum(errs) / len(errs)
    results["ratio_saealign_bf16_to_bare_bf16"] = results["bare_forward_bf16"]["seconds"] / results["saealign_bf16"]["seconds"]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
