"""The Nav1D dynamic-programming optimum: exactness, convergence, independent check, rollouts."""

import itertools

import numpy as np
import pytest

from diffalign.envs.nav1d import Nav1DEnv, dynamics, nav1d_layout, reward, simulate
from diffalign.envs.nav1d_optimum import (
    Nav1DOptimalPolicy,
    expected_start_value,
    nav1d_optimum,
    random_return,
    solve_nav1d,
)


def test_dp_equals_brute_force_on_tiny_instance():
    # horizon 3, 5 actions, grid spacing 0.05: every reachable point lies on the grid, so the
    # DP (with interpolation) must equal exhaustive search over all 5**3 action sequences
    horizon, actions = 3, np.linspace(-1, 1, 5)
    sol = solve_nav1d(layout_seed=3, horizon=horizon, n_x=41, n_actions=5)
    mu, sigma = nav1d_layout(3, horizon)
    starts = sol.x_grid
    best = np.full(len(starts), -np.inf)
    best_seq = [None] * len(starts)
    for seq in itertools.product(actions, repeat=horizon):
        x, ret = starts.copy(), np.zeros(len(starts))
        for t, a in enumerate(seq):
            x = dynamics(x, a)
            ret += reward(x, t, mu, sigma)
        better = ret > best
        best = np.where(better, ret, best)
        for i in np.flatnonzero(better):
            best_seq[i] = seq
    np.testing.assert_allclose(sol.values[0], best, rtol=0, atol=1e-9)
    # the greedy policy attains the brute-force maximum
    policy = Nav1DOptimalPolicy(sol)
    x, ret = starts.copy(), np.zeros(len(starts))
    for t in range(horizon):
        obs = np.stack([x, np.full_like(x, t / horizon)], axis=-1)
        x = dynamics(x, policy(obs)[:, 0])
        ret += reward(x, t, mu, sigma)
    np.testing.assert_allclose(ret, best, rtol=0, atol=1e-9)


def test_grid_refinement_converges():
    coarse = expected_start_value(solve_nav1d(0, 32, 0.1, 1001, 101))
    default = nav1d_optimum()["optimal_return"]
    fine = expected_start_value(solve_nav1d(0, 32, 0.1, 4001, 401))
    assert abs(default - fine) / fine < 0.005
    assert abs(coarse - fine) / fine < 0.005
    # finer grids only find better paths (up to interpolation error)
    assert fine >= default - 1e-3 * fine


def _path_dp(mu: np.ndarray, sigma: np.ndarray, step_size: float, k: int) -> tuple:
    """Independent method: optimise over position paths |x_{t+1} - x_t| <= δ on a grid of
    spacing δ/k, where every move is exact (no interpolation, no action set)."""
    n = int(round(2.0 / (step_size / k))) + 1
    xs = np.linspace(-1.0, 1.0, n)
    v = np.zeros(n)
    for t in range(len(mu) - 1, -1, -1):
        gain = np.exp(-((xs - mu[t]) ** 2) / (2 * sigma[t] ** 2)) + v  # land at x_{t+1}
        padded = np.concatenate([np.full(k, -np.inf), gain, np.full(k, -np.inf)])
        v = np.max([padded[s : s + n] for s in range(2 * k + 1)], axis=0)
    return xs, v


@pytest.mark.parametrize("layout_seed", [0, 7])
def test_independent_optimum_from_env_layout(layout_seed):
    env = Nav1DEnv(layout_seed=layout_seed)
    xs, v0 = _path_dp(env.mu, env.sigma, env.step_size, k=40)
    independent = np.trapezoid(v0, xs) / 2.0
    res = nav1d_optimum(layout_seed=layout_seed)
    assert abs(res["optimal_return"] - independent) / independent < 0.01
    # pointwise too
    np.testing.assert_allclose(res["solution"].value(xs), v0, rtol=0.01, atol=0.02)


def test_policy_achieves_predicted_value_in_rollouts():
    res = nav1d_optimum()
    sol, policy = res["solution"], res["policy"]
    rng = np.random.default_rng(123)
    x0 = rng.uniform(-1, 1, size=3000)
    out = simulate(lambda obs, t: policy(obs), x0, sol.mu, sol.sigma)
    returns = out["rewards"].sum(axis=1)
    assert abs(returns.mean() - res["optimal_return"]) / res["optimal_return"] < 0.005
    # per start state the rollout achieves V*(x0) closely
    np.testing.assert_allclose(returns, sol.value(x0), rtol=0.01, atol=0.02)
    # and through the gymnasium env with single observations
    env = Nav1DEnv()
    for s in range(3):
        obs, _ = env.reset(seed=s)
        v_pred, total, done = float(sol.value(obs[0])), 0.0, False
        while not done:
            a = policy(obs)
            assert a.shape == (1,) and a.dtype == np.float32
            obs, r, term, trunc, _ = env.step(a)
            total += r
            done = term or trunc
        assert abs(total - v_pred) / v_pred < 0.01


def test_policy_batched_equals_single():
    policy = nav1d_optimum()["policy"]
    rng = np.random.default_rng(0)
    obs = np.stack([rng.uniform(-1, 1, 20), rng.integers(0, 32, 20) / 32], axis=-1)
    batched = policy(obs)
    assert batched.shape == (20, 1)
    for i in range(20):
        np.testing.assert_array_equal(policy(obs[i]), batched[i])
    assert policy(obs.reshape(4, 5, 2)).shape == (4, 5, 1)


def test_optimum_numbers_and_cache():
    res = nav1d_optimum()
    assert set(res) >= {"optimal_return", "random_return"}
    opt, rand = res["optimal_return"], res["random_return"]
    assert 0 < rand < 0.6 * opt < opt <= 32
    again = nav1d_optimum()
    assert again["solution"] is res["solution"]
    assert again["optimal_return"] == opt and again["random_return"] == rand
    # the cached arrays cannot be altered by callers
    with pytest.raises(ValueError):
        res["solution"].values[0, 0] = 1.0
    # a restricted start distribution has its own expected value
    part = nav1d_optimum(start_low=-1.0, start_high=-0.2)["optimal_return"]
    xs = np.linspace(-1, -0.2, 801)
    assert part == pytest.approx(np.trapezoid(res["solution"].value(xs), xs) / 0.8, rel=1e-4)


def test_random_return_matches_env_monte_carlo():
    mean, se = random_return()
    assert se < 0.05
    env = Nav1DEnv()
    env.action_space.seed(0)
    totals = []
    for s in range(300):
        env.reset(seed=1000 + s)
        total, done = 0.0, False
        while not done:
            _, r, term, trunc, _ = env.step(env.action_space.sample())
            total += r
            done = term or trunc
        totals.append(total)
    totals = np.array(totals)
    tol = 4 * np.sqrt(se**2 + totals.var() / len(totals))
    assert abs(totals.mean() - mean) < tol


def test_bad_arguments():
    with pytest.raises(ValueError, match="start_low=0.5"):
        nav1d_optimum(start_low=0.5, start_high=0.0)
    with pytest.raises(ValueError, match="n_x=1"):
        solve_nav1d(0, 32, 0.1, 1, 201)
    with pytest.raises(ValueError, match="horizon=0"):
        nav1d_optimum(horizon=0)
