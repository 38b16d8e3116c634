"""Nav1D environment: gymnasium API, exact dynamics and reward, layout, rendering, arguments."""

import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import diffalign.envs
from diffalign.envs import NAV1D_ID, register_envs
from diffalign.envs.nav1d import Nav1DEnv, dynamics, nav1d_layout, reward, simulate


def test_check_env_direct_and_registered():
    check_env(Nav1DEnv(), skip_render_check=True)
    check_env(gymnasium.make(NAV1D_ID, render_mode="rgb_array").unwrapped, skip_render_check=False)
    env = gymnasium.make(NAV1D_ID)
    check_env(env.unwrapped)
    obs, _ = env.reset(seed=3)
    assert env.observation_space.contains(obs)
    assert isinstance(env.unwrapped, Nav1DEnv)
    # registering again is harmless
    assert register_envs() is True
    assert NAV1D_ID in gymnasium.registry
    assert diffalign.envs.NAV1D_ID == "diffalign/Nav1D-v0"


def test_make_passes_kwargs():
    env = gymnasium.make(NAV1D_ID, layout_seed=5, horizon=8, start_low=0.2, start_high=0.3)
    u = env.unwrapped
    assert u.horizon == 8 and u.layout_seed == 5
    mu, sigma = nav1d_layout(5, 8)
    np.testing.assert_array_equal(u.mu, mu)
    np.testing.assert_array_equal(u.sigma, sigma)
    for s in range(5):
        obs, _ = env.reset(seed=s)
        assert 0.2 <= obs[0] <= 0.3


def test_layout_is_seeded_and_in_range():
    mu, sigma = nav1d_layout(0, 32)
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(mu, rng.uniform(-0.9, 0.9, 32))
    np.testing.assert_array_equal(sigma, rng.uniform(0.05, 0.3, 32))
    assert np.all((mu >= -0.9) & (mu <= 0.9)) and np.all((sigma >= 0.05) & (sigma <= 0.3))
    mu1, _ = nav1d_layout(1, 32)
    assert not np.allclose(mu, mu1)
    env = Nav1DEnv()
    np.testing.assert_array_equal(env.mu, mu)
    np.testing.assert_array_equal(env.sigma, sigma)


def test_step_matches_formula_with_clipping():
    env = Nav1DEnv(layout_seed=2)
    rng = np.random.default_rng(0)
    for ep in range(20):
        obs, _ = env.reset(seed=ep)
        x = float(obs[0])
        assert obs[1] == 0.0
        for t in range(env.horizon):
            a = np.float32(rng.uniform(-2.0, 2.0))  # half of them need clipping
            obs, r, terminated, truncated, info = env.step(np.array([a], dtype=np.float32))
            x_next = np.float32(np.clip(x + 0.1 * np.clip(float(a), -1, 1), -1, 1))
            r_expected = np.exp(-((float(x_next) - env.mu[t]) ** 2) / (2 * env.sigma[t] ** 2))
            assert obs[0] == x_next
            assert obs[1] == np.float32((t + 1) / 32)
            assert r == r_expected
            assert terminated is False
            assert truncated is (t == env.horizon - 1)
            assert info["t"] == t
            x = float(x_next)
    with pytest.raises(RuntimeError):
        env.step(np.array([0.0], dtype=np.float32))


def test_walls_clip_position():
    env = Nav1DEnv()
    obs, _ = env.reset(options={"x0": 0.95})
    obs, *_ = env.step(np.array([1.0], dtype=np.float32))
    assert obs[0] == 1.0
    obs, *_ = env.step(np.array([5.0], dtype=np.float32))
    assert obs[0] == 1.0
    obs, _ = env.reset(options={"x0": -0.97})
    obs, *_ = env.step(np.array([-0.5], dtype=np.float32))
    assert obs[0] == -1.0


def test_pure_functions_vectorised():
    x = np.array([-1.0, -0.5, 0.0, 0.99])
    a = np.array([-1.0, 3.0, 0.25, 0.5])
    np.testing.assert_array_equal(dynamics(x, a), [-1.0, -0.4, 0.025, 1.0])
    np.testing.assert_array_equal(dynamics(x[:, None], a[None, :]).shape, (4, 4))
    mu, sigma = nav1d_layout(0, 32)
    t = np.array([0, 5, 31, 7])
    np.testing.assert_allclose(
        reward(x, t, mu, sigma), np.exp(-((x - mu[t]) ** 2) / (2 * sigma[t] ** 2)), rtol=0, atol=0
    )
    assert reward(mu[3], 3, mu, sigma) == 1.0


def test_simulate_equals_env():
    env = Nav1DEnv(layout_seed=1)
    rng = np.random.default_rng(1)
    acts = rng.uniform(-1.5, 1.5, size=(4, 32)).astype(np.float32)
    x0 = np.array([-1.0, -0.3, 0.4, 1.0], dtype=np.float32)
    out = simulate(lambda obs, t: acts[:, t], x0, env.mu, env.sigma)
    for i in range(4):
        obs, _ = env.reset(options={"x0": x0[i]})
        for t in range(32):
            np.testing.assert_array_equal(out["observations"][i, t], obs)
            obs, r, *_ = env.step(acts[i, t : t + 1])
            np.testing.assert_array_equal(out["next_observations"][i, t], obs)
            assert out["rewards"][i, t] == r


def test_reset_seeding_reproducible_and_uniform_starts():
    env = Nav1DEnv(start_low=-1.0, start_high=-0.2)
    a, _ = env.reset(seed=11)
    b, _ = env.reset(seed=11)
    np.testing.assert_array_equal(a, b)
    xs = np.array([env.reset()[0][0] for _ in range(300)])
    assert xs.min() >= -1.0 and xs.max() <= -0.2
    assert abs(xs.mean() - (-0.6)) < 0.05


def test_render_rgb_array():
    env = Nav1DEnv(render_mode="rgb_array")
    env.reset(seed=0)
    for _ in range(5):
        env.step(env.action_space.sample())
    img = env.render()
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert img.shape[0] > 100 and img.shape[1] > 100
    assert img.std() > 10  # a picture, not a blank canvas
    assert Nav1DEnv().render() is None


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"horizon": 0}, "horizon=0"),
        ({"horizon": 2.5}, "horizon=2.5"),
        ({"step_size": -0.1}, "step_size=-0.1"),
        ({"layout_seed": -1}, "layout_seed=-1"),
        ({"start_low": 0.5, "start_high": 0.0}, "start_low=0.5"),
        ({"start_high": 1.5}, "start_high=1.5"),
        ({"render_mode": "human"}, "render_mode='human'"),
    ],
)
def test_bad_constructor_args(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment.replace(".", r"\.")):
        Nav1DEnv(**kwargs)


def test_bad_actions_and_options():
    env = Nav1DEnv()
    env.reset(seed=0)
    with pytest.raises(ValueError, match="action"):
        env.step(np.array([np.nan]))
    with pytest.raises(ValueError, match="action"):
        env.step(np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="x0=2"):
        env.reset(options={"x0": 2.0})
