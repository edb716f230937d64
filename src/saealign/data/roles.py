"""The fixed data roles of SPLITS.md: HH-RLHF's fit / validation / test roles, the harmless-base split,
and `select_triples`, the one way every command turns `--data [--data-role] [--n]` into triples.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from pathlib import Path
from typing import Any

from saealign.data.draws import restrict, split_validation
from saealign.data.formats import (LoadReport, PreferenceTriple, first_user_turn, load_preferences, local_path,
                                   read_records, triples_fingerprint)

log = logging.getLogger(__name__)

HH_SUBSETS = ("helpful-base", "helpful-online", "helpful-rejection-sampled", "harmless-base")
FIT_SUBSETS = ("helpful-online", "helpful-rejection-sampled")
DATA_ROLES = ("fit", "validation", "test_helpful", "test_harmless")
# SPLITS.md's seeded split of harmless-base over dialogues: 40 % fit, 10 % validation, 50 % test (the test
# part is DATA_ROLES' `test_harmless`). `harmless_all` is the whole of harmless-base: the harmless test set of
# the numbers published before the split, kept only to reproduce them (it overlaps the fit part).
HARMLESS_ROLES = ("harmless_fit", "harmless_validation", "test_harmless")
LEGACY_ROLES = ("harmless_all",)
HARMLESS_FRACTIONS = (0.4, 0.1)


def alpaca_eval_instructions(alpaca_eval_dir: str | Path, dataset: str = "helpful_base") -> set[str]:
    """The AlpacaEval instructions whose `dataset` is `dataset`, read from every ``model_outputs.json``."""
    files = sorted(Path(alpaca_eval_dir).rglob("model_outputs.json"))
    if not files:
        raise FileNotFoundError(f"{alpaca_eval_dir}: no AlpacaEval model_outputs.json found")
    found: set[str] = set()
    for path in files:
        found |= {r["instruction"].strip() for _, r in read_records(path) if r.get("dataset") == dataset}
    return found


class DataRoles(dict):
    """The data roles of SPLITS.md (``fit``, ``validation``, ``test_helpful``, ``test_harmless``).

    A dict of role -> triples, plus `summary()`: the seed, counts and provenance that every result
    file must record.
    """

    def __init__(self, roles: dict[str, list[PreferenceTriple]], seed: int, val_fraction: float,
                 report: LoadReport, contamination: dict[str, Any]):
        super().__init__(roles)
        self.seed, self.val_fraction, self.report, self.contamination = seed, val_fraction, report, contamination

    def summary(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "counts": {role: len(ts) for role, ts in self.items()},
            "counts_by_subset": {role: dict(sorted(Counter(t.meta["subset"] for t in ts).items()))
                                 for role, ts in self.items()},
            "fingerprints": {role: triples_fingerprint(ts) for role, ts in self.items()},
            "alpaca_eval_contamination": self.contamination,
            "load": self.report.summary(),
        }


def hh_rlhf_roles(data_dir: str | Path, seed: int = 0, val_fraction: float = 0.15,
                  alpaca_eval_dir: str | Path | None = None, allow_empty: bool = True) -> DataRoles:
    """Build the fixed HH-RLHF data roles of SPLITS.md.

    `data_dir` is the shared data root (holding ``hh-rlhf/`` and ``alpaca-eval/``) or the ``hh-rlhf``
    folder itself. Identical pairs are dropped (counted in ``summary()["load"]``); empty responses
    are real crowdworker preferences (e.g. silence preferred in harmless-base, 11 in all) and are
    kept with a warning unless `allow_empty` is False; any other bad record is an error. Dialogues whose first Human turn is an AlpacaEval
    ``helpful_base`` instruction are removed from the test and, should any occur there, the fit pool.
    """
    root = Path(data_dir)
    hh = root / "hh-rlhf" if (root / "hh-rlhf").is_dir() else root
    missing = [f"{s}/test.jsonl.gz" for s in HH_SUBSETS if not (hh / s / "test.jsonl.gz").is_file()]
    if missing:
        raise FileNotFoundError(f"{root}: not an HH-RLHF data directory (no {', '.join(missing)}); "
                                "data roles need the shared data root or its hh-rlhf folder")
    alpaca_dir = Path(alpaca_eval_dir) if alpaca_eval_dir else hh.parent / "alpaca-eval"
    report = LoadReport()
    loaded = {s: load_preferences(hh / s / "test.jsonl.gz", subset=s, allow_empty=allow_empty, report=report)
              for s in HH_SUBSETS}
    instructions = alpaca_eval_instructions(alpaca_dir)

    def decontaminate(triples: list[PreferenceTriple]) -> tuple[list[PreferenceTriple], set[str]]:
        hits = {first_user_turn(t) for t in triples} & instructions
        return [t for t in triples if first_user_turn(t) not in hits], hits

    pool_size = sum(len(loaded[s]) for s in FIT_SUBSETS)
    pool, pool_hits = decontaminate([t for s in FIT_SUBSETS for t in loaded[s]])
    test_helpful, test_hits = decontaminate(loaded["helpful-base"])
    fit, val = split_validation(pool, val_fraction, seed)
    contamination = {
        "instructions": len(instructions),
        "instructions_matched": len(test_hits | pool_hits),
        "removed_test_helpful": len(loaded["helpful-base"]) - len(test_helpful),
        "removed_fit_pool": pool_size - len(pool),
    }
    if contamination["removed_fit_pool"]:
        log.warning("removed %d AlpacaEval dialogue(s) from the fit pool", contamination["removed_fit_pool"])
    harmless_test = split_harmless(loaded["harmless-base"], seed)["test_harmless"]
    roles = dict(zip(DATA_ROLES, (fit, val, test_helpful, harmless_test)))
    return DataRoles(roles, seed, val_fraction, report, contamination)


def harmless_roles(data_dir: str | Path, seed: int = 0, allow_empty: bool = True) -> dict[str, list[PreferenceTriple]]:
    """SPLITS.md's harmless-fit / -validation / test parts of harmless-base, plus `harmless_all` (the whole)."""
    root = Path(data_dir)
    path = (root / "hh-rlhf" if (root / "hh-rlhf").is_dir() else root) / "harmless-base" / "test.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{root}: no harmless-base/test.jsonl.gz; harmless roles need the shared data root")
    triples = load_preferences(path, subset="harmless-base", allow_empty=allow_empty)
    return {**split_harmless(triples, seed), "harmless_all": triples}


