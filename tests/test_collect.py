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


def test_sac_medium_tiny_budget(tmp_path):
    pytest.importorskip("mujoco")
    pytest.importorskip("stable_baselines3")
    from diffalign.data.collect import agent_paths, collect_medium

    out = tmp_path / "hopper-medium.hdf5"
    eps, info = collect_medium("mujoco/hopper", out, episodes=2, max_train_steps=250,
                               eval_every=125, max_episode_steps=40, progress=False)
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
