"""The steering server under load, and steered vs unsteered decode speed, on the default model (CPU here).

Load (`--part load`): a real `saealign serve` stack on 127.0.0.1 only (uvicorn + the batching engine) with
base, DSPA (two settings), static-sae, RepE and prompt-prefix registered; for each client count
(8/32/64), that many clients each send one greedy chat request at once, methods mixed round-robin.
Recorded: errors, p50/p95 latency, completion tokens/s, and whether every answer equals the same request
run by itself. Side by side in the same run: the old server's way of serving, i.e. the same requests
one at a time through `saealign.runtime.generation.generate` (the function the old server called under its
lock, batch 1, the request's intervention applied), in process, so without HTTP costs: if anything it
flatters the old server. Those sequential answers are also the reference for "equal to sequential".

Decode (`--part decode`), batch 1/8/64, all rows base vs all rows DSPA, a fixed number of new tokens
(end-of-sequence ignored), repeated, medians reported. Two paths: the server's (`BatchEngine` decode
steps, prefill excluded, each row with its own latent sets; a base and a steered engine stepped
alternately, so load from other processes hits both alike) and the harnesses' (`model.generate` inside
`DSPA.apply`, prefill included; base and steered runs alternate).

    python benchmarks/bench_serve.py --map runs/demo/map        # after `saealign demo` (writes runs/demo/map)

Everything is bounded: one request per client, at most --timeout seconds per request, fixed repeats.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import httpx
import torch

from saealign.runtime.generation import BatchEngine, DecodeRow, Sampling, generate, render_chat
from saealign.models import load_model
from saealign.serve import OpenAIServer
from saealign.steering import load_method, row_steering, system_prompt_of

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["How do I make bread at home?", "Can you explain what inflation is in simple terms?",
             "Write a short poem about the sea.", "What should I pack for a weekend hiking trip?",
             "How can I get better at chess?", "Why is the sky blue?", "Give me three tips for better sleep.",
             "What is a good way to learn a new language?", "How do vaccines work?", "Tell me a fun fact about cats.",
             "How do I apologise to a friend?", "What is the difference between weather and climate?",
             "Suggest a name for a bakery.", "How do I start running?", "What does a CPU do?",
             "How should I store fresh herbs?"]


def request_mix(map_dir: str) -> list[tuple[str, str, dict]]:
    """(served method name, spec, per-request settings) in round-robin order."""
    return [("base", "base", {}), ("dspa", f"dspa:{map_dir}", {}),
            ("dspa", f"dspa:{map_dir}", {"alpha": 0.6, "k_diff": 32, "mode": "both"}),
            ("static", f"static-sae:{map_dir}", {}), ("repe", f"repe:{map_dir}", {"coef": 4.0}),
            ("prefix", "prompt-prefix", {})]


def requests_for(clients: int, mix: list[tuple[str, str, dict]], offset: int) -> list[dict]:
    return [{"method": mix[(offset + i) % len(mix)], "question": QUESTIONS[(offset + i) % len(QUESTIONS)]}
            for i in range(clients)]


def _key(method: tuple[str, str, dict]) -> tuple[str, str]:
    return method[0], json.dumps(method[2], sort_keys=True)


def sequential(model, tok, requests: list[dict], interventions: dict, max_tokens: int) -> tuple[list[str], float]:
    """The old server: one request at a time through `generate` (batch 1, the request's intervention)."""
    texts = []
    start = time.perf_counter()
    for r in requests:
        steer = interventions[_key(r["method"])]
        prompt = render_chat(tok, [{"role": "user", "content": r["question"]}], system_prompt_of(steer))
        texts.append(generate(model, tok, [prompt], Sampling(max_new_tokens=max_tokens), batch_size=1,
                              intervention=steer, progress=False)[0].text)
    return texts, time.perf_counter() - start


async def concurrent(url: str, requests: list[dict], max_tokens: int, timeout: float) -> tuple[list, float]:
    """Every request at once, one client (connection) each; returns (per request: (status, text, seconds, tokens))."""
    async def one(client: httpx.AsyncClient, r: dict):
        name, _, settings = r["method"]
        body = {"model": name, "messages": [{"role": "user", "content": r["question"]}], "temperature": 0,
                "max_tokens": max_tokens, **({"steering": settings} if settings else {})}
        t0 = time.perf_counter()
        try:
            resp = await client.post(url + "/chat/completions", json=body)
            out = resp.json()
            ok = resp.status_code == 200
            return (resp.status_code, out["choices"][0]["message"]["content"] if ok else out,
                    time.perf_counter() - t0, out["usage"]["completion_tokens"] if ok else 0)
        except httpx.HTTPError as err:
            return (type(err).__name__, None, time.perf_counter() - t0, 0)

    limits = httpx.Limits(max_connections=len(requests), max_keepalive_connections=len(requests))
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one(client, r) for r in requests))
    return results, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def load_part(model, tok, args) -> dict:
    mix = request_mix(args.map)
    methods = {name: load_method(spec, model=model) for name, spec, _ in mix if name != "base"}
    interventions = {_key(m): load_method(m[1], model=model, **m[2]) for m in mix}  # for the sequential runs
    levels = []
    with OpenAIServer(model, tok, model_name="base", methods=methods, port=0, max_batch=64, max_queue=512) as server:
        asyncio.run(concurrent(server.url, requests_for(2, mix, 0), args.max_tokens, args.timeout))  # warm-up
        for offset, clients in enumerate(args.clients):
            requests = requests_for(clients, mix, offset)
            reference, seq_seconds = sequential(model, tok, requests, interventions, args.max_tokens)
            results, seconds = asyncio.run(concurrent(server.url, requests, args.max_tokens, args.timeout))
            latencies = [r[2] for r in results]
            tokens = sum(r[3] for r in results)
            errors = [r[0] for r in results if r[0] != 200]
            mismatched = [i for i, (r, want) in enumerate(zip(results, reference)) if r[0] == 200 and r[1] != want]
            # the sequential run decodes the same answers, so the same token count
            level = {"clients": clients, "errors": len(errors), "error_kinds": sorted(set(map(str, errors))),
                     "p50_s": round(percentile(latencies, 50), 3), "p95_s": round(percentile(latencies, 95), 3),
                     "wall_s": round(seconds, 2), "completion_tokens": tokens, "tokens_per_s": round(tokens / seconds, 1),
                     "outputs_equal_sequential": not mismatched and not errors, "mismatched": mismatched,
                     "sequential_wall_s": round(seq_seconds, 2),
                     "sequential_tokens_per_s": round(tokens / seq_seconds, 1),
                     "speedup_vs_sequential": round(seq_seconds / seconds, 2),
                     "methods": sorted({r["method"][0] + ("+" + json.dumps(r["method"][2]) if r["method"][2] else "")
                                        for r in requests})}
            print(json.dumps(level))
            levels.append(level)
        metrics = server.metrics()
    return {"max_tokens": args.max_tokens, "levels": levels, "server_metrics_at_end": metrics}


