"""DSPA speed on the default model, side by side in one run:
- decode tokens/s steered vs unsteered (batch 1 and batch 8, greedy, fixed new-token count);
- map-fit throughput (triples/s) and its ratio to the bare forward passes it needs (the same
  batches run to l_out with no SAE work).

    python benchmarks/bench_dspa.py --map /work/runs/map_full --fit-triples 48
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from saealign.data import collate_pairs, load_preferences, render_triples
from saealign.demo import DEMO_DATA
from saealign.dspa import DSPA, FitOptions, SteerConfig, fit_map
from saealign.hooks import read_residuals
from saealign.models import load_model
from saealign.sae import load_sae

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def decode_rate(model, tok, prompts, new_tokens, steer=None) -> float:
    batch = tok.apply_chat_template([[{"role": "user", "content": p}] for p in prompts], add_generation_prompt=True,
                                    return_tensors="pt", padding=True, return_dict=True)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    ctx = steer.apply(model) if steer is not None else torch.no_grad()
    with ctx:
        t0 = time.perf_counter()
        model.generate(**batch, **kwargs)
        seconds = time.perf_counter() - t0
    return len(prompts) * new_tokens / seconds


@torch.no_grad()
def bare_passes(model, tok, rendered, options, l_out) -> None:
    order = sorted(range(len(rendered)), key=lambda i: rendered[i].length("both"))
    for b0 in range(0, len(order), options.batch_size):
        items = [rendered[i] for i in order[b0: b0 + options.batch_size]]
        for which in ("chosen", "rejected"):
            b = collate_pairs(items, tok, which, "right")
            read_residuals(model, b["input_ids"], b["attention_mask"], [l_out])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--map", default=None, help="DSPA map (default: fit one on the demo data first)")
    p.add_argument("--fit-triples", type=int, default=48)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "dspa_speed.json"))
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model()
    sae_in, sae_out = load_sae("default:in"), load_sae("default:out")
    triples = load_preferences(str(DEMO_DATA))[: args.fit_triples]
    options = FitOptions(max_length=512)
    rendered = render_triples(tok, triples, max_length=options.max_length)
    res = {"fit_triples": len(triples), "threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    bare_passes(model, tok, rendered, options, sae_out.layer)
    res["bare_forward_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    dspa_map = fit_map(model, tok, sae_in, sae_out, triples, options, progress=False)
    res["fit_s"] = time.perf_counter() - t0
    res["fit_triples_per_s"] = len(triples) / res["fit_s"]
    res["fit_over_bare_forward"] = res["fit_s"] / res["bare_forward_s"]
    # the map's recommended (validation-chosen) settings when a map is given, else the paper's defaults
    steer = DSPA.load(args.map, model=model) if args.map else DSPA(dspa_map, sae_in, sae_out, SteerConfig())
    res["steer_settings"] = dict(steer.cfg.__dict__)
    prompts = [t.prompt[-1]["content"] for t in load_preferences(str(DEMO_DATA))[-8:]]
    for bs in (1, 8):
        rates = {"base": [], "dspa": []}
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
            rates["base"].append(decode_rate(model, tok, prompts[:bs], args.new_tokens))
            rates["dspa"].append(decode_rate(model, tok, prompts[:bs], args.new_tokens, steer))
        res[f"decode_batch{bs}"] = {k: max(v) for k, v in rates.items()}
        res[f"decode_batch{bs}"]["steered_over_unsteered"] = max(rates["dspa"]) / max(rates["base"])
        print(bs, res[f"decode_batch{bs}"], flush=True)
    Path(args.output).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
