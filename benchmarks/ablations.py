"""The DSPA paper's ablations on the default model (issue #17), by the protocol: maps fitted on fit roles, every
choice made on validation, each arm reported once on test.

Two measures, every map fitted twice (same SAEs, same steering):
- one attribute of `attributes_protocol.py` (--attribute): `refusal` (fewer refusals on benign prompts, the one
  DSPA measurably moves) or `conditional` ("refuse iff harmful"). A map on its best-of-K fit triples; the
  attribute's headline from greedy answers, paired against base (`saealign eval attributes`), and the map's held-out
  signal on its validation triples (`saealign eval map-signal`);
- the judge-free HH-RLHF protocol: a map on a seeded draw of N fit-pool triples; reward accuracy against base.

Stages (each written to OUTPUT/ablations.json as it ends; a rerun resumes: maps, answers and finished stages are
kept):
1. layer grid: every pair l_in < l_out of the suite's layers, generic SAEs of the base width, one fixed steering
   setting per attribute (GRID_STEERING). Every pair's maps and held-out map signal come from shared forward passes (`run_fits`,
   `held_out_features`: the 21 pairs of 7 layers cost about one fit at the deepest pair). The outcome measures
   (greedy answers, HH scoring: a pass per pair) run on every pair with --full-grid, or by a coordinate search
   (the default, for CPU): l_in over the pairs ending at --anchor-out (24, the shipped output layer), then l_out
   from the best l_in. The pair is chosen by the attribute's validation gain among pairs whose perplexity stays
   within the protocol's guard (the HH measure's own best pair and the largest map signal are reported beside it);
2. at that pair, one choice changed per arm: preference-domain SAEs (the suite's fine-tuned variant), the wide
   SAEs, the two modes the grid does not use, stat mean (the grid uses density); the shipped SAEs (9, 24)
   as today's default; each arm on validation;
3. every arm once on test (the attribute's test-role prompts; HH: the helpful-test sample of the
   restricted sweep), with paired differences to the reference arm (the chosen pair as in the grid).
Plots: OUTPUT/ablation_layer_grid.png (heat maps of the grid), OUTPUT/ablations.md (tables).

    python benchmarks/ablations.py --attribute refusal --suite runs/sae_suite \
        --triples runs/attributes/refusal/triples_fit/triples.jsonl \
        --val-triples runs/attributes/refusal/triples_validation/triples.jsonl --output runs/ablations
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from attributes_pairwise import per_prompt
from attributes_protocol import ATTRIBUTES, HELD_OUT_EXCLUDES, PPL_GUARD
from saealign._io import read_json, write_json
from saealign.data import sample, select_triples
from saealign.dspa.fitting import DSPAFitConfig, run_fits
from saealign.dspa.map import DSPAMap, Recommended, record_recommended
from saealign.eval.attribute_bench import AttributeEvalConfig, run_attribute_eval
from saealign.eval.attributes import get_scorer
from saealign.eval.pref import preference_metrics, reward_hits
from saealign.dspa.diagnostics import HeldOutStatistics, held_out_features, map_signal
from saealign.models import DEFAULT_MODEL, load_model
from saealign.sae import load_sae
from saealign.runtime.scoring import base_scores_cached, load_scores, save_scores, score_triples
from saealign.stats import paired_difference
from saealign.steering import LatentSteering, load_method

ROOT = Path(__file__).resolve().parents[1]
MODES = ("ablate", "augment", "both")
# One setting for the whole grid per attribute, the paper's k_prompt/k_diff, no threshold (tau is in each map's own
# units). Conditional: `both` (a refusal has to be added, attributes_protocol.py), alpha 0.5 (the middle of its
# grid). Refusal on benign prompts: the protocol's validation choice at the shipped pair (ablate, alpha 1.0).
GRID_STEERING = {"conditional": LatentSteering(mode="both", alpha=0.5, k_prompt=32, k_diff=16, threshold=0.0),
                 "refusal": LatentSteering(mode="ablate", alpha=1.0, k_prompt=32, k_diff=16, threshold=0.0)}
# The centred arm (`--center`) scores with every input latent's deviation from the mean prompt: on the conditional
# map's held-out triples, agreement rose with k_prompt up to all of them (README, "the centred map").
CENTRED_K_PROMPT = 1 << 20
CHOICE_RULE = "largest validation gain in {headline} among pairs with perplexity <= {guard} x base (ties: lower perplexity)"


@dataclass(frozen=True)
class Arm:
    """One map configuration: its SAEs, prompt statistic and steering setting."""

    name: str
    sae_in: str
    sae_out: str
    steering: LatentSteering
    stat: str = "density"

    @property
    def fit_key(self) -> str:  # arms that differ only in steering share the fit
        return f"{_short(self.sae_in)}__{_short(self.sae_out)}__{self.stat}"

    @property
    def signal_key(self) -> tuple:  # the map signal depends on the fit and on how scores are made, not on the mode
        return self.fit_key, bool(self.steering.center), self.steering.k_prompt


def _short(sae: str) -> str:
    return sae.replace("default:", "shipped_") if sae.startswith("default:") else "_".join(Path(sae).parts[-2:])


def sae_dir(suite: Path, variant: str, layer: int, width: int) -> str:
    return str(suite / variant / f"layer_{layer}_w{width}")


class Ablations:
    def __init__(self, args: argparse.Namespace):
        self.args, self.out = args, args.output
        self.result_path = self.out / "ablations.json"
        self.result = read_json(self.result_path) if self.result_path.exists() else {}
        self.attribute = args.attribute
        self.scorer, _, self.validation_sources, self.test_sources, self.headline, self.direction, _ = \
            ATTRIBUTES[args.attribute]
        self.steering = GRID_STEERING[args.attribute]
        self.model, self.tok = load_model(DEFAULT_MODEL, dtype="float32")
        self.hh_fit = dict(data=str(args.data), data_role="fit", n=args.hh_n, seed=0, max_length=args.hh_max_length)
        self.hh_validation = sample(select_triples(str(args.data), "validation"), args.hh_eval_n, 0)
        self.hh_test = sample(select_triples(str(args.data), "test_helpful"), args.hh_eval_n, 0)
        self.val_triples = select_triples(str(args.val_triples))
        self.val_kinds = [t.meta.get("extra", {}).get("kind") for t in self.val_triples]
        self.base, self.hh_scores, self.signals_by_fit = {}, {}, {}

    def save(self) -> None:
        self.result.update({"benchmark": "DSPA ablations", "model": DEFAULT_MODEL, "suite": str(self.args.suite),
                            "attribute": self.attribute, "scorer": self.scorer, "headline": self.headline,
                            "direction": self.direction, "perplexity_guard": PPL_GUARD,
                            "triples": str(self.args.triples), "val_triples": str(self.args.val_triples),
                            "grid_steering": dataclasses.asdict(self.steering), "hh_fit_n": self.args.hh_n,
                            "hh_eval_n": self.args.hh_eval_n, "attribute_n": {"validation": self.args.val_n,
                                                                              "test": self.args.test_n},
                            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"})
        write_json(self.result_path, self.result)

    # maps ---------------------------------------------------------------------------------------------------
    def fitted(self, arm: Arm, measure: str) -> Path:
        return self.out / "maps" / measure / arm.fit_key

    def fit(self, arms: list[Arm], measure: str) -> None:
        """Fit the maps the arms lack for `measure` (the attribute | hh); arms with the same prompt statistic share
        their forward passes (`run_fits`), so the whole layer grid costs about one fit at its deepest pair."""
        data = (self.hh_fit if measure == "hh"
                else dict(data=str(self.args.triples), max_length=self.args.attr_max_length))
        todo = {arm.fit_key: arm for arm in arms if not (self.fitted(arm, measure) / "config.json").exists()}
        for stat in sorted({arm.stat for arm in todo.values()}):
            group = [arm for arm in todo.values() if arm.stat == stat]
            t = time.time()
            run_fits([DSPAFitConfig(**data, output=str(self.fitted(arm, measure)), sae_in=arm.sae_in, sae_out=arm.sae_out,
                                    stat=stat, batch_size=self.args.fit_batch, checkpoint_every=self.args.fit_checkpoint)
                      for arm in group], self.model, self.tok)
            print(f"  fit {measure}: {len(group)} map(s) ({stat}) from shared passes in {time.time() - t:.0f} s", flush=True)

    def map_for(self, arm: Arm, measure: str) -> Path:
        """The arm's map for `measure`: fitted once per fit key, copied with the arm's steering."""
        fitted = self.fitted(arm, measure)
        if not (fitted / "config.json").exists():
            self.fit([arm], measure)
        steered = self.out / "maps" / measure / f"{arm.fit_key}__{arm.name}"
        if not (steered / "config.json").exists():
            tmp = steered.with_name(steered.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(fitted, tmp, ignore=shutil.ignore_patterns("checkpoint*", "snapshot_*"))
            record_recommended(tmp, Recommended(dspa=arm.steering, source="benchmarks/ablations.py"))
            os.replace(tmp, steered)
        return steered

    # measures -----------------------------------------------------------------------------------------------
    def attribute_eval(self, arms: list[Arm], split: str) -> dict[str, dict]:
        """The attribute's metrics of every arm's answers on `split` prompts, paired against base, in one eval run."""
        sources, n = ((self.validation_sources, self.args.val_n) if split == "validation"
                      else (self.test_sources, self.args.test_n))
        run = self.out / f"{self.attribute}_{split}"
        methods = ["base", *(f"{a.name}=dspa:{self.map_for(a, self.attribute)}" for a in arms)]
        t = time.time()
        records = run_attribute_eval(AttributeEvalConfig(
            output=str(run), scorer=self.scorer, sources=sources, data=str(self.args.data), n=n,
            exclude=HELD_OUT_EXCLUDES.get(self.attribute, []), methods=methods, max_new_tokens=self.args.tokens,
            batch_size=self.args.batch), self.model, self.tok, progress=False)
        print(f"  {self.attribute} {split}: {len(arms)} arms + base in {time.time() - t:.0f} s", flush=True)
        return {r.method: {"metrics": {k: v.to_json() for k, v in r.metrics.items()},
                           "deltas": {k: v.to_json() for k, v in r.deltas.items()}} for r in records}

    def signals(self, arms: list[Arm]) -> dict[str, dict]:
        """Held-out signal of each arm's attribute map on the validation triples (`eval map-signal`'s numbers).
        g and Δρ come from one set of passes per prompt statistic for every SAE the arms use, and a map's
        signal does not depend on the steering mode, so it is computed once per fitted map."""
        todo = [arm for arm in arms if arm.signal_key not in self.signals_by_fit]
        self.fit(todo, self.attribute)
        for stat in sorted({arm.stat for arm in todo}):
            group = {arm.signal_key: arm for arm in todo if arm.stat == stat}
            maps = {key: DSPAMap.load(self.fitted(arm, self.attribute)) for key, arm in group.items()}  # small: 5M floats
            ins = list(dict.fromkeys(arm.sae_in for arm in group.values()))
            outs = list(dict.fromkeys(arm.sae_out for arm in group.values()))
            options = dataclasses.replace(next(iter(maps.values())).meta.options, batch_size=self.args.fit_batch)
            t = time.time()
            g, delta = held_out_features(self.model, self.tok, [load_sae(x) for x in ins], [load_sae(x) for x in outs],
                                         self.val_triples, options, progress=False)
            for key, arm in group.items():
                held_out = HeldOutStatistics(g[ins.index(arm.sae_in)], delta[outs.index(arm.sae_out)])
                self.signals_by_fit[key] = map_signal(maps[key], held_out, arm.steering.k_prompt, arm.steering.k_diff,
                                                      center=bool(arm.steering.center), kinds=self.val_kinds)[0]
            print(f"  map signal: {len(group)} map(s) ({stat}) in {time.time() - t:.0f} s", flush=True)
        return {arm.name: {**self.signals_by_fit[arm.signal_key], "map": arm.fit_key} for arm in arms}

    def hh(self, arm: Arm, split: str) -> dict:
        """The arm's HH-RLHF metrics on `split`; its per-triple scores are kept on disk, so that a rerun (an arm
        added, the paired test differences) scores no arm twice."""
        triples = self.hh_validation if split == "validation" else self.hh_test
        if split not in self.base:
            self.base[split] = base_scores_cached(self.model, self.tok, triples, self.args.hh_max_length, progress=False)
        if (split, arm.name) not in self.hh_scores:
            path = self.out / "hh_scores" / split / f"{arm.fit_key}__{arm.name}.safetensors"
            if not path.exists():
                intervention = load_method(f"dspa:{self.map_for(arm, 'hh')}", model=self.model)
                save_scores(path, score_triples(self.model, self.tok, triples, intervention, self.args.hh_max_length,
                                                progress=False))
            self.hh_scores[split, arm.name] = load_scores(path)
        return {k: v.to_json() for k, v in preference_metrics(self.hh_scores[split, arm.name], self.base[split]).items()}

    # stages -------------------------------------------------------------------------------------------------
    def grid(self) -> tuple[int, int]:
        """Every pair l_in < l_out: maps and held-out map signal for all of them (shared passes); the outcome
        measures (generation and HH scoring, the costly part) on every pair with --full-grid, else by a
        coordinate search: l_in over the pairs ending at --anchor-out, then l_out from the best l_in."""
        layers, width, suite = self.args.layers, self.args.width, self.args.suite
        arms = {f"{i}_{o}": Arm(f"L{i}_L{o}", sae_dir(suite, "generic", i, width), sae_dir(suite, "generic", o, width),
                                self.steering) for i in layers for o in layers if i < o}
        stage = self.result.setdefault("grid", {})
        for key, arm in arms.items():
            stage.setdefault(key, {"l_in": arm.sae_in, "l_out": arm.sae_out})
        self.fit(list(arms.values()), self.attribute)
        self.fit(list(arms.values()), "hh")
        unsignalled = {key: arm for key, arm in arms.items() if "map_signal" not in stage[key]}
        signals = self.signals(list(unsignalled.values()))
        for key, arm in unsignalled.items():
            stage[key]["map_signal"] = signals[arm.name]
        self.save()
        if self.args.full_grid:
            rounds = [list(arms)]
        else:
            anchor = self.args.anchor_out
            if anchor not in layers or anchor == min(layers):
                raise SystemExit(f"--anchor-out {anchor} must be one of --layers {layers} above the first")
            first = [f"{i}_{anchor}" for i in layers if i < anchor]
            self.evaluate(first, arms)
            best_in = int(self.best(first).split("_")[0])
            rounds = [first, [f"{best_in}_{o}" for o in layers if o > best_in and o != anchor]]
        for keys in rounds:
            self.evaluate(keys, arms)
        evaluated = [k for keys in rounds for k in keys]
        self.result["search"] = {"mode": "full grid" if self.args.full_grid else "coordinate",
                                 "anchor_out": None if self.args.full_grid else self.args.anchor_out, "rounds": rounds}
        hh_best = max(evaluated, key=lambda k: stage[k]["hh_validation"]["reward_acc"]["value"])
        signal_best = max(stage, key=lambda k: stage[k]["map_signal"]["pearson"])
        self.result["chosen_pair"] = {"attribute": self.best(evaluated), "hh": hh_best, "map_signal": signal_best,
                                      "rule": CHOICE_RULE.format(headline=self.headline, guard=PPL_GUARD)}
        self.save()
        i, o = map(int, self.result["chosen_pair"]["attribute"].split("_"))
        return i, o

    def best(self, keys: list[str]) -> str:
        """The pair with the largest validation gain in the headline (its direction applied) among those within
        the perplexity guard (all of them if none is), ties to the lower perplexity. Not to the map signal: its
        alignment is in the map's own units, which grow with the residual norm of deeper layers."""
        stage, measure = self.result["grid"], f"{self.attribute}_validation"
        guard = PPL_GUARD * self.result["grid_base"]["metrics"]["perplexity"]["value"]
        kept = [k for k in keys if stage[k][measure]["metrics"]["perplexity"]["value"] <= guard] or keys
        return max(kept, key=lambda k: (self.direction * stage[k][measure]["deltas"][self.headline]["value"],
                                        -stage[k][measure]["metrics"]["perplexity"]["value"]))

    def evaluate(self, keys: list[str], arms: dict[str, Arm]) -> None:
        """The outcome measures of these grid pairs on validation (pairs already scored are kept)."""
        stage = self.result["grid"]
        todo = [k for k in keys if "hh_validation" not in stage[k]]
        if not todo:
            return
        measured = self.attribute_eval([arms[k] for k in todo], "validation")
        self.result["grid_base"] = measured["base"]  # the same prompts and greedy answers in every round
        for key in todo:
            stage[key][f"{self.attribute}_validation"] = measured[arms[key].name]
            t = time.time()
            stage[key]["hh_validation"] = self.hh(arms[key], "validation")
            print(f"  {key}: Δ {self.headline} {measured[arms[key].name]['deltas'][self.headline]['value']:+.3f}, "
                  f"hh reward acc {stage[key]['hh_validation']['reward_acc']['value']:.3f} ({time.time() - t:.0f} s)",
                  flush=True)
            self.save()

    def arms_at(self, i: int, o: int) -> list[Arm]:
        """At the chosen pair: the reference, the SAE-type and width arms, the steering arms, the shipped pair."""
        s, w = self.args.suite, self.args.width
        ref, *steering = self.steering_arms(Arm("reference", sae_dir(s, "generic", i, w), sae_dir(s, "generic", o, w),
                                                self.steering))
        preference = dataclasses.replace(ref, name="preference_sae", sae_in=sae_dir(s, "preference", i, w),
                                         sae_out=sae_dir(s, "preference", o, w))
        wide_suite, wide_width = self.args.wide_suite or s, self.args.wide_width
        wide = Arm("wide_sae", sae_dir(wide_suite, "generic", i, wide_width), sae_dir(wide_suite, "generic", o, wide_width),
                   self.steering)
        return [ref, *_if_trained(preference), *_if_trained(wide), *steering,
                Arm("shipped_9_24", "default:in", "default:out", self.steering)]

    def steering_arms(self, ref: Arm) -> list[Arm]:
        """The reference and the arms that change only how its SAEs are used: mode (the two the grid does not
        use), prompt statistic, centring."""
        modes = [dataclasses.replace(ref, name=f"mode_{mode}", steering=dataclasses.replace(self.steering, mode=mode))
                 for mode in MODES if mode != self.steering.mode]
        return [ref, *modes, dataclasses.replace(ref, name="stat_mean", stat="mean"),
                dataclasses.replace(ref, name="centred", steering=dataclasses.replace(self.steering, center=True,
                                                                                      k_prompt=CENTRED_K_PROMPT))]

    def arms(self, arms: list[Arm], split: str) -> None:
        stage = self.result.setdefault(f"arms_{split}", {})
        measures = [self.attribute] + ([] if self.args.skip_hh else [f"hh_{split}"])
        if all(m in stage.get(a.name, {}) for a in arms for m in measures):
            return
        for measure in (self.attribute, *([] if self.args.skip_hh else ["hh"])):
            self.fit(arms, measure)  # the arms' SAE pairs from shared passes
        measured = self.attribute_eval(arms, split)
        signals = self.signals(arms) if split == "validation" else {}
        stage["base"] = {self.attribute: measured["base"]}
        for arm in arms:
            row = stage.setdefault(arm.name, {"sae_in": arm.sae_in, "sae_out": arm.sae_out, "stat": arm.stat,
                                              "steering": dataclasses.asdict(arm.steering)})
            row[self.attribute] = measured[arm.name]
            if split == "validation":
                row["map_signal"] = signals[arm.name]
            if not self.args.skip_hh:
                row[f"hh_{split}"] = self.hh(arm, split)
            self.save()
        if split == "test":
            self.result["paired_test"] = self.paired(arms)
            self.save()

    def paired(self, arms: list[Arm]) -> dict[str, dict]:
        """Each arm minus the reference on the test prompts (the headline) and test triples (reward accuracy)."""
        scorer = get_scorer(self.scorer)
        run = self.out / f"{self.attribute}_test"
        ids_ref, ref = per_prompt(run, "reference", scorer)
        out = {}
        for arm in arms[1:]:
            ids, scores = per_prompt(run, arm.name, scorer)
            assert ids == ids_ref, f"{arm.name} answered other prompts than the reference"
            out[arm.name] = {self.headline: paired_difference(scores, ref, 2000, 0).to_json()}
            if not self.args.skip_hh:
                out[arm.name]["reward_acc"] = paired_difference(self._hh_hits(arm), self._hh_hits(arms[0]), 2000,
                                                                0).to_json()
        return out

    def _hh_hits(self, arm: Arm) -> np.ndarray:
        """Per test triple: 1 when the arm's reward (log-ratio to base) prefers chosen, 0.5 on a tie, else 0."""
        self.hh(arm, "test")  # fills the score cache
        return reward_hits(self.hh_scores["test", arm.name], self.base["test"])

    def run(self) -> None:
        t0 = time.time()
        if self.args.suite is None:  # no suite: the mode and stat arms on the shipped pair (9, 24)
            arms = self.steering_arms(Arm("reference", "default:in", "default:out", self.steering))
        else:
            i, o = self.grid()
            print(f"layer grid done ({time.time() - t0:.0f} s): chosen pair ({i}, {o}); "
                  f"HH's best {self.result['chosen_pair']['hh']}", flush=True)
            if self.args.grid_only:
                self.report()
                return
            arms = self.arms_at(i, o)
        self.arms(arms, "validation")
        print(f"arms on validation done ({time.time() - t0:.0f} s)", flush=True)
        self.arms(arms, "test")
        print(f"arms on test done ({time.time() - t0:.0f} s)", flush=True)
        self.report()

    def report(self) -> None:
        if "grid" in self.result:
            plot_grid(self.result, self.args.layers, self.out / "ablation_layer_grid.png")
        (self.out / "ablations.md").write_text(markdown(self.result))