def fixed_length_engine(model, tok, batch: int) -> BatchEngine:
    engine = BatchEngine(model, tok, max_batch=batch)
    engine.eos_ids = set()  # a fixed number of new tokens for every row
    return engine


@torch.inference_mode()
def paired_decode_rates(model, tok, prompts: list[list[int]], steering, new_tokens: int) -> tuple[float, float, int]:
    """Decode tokens/s of the same batch unsteered and steered (prefill excluded), two engines stepped
    alternately (base, steered, steered, base, ...) so that load from other processes hits both alike;
    and the token positions steering edited."""
    engines = {kind: fixed_length_engine(model, tok, len(prompts)) for kind in ("base", "dspa")}
    rows = {kind: [DecodeRow(p, Sampling(max_new_tokens=new_tokens), steering=steering() if kind == "dspa" else None)
                   for p in prompts] for kind in engines}
    seconds = {kind: 0.0 for kind in engines}
    for kind, engine in engines.items():
        engine.step(rows[kind])  # prefill and the first token
    for step in range(new_tokens - 1):
        for kind in (("base", "dspa") if step % 2 == 0 else ("dspa", "base")):
            start = time.perf_counter()
            engines[kind].step()
            seconds[kind] += time.perf_counter() - start
    tokens = len(prompts) * (new_tokens - 1)
    return tokens / seconds["base"], tokens / seconds["dspa"], sum(r.edited_tokens for r in rows["dspa"])