def split_harmless(triples: list[PreferenceTriple], seed: int = 0) -> dict[str, list[PreferenceTriple]]:
    """A seeded draw over harmless-base dialogues into HARMLESS_ROLES (each part in file order), so harmful
    prompts can be fitted and tuned on without touching test."""
    order = list(range(len(triples)))
    random.Random(f"harmless/{seed}").shuffle(order)
    n_fit = math.floor(HARMLESS_FRACTIONS[0] * len(order) + 0.5)
    n_val = math.floor(HARMLESS_FRACTIONS[1] * len(order) + 0.5)
    parts = (order[:n_fit], order[n_fit:n_fit + n_val], order[n_fit + n_val:])
    return {role: [triples[i] for i in sorted(part)] for role, part in zip(HARMLESS_ROLES, parts)}


def select_triples(data: str | Path, role: str | None = None, n: int | None = None, seed: int = 0,
                   split_seed: int = 0, allow_empty: bool = True) -> list[PreferenceTriple]:
    """Triples from a file / HF dataset, or one role of an HH-RLHF directory (split with `split_seed`,
    the protocol's 0 by default, independent of `seed`), optionally a seeded nested draw of `n`.

    Every route applies the same record rules, `allow_empty` included: its default keeps empty
    responses (with a warning) because the protocol keeps the real ones in HH-RLHF.
    """
    path = local_path(data)
    if role is None and not (path is not None and path.is_dir()):
        triples = load_preferences(data, allow_empty=allow_empty)
    else:
        if path is None:
            raise FileNotFoundError(f"no such file or directory: {data} (a data role needs an HH-RLHF directory)")
        known = list(dict.fromkeys(DATA_ROLES + HARMLESS_ROLES + LEGACY_ROLES))
        if role not in known:  # checked before the whole split is loaded
            raise ValueError(f"{data} is an HH-RLHF directory: pass a role, one of {known}, got {role!r}")
        if role in HARMLESS_ROLES + LEGACY_ROLES:
            triples = harmless_roles(path, seed=split_seed, allow_empty=allow_empty)[role]
        else:
            triples = list(hh_rlhf_roles(path, seed=split_seed, allow_empty=allow_empty)[role])
        if not triples:
            raise ValueError(f"no preference triples in role {role!r} of {data}")
    return restrict(triples, n, seed=seed) if n is not None and n < len(triples) else triples
