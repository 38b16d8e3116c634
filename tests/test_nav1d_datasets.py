"""Nav1D datasets: behaviour densities, return ordering, exact data, writers, commands."""

import importlib.util
import json
import os

import h5py
import numpy as np
import pytest

from diffalign.commands.nav1d import DataNav1DArgs, OptimumArgs, data_nav1d_main, optimum_main
from diffalign.data.nav1d_datasets import (
    D4RL_KEYS,
    CorrelatedRandomPolicy,
    ExpertPolicy,
    episode_returns,
    generate_nav1d_dataset,
    nav1d_dataset_attrs,
    plot_nav1d_dataset,
    read_nav1d_hdf5,
    write_nav1d_hdf5,
    write_nav1d_minari,
)
from diffalign.envs.nav1d import dynamics, nav1d_layout, reward
from diffalign.envs.nav1d_optimum import nav1d_optimum

OPT = nav1d_optimum()["optimal_return"]


@pytest.fixture(scope="module")
def datasets():
    return {
        k: generate_nav1d_dataset(k, episodes=150, seed=1) for k in ("partial", "full", "expert")
    }


def test_layout_and_dtypes(datasets):
    for data in datasets.values():
        n = 150 * 32
        assert data["observations"].shape == (n, 2) and data["observations"].dtype == np.float32
        assert data["next_observations"].shape == (n, 2)
        assert data["next_observations"].dtype == np.float32
        assert data["actions"].shape == (n, 1) and data["actions"].dtype == np.float32
        assert data["rewards"].shape == (n,) and data["rewards"].dtype == np.float32
        assert data["terminals"].dtype == bool and not data["terminals"].any()
        assert data["timeouts"].dtype == bool
        np.testing.assert_array_equal(np.flatnonzero(data["timeouts"]), np.arange(31, n, 32))
        assert np.all(np.abs(data["actions"]) <= 1.0)


def test_dynamics_and_rewards_exact_in_data(datasets):
    mu, sigma = nav1d_layout(0, 32)
    for data in datasets.values():
        obs, act, nxt = data["observations"], data["actions"], data["next_observations"]
        t = np.rint(obs[:, 1] * 32).astype(int)
        np.testing.assert_array_equal(t, np.tile(np.arange(32), 150))
        np.testing.assert_array_equal(nxt[:, 0], dynamics(obs[:, 0], act[:, 0]).astype(np.float32))
        np.testing.assert_array_equal(nxt[:, 1], ((t + 1) / 32).astype(np.float32))
        np.testing.assert_array_equal(
            data["rewards"], reward(nxt[:, 0], t, mu, sigma).astype(np.float32)
        )
        # consecutive steps of an episode chain
        cont = ~data["timeouts"][:-1]
        np.testing.assert_array_equal(nxt[:-1][cont], obs[1:][cont])


def test_start_distributions(datasets):
    x0 = {k: d["observations"][::32, 0] for k, d in datasets.items()}
    assert x0["partial"].min() >= -1.0 and x0["partial"].max() <= -0.2
    assert x0["full"].min() < -0.5 and x0["full"].max() > 0.5


def test_return_ordering(datasets):
    means = {k: episode_returns(d).mean() for k, d in datasets.items()}
    assert means["expert"] >= 0.8 * OPT
    assert means["partial"] <= 0.6 * OPT and means["full"] <= 0.6 * OPT
    assert means["expert"] > 2.0 * max(means["partial"], means["full"])
    assert episode_returns(datasets["full"]).shape == (150,)


def test_random_policy_travels(datasets):
    data = datasets["full"]
    x = data["observations"][:, 0].reshape(150, 32)
    span = x.max(axis=1) - x.min(axis=1)
    assert np.median(span) > 0.5  # temporally correlated actions move the point far
    a = data["actions"][:, 0].reshape(150, 32)
    lag1 = np.corrcoef(a[:, :-1].ravel(), a[:, 1:].ravel())[0, 1]
    assert lag1 > 0.7


def test_same_seed_same_data():
    a = generate_nav1d_dataset("full", episodes=10, seed=4)
    b = generate_nav1d_dataset("full", episodes=10, seed=4)
    c = generate_nav1d_dataset("full", episodes=10, seed=5)
    for k in D4RL_KEYS:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["actions"], c["actions"])


