"""Alignment-stage FLOPs: DSPA vs RAHF-SCIT, counted on our runs and modelled at the paper's scale (issue #14).

1. From the restricted-data sweep's JSON: per run, the counted FLOPs (torch's FlopCounterMode) beside the
   analytic model's, and DSPA's counted FLOPs over RAHF-SCIT's at equal N.
2. The analytic model (`saealign.cost.pass_flops`, validated by 1.) for our SmolLM2-135M (a check against
   1.), Gemma-2-9B and Qwen3-8B on the
   paper's recipes, at N triples of the fit pool's mean prompt/response lengths (measured here with the
   default model's tokenizer and chat template; the paper's models tokenise alike within a few per cent):
   - DSPA: per triple a chosen pass through l_in..l_out with both SAE encoders, and a rejected pass to l_out
     with the output SAE (no LM head, no backward). Paper layers: Gemma-2-9B 9 -> 39, Qwen3-8B 9 -> 18; 16k SAEs;
     ours 9 -> 24 with the shipped SAEs (2,048 and 2,560 latents).
   - RAHF-SCIT as saealign runs it (`saealign rahf train`): step 1, per triple two examples, each two forward
     passes with gradients (matched and mismatched instruction) and their backward, 2 epochs, full fine-tuning;
     step 2, per example three no-grad passes to the highest target layer and one LoRA pass there with its
     backward, one epoch over 2N examples.
   - RAHF-SCIT as the reference code runs it (LiuAmber/RAHF, read for the brief): step 1 three forward passes
     with gradients per example; step 2 a fixed 450 steps x 64 examples, full-depth passes with the LM head,
     responses of at most 512 tokens.

    python benchmarks/cost_model.py --sweep benchmarks/results/restricted_sweep.json \
        --artifacts dspa@16=runs/cost16/dspa rahf-scit@16=runs/cost16/rahf dpo@16=runs/cost16/dpo
"""

from __future__ import annotations

import argparse
from pathlib import Path

from restricted_sweep import _as_number
from saealign._io import read_json, write_json
from saealign.cost import GEMMA2_9B, QWEN3_8B, ArchShape, LoraShape, pass_flops
from saealign.steering import recorded_cost

ROOT = Path(__file__).resolve().parents[1]
INSTRUCTION_TOKENS = 80  # the SCIT instruction as a system turn (ours: 45-60 words)
SMOLLM2_135M = ArchShape(n_layers=30, d_model=576, d_ff=1536, n_heads=9, n_kv_heads=3, head_dim=64, vocab=49152)
# name: (shape, l_in, l_out, input and output SAE widths). SmolLM2 with its shipped SAEs checks the model
# against the counted runs; the paper's models use 16k-wide SAEs (Gemma Scope's width in the paper).
MODELS = {"SmolLM2-135M (ours)": (SMOLLM2_135M, 9, 24, 2048, 2560), "Gemma-2-9B": (GEMMA2_9B, 9, 39, 16384, 16384),
          "Qwen3-8B": (QWEN3_8B, 9, 18, 16384, 16384)}


def dspa_flops(arch: ArchShape, n: int, prompt: float, response: float, l_out: int, m_in: int, m_out: int) -> float:
    seq = round(prompt + response)
    chosen, _ = pass_flops(arch, n, seq, layers=l_out + 1, lm_head=False,
                           extra=[(round(n * prompt), arch.d_model, m_in), (round(n * response), arch.d_model, m_out)])
    rejected, _ = pass_flops(arch, n, seq, layers=l_out + 1, lm_head=False,
                             extra=[(round(n * response), arch.d_model, m_out)])
    return chosen + rejected


def rahf_flops(arch: ArchShape, n: int, prompt: float, response: float, reference: bool) -> dict[str, float]:
    """Step 1 and step 2 FLOPs (forward + backward) of RAHF-SCIT on n triples."""
    top = round(18 / 32 * arch.n_layers)  # the reference's highest target layer, at the same relative depth
    lora = LoraShape(8, list(range(top + 1)), ["q_proj", "v_proj"])
    seq = round(prompt + INSTRUCTION_TOKENS + response)
    examples = 2 * n
    graded_passes = 3 if reference else 2
    fwd, bwd = pass_flops(arch, examples, seq, grad="full")
    step1 = 2 * graded_passes * (fwd + bwd)  # 2 epochs
    step2_examples = 450 * 64 if reference else examples
    step2_response = min(response, 512)
    layers, head = (None, True) if reference else (top + 1, False)
    plain = round(prompt + step2_response)
    steered = round(prompt + INSTRUCTION_TOKENS + step2_response)
    no_grad = (pass_flops(arch, step2_examples, plain, layers, head)[0]
               + 2 * pass_flops(arch, step2_examples, steered, layers, head)[0])
    lora_fwd, lora_bwd = pass_flops(arch, step2_examples, plain, layers, head, grad="lora", lora=lora)
    return {"step1": step1, "step2": no_grad + lora_fwd + lora_bwd}


