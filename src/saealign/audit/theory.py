"""Synthetic checks of DSPA's theory (METHOD.md, "Theory"), so a claim about the map is tested on data
where the truth is known, through the map's own accumulator.

Prompts. A prompt has one of T types (probabilities `weights`); type t fires gate k on each of the
prompt's L tokens with probability G[t, k], so g(x) = Binomial(L, G[t]) / L is a token density like
DSPA's and the co-activation is known exactly:
`M = E[g g^T] = sum_t w_t (G_t G_t^T + diag(G_t (1 - G_t)) / L)`.
Responses. `delta | x ~ N(c Sigma B g(x), noise^2 Sigma)`: additive gating `w(x) = c B g(x)` with
per-gate templates B (m_out, m_in) and a shared covariance Sigma.
Theory. `A^T -> c Sigma B M`; where M is invertible `Sigma^{-1} A^T M^{-1} = c B`; the relative error
of row k falls like `1/sqrt(N p_k)`; under a utility linear in the latents, `U_x(f) = w(x)^T f` (the
log-likelihood ratio of the Gaussian model), small ablations of the top-k latents by score gain most.

The map is accumulated by `SparseSum.add_outer` and read by `DSPAMap.matrix`, the code every fit uses.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from saealign.dspa.map import DSPAMap, FitOptions, MapMetadata, SparseSum
from saealign.dspa.steer import edit_latents, select_latents


@dataclass
class GateModel:
    """Prompt types and their per-token gate probabilities (see the module docstring)."""

    types: np.ndarray  # (T, m_in)
    weights: np.ndarray  # (T,)
    tokens: int = 16

    @classmethod
    def independent(cls, on: np.ndarray, fire: float = 0.5, tokens: int = 16) -> "GateModel":
        """Gate k is on in a prompt with probability on[k], independently; an on gate fires on each token with
        probability `fire`. Written as a mixture over all 2^m on/off patterns, so M stays exact."""
        patterns = np.array(list(itertools.product([0, 1], repeat=len(on))), dtype=float)
        weights = np.prod(np.where(patterns == 1, on, 1 - on), axis=1)
        return cls(patterns * fire, weights, tokens)

    @property
    def m_in(self) -> int:
        return self.types.shape[1]

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        kinds = rng.choice(len(self.weights), size=n, p=self.weights / self.weights.sum())
        return rng.binomial(self.tokens, self.types[kinds]) / self.tokens

    def co_activation(self) -> np.ndarray:
        """M = E[g g^T], exactly."""
        g, w, L = self.types, self.weights / self.weights.sum(), self.tokens
        return (g.T * w) @ g + np.diag(w @ (g * (1 - g))) / L

    def frequency(self) -> np.ndarray:
        """p_k = P(g_k > 0): the share of prompts where gate k fires on at least one token."""
        return (self.weights / self.weights.sum()) @ (1 - (1 - self.types) ** self.tokens)


@dataclass
class ResponseModel:
    """`delta | x ~ N(c Sigma B g(x), noise^2 Sigma)`."""

    templates: np.ndarray  # B, (m_out, m_in)
    sigma: np.ndarray  # (m_out, m_out), positive definite
    c: float = 1.0
    noise: float = 1.0

    @classmethod
    def random(cls, m_in: int, m_out: int, rng: np.random.Generator, c: float = 1.0, noise: float = 1.0) -> "ResponseModel":
        q, _ = np.linalg.qr(rng.standard_normal((m_out, m_out)))
        sigma = (q * np.linspace(0.5, 2.0, m_out)) @ q.T
        return cls(rng.standard_normal((m_out, m_in)), sigma, c, noise)

    @classmethod
    def isotropic(cls, m_in: int, m_out: int, rng: np.random.Generator, noise: float = 2.0) -> "ResponseModel":
        """Orthonormal templates, Sigma = I, noise-dominated: every gate's row has the same constant in front
        of 1/sqrt(N p_k), so the rare-gate check compares frequencies and nothing else."""
        q, _ = np.linalg.qr(rng.standard_normal((m_out, m_in)))
        return cls(q, np.eye(m_out), 1.0, noise)

    def weights(self, g: np.ndarray) -> np.ndarray:
        """w(x) = c B g(x), per row of g: the linear utility's weights for each prompt."""
        return self.c * g @ self.templates.T

    def sample(self, g: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        chol = np.linalg.cholesky(self.sigma)
        noise = self.noise * rng.standard_normal((len(g), len(self.sigma))) @ chol.T
        return self.weights(g) @ self.sigma + noise

    def limit(self, co_activation: np.ndarray) -> np.ndarray:
        """The theory's A^T = c Sigma B M, (m_out, m_in)."""
        return self.c * self.sigma @ self.templates @ co_activation


def accumulate_map(g: np.ndarray, delta: np.ndarray, batch: int = 4096) -> np.ndarray:
    """A (m_in, m_out) from (g, delta) pairs through the fit's own accumulator and the map's own read-out."""
    a_sum = SparseSum(g.shape[1], delta.shape[1])
    for start in range(0, len(g), batch):
        a_sum.add_outer(torch.from_numpy(g[start:start + batch]), torch.from_numpy(delta[start:start + batch]))
    meta = MapMetadata(model="synthetic", l_in=0, l_out=1, sae_in={}, sae_out={}, m_in=g.shape[1], m_out=delta.shape[1],
                       options=FitOptions(), data_fingerprint="synthetic")
    dspa_map = DSPAMap(a_sum, torch.from_numpy(g.sum(0)), len(g), meta)
    return dspa_map.matrix().double().numpy()


def relative_error(estimate: np.ndarray, truth: np.ndarray, axis: int | None = None) -> np.ndarray:
    return np.linalg.norm(estimate - truth, axis=axis) / np.linalg.norm(truth, axis=axis)


def convergence(gates: GateModel, responses: ResponseModel, sizes: list[int], seeds: int) -> dict:
    """Relative error of A^T against c Sigma B M by N (mean over seeds), and the log-log slope."""
    truth = responses.limit(gates.co_activation())
    errors = []
    for n in sizes:
        per_seed = []
        for seed in range(seeds):
            rng = np.random.default_rng([n, seed])
            g = gates.sample(n, rng)
            per_seed.append(float(relative_error(accumulate_map(g, responses.sample(g, rng)).T, truth)))
        errors.append(float(np.mean(per_seed)))
    slope = float(np.polyfit(np.log(sizes), np.log(errors), 1)[0])
    return {"sizes": sizes, "relative_error": errors, "slope": slope, "seeds": seeds}


def demixing(gates: GateModel, responses: ResponseModel, n: int, seed: int = 0) -> dict:
    """Per gate, the cosine between column k of Sigma^{-1} A^T M^{-1} and template B_k (M exact, Sigma known)."""
    rng = np.random.default_rng(seed)
    g = gates.sample(n, rng)
    a_t = accumulate_map(g, responses.sample(g, rng)).T
    m = gates.co_activation()
    recovered = np.linalg.solve(responses.sigma, a_t) @ np.linalg.inv(m)
    b = responses.templates
    cosines = (recovered * b).sum(0) / (np.linalg.norm(recovered, axis=0) * np.linalg.norm(b, axis=0))
    mixed = (a_t * b).sum(0) / (np.linalg.norm(a_t, axis=0) * np.linalg.norm(b, axis=0))
    return {"n": n, "cosine_demixed": cosines.tolist(), "cosine_raw_rows": mixed.tolist(),
            "condition_number_M": float(np.linalg.cond(m))}


def rare_gates(gates: GateModel, responses: ResponseModel, n: int, seeds: int) -> dict:
    """Relative error of each row of A (mean over seeds), next to the gate's frequency p_k."""
    truth = responses.limit(gates.co_activation()).T  # (m_in, m_out): row k belongs to gate k
    errors = np.zeros(gates.m_in)
    for seed in range(seeds):
        rng = np.random.default_rng([n, seed, 1])
        g = gates.sample(n, rng)
        errors += relative_error(accumulate_map(g, responses.sample(g, rng)), truth, axis=1) / seeds
    return {"n": n, "frequency": gates.frequency().tolist(), "row_relative_error": errors.tolist(), "seeds": seeds}


def _saturating(f: np.ndarray, level: float) -> np.ndarray:
    return level * np.tanh(f / level)


def ablation_gains(gates: GateModel, responses: ResponseModel, a: np.ndarray, alphas: list[float], k: int,
                   n_prompts: int = 2000, saturation: float | None = None, seed: int = 0) -> dict:
    """Mean utility gain of ablating k latents chosen by DSPA's score (s = A^T g), at random, by activation
    magnitude, or by the true weights (oracle), with DSPA's own edit rule on one token per prompt.

    Utility: U_x(f) = w(x)^T f, or w(x)^T (t tanh(f / t)) with `saturation` t (a utility the linear model
    misdescribes: large activations count less). Token activations: exponential, half of the latents active."""
    rng = np.random.default_rng(seed)
    g = gates.sample(n_prompts, rng)
    w = responses.weights(g)
    m_out = w.shape[1]
    f = torch.from_numpy(rng.exponential(1.0, (n_prompts, m_out)) * (rng.random((n_prompts, m_out)) < 0.5))
    scores = torch.from_numpy(g @ a)  # k_prompt covers every gate here, so TopK(g) = g
    by = {"score": select_latents(scores, k, "ablate")[0],
          "oracle": select_latents(torch.from_numpy(w), k, "ablate")[0],
          "magnitude": torch.zeros_like(f, dtype=torch.bool).scatter_(1, f.topk(k, dim=1).indices, True),
          "random": torch.zeros_like(f, dtype=torch.bool).scatter_(
              1, torch.from_numpy(np.argsort(rng.random((n_prompts, m_out)), axis=1)[:, :k]), True)}

    def utility(acts: torch.Tensor) -> np.ndarray:
        values = acts.numpy() if saturation is None else _saturating(acts.numpy(), saturation)
        return (w * values).sum(1)

    gains: dict[str, list[float]] = {name: [] for name in by}
    for alpha in alphas:
        for name, minus in by.items():
            edited = edit_latents(f, minus, torch.zeros_like(minus), alpha)
            gains[name].append(float(np.mean(utility(edited) - utility(f))))
    return {"alphas": alphas, "k": k, "saturation": saturation, "mean_gain": gains}


RARE_GATE_FREQUENCIES = (0.5, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.02)


@dataclass
class ReferenceSetup:
    gates: GateModel  # co-active gates, M invertible
    responses: ResponseModel  # random templates and covariance
    independent_gates: GateModel  # independent gates of very unequal frequency (RARE_GATE_FREQUENCIES)
    isotropic_responses: ResponseModel  # for the rare-gate check


def reference_setup(seed: int = 0, m_in: int = 8, m_out: int = 24, kinds: int = 12) -> ReferenceSetup:
    """The setting the tests and the benchmark share (`kinds` sparse prompt types)."""
    rng = np.random.default_rng(seed)
    types = rng.random((kinds, m_in)) * (rng.random((kinds, m_in)) < 0.5)
    gates = GateModel(types, rng.random(kinds) + 0.2)
    return ReferenceSetup(gates, ResponseModel.random(m_in, m_out, rng), GateModel.independent(np.array(RARE_GATE_FREQUENCIES)),
                          ResponseModel.isotropic(m_in, m_out, rng))
