"""Evaluation metrics against analytic values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffalign.eval.metrics import (
    D4RL_REF_SCORES,
    candidate_entropy,
    coherency_planner,
    coherency_policy,
    normalized_score,
    reference_scores,
    return_stats,
    success_rate,
)


# ---------------------------------------------------------------------- returns and scores
def test_return_stats():
    stats = return_stats([1.0, 2.0, 3.0, 6.0])
    assert stats == {"return_mean": 3.0, "return_std": pytest.approx(math.sqrt(3.5))}
    assert return_stats(torch.tensor([5.0]))["return_std"] == 0.0
    with pytest.raises(ValueError):
        return_stats([])


def test_normalized_score_endpoints_and_arrays():
    lo, hi = D4RL_REF_SCORES["hopper"]
    assert (lo, hi) == (-20.272305, 3234.3)
    assert normalized_score(hi, lo, hi) == pytest.approx(100.0)
    assert normalized_score(lo, lo, hi) == pytest.approx(0.0)
    assert normalized_score((lo + hi) / 2, lo, hi) == pytest.approx(50.0)
    arr = normalized_score(np.array([0.0, 2.0, 4.0]), 0.0, 4.0)
    np.testing.assert_allclose(arr, [0.0, 50.0, 100.0])
    with pytest.raises(ValueError, match="differ"):
        normalized_score(1.0, 2.0, 2.0)


def test_reference_scores_lookup():
    assert D4RL_REF_SCORES["halfcheetah"] == (-280.178953, 12135.0)
    assert D4RL_REF_SCORES["walker2d"] == (1.629008, 4592.3)
    assert D4RL_REF_SCORES["kitchen"] == (0.0, 4.0)
    assert D4RL_REF_SCORES["antmaze"] == (0.0, 1.0)
    assert reference_scores("hopper-medium-v2") == D4RL_REF_SCORES["hopper"]
    assert reference_scores("mujoco/halfcheetah/expert-v0") == D4RL_REF_SCORES["halfcheetah"]
    assert reference_scores("HalfCheetah-v4") == D4RL_REF_SCORES["halfcheetah"]
    assert reference_scores("Walker2d-v4") == D4RL_REF_SCORES["walker2d"]
    assert reference_scores("kitchen-mixed-v0") == (0.0, 4.0)
    assert reference_scores("antmaze-umaze-v2") == (0.0, 1.0)
    # a dataset's own constants win over the name
    meta = {"env_id": "Hopper-v4", "ref_min_score": -5.0, "ref_max_score": 7.0}
    assert reference_scores(meta) == (-5.0, 7.0)
    assert reference_scores({"env_id": "Hopper-v4"}) == D4RL_REF_SCORES["hopper"]
    assert reference_scores({"env_id": "x", "dataset_id": "D4RL/antmaze/umaze-v1"}) == (0.0, 1.0)
    with pytest.raises(KeyError, match="Nav1D"):
        reference_scores("diffalign/Nav1D-v0")
    with pytest.raises(KeyError, match="ref_min_score"):
        reference_scores({"env_id": "diffalign/Nav1D-v0"})


def test_success_rate_forms():
    assert success_rate([True, False, True, True]) == 0.75
    assert success_rate(np.array([1, 0])) == 0.5
    infos = [{"success": 1.0}, {"success": 0.0}, {"is_success": True}]
    assert success_rate(infos) == pytest.approx(2 / 3)
    # per-step flags: an episode succeeds if any step does
    steps = np.array([[0, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    assert success_rate(steps) == pytest.approx(2 / 3)
    per_step_infos = [[{"success": False}, {"success": True}], [{"success": False}]]
    assert success_rate(per_step_infos) == 0.5
    assert success_rate(torch.tensor([True, True])) == 1.0
    with pytest.raises(KeyError, match="success"):
        success_rate([{"reward": 1.0}])
    with pytest.raises(ValueError):
        success_rate([])


# ---------------------------------------------------------------------- coherency
DELTA = 0.1


def nav1d_step(s, a):
    """Nav1D dynamics on a 1-D state: x' = clip(x + δ·clip(a), -1, 1)."""
    return np.clip(s + DELTA * np.clip(a, -1, 1), -1, 1)


