"""Estimates and their intervals: the one statistics module every evaluator uses, so that numbers from
different harnesses (DSPA's `eval pref`, FPO's `fpo eval`, multiple choice, MT-Bench, ...) compare.

The rules:
- **Interval**: a 95 % percentile bootstrap over the sampled units (triples, prompts, questions,
  instructions, items): `n_boot` resamples (default `N_BOOT`) drawn from `numpy.random.default_rng(seed)`
  (default 0), so a rerun gives the same interval. Percentile rather than normal: a rate near 0 or 1 or
  a skewed margin gets an interval inside its range without a special case. Under 2 units there is no
  interval.
- **Standard error**, shown beside the interval: of a mean, the sample standard deviation (ddof 1) of
  the unit values over sqrt(n) (lm-eval's `stderr`; for several values per unit, of the per-unit
  means); of any other statistic, the standard deviation of its bootstrap replicates.
- **Ties**: in every accuracy-type metric (the share of units where `a > b`) a tie counts one half
  (`wins`). A method that changes nothing then scores 50 %, the no-effect point, not 0 %.
- **Paired difference** of two methods on the same units: the mean per-unit difference, with the same
  bootstrap over those differences (`paired_difference`); it is far narrower than the two intervals
  suggest when the methods agree on most units.
- **Unpaired difference** (estimates from different units, or without per-unit values): the
  difference of the values with sqrt(se_a^2 + se_b^2) and no interval (`unpaired_difference`).

An `Estimate` without an interval is a descriptive figure (an SAE's pooled FVU, a perplexity, a count).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

N_BOOT = 2000
LEVEL = 0.95
_CHUNK = 1 << 22  # resampled indices held at once (the draws are the same as in one block)


@dataclass(frozen=True)
class Estimate:
    """A value with its 95 % interval, standard error and number of units (each None when not known)."""

    value: float | None
    ci95: tuple[float, float] | None = None
    se: float | None = None
    n: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "ci95": None if self.ci95 is None else list(self.ci95), "se": self.se, "n": self.n}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Estimate":
        ci = data.get("ci95")
        return cls(data["value"], None if ci is None else (float(ci[0]), float(ci[1])), data.get("se"), data.get("n"))


def wins(a: np.ndarray, b: np.ndarray, atol: float = 0.0) -> np.ndarray:
    """Per unit: 1 where `a > b`, 0.5 where they tie (within `atol`), 0 otherwise (the tie rule)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    tie = np.abs(a - b) <= atol
    return np.where(tie, 0.5, (a > b).astype(np.float64))


def standard_error(values: Sequence[float] | np.ndarray) -> float | None:
    """Sample standard deviation (ddof 1) over sqrt(n); None under 2 values."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.std(ddof=1) / np.sqrt(arr.size)) if arr.size > 1 else None


def _percentile_interval(replicates: np.ndarray) -> tuple[float, float]:
    lo, hi = np.quantile(replicates, [(1 - LEVEL) / 2, 1 - (1 - LEVEL) / 2])
    return float(lo), float(hi)


def _resampled_means(sums: np.ndarray, counts: np.ndarray | None, n_boot: int, seed: int) -> np.ndarray:
    """Bootstrap replicates of sum(sums[idx]) / sum(counts[idx]) (of the plain mean when `counts` is None)."""
    rng = np.random.default_rng(seed)
    n = sums.size
    rows = max(1, _CHUNK // n)
    out = np.empty(n_boot)
    for start in range(0, n_boot, rows):
        idx = rng.integers(0, n, size=(min(rows, n_boot - start), n))
        out[start:start + len(idx)] = (sums[idx].mean(1) if counts is None
                                       else sums[idx].sum(1) / counts[idx].sum(1))
    return out


def mean_estimate(values: Sequence[float] | np.ndarray, n_boot: int = N_BOOT, seed: int = 0,
                  units: Sequence[Any] | None = None) -> Estimate:
    """Mean of `values` with its bootstrap interval. `units` (one label per value) makes the resampled
    unit a group of values, e.g. a question judged on two turns; the mean stays the mean of all values."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return Estimate(None, n=0)
    if units is None:
        sums, counts = arr, None
    else:
        _, group = np.unique(np.asarray(units, dtype=object).astype(str), return_inverse=True)
        sums, counts = np.bincount(group, arr), np.bincount(group).astype(np.float64)
    n = sums.size
    if n < 2:
        return Estimate(float(arr.mean()), n=n)
    replicates = _resampled_means(sums, counts, n_boot, seed)
    se = standard_error(sums if counts is None else sums / counts)
    return Estimate(float(arr.mean()), _percentile_interval(replicates), se, n)


def ratio_estimate(numerators: Sequence[float] | np.ndarray, denominators: Sequence[float] | np.ndarray,
                   n_boot: int = N_BOOT, seed: int = 0) -> Estimate:
    """sum(numerators) / sum(denominators) over units (e.g. one category's share of the edit mass over
    prompts) with the bootstrap interval of resampled units; replicates with a zero denominator are left out."""
    num, den = np.asarray(numerators, dtype=np.float64), np.asarray(denominators, dtype=np.float64)
    total = den.sum()
    value = float(num.sum() / total) if total > 0 else None
    if num.size < 2 or value is None:
        return Estimate(value, n=int(num.size))
    with np.errstate(invalid="ignore", divide="ignore"):
        replicates = _resampled_means(num, den, n_boot, seed)
    replicates = replicates[np.isfinite(replicates)]
    return Estimate(value, _percentile_interval(replicates), float(replicates.std(ddof=1)), int(num.size))


def paired_difference(values: Sequence[float] | np.ndarray, baseline: Sequence[float] | np.ndarray,
                      n_boot: int = N_BOOT, seed: int = 0) -> Estimate:
    """Mean of per-unit differences `values - baseline` (same units, same order) with its bootstrap interval."""
    return mean_estimate(np.asarray(values, dtype=np.float64) - np.asarray(baseline, dtype=np.float64), n_boot, seed)


def bootstrap_estimate(statistic: Callable[[np.ndarray], float], n_units: int, n_boot: int = N_BOOT,
                       seed: int = 0) -> Estimate:
    """Any statistic of the units (`statistic(indices)`, e.g. a fitted model's parameter), its value on
    all units and its bootstrap interval; the standard error is the spread of the replicates."""
    value = float(statistic(np.arange(n_units)))
    if n_units < 2:
        return Estimate(value, n=n_units)
    rng = np.random.default_rng(seed)
    replicates = np.array([statistic(rng.integers(0, n_units, size=n_units)) for _ in range(n_boot)])
    return Estimate(value, _percentile_interval(replicates), float(replicates.std(ddof=1)), n_units)


def unpaired_difference(a: Estimate, b: Estimate) -> Estimate:
    """`a - b` for estimates on different units: sqrt(se_a^2 + se_b^2), no interval (see the module docstring)."""
    se = None if a.se is None or b.se is None else float(np.hypot(a.se, b.se))
    return Estimate(a.value - b.value, se=se)

