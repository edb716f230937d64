"""The attribute-preference protocol of METHOD.md ("Positive controls"), end to end, with the library commands.

Per attribute (repetition: less; refusal on benign prompts: fewer; refuse_iff_harmful: the conditional one):
1. best-of-K triples from fit-role prompts (`saealign data best-of-k`), and a shuffled-label copy;
2. DSPA maps on them (`saealign dspa fit --data FILE`, snapshots for the growth with N), the real one and
   the shuffled-label negative control;
3. held-out signal of the maps on best-of-K triples from validation-role prompts (`saealign eval map-signal`);
4. steering settings chosen on validation-role prompts (`saealign eval attributes` over a small grid):
   the best paired attribute change whose perplexity stays within PPL_GUARD of base and whose distinct-2
   stays above DISTINCT_GUARD of base, the lower perplexity between equal changes; recorded in the map
   (`record_recommended`), the control gets the same;
5. held-out evaluation on test-role prompts for base, dspa, static-sae, repe, prompt-prefix and the
   shuffled-label map (validation and test prompts exclude every fit prompt's text, `--exclude`); results
   copied to RESULTS/attributes_<attribute>_results.json (`saealign report RESULTS` finds it), .md and .png,
   and the map signal to RESULTS/attributes_<attribute>_map_signal.json.

Every step resumes (each command does; the validation choice is kept in OUT/ATTRIBUTE/chosen_on_validation.json),
so the script can be rerun after an interruption: the tiny run took 5 min, its rerun 2 min with nothing regenerated.

Cost of the full run (FULL), measured 2026-11-26 on the shared 2-core CPU machine with OMP_NUM_THREADS=1, 48 new
tokens, batch 16: sampling 85 tokens/s (batch 48: 25 % faster, 32 tokens), greedy 110-143 tokens/s, DSPA-steered 5 % slower than base. It generates
about 1.6 M sampled tokens (the conditional attribute's harmful prompts at K=16 are 0.7 M of them) and 0.65 M
greedy ones: about 7.5 h in one process, about 4.5 h running the conditional attribute beside the other two.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/attributes_protocol.py    # the full run
    .venv/bin/python benchmarks/attributes_protocol.py --tiny --output runs/attr_tiny --results runs/attr_tiny/results
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from saealign._io import read_json, write_json

ROOT = Path(__file__).resolve().parents[1]
SAEALIGN = [sys.executable, "-m", "saealign"]
PPL_GUARD, DISTINCT_GUARD = 1.25, 0.8

# attribute -> (scorer, fit sources, validation sources, test sources, the headline to improve, its direction,
# best-of-K temperature). Repetition samples cooler: at 0.9 only 3 % of 40-token answers repeat a 3-gram
# (27 % of greedy ones; benchmarks/refusal_patterns.py's 200 answers), which leaves most prompts tied.
ATTRIBUTES = {
    "repetition": ("repetition", ["fit"], ["validation"], ["test_helpful"], "repetition", -1, 0.6),
    "refusal": ("refusal", ["benign=fit"], ["benign=validation"], ["benign=test_helpful"], "refusal", -1, 0.9),
    "conditional": ("refuse_iff_harmful", ["harmful=harmless_fit"],
                    ["harmful=harmless_validation", "benign=validation"], ["harmful=test_harmless", "benign=test_helpful"],
                    "balanced_accuracy", +1, 0.9),
}
# The conditional map is fitted on harmful-prompt triples only (chosen: a refusal), for compute: benign-prompt
# triples (chosen: an answer over a refusal) need a sampled refusal on a benign prompt, 4 % of samples at 0.9
# (23 of 600 on validation prompts; 18 of 150 prompts gave a triple at K=4), so 1,000 benign prompts would cost
# 45 % more sampling for about 120 triples. The benign half of the score is left to the map's prompt
# conditioning, which is what the attribute tests. Held-out prompts still exclude the benign fit pool.
HELD_OUT_EXCLUDES = {"conditional": ["harmful=harmless_fit", "benign=fit"]}
FULL = {"fit_prompts": 1000, "k": 4, "k_harmful": 10, "tokens": 48, "val_triple_prompts": 150, "val_prompts": 100,
        "test_prompts": 300, "snapshots": [100, 200, 400], "alphas": [0.2, 0.5, 1.0], "modes": ["ablate", "both"],
        "coefs": [1.0, 4.0, 16.0], "max_length": 256, "batch": 48}
# A refusal shows in an answer's first sentence, so the refusal attributes generate 32 tokens (a third less compute).
# One steering mode per attribute halves the validation grid: a refusal has to be added (`both` augments the
# latents of the chosen side), repetition removed (`ablate` the latents of the rejected side). The conditional
# attribute's grid was cut further (two alphas, one RepE coefficient) to fit the measured run into one session.
# Refusal on benign prompts: a refusal is sampled in ~4 % of answers, so K = 16 and 2,100 prompts give ~550
# triples (session 9's run: 553 from a 1,000-prompt H100 part and a 1,100-prompt CPU part, merged).
FULL_BY_ATTRIBUTE = {"refusal": {"tokens": 32, "k": 16, "fit_prompts": 2100, "val_triple_prompts": 350,
                                 "modes": ["ablate", "both"], "alphas": [0.5, 1.0], "coefs": [1.0, 4.0],
                                 "snapshots": [100, 250, 500]},
                     "conditional": {"tokens": 32, "modes": ["both"], "alphas": [0.2, 0.5], "coefs": [4.0]},
                     "repetition": {"modes": ["ablate"]}}
# On a GPU the compute note above no longer binds: the conditional map also gets benign-prompt triples (chosen: an
# answer over a refusal), so it can learn when to refuse and not only how; K = 16 for both kinds, a wider grid.
GPU = {**FULL, "fit_prompts": 1000, "k": 16, "k_harmful": 16, "tokens": 32, "val_triple_prompts": 200,
       "snapshots": [100, 250, 500], "alphas": [0.2, 0.5, 1.0], "modes": ["ablate", "both"], "coefs": [1.0, 4.0],
       "batch": 256, "fit_batch": 32}
GPU_BY_ATTRIBUTE = {"conditional": {"fit_sources": ["harmful=harmless_fit", "benign=fit"]},
                    "refusal": {"modes": ["ablate", "both"]}, "repetition": {"tokens": 48, "modes": ["ablate"]}}
TINY = {"fit_prompts": 16, "k": 3, "k_harmful": 6, "tokens": 12, "val_triple_prompts": 16, "val_prompts": 4,
        "test_prompts": 8, "snapshots": [4], "alphas": [0.5], "modes": ["ablate"], "coefs": [4.0], "max_length": 64, "batch": 16}


def run(*args: str) -> None:
    cmd = [*SAEALIGN, *map(str, args)]
    print("+ saealign " + " ".join(map(str, args)), flush=True)
    t = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    print(f"  ({time.time() - t:.0f} s)", flush=True)


def sources(flag: str, values: list[str]) -> list[str]:
    return [a for v in values for a in (flag, v)]



def best_of_k(out: Path, scorer: str, srcs: list[str], n: int, s: dict, data: str, temperature: float,
              exclude: list[str] = ()) -> Path:
    run("data", "best-of-k", "--data", data, *sources("--sources", srcs), *sources("--exclude", exclude),
        "--scorer", scorer, "--n", n, "--temperature", temperature,
        "--k", s["k"], "--k-by-kind", f"harmful={s['k_harmful']}", "--max-new-tokens", s["tokens"], "--batch-size", s["batch"], "--output", out)
    return out / "triples.jsonl"


def enough_triples(triples: Path, step: str) -> bool:
    """Whether best-of-K gave the 2 triples a step needs; says so when not (tiny settings often tie everywhere)."""
    counts = read_json(triples.parent / "provenance.json")["counts"]
    if counts["triples"] >= 2:
        return True
    print(f"{step} skipped: {counts['triples']} triple(s) from {counts['prompts']} prompts (raise the prompts or K)",
          flush=True)
    return False


def evaluate(out: Path, scorer: str, srcs: list[str], exclude: list[str], n: int, methods: list[str], s: dict, data: str,
             options: list[str] = ()) -> list[dict]:
    run("eval", "attributes", "--data", data, *sources("--sources", srcs), *sources("--exclude", exclude),
        "--scorer", scorer, "--n", n,
        *sources("--methods", methods), "--max-new-tokens", s["tokens"], "--batch-size", s["batch"], *options,
        "--output", out)
    return read_json(out / "results.json")["records"]


def acceptable(record: dict, base: dict) -> bool:
    """The fluency guard of a setting: perplexity and distinct-2 close to base."""
    m, b = record["metrics"], base["metrics"]
    return (m["perplexity"]["value"] <= PPL_GUARD * b["perplexity"]["value"]
            and m["distinct_2"]["value"] >= DISTINCT_GUARD * b["distinct_2"]["value"])


def choose(work: Path, attribute: str, map_dir: Path, s: dict, data: str) -> dict:
    """Validation grid for dspa/static-sae (alpha x mode) and repe (coef); base answers are generated once
    and shared (they take no steering option)."""
    scorer, fit_sources, val_sources, _, headline, direction, _ = ATTRIBUTES[attribute]
    excluded = HELD_OUT_EXCLUDES.get(attribute, fit_sources)
    latent_methods = [f"dspa=dspa:{map_dir}", f"static=static-sae:{map_dir}"]
    grid = [(["--alpha", a, "--mode", m], {"alpha": a, "mode": m}, latent_methods) for a in s["alphas"] for m in s["modes"]]
    grid += [(["--coef", c], {"coef": c}, ["repe=repe:" + str(map_dir)]) for c in s["coefs"]]
    best: dict[str, tuple[float, dict]] = {}
    shared_base = work / "validation" / "answers" / "base.jsonl"
    for i, (options, setting, methods) in enumerate(grid):
        out = work / "validation" / f"setting_{i}"
        if shared_base.exists() and not (out / "answers" / "base.jsonl").exists():
            (out / "answers").mkdir(parents=True, exist_ok=True)
            shutil.copy(shared_base, out / "answers" / "base.jsonl")
        # a finished setting is read back: recommending the choice changes the map's config, and with it the
        # identity its answers were saved under, so a rerun after that point could not reuse them
        done = read_json(out / "results.json")["records"] if (out / "results.json").exists() else []
        if not all(r["config"].get(key) == value for r in done if r["method"] != "base" for key, value in setting.items()):
            done = []  # another grid in this directory
        records = done or evaluate(out, scorer, val_sources, excluded, s["val_prompts"], ["base", *methods], s, data,
                                   options)
        shared_base.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(out / "answers" / "base.jsonl", shared_base)
        base = next(r for r in records if r["method"] == "base")
        for r in records:
            if r["method"] == "base" or not acceptable(r, base):
                continue
            # the largest gain; between equal gains (a rate over 100 prompts ties often) the lower perplexity
            rank = (direction * r["deltas"][headline]["value"], -r["metrics"]["perplexity"]["value"])
            if rank > best.get(r["method"], ((float("-inf"), 0.0), {}))[0]:
                best[r["method"]] = (rank, setting)
    return {method: setting for method, (_, setting) in best.items()}


def recommend(map_dirs: list[Path], chosen: dict) -> None:
    from saealign.dspa.map import Recommended, record_recommended
    from saealign.steering import LatentSteering, SteeringOptions

    recommended = Recommended(dspa=LatentSteering(**chosen.get("dspa", {})),
                              static_sae=LatentSteering(**chosen.get("static", {})),
                              repe=SteeringOptions(**chosen.get("repe", {})),
                              source="benchmarks/attributes_protocol.py validation grid")
    for map_dir in map_dirs:
        record_recommended(map_dir, recommended)


def protocol(attribute: str, s: dict, work: Path, results: Path, data: str) -> None:
    from saealign.best_of_k import write_shuffled_labels

    scorer, fit_sources, val_sources, test_sources, _, _, temperature = ATTRIBUTES[attribute]
    excluded = HELD_OUT_EXCLUDES.get(attribute, fit_sources)
    fit_sources = s.get("fit_sources", fit_sources)
    work = work / attribute
    given = s.get("fit_triples")
    if given and (len(given) > 1 or s.get("fit_kinds")):  # parts built apart (a GPU and a CPU part), or one kind
        run("data", "merge-triples", *given, "--output", work / "triples_fit_merged",
            *sources("--kind", s.get("fit_kinds") or []))
        given = [work / "triples_fit_merged" / "triples.jsonl"]
    triples = given[0] if given else best_of_k(work / "triples_fit", scorer, fit_sources, s["fit_prompts"], s, data,
                                               temperature)
    if not enough_triples(triples, f"{attribute}: fitting"):
        return
    shuffled = work / "triples_fit_shuffled.jsonl"
    if not shuffled.exists():
        write_shuffled_labels(triples, shuffled, seed=0)
    maps = {"map": triples, "map_shuffled": shuffled}
    for name, file in maps.items():
        run("dspa", "fit", "--data", file, "--max-length", s["max_length"], *sources("--snapshots", s["snapshots"]),
            "--batch-size", s.get("fit_batch", 8), "--output", work / name)
    held_out = s.get("validation_triples") or best_of_k(work / "triples_validation", scorer, val_sources,
                                                        s["val_triple_prompts"], s, data, temperature, exclude=excluded)
    if enough_triples(held_out, f"{attribute}: map signal"):
        run("eval", "map-signal", "--maps", work / "map", "--maps", work / "map_shuffled", "--data", held_out,
            "--output", results / f"attributes_{attribute}_map_signal.json")
    chosen_file = work / "chosen_on_validation.json"
    if not chosen_file.exists():  # recommending changes the maps' configs, so the grid runs once
        chosen = choose(work, attribute, work / "map", s, data)
        recommend([work / "map", work / "map_shuffled"], chosen)
        write_json(chosen_file, chosen)
    chosen = read_json(chosen_file)
    kept = sorted({"dspa", "static", "repe"} - set(chosen))
    print(f"{attribute}: chosen on validation {chosen}"
          + (f"; no setting of {kept} passed the fluency guard, their defaults are kept" if kept else ""), flush=True)
    methods = ["base", f"dspa=dspa:{work / 'map'}", f"static-sae=static-sae:{work / 'map'}", f"repe=repe:{work / 'map'}",
               "prompt-prefix", f"dspa-shuffled-labels=dspa:{work / 'map_shuffled'}"]
    evaluate(work / "test", scorer, test_sources, excluded, s["test_prompts"], methods, s, data)
    for target, name in (("_results.json", "results.json"), (".md", "results.md"), (".png", "deltas.png")):
        shutil.copy(work / "test" / name, results / f"attributes_{attribute}{target}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--output", default=str(ROOT / "runs" / "attributes"), help="working directory (triples, maps, answers)")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--attributes", nargs="+", default=list(ATTRIBUTES), choices=list(ATTRIBUTES))
    ap.add_argument("--tiny", action="store_true", help="16 prompts, K=3 (6 harmful), 12 tokens: shows the pipeline works")
    ap.add_argument("--gpu", action="store_true", help="the GPU settings (GPU above): benign triples too, K=16, wider grid")
    ap.add_argument("--fit-triples", type=Path, nargs="+", help="best-of-K fit triples built earlier (a `data best-of-k` "
                    "output's triples.jsonl, provenance.json beside it), e.g. on a GPU: used instead of sampling them "
                    "here; several parts are merged (`saealign data merge-triples`)")
    ap.add_argument("--fit-kinds", nargs="+", help="keep the fit triples of these prompt kinds only (e.g. benign)")
    ap.add_argument("--modes", nargs="+", help="steering modes of the validation grid (default: the preset's)")
    ap.add_argument("--alphas", type=float, nargs="+", help="alphas of the validation grid (default: the preset's)")
    ap.add_argument("--coefs", type=float, nargs="+", help="RepE coefficients of the validation grid (default: the preset's)")
    ap.add_argument("--snapshots", type=int, nargs="+", help="map snapshots at these N (nested seeded draws; default: the preset's)")
    ap.add_argument("--validation-triples", type=Path, help="likewise for the held-out triples of the map-signal step")
    ap.add_argument("--batch", type=int, help="generation batch (default: the preset's)")
    args = ap.parse_args()
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    for attribute in args.attributes:
        if args.tiny:
            settings = {**TINY, **({"fit_sources": GPU_BY_ATTRIBUTE[attribute]["fit_sources"]}
                                   if args.gpu and "fit_sources" in GPU_BY_ATTRIBUTE[attribute] else {})}
        elif args.gpu:
            settings = {**GPU, **GPU_BY_ATTRIBUTE.get(attribute, {})}
        else:
            settings = {**FULL, **FULL_BY_ATTRIBUTE.get(attribute, {})}
        given = {"fit_triples": args.fit_triples, "fit_kinds": args.fit_kinds, "validation_triples": args.validation_triples,
                 "batch": args.batch, "modes": args.modes, "alphas": args.alphas, "coefs": args.coefs,
                 "snapshots": args.snapshots}
        settings.update({k: v for k, v in given.items() if v is not None})
        protocol(attribute, settings, Path(args.output), results, args.data)


if __name__ == "__main__":
    main()
