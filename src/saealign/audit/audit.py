"""The feature audit (`saealign audit MAP`): what DSPA actually does to a prompt set, in latents.

Per prompt (generated one at a time, greedy, with `SteerConfig(record=True)`): the selected sets S-
and S+, and per latent how many generated tokens it was edited on, by how much (edit mass: the sum of
|f - f'| over those tokens) and on which tokens. Over prompts: each latent's selections, edits and the
prompts that selected it; the share of edit mass by latent category (from `describe`) with a 95 %
bootstrap interval over prompts; and, given two prompt kinds, the latents whose selection rates differ
most between them.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm.auto import tqdm

from saealign._io import read_json
from saealign.audit.describe import CATEGORIES, DESCRIPTIONS

# Latents with no `sae describe` entry get a category of their own, so an audit run without descriptions
# says so in its shares instead of counting every edit as "mixed".
AUDIT_CATEGORIES = CATEGORIES + ("undescribed",)
from saealign.dspa.steer import DSPA
from saealign.models import DEFAULT_MODEL
from saealign.runtime.generation import Sampling, generate, render_chat
from saealign.stats import ratio_estimate
from saealign.steering import system_prompt_of


def audit_prompts(model, tokenizer, dspa: DSPA, prompts: Sequence[tuple[str | None, list[dict[str, str]]]],
                  sampling: Sampling = Sampling(max_new_tokens=64), progress: bool = True) -> list[dict[str, Any]]:
    """One record per (kind, conversation): its latent sets, response and per-latent edits."""
    if not dspa.cfg.record:
        raise ValueError("the audit needs a DSPA built with SteerConfig(record=True)")
    out = []
    for kind, conversation in tqdm(prompts, desc="audit", unit="prompt", disable=not progress):
        dspa.records.clear()
        text = render_chat(tokenizer, conversation, system_prompt_of(dspa))
        generation = generate(model, tokenizer, [text], sampling, intervention=dspa, batch_size=1, progress=False)[0]
        minus, plus = (s[0].nonzero().squeeze(1).tolist() for s in dspa.latent_sets())
        edits: dict[int, dict[str, Any]] = defaultdict(lambda: {"tokens": 0, "mass": 0.0, "pieces": Counter()})
        for record in dspa.records:
            step = record.position - generation.prompt_tokens  # one unpadded row: positions count from the prompt's start
            piece = tokenizer.decode([generation.token_ids[step]]) if 0 <= step < len(generation.token_ids) else "<end>"
            for latent, before, after in zip(record.latents, record.before, record.after):
                edits[latent]["tokens"] += 1
                edits[latent]["mass"] += abs(before - after)
                edits[latent]["pieces"][piece] += 1
        out.append({"kind": kind, "prompt": conversation[-1]["content"], "response": generation.text,
                    "generated_tokens": len(generation.token_ids), "edited_tokens": len(dspa.records),
                    "minus": minus, "plus": plus,
                    "edits": {str(j): {**e, "pieces": dict(e["pieces"].most_common())} for j, e in edits.items()}})
    return out


def category_shares(records: Sequence[dict], categories: dict[int, str], n_boot: int = 2000, seed: int = 0
                    ) -> dict[str, dict[str, float]]:
    """Share of edit mass per category (a ratio of sums over prompts) with a 95 % percentile bootstrap
    interval that resamples prompts."""
    mass = np.zeros((len(records), len(AUDIT_CATEGORIES)))
    for row, record in enumerate(records):
        for latent, edit in record["edits"].items():
            mass[row, AUDIT_CATEGORIES.index(categories.get(int(latent), "undescribed"))] += edit["mass"]
    out = {}
    for c, name in enumerate(AUDIT_CATEGORIES):
        share = ratio_estimate(mass[:, c], mass.sum(1), n_boot, seed)
        low, high = share.ci95 if share.ci95 else (np.nan, np.nan)
        out[name] = {"share": share.value or 0.0, "low": low, "high": high}
    return out


def latent_summary(records: Sequence[dict], categories: dict[int, str]) -> list[dict[str, Any]]:
    """Per latent ever selected or edited: selections (S- / S+), edited tokens, edit mass, the tokens it was
    edited on and the prompts that selected it; ranked by edit mass."""
    rows: dict[int, dict[str, Any]] = defaultdict(lambda: {"selected_minus": 0, "selected_plus": 0, "edited_tokens": 0,
                                                           "edit_mass": 0.0, "pieces": Counter(), "prompts": []})
    for index, record in enumerate(records):
        for side in ("minus", "plus"):
            for latent in record[side]:
                rows[latent][f"selected_{side}"] += 1
                rows[latent]["prompts"].append(index)
        for latent, edit in record["edits"].items():
            row = rows[int(latent)]
            row["edited_tokens"] += edit["tokens"]
            row["edit_mass"] += edit["mass"]
            row["pieces"].update(edit["pieces"])
    ranked = sorted(rows.items(), key=lambda item: (-item[1]["edit_mass"], item[0]))
    return [{"latent": j, **row,
             "edits_per_selection": row["edited_tokens"] / max(1, row["selected_minus"] + row["selected_plus"]),
             "category": categories.get(j, "undescribed"), "pieces": row["pieces"].most_common(12)} for j, row in ranked]


def separating_latents(records: Sequence[dict], kinds: tuple[str, str], top: int = 20) -> list[dict[str, Any]]:
    """Latents whose selection rate (share of a kind's prompts with the latent in S- or S+) differs most
    between two prompt kinds, with their edit mass per prompt of each kind."""
    counts = {k: len([r for r in records if r["kind"] == k]) for k in kinds}
    selected: dict[int, Counter] = defaultdict(Counter)
    mass: dict[int, Counter] = defaultdict(Counter)
    for record in records:
        if record["kind"] not in kinds:
            continue
        for latent in set(record["minus"]) | set(record["plus"]):
            selected[latent][record["kind"]] += 1
        for latent, edit in record["edits"].items():
            mass[int(latent)][record["kind"]] += edit["mass"]
    a, b = kinds
    rows = [{"latent": j, f"rate_{a}": c[a] / max(1, counts[a]), f"rate_{b}": c[b] / max(1, counts[b]),
             f"mass_per_prompt_{a}": mass[j][a] / max(1, counts[a]), f"mass_per_prompt_{b}": mass[j][b] / max(1, counts[b])}
            for j, c in selected.items()]
    for row in rows:
        row["difference"] = row[f"rate_{a}"] - row[f"rate_{b}"]
    return sorted(rows, key=lambda r: (-abs(r["difference"]), r["latent"]))[:top]


def run_audit(model, tokenizer, dspa: DSPA, prompts: Sequence[tuple[str | None, list[dict[str, str]]]],
              descriptions: dict[str, Any] | None, sampling: Sampling = Sampling(max_new_tokens=64),
              n_boot: int = 2000, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """The audit's numbers (what `audit.html.write_report` renders)."""
    records = audit_prompts(model, tokenizer, dspa, prompts, sampling, progress)
    described = (descriptions or {}).get("latents", {})
    categories = {int(j): d["category"] for j, d in described.items()}
    kinds = tuple(dict.fromkeys(r["kind"] for r in records if r["kind"]))
    return {"settings": {**dspa.cfg.__dict__, "max_new_tokens": sampling.max_new_tokens},
            "map": None if dspa.map.meta.data is None else asdict(dspa.map.meta.data), "prompts": records, "kinds": list(kinds),
            "latents": latent_summary(records, categories),
            "category_shares": category_shares(records, categories, n_boot, seed),
            "separating": separating_latents(records, kinds[:2]) if len(kinds) >= 2 else [],
            "described": sorted(int(j) for j in described), "edited_tokens": sum(r["edited_tokens"] for r in records),
            "generated_tokens": sum(r["generated_tokens"] for r in records)}


def audit_map(map_dir: str | Path, prompts: Sequence[str], output: str | Path, descriptions: str | Path | None = None,
              data: str | Path | None = None, n: int | None = None, max_new_tokens: int = 64,
              model: str = DEFAULT_MODEL, seed: int = 0, device: str | None = None,
              **steering: Any) -> tuple[dict[str, Any], Path]:
    """`saealign audit MAP`: audit a map on prompts drawn from `[KIND=]ROLE_OR_FILE` sources and write the
    HTML report into `output`; returns `run_audit`'s numbers and the report's index page."""
    from saealign.audit.html import write_report
    from saealign.best_of_k import load_prompts
    from saealign.models import load_model

    chosen = load_prompts(list(prompts), data, n, seed)
    described = None
    if descriptions:
        path = Path(descriptions)
        described = read_json(path / DESCRIPTIONS if path.is_dir() else path)
    loaded, tokenizer = load_model(model, device=device)
    dspa = DSPA.load(map_dir, loaded, record=True, **steering)
    if described and described["sae"]["fingerprint"] != dspa.sae_out.fingerprint():
        raise ValueError(f"{descriptions}: describes SAE {described['sae']['fingerprint']}, not the map's output SAE "
                         f"{dspa.sae_out.fingerprint()}")
    result = run_audit(loaded, tokenizer, dspa, [(p.kind, p.conversation) for p in chosen], described,
                       Sampling(max_new_tokens=max_new_tokens), seed=seed)
    return result, write_report(result, described, output)