@torch.inference_mode()
def generate_rate(model, tok, questions: list[str], steer, new_tokens: int) -> tuple[float, int]:
    """The harnesses' path: `model.generate` inside `steer.apply` (hooks, prefill included), new tokens/s."""
    batch = tok.apply_chat_template([[{"role": "user", "content": q}] for q in questions], add_generation_prompt=True,
                                    return_tensors="pt", padding=True, return_dict=True)
    before = steer.edited_tokens if steer is not None else 0
    with steer.apply(model) if steer is not None else nullcontext():
        start = time.perf_counter()
        model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=tok.pad_token_id)
        seconds = time.perf_counter() - start
    return len(questions) * new_tokens / seconds, (steer.edited_tokens - before) if steer is not None else 0


def decode_part(model, tok, args) -> dict:
    dspa = load_method(f"dspa:{args.map}", model=model, alpha=0.6, k_diff=32, mode="both")
    prompts = [tok(render_chat(tok, [{"role": "user", "content": q}]), add_special_tokens=False)["input_ids"]
               for q in QUESTIONS]

    def engine_path(batch: int, repeat: int) -> tuple[float, float, int]:
        return paired_decode_rates(model, tok, [prompts[i % len(prompts)] for i in range(batch)],
                                   lambda: row_steering(dspa), args.new_tokens)

    def generate_path(batch: int, repeat: int) -> tuple[float, float, int]:
        questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(batch)]
        kinds = ("base", "dspa") if repeat % 2 == 0 else ("dspa", "base")  # alternate which goes first
        results = {kind: generate_rate(model, tok, questions, dspa if kind == "dspa" else None, args.new_tokens)
                   for kind in kinds}
        return results["base"][0], results["dspa"][0], results["dspa"][1]

    runners = {"engine": engine_path, "generate": generate_path}
    rates = {(path, b): {"base": [], "dspa": []} for path in args.paths for b in args.batches}
    edited: dict[tuple[str, int], int] = {}
    for path in args.paths:
        runners[path](2, 0)  # warm-up
    for repeat in range(args.repeats):
        for path in args.paths:
            for batch in args.batches:
                base, steered, edited[(path, batch)] = runners[path](batch, repeat)
                rates[(path, batch)]["base"].append(base)
                rates[(path, batch)]["dspa"].append(steered)
    out: dict[str, dict] = {path: {} for path in args.paths}
    for (path, batch), r in rates.items():
        base, steered = statistics.median(r["base"]), statistics.median(r["dspa"])
        out[path][str(batch)] = {"base_tokens_per_s": round(base, 1), "dspa_tokens_per_s": round(steered, 1),
                                 "ratio": round(steered / base, 3), "dspa_edited_positions": edited[(path, batch)],
                                 "decoded_positions": batch * (args.new_tokens - 1), "runs": r}
        print(path, batch, json.dumps({k: v for k, v in out[path][str(batch)].items() if k != "runs"}))
    return {"new_tokens": args.new_tokens, "repeats": args.repeats, "dspa": "alpha 0.6, k_diff 32, mode both",
            "paths": {"engine": "BatchEngine decode steps, prefill excluded (the server's path)",
                      "generate": "model.generate inside DSPA.apply, prefill included (the harnesses' path)"},
            "results": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--map", default=str(ROOT / "runs" / "demo" / "map"))
    parser.add_argument("--part", choices=("load", "decode", "all"), default="all")
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--timeout", type=float, default=240.0)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--paths", nargs="+", choices=("engine", "generate"), default=["engine", "generate"])
    parser.add_argument("--threads", type=int, default=1, help="1: the machine is shared; more threads stall on a busy core")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model()
    env = {"device": str(next(model.parameters()).device), "threads": args.threads, "cpu": platform.processor() or
           platform.machine(), "torch": torch.__version__, "note": "CPU only: no GPU on this machine"}
    for part, fn in (("load", load_part), ("decode", decode_part)):
        if args.part in (part, "all"):
            result = {"env": env, **fn(model, tok, args)}
            path = Path(args.output) / f"serve_{part}.json"
            path.write_text(json.dumps(result, indent=1) + "\n")
            print("wrote", path)


if __name__ == "__main__":
    main()