@pytest.mark.parametrize("scale", [0.7, 1.0])
def test_random_policy_density(scale):
    pol = CorrelatedRandomPolicy(rho=0.9, scale=scale)
    a = np.linspace(-1, 1, 400001)
    obs = np.zeros((len(a), 2))
    dens = pol.density(obs, a)
    assert np.trapezoid(dens, a) == pytest.approx(1.0, abs=1e-4)
    assert pol.max_density(obs[:1])[0] == pytest.approx(dens.max(), rel=1e-6)
    assert pol.density(np.zeros(2), np.array([1.0])) == 0.0
    # the density is the marginal law of the sampled actions (a histogram check)
    rng = np.random.default_rng(0)
    samples = []
    for t in range(32):
        o = np.stack([np.zeros(20000), np.full(20000, t / 32)], axis=-1)
        samples.append(pol.act(o, rng)[:, 0])
    hist, edges = np.histogram(np.concatenate(samples), bins=20, range=(-1, 1), density=True)
    centres = 0.5 * (edges[1:] + edges[:-1])
    np.testing.assert_allclose(hist, pol.density(np.zeros((20, 2)), centres), rtol=0.1, atol=0.02)
    # observation-independent; (B, 1) actions accepted
    np.testing.assert_array_equal(
        pol.log_prob(np.array([[0.3, 0.5]]), np.array([[0.2]])),
        pol.log_prob(np.array([[-0.9, 0.0]]), np.array([0.2])),
    )


def test_expert_policy_density():
    pol = ExpertPolicy(noise_std=0.1)
    a = np.linspace(-1, 1, 200001)
    rng = np.random.default_rng(0)
    for x, t in [(-0.95, 0), (0.5, 10), (0.0, 31), (0.3, 5)]:
        obs = np.array([[x, t / 32]])  # (1, 2) broadcasts against the (N,) actions
        dens = pol.density(obs, a)
        assert dens.shape == a.shape
        np.testing.assert_array_equal(dens[::5000], pol.density(np.tile(obs, (41, 1)), a[::5000]))
        assert np.trapezoid(dens, a) == pytest.approx(1.0, abs=1e-4)
        assert pol.max_density(obs[:1])[0] == pytest.approx(dens.max(), rel=1e-6)
        m = pol.mean(obs[:1])[0]
        assert a[np.argmax(dens)] == pytest.approx(m, abs=1e-5)
        # samples are inside [-1, 1] and centred like the truncated normal
        s = pol.act(np.tile([x, t / 32], (5000, 1)), rng)[:, 0]
        assert np.all(np.abs(s) <= 1.0)
        assert s.mean() == pytest.approx(np.trapezoid(a * dens, a), abs=0.01)
    assert pol.density(np.array([0.0, 0.0]), np.array([1.5])) == 0.0


def test_hdf5_round_trip(tmp_path, datasets):
    data = datasets["partial"]
    attrs = nav1d_dataset_attrs("partial", seed=1, episodes=150)
    path = write_nav1d_hdf5(tmp_path / "sub" / "nav1d.hdf5", data, attrs)
    assert sorted(os.listdir(path.parent)) == ["nav1d.hdf5"]  # no temporary left behind
    back, back_attrs = read_nav1d_hdf5(path)
    for k in D4RL_KEYS:
        assert back[k].dtype == data[k].dtype
        np.testing.assert_array_equal(back[k], data[k])
    with h5py.File(path, "r") as f:
        assert set(f.keys()) == set(D4RL_KEYS)
    assert back_attrs["env_id"] == "diffalign/Nav1D-v0"
    assert back_attrs["dataset_kind"] == "partial"
    assert back_attrs["layout_seed"] == 0
    assert back_attrs["behaviour_policy"] == "correlated_random"
    assert json.loads(back_attrs["behaviour_params"])["rho"] == 0.9
    assert back_attrs["ref_min_score"] == 0.0
    assert back_attrs["ref_max_score"] == pytest.approx(OPT)


