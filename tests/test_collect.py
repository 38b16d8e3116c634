"""``diffalign collect`` and simulator task strings: real environments, small collections."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffalign.cli import main
from diffalign.data.readers import read_d4rl_hdf5


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    d = tmp_path / "data"
    monkeypatch.setenv("DIFFALIGN_DATA", str(d))
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    return d


# ---------------------------------------------------------------------- MetaWorld
def test_metaworld_expert_cli_roundtrip(tmp_path, capsys):
    pytest.importorskip("metaworld")
    out = tmp_path / "bp.hdf5"
    rc = main(["collect", "metaworld/button-press-v3", "--policy", "expert", "--episodes", "8",
               "--out", str(out), "--json", "--no-progress"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    eps = read_d4rl_hdf5(out)
    assert len(eps) == 8 and eps.num_steps == 8 * 200
    assert eps.obs_dim == 39 and eps.act_dim == 4
    assert eps.next_observations is not None
    m = eps.meta
    assert m["task"] == "metaworld/button-press-v3" and m["policy"] == "expert"
    assert m["env_id"] == "diffalign/metaworld.button-press-v3-v0" and m["seed"] == 0
    assert m["ref_min_score"] == 0.0 and m["ref_max_score"] > 100
    # measured: the scripted expert presses the button in 50 of 50 episodes (200 steps)
    assert m["success_rate"] >= 0.9 and summary["success_rate"] == m["success_rate"]
    assert eps.timeouts.sum() == 8 and not eps.terminals.any()
    np.testing.assert_allclose(eps.returns().mean(), summary["return_mean"], rtol=1e-5)

    # the file's meta rebuilds the same environment: episode i starts at reset(seed=i)
    from diffalign.tasks import resolve_task

    task = resolve_task(str(out))
    assert task.ref_min == 0.0 and task.ref_max == pytest.approx(m["ref_max_score"])
    env = task.make_env()
    assert env.max_episode_steps == 200
    np.testing.assert_array_equal(env.reset(seed=2)[0], eps.episode(2)["observations"][0])
    env.close()


def test_metaworld_noisy_policy(tmp_path):
    pytest.importorskip("metaworld")
    from diffalign.data.collect import collect_episodes

    eps = collect_episodes("metaworld/button-press-v3", "noisy", episodes=2, noise=0.5,
                           max_episode_steps=40, progress=False)
    assert len(eps) == 2 and eps.num_steps == 80
    assert eps.meta["noise"] == 0.5 and eps.meta["policy"] == "noisy"
    assert np.abs(eps.actions).max() <= 1.0
    # noisy actions differ from the expert's on the same states
    clean = collect_episodes("metaworld/button-press-v3", "expert", episodes=2,
                             max_episode_steps=40, progress=False)
    assert not np.allclose(eps.actions, clean.actions)


def _expert_actions(task_name, observations):
    """The clean scripted expert's actions on recorded states (the policy is a function of
    the observation)."""
    from metaworld.policies import ENV_POLICY_MAP

    pol = ENV_POLICY_MAP[task_name]()
    return np.clip([pol.get_action(np.asarray(o, np.float64)) for o in observations], -1, 1)


def test_metaworld_mixed_cli_writes_mix_and_resolves(data_dir, capsys):
    pytest.importorskip("metaworld")
    from diffalign.tasks import resolve_task

    assert main(["collect", "metaworld/button-press-v3/mixed", "--episodes", "6",
                 "--max-episode-steps", "30", "--noise-levels", "0.1", "2.0",
                 "--random-fraction", "0.34", "--json", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    path = data_dir / "metaworld" / "button-press-v3-mixed.hdf5"
    assert summary["path"] == str(path) and path.is_file()
    eps = read_d4rl_hdf5(path)
    m = eps.meta
    assert len(eps) == 6 and eps.num_steps == 6 * 30 and m["policy"] == "mixed"
    mix = json.loads(m["mix"])
    assert [(c["policy"], c["noise"], c["episodes"]) for c in mix] == [
        ("noisy", 0.1, 2), ("noisy", 2.0, 2), ("random", None, 2)]
    assert sum(c["fraction"] for c in mix) == pytest.approx(1.0)
    assert json.loads(m["noise_levels"]) == [0.1, 2.0] and m["random_fraction"] == 0.34
    success = json.loads(m["episode_success"])
    assert m["success_rate"] == pytest.approx(np.mean(success))
    assert summary["mix"] == mix and summary["success_rate"] == m["success_rate"]
    for c in mix:
        assert c["success_rate"] is not None and 0 <= c["success_rate"] <= 1
    # the episodes really ran at their noise levels: distance from the clean expert's action
    noise = json.loads(m["episode_noise"])
    assert json.loads(m["episode_policy"]) == ["random" if x is None else "noisy"
                                               for x in noise]
    dev = {}
    for i, x in enumerate(noise):
        ep = eps.episode(i)
        d = np.abs(ep["actions"] - _expert_actions("button-press-v3", ep["observations"]))
        dev.setdefault(x, []).append(float(d.mean()))
        assert np.abs(ep["actions"]).max() <= 1.0
    assert sorted(dev, key=lambda x: -1 if x is None else x) == [None, 0.1, 2.0]
    assert max(dev[0.1]) < 0.1 < 0.5 < min(dev[2.0])  # E|N(0, .1)| = .08 before clipping
    assert min(dev[None]) > 0.3  # uniform actions ignore the expert
    # found where the other collected MetaWorld datasets are
    task = resolve_task("metaworld/button-press-v3/mixed")
    assert len(task.episodes) == 6 and task.meta["policy"] == "mixed"
    assert task.meta["sim_task"] == "metaworld/button-press-v3"
    env = task.make_env()
    assert env.max_episode_steps == 30
    np.testing.assert_array_equal(env.reset(seed=3)[0], eps.episode(3)["observations"][0])
    env.close()


def test_mixed_default_mixes_and_episode_assignment():
    from diffalign.data.collect import (
        MIXED_NOISE_LEVELS,
        MIXED_RANDOM_FRACTION,
        _assign_components,
        mixed_components,
    )
    from diffalign.envs.adapters import METAWORLD_TASKS

    assert set(MIXED_RANDOM_FRACTION) == set(METAWORLD_TASKS)
    for name in METAWORLD_TASKS:
        comps = mixed_components(f"metaworld/{name}")
        assert [c["noise"] for c in comps[:-1]] == list(MIXED_NOISE_LEVELS)
        assert comps[-1] == {"policy": "random", "noise": None,
                             "fraction": MIXED_RANDOM_FRACTION[name]}
        assert sum(c["fraction"] for c in comps) == pytest.approx(1.0)
    assert mixed_components("metaworld/drawer-open-v3", [0, 1], 0)[0]["policy"] == "expert"
    assert len(mixed_components("metaworld/drawer-open-v3", [0, 1], 0)) == 2  # no random
    fr = [c["fraction"] for c in mixed_components("metaworld/button-press-v3")]
    a = _assign_components(fr, 40, seed=0)
    assert np.bincount(a).tolist() == [5, 5, 4, 4, 4, 18]
    np.testing.assert_array_equal(a, _assign_components(fr, 40, seed=0))
    assert not np.array_equal(a, _assign_components(fr, 40, seed=1))
    assert np.bincount(_assign_components(fr, 3, seed=0), minlength=6).tolist() == \
        [1, 0, 0, 0, 0, 2]


def test_ensure_dataset_collects_once(data_dir, monkeypatch):
    pytest.importorskip("metaworld")
    from diffalign.data import collect as col
    from diffalign.tasks import resolve_task

    assert col.ensure_dataset("nav1d/partial") is None  # nothing to collect
    with pytest.raises(ValueError, match="'medium'"):
        col.ensure_dataset("metaworld/button-press-v3/medium")
    path = col.ensure_dataset("metaworld/drawer-open-v3/mixed", episodes=3, progress=False)
    assert path == data_dir / "metaworld" / "drawer-open-v3-mixed.hdf5" and path.is_file()
    task = resolve_task("metaworld/drawer-open-v3/mixed")
    assert len(task.episodes) == 3 and task.meta["policy"] == "mixed"

    def no_collecting(*a, **k):
        raise AssertionError("collected again")

    monkeypatch.setattr(col, "collect_dataset", no_collecting)
    assert col.ensure_dataset("metaworld/drawer-open-v3/mixed") == path


# ---------------------------------------------------------------------- MuJoCo
def test_mujoco_random_cli_roundtrip(tmp_path):
    pytest.importorskip("mujoco")
    out = tmp_path / "hopper-random.hdf5"
    assert main(["collect", "mujoco/hopper", "--policy", "random", "--episodes", "5",
                 "--out", str(out), "--no-progress"]) == 0
    eps = read_d4rl_hdf5(out)
    assert len(eps) == 5 and eps.obs_dim == 11 and eps.act_dim == 3
    assert eps.meta["ref_min_score"] == -20.272305 and eps.meta["ref_max_score"] == 3234.3
    assert eps.meta["policy"] == "random" and eps.meta["task"] == "mujoco/hopper"
    assert eps.terminals.sum() + eps.timeouts.sum() == 5  # random hoppers fall: terminals
    assert eps.terminals.any()
    # next_observations chain within an episode
    ep = eps.episode(0)
    np.testing.assert_array_equal(ep["next_observations"][:-1], ep["observations"][1:])


def test_sim_task_string_resolves_collected_data(data_dir):
    pytest.importorskip("mujoco")
    from diffalign.commands.collect import collect_task
    from diffalign.eval.evaluate import task_env
    from diffalign.tasks import resolve_task

    with pytest.raises(FileNotFoundError, match="diffalign collect mujoco/walker2d --policy "
                                                "random"):
        resolve_task("mujoco/walker2d/random")
    path = collect_task("mujoco/walker2d/random", quick=True)
    assert path == data_dir / "mujoco" / "walker2d-random.hdf5" and path.is_file()
    task = resolve_task("mujoco/walker2d/random")
    assert len(task.episodes) == 10
    assert (task.ref_min, task.ref_max) == (1.629008, 4592.3)
    env = task.make_env()
    assert env.observation_space.shape == (17,) and env.reset(seed=0)[0].dtype == np.float32
    # evaluate's environment from a model's task metadata
    make_env, rmin, rmax = task_env({"task": "mujoco/walker2d/random"})
    assert (rmin, rmax) == (1.629008, 4592.3) and make_env().observation_space.shape == (17,)
    with pytest.raises(ValueError, match="names an environment but no dataset"):
        resolve_task("mujoco/walker2d")
    with pytest.raises(ValueError, match="mujoco/ant"):
        resolve_task("mujoco/ant/medium")


def test_minari_format_roundtrip(data_dir, tmp_path):
    pytest.importorskip("mujoco")
    pytest.importorskip("minari")
    from diffalign.tasks import resolve_task

    assert main(["collect", "mujoco/halfcheetah", "--policy", "random", "--episodes", "2",
                 "--max-episode-steps", "30", "--format", "minari",
                 "--out", "mujoco/halfcheetah/random-v0", "--no-progress"]) == 0
    assert (tmp_path / "minari" / "mujoco" / "halfcheetah" / "random-v0").is_dir()
    for name in ("mujoco/halfcheetah/random-v0", "mujoco/halfcheetah/random"):
        task = resolve_task(name)
        assert len(task.episodes) == 2 and task.episodes.num_steps == 60
        assert task.meta["sim_task"] == "mujoco/halfcheetah"
        assert task.ref_max == 12135.0
        env = task.make_env()
        env.reset(seed=0)
        flags = [env.step(env.action_space.sample())[3] for _ in range(30)]
        assert flags[-1] and not any(flags[:-1])  # the recorded 30-step limit


def test_download_offline_is_a_clear_error(data_dir):
    pytest.importorskip("minari")
    from diffalign.tasks import resolve_task

    with pytest.raises(FileNotFoundError, match="could not download the Minari dataset "
                                                "'mujoco/hopper/expert-v0'"):
        resolve_task("mujoco/hopper/expert-v0", download=True)  # HF_HUB_OFFLINE=1 in conftest


def test_sac_medium_tiny_budget(tmp_path, monkeypatch):
    pytest.importorskip("mujoco")
    pytest.importorskip("stable_baselines3")
    import tempfile

    from diffalign.data.collect import agent_paths, collect_medium

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    out = tmp_path / "hopper-medium.hdf5"
    eps, info = collect_medium("mujoco/hopper", out, episodes=2, max_train_steps=250,
                               eval_every=125, max_episode_steps=40, progress=False)
    assert not list(scratch.glob("SB3-*"))  # no logger folders left behind in /tmp
    weights, meta_file = agent_paths(out)
    assert weights.is_file() and meta_file.is_file()
    assert info["finished"] and info["train_steps"] == 250 and len(info["evals"]) == 2
    assert not info["reached"]  # 250 steps do not reach the default target of 1281
    assert eps.meta["policy"] == "medium" and eps.meta["agent"] == str(weights)
    assert eps.meta["target_return"] == 1282 and len(eps) == 2
    # a finished agent with the same target and budget is reused, not retrained
    eps2, info2 = collect_medium("mujoco/hopper", out, episodes=1, max_train_steps=250,
                                 eval_every=125, max_episode_steps=40, progress=False)
    assert info2.get("reused") and len(eps2) == 1


def test_sac_stops_at_its_time_budget(tmp_path):
    pytest.importorskip("mujoco")
    pytest.importorskip("stable_baselines3")
    from diffalign.data.collect import collect_medium

    out = tmp_path / "hopper-medium.hdf5"
    kw = dict(episodes=1, max_train_steps=100_000, eval_every=50, max_episode_steps=20,
              progress=False)
    _, info = collect_medium("mujoco/hopper", out, max_train_seconds=0.5, **kw)
    assert info["finished"] and info["stopped_by"] == "time"
    assert 0 < info["train_steps"] < 100_000
    # reused with the same (or a smaller) time budget, retrained when given more time
    _, again = collect_medium("mujoco/hopper", out, max_train_seconds=0.5, **kw)
    assert again.get("reused")
    _, longer = collect_medium("mujoco/hopper", out, max_train_seconds=1.0, **kw)
    assert not longer.get("reused") and longer["stopped_by"] == "time"


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("argv,needle", [
    (["collect", "mujoco/ant", "--out", "x.hdf5"], "mujoco/ant"),
    (["collect", "frob/x", "--out", "x.hdf5"], "frob/x"),
    (["collect", "mujoco/hopper", "--policy", "expert", "--out", "x.hdf5"], "'expert'"),
    (["collect", "pusht/pusht", "--policy", "expert", "--out", "x.hdf5"], "no scripted PushT"),
    (["collect", "mujoco/hopper", "--episodes", "0", "--out", "x.hdf5"], "episodes=0"),
    (["collect", "mujoco/hopper", "--out", "x.txt"], "x.txt"),
    (["collect", "metaworld/button-press-v3", "--policy", "noisy", "--noise", "0",
      "--out", "x.hdf5"], "noise"),
    (["collect", "metaworld/button-press-v3", "--policy", "mixed", "--noise-levels", "0.1",
      "-1", "--out", "x.hdf5"], "got -1.0 in noise_levels=(0.1, -1.0)"),
    (["collect", "metaworld/button-press-v3/mixed", "--noise-levels", "0.5", "abc",
      "--out", "x.hdf5"], "'abc'"),
    (["collect", "metaworld/button-press-v3/mixed", "--noise-levels", "0.5", "0.5",
      "--out", "x.hdf5"], "noise_levels=(0.5, 0.5)"),
    (["collect", "metaworld/button-press-v3/mixed", "--noise-levels", "nan",
      "--out", "x.hdf5"], "nan"),
    (["collect", "metaworld/button-press-v3/mixed", "--random-fraction", "1",
      "--out", "x.hdf5"], "random_fraction=1.0"),
    (["collect", "metaworld/button-press-v3", "--noise-levels", "0.1", "--out", "x.hdf5"],
     "--noise-levels is for --policy mixed"),
    (["collect", "mujoco/hopper/mixed", "--out", "x.hdf5"], "'mixed'"),
])
def test_collect_bad_input_exits_2(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = " ".join(capsys.readouterr().err.replace("│", " ").split())  # tyro boxes the error
    assert needle in err
    assert not (tmp_path / "x.hdf5").exists()


def test_collect_out_is_a_directory_exits_2(tmp_path, capsys):
    d = tmp_path / "out.hdf5"
    d.mkdir()
    assert main(["collect", "mujoco/hopper", "--out", str(d)]) == 2
    assert "is a directory" in " ".join(capsys.readouterr().err.replace("│", " ").split())
