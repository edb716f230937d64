"""The main job on the embedded default model, end to end in a few minutes on a CPU:
fit a DSPA map from a small preference set, show base vs steered answers and the latents edited,
and measure held-out preference/reward accuracy.

The built-in set (`resources/demo_preferences.jsonl`) is demonstration data written for this
project — it shows the pipeline, not a benchmark result. Real data: `--data FILE` (any format
`saealign data inspect` reads) or the commands printed at the end.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markdown import Markdown
from rich.table import Table

from saealign.config import check_config
from saealign.models import model_option
from saealign.steering import LatentSteering

DEMO_DATA = Path(__file__).resolve().parent / "resources" / "demo_preferences.jsonl"


@dataclass
class DemoConfig(LatentSteering):
    """The demo's data and output, and the steering knobs (the paper's defaults unless given)."""

    data: str = field(default=str(DEMO_DATA), metadata={"help": "Preference triples (default: the built-in demonstration set)."})
    model: str = model_option("model")
    sae_in: str = field(default="default:in", metadata={"help": "SAE read at the input (prompt) layer."})
    sae_out: str = field(default="default:out", metadata={"help": "SAE edited at the output layer."})
    heldout: float = field(default=0.25, metadata={"help": "Fraction of triples held out for the preference metric.",
                                                   "gt": 0, "lt": 1})
    show: int = field(default=3, metadata={"help": "Held-out prompts to answer base vs steered.", "ge": 1})
    max_new_tokens: int = field(default=80, metadata={"help": "Tokens generated per answer.", "ge": 1})
    output: str = field(default="runs/demo", metadata={"help": "Where the fitted map and results are written."})
    seed: int = field(default=0, metadata={"help": "Seed of the held-out split."})

    def __post_init__(self) -> None:
        check_config(self)


def run_demo(cfg: DemoConfig, console: Console | None = None) -> dict:
    from saealign.data import load_preferences
    from saealign.dspa import DSPA, SteerConfig, fit_map
    from saealign.runtime.generation import Sampling, generate_chat
    from saealign.eval.pref import evaluate_preferences, markdown_table
    from saealign.models import load_model
    from saealign.sae import load_sae

    console = console or Console()
    t0 = time.time()
    console.rule("[bold]saealign demo: DSPA on the embedded default model")
    triples = load_preferences(cfg.data)  # bad data is refused before the model loads
    model, tok = load_model(cfg.model)
    sae_in, sae_out = load_sae(cfg.sae_in), load_sae(cfg.sae_out)
    console.print(f"model {cfg.model} loaded; SAEs: input layer {sae_in.layer} ({sae_in.d_sae} latents), "
                  f"output layer {sae_out.layer} ({sae_out.d_sae} latents)  [{time.time() - t0:.0f} s]")
    if Path(cfg.data) == DEMO_DATA:
        console.print("[yellow]data: the built-in DEMONSTRATION set (written for this project; not a benchmark)[/yellow]")
    order = list(range(len(triples)))
    random.Random(cfg.seed).shuffle(order)
    n_held = max(2, int(len(triples) * cfg.heldout))
    held = [triples[i] for i in sorted(order[:n_held])]
    fit = [triples[i] for i in sorted(order[n_held:])]
    console.print(f"fitting the DSPA map on {len(fit)} triples (forward passes only) ...")
    dspa_map = fit_map(model, tok, sae_in, sae_out, fit, seed=cfg.seed)
    dspa_map.save(Path(cfg.output) / "map")
    console.print(f"map: {dspa_map.a_sum.nnz} non-zero entries, {dspa_map.meta.fit_seconds} s "
                  f"-> {Path(cfg.output) / 'map'}")
    steer = DSPA(dspa_map, sae_in, sae_out, SteerConfig(**cfg.steering_options(), record=True))
    console.print(f"steering: DSPA mode={steer.cfg.mode} alpha={steer.cfg.alpha} k_prompt={steer.cfg.k_prompt} "
                  f"k_diff={steer.cfg.k_diff}, generated tokens only, greedy, {cfg.max_new_tokens} new tokens")

    convs = [t.prompt for t in held[: cfg.show]]
    sampling = Sampling(max_new_tokens=cfg.max_new_tokens)
    base = generate_chat(model, tok, convs, sampling, progress=False)
    steered, edits = [], []
    for conv in convs:  # one prompt at a time, to count each prompt's edits (batched output is the same)
        before = steer.edited_tokens
        steered += generate_chat(model, tok, [conv], sampling, intervention=steer, progress=False)
        edits.append(steer.edited_tokens - before)
    changed = sum(b != s for b, s in zip(base, steered))
    table = Table(title=f"held-out prompts: base vs DSPA (greedy); {changed} of {len(convs)} answers changed",
                  show_lines=True)
    for col, ratio in (("prompt", 2), ("base", 3), ("DSPA", 3), ("tokens edited", 1)):
        table.add_column(col, ratio=ratio)
    for conv, b, s, n in zip(convs, base, steered, edits):
        table.add_row(conv[-1]["content"], b, s, f"{n}" + ("" if b != s else "\n(same answer)"))
    console.print(table)
    counts = Counter(lat for r in steer.records for lat in r.latents)
    console.print(f"DSPA edited {steer.edited_tokens} generated token positions in total. Output-SAE latents "
                  "edited most often (latent: tokens): "
                  + ", ".join(f"{lat}: {n}" for lat, n in counts.most_common(10)))

    result = evaluate_preferences(model, tok, held, {"base": None, "dspa": steer}, n_boot=1000, seed=cfg.seed, progress=False)
    console.print(Markdown(markdown_table(result, "held-out demo triples (tiny n: intervals are wide)", legend=True)))
    console.print(f"done in {time.time() - t0:.0f} s. Real data and the full protocol:\n"
                  "  saealign data inspect ../shared/data/hh-rlhf/helpful-online/test.jsonl.gz\n"
                  "  saealign dspa fit --data ../shared/data --data-role fit --n 1000 --output runs/map\n"
                  "  saealign eval pref --data ../shared/data --data-role test_helpful --n 600 "
                  "--methods base --methods dspa:runs/map --methods static-sae:runs/map\n"
                  "  saealign generate --method dspa:runs/map --compare -p 'How do I make bread?'")
    return result