def test_hdf5_failure_leaves_nothing(tmp_path, datasets):
    bad = dict(datasets["full"])
    bad.pop("rewards")
    with pytest.raises(ValueError, match="rewards"):
        write_nav1d_hdf5(tmp_path / "x.hdf5", bad)
    bad = dict(datasets["full"], rewards=object())
    with pytest.raises(ValueError, match="rewards"):
        write_nav1d_hdf5(tmp_path / "x.hdf5", bad)
    assert os.listdir(tmp_path) == []


def test_plot(tmp_path, datasets):
    p = plot_nav1d_dataset(datasets["expert"], 0, tmp_path / "pic.png")
    with open(p, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="env_or_layout"):
        plot_nav1d_dataset(datasets["expert"], "nope", tmp_path / "pic2.png")


@pytest.mark.skipif(importlib.util.find_spec("minari") is None, reason="minari not installed")
def test_minari_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    import minari

    data = generate_nav1d_dataset("expert", episodes=5, seed=2)
    write_nav1d_minari(data, "nav1d/expert-test-v0", kind="expert")
    ds = minari.load_dataset("nav1d/expert-test-v0")
    assert ds.total_episodes == 5 and ds.total_steps == 5 * 32
    for i, ep in enumerate(ds.iterate_episodes()):
        sl = slice(32 * i, 32 * (i + 1))
        np.testing.assert_array_equal(ep.observations[:-1], data["observations"][sl])
        np.testing.assert_array_equal(ep.observations[-1], data["next_observations"][32 * i + 31])
        np.testing.assert_array_equal(ep.actions, data["actions"][sl])
        np.testing.assert_allclose(ep.rewards, data["rewards"][sl], rtol=0, atol=0)
        assert ep.truncations[-1] and not ep.terminations.any()
    assert ds.storage.metadata["ref_max_score"] == pytest.approx(OPT)
    env = ds.recover_environment(eval_env=True)
    assert env.unwrapped.layout_seed == 0


def test_optimum_command(capsys):
    out = optimum_main(OptimumArgs(json=True))
    printed = json.loads(capsys.readouterr().out)
    assert printed["optimal_return"] == pytest.approx(OPT)
    assert printed["random_return"] == out["random_return"]
    optimum_main(OptimumArgs())
    assert "optimal return" in capsys.readouterr().out
    with pytest.raises(ValueError, match="horizon=0"):
        OptimumArgs(horizon=0)


def test_data_command_hdf5(tmp_path, capsys):
    out = tmp_path / "expert.hdf5"
    summary = data_nav1d_main(DataNav1DArgs(dataset="expert", out=out, episodes=20, seed=3))
    assert out.exists() and (tmp_path / "expert.png").exists()
    assert "% of the optimum" in capsys.readouterr().out
    assert summary["episodes"] == 20 and summary["percent_of_optimum"] > 80
    data, attrs = read_nav1d_hdf5(out)
    assert len(data["rewards"]) == 20 * 32 and attrs["dataset_kind"] == "expert"


@pytest.mark.skipif(importlib.util.find_spec("minari") is None, reason="minari not installed")
def test_data_command_minari(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    summary = data_nav1d_main(
        DataNav1DArgs(dataset="partial", episodes=3, format="minari", id="nav1d/partial-test-v0")
    )
    assert os.path.exists(summary["picture"]) and summary["episodes"] == 3


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"episodes": 0}, "episodes=0"),
        ({"format": "minari"}, "id=None"),
        ({"out": "data.csv"}, "out='data.csv'"),
        ({"dataset": "medium"}, "dataset='medium'"),
        ({"seed": -1}, "seed=-1"),
    ],
)
def test_data_command_bad_args(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment.replace(".", r"\.")):
        DataNav1DArgs(**kwargs)


def test_library_bad_args():
    with pytest.raises(ValueError, match="kind='medium'"):
        generate_nav1d_dataset("medium")
    with pytest.raises(ValueError, match="episodes=0"):
        generate_nav1d_dataset("full", episodes=0)
    with pytest.raises(ValueError, match="rho=1.0"):
        CorrelatedRandomPolicy(rho=1.0)
    with pytest.raises(ValueError, match="noise_std=0"):
        ExpertPolicy(noise_std=0)