def _if_trained(arm: Arm) -> list[Arm]:
    """[arm] when both its SAEs are saved; else [] and a line saying so (a rerun once they are adds the arm, and
    only its own work is done: answers, maps and HH scores of the other arms are kept)."""
    if all((Path(sae) / "cfg.json").exists() for sae in (arm.sae_in, arm.sae_out)):
        return [arm]
    print(f"  no SAEs at {arm.sae_in} and {arm.sae_out}: arm {arm.name} skipped", flush=True)
    return []


def plot_grid(result: dict, layers: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attribute, headline = _measure(result)
    panels = [(f"Δ {headline} vs base, points\n({attribute}, validation)",
               lambda r: 100 * r[f"{attribute}_validation"]["deltas"][headline]["value"]),
              (f"map signal: Pearson r of scores and held-out Δρ\n({attribute}, validation triples)",
               lambda r: r["map_signal"]["pearson"]),
              ("reward accuracy vs base\n(HH-RLHF, validation)", lambda r: r["hh_validation"]["reward_acc"]["value"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4))
    for ax, (title, value) in zip(axes, panels):
        grid = np.full((len(layers), len(layers)), np.nan)
        for key, row in result["grid"].items():
            i, o = map(int, key.split("_"))
            try:
                grid[layers.index(i), layers.index(o)] = value(row)
            except KeyError:  # a pair the coordinate search did not evaluate: left blank
                pass
        span = max(5.0, float(np.nanmax(np.abs(grid)))) if "Δ" in title else None  # +-1 point is not saturated colour
        im = ax.imshow(grid, cmap="RdBu_r" if "Δ" in title else "viridis", origin="lower",
                       **({"vmin": -span, "vmax": span} if "Δ" in title else {}))
        for (a, b), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(b, a, f"{v:+.1f}" if "Δ" in title else f"{v:.3f}", ha="center", va="center", fontsize=7,
                        bbox={"facecolor": "white", "alpha": 0.6, "linewidth": 0})
        ax.set_xticks(range(len(layers)), layers)
        ax.set_yticks(range(len(layers)), layers)
        ax.set_xlabel("l_out (edited layer)")
        ax.set_ylabel("l_in (prompt layer)")
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _measure(result: dict) -> tuple[str, str]:
    """(attribute, headline) of a result; files written before --attribute existed are the conditional one."""
    return result.get("attribute", "conditional"), result.get("headline", "balanced_accuracy")


def _cell(estimate: dict, scale: float = 100.0, digits: int = 1) -> str:
    lo, hi = estimate["ci95"] or (estimate["value"], estimate["value"])
    return f"{scale * estimate['value']:+.{digits}f} [{scale * lo:+.{digits}f}, {scale * hi:+.{digits}f}]"


def _level(estimate: dict) -> str:
    lo, hi = estimate["ci95"] or (estimate["value"], estimate["value"])
    return f"{100 * estimate['value']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def markdown(result: dict) -> str:
    attribute, headline = _measure(result)
    lines = ["# DSPA ablations", "", f"Attribute: {attribute} (headline: {headline}). Steering of the grid and the "
             f"arms: {result['grid_steering']}."]
    if "chosen_pair" in result:
        search, chosen = result.get("search", {}), result["chosen_pair"]
        lines += [f"Chosen pair ({chosen['rule']}): {chosen['attribute']}; HH validation's best: {chosen['hh']}; "
                  f"largest map-signal r: {chosen['map_signal']}.",
                  f"Search: {search.get('mode')}" + (f" (first round l_out = {search['anchor_out']}, then l_out from the "
                                                     f"best l_in); pairs scored: {sum(map(len, search['rounds']))} of "
                                                     f"{len(result['grid'])}" if search.get("anchor_out") else "") + ".",
                  "", "## Layer grid (validation)", "",
                  f"| l_in_l_out | Δ {headline} (pp) | perplexity | map-signal alignment, map units [95 % CI] | "
                  "map-signal Pearson r (shuffled prompts) | HH reward acc. % |",
                  "|---|---|---|---|---|---|"]
        if "grid_base" in result:
            lines.insert(-3, f"Base on the validation prompts: {headline} "
                             f"{_level(result['grid_base']['metrics'][headline])} %, perplexity "
                             f"{result['grid_base']['metrics']['perplexity']['value']:.2f}.")
    else:
        lines.append("No SAE suite: the arms use the shipped SAEs (layers 9 and 24).")
    for key, row in sorted(result.get("grid", {}).items(), key=lambda kv: tuple(map(int, kv[0].split("_")))):
        if "map_signal" not in row:
            continue
        measured = row.get(f"{attribute}_validation")  # None: not on the coordinate search's path
        outcome = (f"{_cell(measured['deltas'][headline])} | {measured['metrics']['perplexity']['value']:.2f}"
                   if measured else "— | —")
        signal = row["map_signal"]
        lines.append(f"| {key} | {outcome} | {_cell(signal['alignment'], 1.0, 3)} | "
                     f"{signal['pearson']:.3f} ({signal['pearson_shuffled_prompts']:.3f}) | "
                     f"{_level(row['hh_validation']['reward_acc']) if 'hh_validation' in row else '—'} |")
    for split in ("validation", "test"):
        stage = result.get(f"arms_{split}")
        if not stage:
            continue
        lines += ["", f"## Arms ({split})", "",
                  f"| arm | {headline} % | Δ vs base (pp) | perplexity | HH reward acc. % | Δ {headline} vs reference (pp) | "
                  "Δ reward acc. vs reference (pp) |", "|---|---|---|---|---|---|---|"]
        paired = result.get("paired_test", {}) if split == "test" else {}
        for name, row in stage.items():
            if name == "base":
                continue
            m, d = row[attribute]["metrics"], row[attribute]["deltas"]
            p = paired.get(name)
            lines.append(f"| {name} | {_level(m[headline])} | {_cell(d[headline])} | {m['perplexity']['value']:.2f} | "
                         f"{_level(row[f'hh_{split}']['reward_acc']) if f'hh_{split}' in row else '—'} | "
                         f"{_cell(p[headline]) if p else '—'} | "
                         f"{_cell(p['reward_acc']) if p and 'reward_acc' in p else '—'} |")
        base = stage["base"][attribute]["metrics"]
        lines.append(f"| base | {_level(base[headline])} | | {base['perplexity']['value']:.2f} | | | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", type=Path, help="`saealign sae suite` output (without it: only the mode and stat arms, "
                    "on the shipped SAEs)")
    ap.add_argument("--attribute", choices=sorted(GRID_STEERING), default="refusal",
                    help="the attribute measure (attributes_protocol.py): its scorer, prompt roles and headline")
    ap.add_argument("--triples", type=Path, required=True, help="the attribute's fit triples (best-of-K jsonl)")
    ap.add_argument("--val-triples", type=Path, required=True, help="the attribute's validation triples")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--output", type=Path, default=ROOT / "runs" / "ablations")
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 6, 9, 12, 18, 24, 27])
    ap.add_argument("--width", type=int, default=2560)
    ap.add_argument("--wide-width", type=int, default=8192)
    ap.add_argument("--wide-suite", type=Path, help="suite holding the wide SAEs (default: --suite); e.g. one trained "
                    "after --grid-only at the chosen pair alone (`sae suite --layers I O --widths WIDE --variants generic`)")
    ap.add_argument("--grid-only", action="store_true", help="stop after the layer grid (its choice written); a rerun "
                    "without it goes on to the arms")
    ap.add_argument("--val-n", type=int, default=100, help="validation prompts (of each kind, where there are two)")
    ap.add_argument("--test-n", type=int, default=300, help="test prompts of each kind")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--fit-batch", type=int, default=32)
    ap.add_argument("--attr-max-length", type=int, default=256)
    ap.add_argument("--hh-n", type=int, default=500, help="fit-pool triples of each HH-RLHF map (seeded draw)")
    ap.add_argument("--hh-eval-n", type=int, default=300, help="HH-RLHF validation and test triples (seeded draws)")
    ap.add_argument("--hh-max-length", type=int, default=384)
    ap.add_argument("--anchor-out", type=int, default=24, help="coordinate search: l_out of the first round "
                    "(the shipped output layer)")
    ap.add_argument("--full-grid", action="store_true", help="outcome measures on every pair (GPU), not a coordinate search")
    ap.add_argument("--fit-checkpoint", type=int, default=128, help="triples between checkpoints of the shared fits")
    ap.add_argument("--skip-hh", action="store_true", help="arms only: leave out the HH-RLHF measure (CPU time)")
    args = ap.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    Ablations(args).run()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_grad_enabled(False)
    main()
