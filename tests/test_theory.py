"""DSPA's theory on synthetic data drawn from its assumptions, through the map's own accumulator
(`SparseSum.add_outer` + `DSPAMap.matrix`): convergence rate, de-mixing, rare gates, top-k ablation."""

import numpy as np
import pytest

from saealign.audit.theory import (RARE_GATE_FREQUENCIES, ablation_gains, accumulate_map, convergence, demixing,
                                   rare_gates, reference_setup)


@pytest.fixture(scope="module")
def setup():
    return reference_setup(seed=0)


def test_accumulator_is_the_plain_mean_of_outer_products(setup):
    gates, responses = setup.gates, setup.responses
    rng = np.random.default_rng(5)
    g = gates.sample(3000, rng)
    delta = responses.sample(g, rng)
    np.testing.assert_allclose(accumulate_map(g, delta, batch=700), g.T @ delta / len(g), rtol=1e-5, atol=1e-6)


def test_map_converges_to_c_sigma_b_m_at_one_over_sqrt_n(setup):
    gates, responses = setup.gates, setup.responses
    result = convergence(gates, responses, [250, 1000, 4000, 16000], seeds=4)
    assert -0.65 <= result["slope"] <= -0.35, result
    assert result["relative_error"][-1] < 0.05


def test_demixing_recovers_the_templates(setup):
    gates, responses = setup.gates, setup.responses
    result = demixing(gates, responses, n=64000)
    assert min(result["cosine_demixed"]) > 0.95, result
    assert min(result["cosine_demixed"]) > max(result["cosine_raw_rows"]), "the raw rows should be mixed"


def test_rare_gate_rows_err_like_one_over_sqrt_n_p(setup):
    result = rare_gates(setup.independent_gates, setup.isotropic_responses, n=8000, seeds=6)
    errors, p = np.array(result["row_relative_error"]), np.array(result["frequency"])
    rare, common = int(np.argmin(RARE_GATE_FREQUENCIES)), int(np.argmax(RARE_GATE_FREQUENCIES))
    measured, predicted = errors[rare] / errors[common], np.sqrt(p[common] / p[rare])
    assert predicted / 1.5 < measured < predicted * 1.5, (measured, predicted)


def test_top_k_by_score_beats_random_and_magnitude_for_small_linear_ablations(setup):
    gates, responses = setup.gates, setup.responses
    rng = np.random.default_rng(7)
    g = gates.sample(8000, rng)
    a = accumulate_map(g, responses.sample(g, rng))
    gains = ablation_gains(gates, responses, a, alphas=[0.02, 0.1], k=4)["mean_gain"]
    for i in range(2):
        assert gains["score"][i] > gains["random"][i] and gains["score"][i] > gains["magnitude"][i], gains
