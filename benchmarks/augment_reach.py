"""Can DSPA's `augment` side start a behaviour the model is not already producing? (issue #11's open question)

DSPA edits only latents that are active on the token (METHOD.md): `augment` raises an active latent of S+, it
never switches one on. So on an answer where none of S+ is active, augment does nothing. This script counts,
teacher-forced on the base model's own greedy answers, the share of answer tokens on which each side would
edit at least one latent (augment: an active S+ latent; ablate: an active S- latent), by prompt kind and by
whether the base answer already refuses. If augment reaches the refusal latents only on answers that already
refuse, DSPA can strengthen or damp a refusal but not start one.

    python benchmarks/augment_reach.py --map runs/attributes/conditional/map \
        --answers runs/attributes/conditional/validation/answers/base.jsonl [--center --k-prompt 2048]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from saealign._io import write_json
from saealign.data import read_records
from saealign.dspa.steer import DSPA
from saealign.eval.attributes import get_scorer
from saealign.models import load_model
from saealign.runtime.generation import render_chat

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def edited_share(model, tok, dspa: DSPA, conversation, answer: str) -> float:
    """Share of the answer's tokens on which `dspa` (its mode) edits at least one latent, teacher-forced."""
    prompt_ids = tok(render_chat(tok, conversation), add_special_tokens=False)["input_ids"]
    answer_ids = tok(answer, add_special_tokens=False)["input_ids"]
    if not answer_ids:
        return 0.0
    ids = torch.tensor([prompt_ids + answer_ids])
    positions = torch.zeros_like(ids, dtype=torch.bool)
    positions[0, len(prompt_ids):] = True
    before = dspa.edited_tokens
    with dspa.apply(model, positions=positions):
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return (dspa.edited_tokens - before) / len(answer_ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--map", required=True)
    ap.add_argument("--answers", required=True, help="an `eval attributes` answers file (records with kind and answer)")
    ap.add_argument("--center", action="store_true")
    ap.add_argument("--k-prompt", type=int)
    ap.add_argument("--k-diff", type=int)
    ap.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "augment_reach.json")
    args = ap.parse_args()
    model, tok = load_model("smollm2-135m-instruct", device="cpu")
    refusal = get_scorer("refusal")
    overrides = {k: v for k, v in (("center", args.center or None), ("k_prompt", args.k_prompt),
                                   ("k_diff", args.k_diff)) if v is not None}
    sides = {mode: DSPA.load(args.map, model=model, mode=mode, **overrides) for mode in ("augment", "ablate")}
    groups: dict[str, dict[str, list[float]]] = {}
    for _, r in read_records(Path(args.answers)):
        refused = bool(refusal(r["prompt"][-1]["content"], r["answer"]))
        group = groups.setdefault(f"{r['kind']}, base {'refuses' if refused else 'answers'}",
                                  {"augment": [], "ablate": []})
        for mode, dspa in sides.items():
            group[mode].append(edited_share(model, tok, dspa, r["prompt"], r["answer"]))
    table = {name: {"prompts": len(g["augment"]),
                    **{f"{mode}_tokens_edited": sum(v) / len(v) for mode, v in g.items()},
                    **{f"{mode}_answers_untouched": sum(x == 0 for x in v) / len(v) for mode, v in g.items()}}
             for name, g in sorted(groups.items())}
    write_json(args.output, {"map": args.map, "answers": args.answers, "settings": overrides, "groups": table})
    for name, row in table.items():
        print(f"{name:28s} n={row['prompts']:3d}  augment edits {row['augment_tokens_edited']:.3f} of tokens "
              f"({row['augment_answers_untouched']:.2f} of answers untouched); ablate {row['ablate_tokens_edited']:.3f} "
              f"({row['ablate_answers_untouched']:.2f})")


if __name__ == "__main__":
    main()
