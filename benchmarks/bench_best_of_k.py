"""Best-of-K sampling throughput on the default model: K answers per prompt with the prompt prefilled once
and its KV cache repeated (`generate(..., num_samples=K)`, what `saealign data best-of-k` does) against the
same rows with each prompt repeated K times (every row prefills its own copy), side by side in one run,
interleaved and repeated, at each sequences-per-call batch size.

Prompts are benign fit-role prompts of HH-RLHF (`../shared/data`), drawn as `data best-of-k` draws them.

    OMP_NUM_THREADS=1 python benchmarks/bench_best_of_k.py --prompts 32 --k 16 --batch-sizes 64 256
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from saealign._io import write_json
from saealign.best_of_k import load_prompts
from saealign.models import load_model
from saealign.runtime.generation import Sampling, generate_chat

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "bench_best_of_k.json"))
    args = ap.parse_args()
    model, tok = load_model("smollm2-135m-instruct", device="cpu")
    prompts = load_prompts(["benign=fit"], args.data, args.prompts, seed=1, max_prompt_words=200)
    convs = [p.conversation for p in prompts]
    sampling = Sampling(0.9, 0.95, args.tokens)
    arms = {"shared prefill": lambda bs: generate_chat(model, tok, convs, sampling, batch_size=bs, progress=False,
                                                       num_samples=args.k),
            "prompt repeated": lambda bs: generate_chat(model, tok, [c for c in convs for _ in range(args.k)], sampling,
                                                        batch_size=bs, progress=False)}
    times: dict[str, list[float]] = {}
    tokens: dict[str, list[int]] = {}
    for rep in range(args.repeats):
        for bs in args.batch_sizes:
            for name, arm in (arms.items() if rep % 2 == 0 else reversed(arms.items())):
                t0 = time.perf_counter()
                answers = arm(bs)
                times.setdefault(f"{name}, batch {bs}", []).append(time.perf_counter() - t0)
                tokens.setdefault(f"{name}, batch {bs}", []).append(sum(len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers))
                print(f"rep {rep} {name} batch {bs}: {times[f'{name}, batch {bs}'][-1]:.1f} s", flush=True)
    rows = {arm: {"seconds": t, "best_s": min(t), "s_per_prompt": min(t) / args.prompts,
                  "answer_tokens_per_s": tokens[arm][0] / min(t)} for arm, t in times.items()}
    result = {"prompts": args.prompts, "k": args.k, "max_new_tokens": args.tokens, "repeats": args.repeats,
              "threads": torch.get_num_threads(), "platform": platform.processor() or platform.machine(),
              "torch": torch.__version__, "arms": rows}
    write_json(args.output, result)
    for arm, r in rows.items():
        print(f"{arm:30s} {r['s_per_prompt']:.2f} s/prompt  {r['answer_tokens_per_s']:.0f} answer tokens/s")


if __name__ == "__main__":
    main()