def fit_pool_lengths(data: Path) -> tuple[float, float]:
    """Mean prompt and response tokens (chosen and rejected) of the fit pool, as `dspa fit` renders them."""
    from saealign.data import render_triples, select_triples
    from saealign.models import DEFAULT_MODEL, load_tokenizer

    rendered = render_triples(load_tokenizer(DEFAULT_MODEL), select_triples(str(data), "fit"), max_length=4096,
                              progress=False)
    prompt = sum(len(r.prompt_ids) for r in rendered) / len(rendered)
    response = sum((len(r.chosen_ids) + len(r.rejected_ids)) / 2 for r in rendered) / len(rendered)
    return prompt, response


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", type=Path, default=ROOT / "benchmarks" / "results" / "restricted_sweep.json")
    ap.add_argument("--artifacts", nargs="*", default=[], metavar="METHOD@N=DIR",
                    help="more runs by their artifacts (a map, a trained model), e.g. dspa@16=runs/cost16/dspa")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--ns", type=int, nargs="+", default=[16, 100, 250, 1000, 10000])
    ap.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "cost_model.json")
    args = ap.parse_args()

    runs = read_json(args.sweep)["runs"] if args.sweep.exists() else {}
    for entry in args.artifacts:  # runs outside the sweep, at an N of their own
        key, _, where = entry.partition("=")
        cost = recorded_cost(where)
        if cost is None:
            raise SystemExit(f"{where}: no recorded alignment-stage cost")
        method, _, n = key.partition("@")
        runs[key] = {"method": method, "n": n, "cost": cost}
    counted = {key: {"counted": r["cost"]["flops"]["total"], "analytic": r["cost"]["analytic_flops"]["total"],
                     "analytic_over_counted": r["cost"]["analytic_over_counted"]}
               for key, r in sorted(runs.items(), key=lambda kv: (kv[1]["method"], _as_number(kv[1]["n"])))}
    ratios = {n: runs[f"rahf-scit@{n}"]["cost"]["flops"]["total"] / runs[f"dspa@{n}"]["cost"]["flops"]["total"]
              for n in sorted({r["n"] for r in runs.values()}, key=_as_number)
              if f"rahf-scit@{n}" in runs and f"dspa@{n}" in runs}
    prompt, response = fit_pool_lengths(args.data)
    paper = {}
    for name, (arch, _, l_out, m_in, m_out) in MODELS.items():
        for n in args.ns:
            dspa = dspa_flops(arch, n, prompt, response, l_out, m_in, m_out)
            ours, reference = rahf_flops(arch, n, prompt, response, False), rahf_flops(arch, n, prompt, response, True)
            paper[f"{name} N={n}"] = {"dspa": dspa, "rahf_saealign": ours, "rahf_reference": reference,
                                      "ratio_saealign": sum(ours.values()) / dspa,
                                      "ratio_reference": sum(reference.values()) / dspa}
    result = {"counted_runs": counted, "rahf_over_dspa_counted": ratios,
              "fit_pool_mean_tokens": {"prompt": prompt, "response": response}, "paper_scale": paper,
              "instruction_tokens": INSTRUCTION_TOKENS}
    write_json(args.output, result)
    lines = ["| run | counted FLOPs | analytic / counted |", "|---|---|---|"]
    lines += [f"| {k} | {v['counted']:.3g} | {v['analytic_over_counted']:.4f} |" for k, v in counted.items()]
    lines += ["", "| N | RAHF-SCIT / DSPA, counted on our runs |", "|---|---|"]
    lines += [f"| {n} | {r:.1f}x |" for n, r in ratios.items()]
    lines += ["", f"Analytic (fit-pool mean prompt {prompt:.0f} and response {response:.0f} tokens, no padding or truncation):", "",
              "| model, N | DSPA FLOPs | RAHF-SCIT (saealign recipe) | ratio | RAHF-SCIT (reference recipe) | ratio |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {k} | {v['dspa']:.3g} | {sum(v['rahf_saealign'].values()):.3g} | {v['ratio_saealign']:.1f}x | "
              f"{sum(v['rahf_reference'].values()):.3g} | {v['ratio_reference']:.1f}x |" for k, v in paper.items()]
    args.output.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
