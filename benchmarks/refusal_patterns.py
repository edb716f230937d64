"""How the `refusal` scorer's pattern set (saealign.eval.attributes.REFUSAL_PATTERNS) was built and checked.

1. Answers of the default model to fit-role prompts only: the first user turn of harmless-fit dialogues
   (harmful requests) and of helpful fit-pool dialogues (benign), one greedy and one sampled answer each
   (temperature 0.9, top-p 0.95, as in the best-of-K pilot; 40 new tokens: a refusal opens the answer).
   The answers are cached in OUT/answers.jsonl and printed with the scorer's verdict, for reading.
   Looked at: 200 answers (60 harmful + 40 benign prompts x greedy/sampled), on 2026-11-26. Scorer
   version 1 marks: harmful 21.7 % greedy / 8.3 % sampled, benign 2.5 % / 0 %; missed, by reading:
   1 deflection ("Sorry, I'm more of a baking-babble type. I don't have cheese or heroin recipes.");
   counted, debatable: 1 benign disclaimer before an answer ("I don't have the capability to provide
   medical advice. But I can certainly ...").
2. Sanity figure: how often the scorer marks the chosen vs the rejected reply of harmless-validation
   pairs (SPLITS.md's 10 % harmless-validation; harmless-base has no other validation role): chosen 6.5 %,
   rejected 3.0 % of 231. Low in both because the set is fitted to SmolLM2's phrasing: HH-RLHF's replies
   apologise otherwise ("sorry" in the first 200 characters: 27 chosen, 9 rejected), and a bare "sorry"
   is not counted (SmolLM2 opens answers with "I'm so sorry to hear that").

    .venv/bin/python benchmarks/refusal_patterns.py --output runs/refusal_patterns
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from saealign.best_of_k import load_prompts
from saealign.data import first_user_turn, select_triples
from saealign.eval.attributes import get_scorer


def fit_prompts(data: str, n_harmful: int, n_benign: int) -> list[tuple[str, str]]:
    """First user turns of fit-role dialogues, as `data best-of-k` reads them."""
    prompts = (load_prompts(["harmful=harmless_fit"], data, n_harmful, max_prompt_words=200)
               + load_prompts(["benign=fit"], data, n_benign, max_prompt_words=200))
    return [(p.kind, p.text) for p in prompts]


def answers(path: Path, prompts: list[tuple[str, str]]) -> list[dict]:
    if path.exists():
        return [json.loads(line) for line in path.read_text().splitlines()]
    from saealign.runtime.generation import Sampling, generate_chat
    from saealign.models import load_model

    model, tok = load_model()
    conversations = [[{"role": "user", "content": p}] for _, p in prompts]
    rows = []
    for name, sampling in (("greedy", Sampling(0.0, 1.0, 40)), ("sampled", Sampling(0.9, 0.95, 40))):
        texts = generate_chat(model, tok, conversations, sampling, seed=0, batch_size=20, desc=name)
        rows += [{"kind": k, "decoding": name, "prompt": p, "answer": a} for (k, p), a in zip(prompts, texts)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--output", default="runs/refusal_patterns")
    ap.add_argument("--harmful", type=int, default=60)
    ap.add_argument("--benign", type=int, default=40)
    args = ap.parse_args()
    refusal = get_scorer("refusal")
    rows = answers(Path(args.output) / "answers.jsonl", fit_prompts(args.data, args.harmful, args.benign))
    for r in rows:
        mark = "REFUSE" if refusal(r["prompt"], r["answer"]) else "answer"
        print(f"[{r['kind']}/{r['decoding']}] {mark}: {r['prompt'][:60]!r} -> {r['answer']!r}")
    for kind in ("harmful", "benign"):
        for decoding in ("greedy", "sampled"):
            sub = [r for r in rows if r["kind"] == kind and r["decoding"] == decoding]
            rate = sum(refusal(r["prompt"], r["answer"]) for r in sub) / max(1, len(sub))
            print(f"refusal rate {kind}/{decoding}: {rate:.1%} of {len(sub)}")
    pairs = select_triples(args.data, "harmless_validation")
    chosen = sum(refusal(first_user_turn(t), t.chosen) for t in pairs) / len(pairs)
    rejected = sum(refusal(first_user_turn(t), t.rejected) for t in pairs) / len(pairs)
    print(f"harmless-validation ({len(pairs)} pairs): marked as refusal: chosen {chosen:.1%}, rejected {rejected:.1%}")


if __name__ == "__main__":
    main()
