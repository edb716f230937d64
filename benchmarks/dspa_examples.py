"""Example generations, base vs DSPA, greedy, on single-turn prompts of the held-out test splits
(a seeded draw; shown, not scored), with the latents DSPA edited in each answer.

    python benchmarks/dspa_examples.py --map /work/runs/map_full --n 5
"""

from __future__ import annotations

import argparse
import random
from collections import Counter
from pathlib import Path

import torch

from saealign._io import write_json
from saealign.data import select_triples
from saealign.dspa import DSPA
from saealign.runtime.generation import Sampling, generate_chat
from saealign.models import DEFAULT_MODEL, load_model

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--map", required=True)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "dspa_examples.json"))
    args = ap.parse_args()

    model, tok = load_model(DEFAULT_MODEL)
    rng = random.Random(args.seed)
    prompts = []
    for role, count in (("test_helpful", args.n - args.n // 2), ("test_harmless", args.n // 2)):
        single = [t for t in select_triples(args.data, role) if len(t.prompt) == 1 and len(t.prompt[0]["content"]) < 200]
        prompts += [(role, t.prompt) for t in rng.sample(single, count)]
    steer = DSPA.load(args.map, model=model, record=True)
    sampling = Sampling(temperature=0.0, max_new_tokens=args.max_new_tokens)
    convs = [p for _, p in prompts]
    base = generate_chat(model, tok, convs, sampling, batch_size=1, progress=False)
    examples = []
    for (role, conv), base_answer in zip(prompts, base):
        steer.records.clear()
        answer = generate_chat(model, tok, [conv], sampling, batch_size=1, intervention=steer, progress=False)[0]
        edited = Counter(lat for r in steer.records for lat in r.latents)
        examples.append({"split": role, "prompt": conv[-1]["content"], "base": base_answer, "dspa": answer,
                         "edited_tokens": len(steer.records), "top_edited_latents": edited.most_common(8)})
        print(f"--- [{role}] {conv[-1]['content']}\nbase: {base_answer}\ndspa: {answer}\n", flush=True)
    write_json(args.output, {"map": args.map, "settings": steer.cfg.__dict__, "max_new_tokens": args.max_new_tokens,
                          "examples": examples})
    lines = ["| split | prompt | base | DSPA | tokens edited |", "|---|---|---|---|---|"]
    for e in examples:
        cells = [e["split"], e["prompt"], e["base"], e["dspa"], str(e["edited_tokens"])]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    Path(args.output).with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
