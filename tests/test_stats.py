"""`saealign.stats`: the one tie rule, interval rule and paired difference every evaluator uses."""

import math

import numpy as np
import pytest

from saealign.stats import (Estimate, bootstrap_estimate, mean_estimate, paired_difference, standard_error,
                            unpaired_difference, wins)


def test_ties_count_one_half_by_hand():
    assert wins([2.0, 1.0, 3.0, 0.0], [1.0, 1.0, 3.0, 5.0]).tolist() == [1.0, 0.5, 0.5, 0.0]
    assert wins([1.0 + 1e-12], [1.0], atol=1e-9).tolist() == [0.5]
    # an unchanged method (every pair tied) sits at the no-effect point
    assert mean_estimate(wins(np.zeros(10), np.zeros(10))).value == 0.5


def test_interval_contains_the_value_and_narrows_with_n():
    rng = np.random.default_rng(1)
    widths = []
    for n in (50, 200, 800):
        values = (rng.random(n) < 0.6).astype(float)
        e = mean_estimate(values)
        assert e.ci95[0] < e.value < e.ci95[1] and e.n == n
        assert e.se == pytest.approx(values.std(ddof=1) / math.sqrt(n))
        widths.append(e.ci95[1] - e.ci95[0])
    assert widths[0] > widths[1] > widths[2]
    assert widths[2] == pytest.approx(2 * 1.96 * e.se, rel=0.15)  # close to the normal one at this n


def test_deterministic_under_a_seed():
    values = np.random.default_rng(2).normal(size=300)
    assert mean_estimate(values, seed=3) == mean_estimate(values, seed=3)
    assert mean_estimate(values, seed=3).ci95 != mean_estimate(values, seed=4).ci95
    stat = lambda idx: float(np.median(values[idx]))  # noqa: E731
    assert bootstrap_estimate(stat, 300, n_boot=200, seed=5) == bootstrap_estimate(stat, 300, n_boot=200, seed=5)


def test_large_inputs_are_resampled_in_chunks_with_the_same_draws():
    values = np.random.default_rng(3).random(5000)
    rng = np.random.default_rng(0)
    means = values[rng.integers(0, 5000, size=(1000, 5000))].mean(1)  # 5e6 indices > one chunk
    lo, hi = np.quantile(means, [0.025, 0.975])
    assert mean_estimate(values, n_boot=1000).ci95 == pytest.approx((lo, hi))


def test_paired_difference_sign_and_width():
    rng = np.random.default_rng(4)
    base = rng.normal(size=400) * 10  # a large spread shared by both methods
    better = base + 0.5 + rng.normal(size=400) * 0.1
    d = paired_difference(better, base)
    assert d.value == pytest.approx(0.5, abs=0.02) and d.ci95[0] > 0
    assert paired_difference(base, better).ci95[1] < 0
    unpaired = unpaired_difference(mean_estimate(better), mean_estimate(base))
    assert unpaired.value == pytest.approx(d.value) and unpaired.ci95 is None and unpaired.se > 20 * d.se


def test_units_resample_groups_and_keep_the_pooled_mean():
    values = [8, 6, 4, 2, 3]
    units = [1, 1, 2, 3, 3]  # question 2 lost one judgment
    e = mean_estimate(values, units=units)
    assert e.value == pytest.approx(23 / 5) and e.n == 3
    assert e.se == pytest.approx(standard_error([7, 4, 2.5]))
    assert 2.5 <= e.ci95[0] < e.value < e.ci95[1] <= 7


def test_degenerate_inputs():
    assert mean_estimate([]) == Estimate(None, n=0)
    assert mean_estimate([0.7]) == Estimate(0.7, n=1)  # one unit: no interval, no standard error
    assert mean_estimate([1.0, 1.0, 1.0]).ci95 == (1.0, 1.0)
    assert standard_error([1.0]) is None


def test_estimate_json_round_trip():
    e = Estimate(0.6, (0.5, 0.7), 0.05, 100)
    assert Estimate.from_json(e.to_json()) == e and e.to_json()["ci95"] == [0.5, 0.7]
    assert Estimate.from_json(Estimate(3.0).to_json()) == Estimate(3.0)


def test_ratio_estimate_is_a_ratio_of_sums_over_resampled_units():
    from saealign.stats import ratio_estimate

    est = ratio_estimate([1.0, 0.0, 3.0, 2.0], [2.0, 2.0, 4.0, 2.0], n_boot=500, seed=0)
    assert est.value == pytest.approx(6.0 / 10.0)  # not the mean of the per-unit ratios (0.5625)
    assert est.ci95[0] < est.value < est.ci95[1] and est.n == 4
    assert ratio_estimate([0.0, 0.0], [0.0, 0.0]).value is None
