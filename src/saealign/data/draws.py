"""Seeded draws, all kept in original order: uniform (`select_subset`; nested: `restrict`, `in_draw_order`)
and stratified (`stratified_subset` by any key; nested within groups: `sample`, `split_validation` by a
triple's meta field). String seeds keep every stream stable across processes and Python versions.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from typing import Callable, Sequence, TypeVar

from saealign.data.formats import PreferenceTriple

T = TypeVar("T")


def _groups(triples: Sequence[PreferenceTriple], key: str) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, t in enumerate(triples):
        groups[str(t.meta.get(key))].append(i)
    return dict(sorted(groups.items()))


def _stratified(triples: Sequence[PreferenceTriple], sizes: dict[str, int], seed: int, key: str) -> list[int]:
    """Indices: `sizes[g]` drawn from each group g with a per-group seeded shuffle, in original order."""
    picked: list[int] = []
    for group, members in _groups(triples, key).items():
        order = list(members)
        random.Random(f"{seed}/{group}").shuffle(order)  # str seeds are stable across processes
        picked.extend(order[:sizes[group]])
    return sorted(picked)


def split_validation(triples: Sequence[PreferenceTriple], fraction: float = 0.15, seed: int = 0,
                     key: str = "subset") -> tuple[list[PreferenceTriple], list[PreferenceTriple]]:
    """`(fit, validation)`: a seeded `fraction` of each `meta[key]` group (rounded half up) is validation."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    sizes = {g: math.floor(fraction * len(m) + 0.5) for g, m in _groups(triples, key).items()}
    val = set(_stratified(triples, sizes, seed, key))
    return [t for i, t in enumerate(triples) if i not in val], [triples[i] for i in sorted(val)]


def restrict(triples: Sequence[PreferenceTriple], n: int, seed: int = 0) -> list[PreferenceTriple]:
    """Draw `n` triples uniformly with a seed, in original order.

    Draws are nested: with the same seed, ``restrict(x, n)`` is a subset of ``restrict(x, m)`` for
    n <= m, so an N-restriction sweep adds data rather than resampling it.
    """
    if not 0 <= n <= len(triples):
        raise ValueError(f"cannot draw {n} of {len(triples)} triples")
    return [triples[i] for i in sorted(_draw_order(len(triples), seed)[:n])]


def _draw_order(size: int, seed: int) -> list[int]:
    order = list(range(size))
    random.Random(f"restrict/{seed}").shuffle(order)
    return order


def in_draw_order(triples: Sequence[PreferenceTriple], seed: int = 0) -> list[PreferenceTriple]:
    """All triples ordered so that the first n are exactly the set ``restrict(triples, n, seed)``:
    one pass over this order yields every nested N-restriction as a prefix."""
    return [triples[i] for i in _draw_order(len(triples), seed)]


def sample(triples: Sequence[PreferenceTriple], n: int | None, seed: int = 0,
           key: str = "subset") -> list[PreferenceTriple]:
    """Draw `n` triples stratified by `meta[key]` (proportional, largest remainder), in original order
    (all of them when `n` is None). Nested within each group: a per-group seeded shuffle is cut."""
    if n is None:
        return list(triples)
    if not 0 <= n <= len(triples):
        raise ValueError(f"cannot draw {n} of {len(triples)} triples")
    groups = _groups(triples, key)
    return [triples[i] for i in _stratified(triples, _quotas(groups, n), seed, key)]


def _quotas(groups: dict[str, list[int]], n: int) -> dict[str, int]:
    """`n` shared out over the groups in proportion to their sizes, remainders to the largest fractions."""
    total = sum(len(m) for m in groups.values())
    exact = {g: n * len(m) / total for g, m in groups.items()}
    sizes = {g: int(q) for g, q in exact.items()}
    for g in sorted(groups, key=lambda g: (-(exact[g] - sizes[g]), g))[:n - sum(sizes.values())]:
        sizes[g] += 1
    return sizes


def select_subset(items: Sequence[T], limit: int | None, seed: int | str = 0) -> list[T]:
    """A seeded uniform subset of `limit` items kept in their original order (all items when `limit` is
    None or not smaller). Benchmarks are ordered by category or source, so the first N would test one only."""
    if limit is None or limit >= len(items):
        return list(items)
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


def stratified_subset(items: Sequence[T], limit: int, key: Callable[[T], str], seed: int = 0) -> list[T]:
    """`limit` items drawn per stratum `key(item)` in proportion to its size (largest remainder), seeded,
    in original order; one random stream visits the strata in sorted order."""
    if limit >= len(items):
        return list(items)
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    strata: dict[str, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        strata[key(item)].append(index)
    quota = _quotas(dict(sorted(strata.items())), limit)
    rng = random.Random(seed)
    keep = [i for name in sorted(strata) for i in rng.sample(strata[name], quota[name])]
    return [items[i] for i in sorted(keep)]