def _rollout_plans(b=6, h=8, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.uniform(-1, 1, size=(b, h, 1))
    s = np.zeros((b, h, 1))
    s[:, 0] = rng.uniform(-1, 1, size=(b, 1))
    for t in range(h - 1):
        s[:, t + 1] = nav1d_step(s[:, t], a[:, t])
    return s, a


def test_coherency_planner_exact_and_one_tol_error():
    s, a = _rollout_plans()
    tol = DELTA / 10
    assert coherency_planner(s, a, nav1d_step, tol) == pytest.approx(1.0)
    # every transition off by exactly one tol: each term is exp(-1/2)
    off = s.copy()
    for t in range(1, s.shape[1]):
        off[:, t] = nav1d_step(off[:, t - 1], a[:, t - 1]) + tol
    assert coherency_planner(off, a, nav1d_step, tol) == pytest.approx(math.exp(-0.5))
    # error of two tol -> exp(-2); torch inputs work too
    off2 = s.copy()
    for t in range(1, s.shape[1]):
        off2[:, t] = nav1d_step(off2[:, t - 1], a[:, t - 1]) - 2 * tol
    c = coherency_planner(torch.from_numpy(off2), torch.from_numpy(a), nav1d_step, tol)
    assert c == pytest.approx(math.exp(-2.0))


def test_coherency_planner_mixed_and_dims():
    s, a = _rollout_plans(b=2, h=3)
    tol = 0.01
    bad = s.copy()
    bad[0, 2] = nav1d_step(bad[0, 1], a[0, 1]) + 100.0  # one transition far off
    # 4 transitions: three exact (1) and one ~0
    assert coherency_planner(bad, a, nav1d_step, tol) == pytest.approx(0.75)
    # a time feature that the dynamics fn does not predict is excluded with dims
    time = np.broadcast_to(np.arange(3.0)[None, :, None], (2, 3, 1))
    with_time = np.concatenate([s, time], axis=-1)

    def dyn_with_time(x, u):
        return np.concatenate([nav1d_step(x[:, :1], u), np.zeros((len(x), 1))], axis=1)

    assert coherency_planner(with_time, a, dyn_with_time, tol) < 0.01
    assert coherency_planner(with_time, a, dyn_with_time, tol, dims=[0]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="H=1"):
        coherency_planner(s[:, :1], a[:, :1], nav1d_step, tol)


def _gauss(x, mu, sigma):
    return np.exp(-((x - mu) ** 2) / (2 * sigma**2)) / (sigma * math.sqrt(2 * math.pi))


def test_coherency_policy_with_known_max():
    # behaviour: a ~ N(mu(s), 0.2) with mu(s) = 0.5*s; max density at a = mu(s)
    sig = 0.2

    def dens(s, a):
        return _gauss(a[:, 0], 0.5 * s[:, 0], sig)

    def max_dens(s):
        return np.full(len(s), _gauss(0.0, 0.0, sig))

    s = np.linspace(-1, 1, 11)[:, None]
    at_mode = 0.5 * s
    assert coherency_policy(s, at_mode, dens, max_dens) == pytest.approx(1.0)
    one_sigma = 0.5 * s + sig
    assert coherency_policy(s, one_sigma, dens, max_dens) == pytest.approx(math.exp(-0.5))
    # half at the mode, half one sigma off
    mixed = np.concatenate([at_mode, one_sigma])
    expected = 0.5 * (1 + math.exp(-0.5))
    both = np.concatenate([s, s])
    assert coherency_policy(both, mixed, dens, max_dens) == pytest.approx(expected)


def test_coherency_policy_grid_estimate():
    sig = 0.3

    def dens(s, a):
        mu = np.stack([0.5 * s[:, 0], -0.25 * s[:, 0]], axis=1)
        return np.prod(_gauss(a, mu, sig), axis=1)

    rng = np.random.default_rng(0)
    s = rng.uniform(-1, 1, size=(40, 1))
    mode = np.stack([0.5 * s[:, 0], -0.25 * s[:, 0]], axis=1)
    off = mode + np.array([sig, 0.0])
    # the grid max (61x61 on [-1, 1]^2) is close to the true max, so the ratios match
    c_mode = coherency_policy(s, mode, dens, action_low=-1, action_high=1, grid_size=61, chunk=64)
    c_off = coherency_policy(s, off, dens, action_low=[-1, -1], action_high=[1, 1], grid_size=61)
    assert c_mode == pytest.approx(1.0)
    assert c_off == pytest.approx(math.exp(-0.5), abs=0.01)
    # a grid too coarse to hold the mode ({-1, 1}^2) still gives ratios <= 1
    coarse = coherency_policy(s, mode, dens, action_low=-1, action_high=1, grid_size=2)
    assert coarse == pytest.approx(1.0)
    # samples outside the behaviour's support give ~0
    far = mode + 5.0
    assert coherency_policy(s, far, dens, action_low=-1, action_high=1, grid_size=21) < 1e-6
    with pytest.raises(ValueError, match="action_low"):
        coherency_policy(s, mode, dens)


# ---------------------------------------------------------------------- entropy
def gaussian_entropy(cov):
    cov = np.atleast_2d(cov)
    return 0.5 * np.linalg.slogdet(2 * math.pi * math.e * cov)[1]


def test_candidate_entropy_matches_gaussian():
    rng = np.random.default_rng(0)
    cov = np.array([[1.0, 0.6], [0.6, 2.0]])
    samples = rng.multivariate_normal([1.0, -2.0], cov, size=(3, 20000))  # (3, N, 2)
    assert candidate_entropy(samples) == pytest.approx(gaussian_entropy(cov), abs=0.02)
    # D = 1 as (n_states, N, 1) and as (n_states, N), per state
    sig = np.array([0.1, 1.0, 3.0])
    x = rng.normal(size=(3, 20000)) * sig[:, None]
    per = candidate_entropy(x, per_state=True)
    expected = 0.5 * np.log(2 * math.pi * math.e * sig**2)
    np.testing.assert_allclose(per, expected, atol=0.02)
    assert candidate_entropy(x[..., None]) == pytest.approx(expected.mean(), abs=0.02)
    assert candidate_entropy(torch.from_numpy(x)) == pytest.approx(expected.mean(), abs=0.02)


def test_candidate_entropy_small_n_and_collapse():
    # N = 2 works (finite); identical samples are pinned by the ridge, not -inf
    two = np.array([[[0.0, 0.0], [1.0, 1.0]]])
    assert np.isfinite(candidate_entropy(two))
    collapsed = np.zeros((2, 5, 3))
    h = candidate_entropy(collapsed, ridge=1e-6)
    assert h == pytest.approx(gaussian_entropy(1e-6 * np.eye(3)))
    # more spread -> more entropy (shrinking samples by 10 lowers it by D*log(10))
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 50, 3))
    diff = candidate_entropy(x, ridge=0.0) - candidate_entropy(x / 10, ridge=0.0)
    assert diff == pytest.approx(3 * math.log(10))
    # the covariance is the unbiased one: two points 0 and 1 have variance 1/2
    pair = np.array([[0.0, 1.0]])
    assert candidate_entropy(pair, ridge=0.0) == pytest.approx(0.5 * math.log(math.pi * math.e))
    with pytest.raises(ValueError, match="N >= 2"):
        candidate_entropy(np.zeros((3, 1, 2)))
    with pytest.raises(ValueError, match="n_states"):
        candidate_entropy(np.zeros(5))
