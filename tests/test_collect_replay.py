"""``replay`` datasets: every transition of a short SAC training (D4RL's medium-replay)."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from diffalign.cli import main

pytest.importorskip("mujoco")
pytest.importorskip("stable_baselines3")


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    d = tmp_path / "data"
    monkeypatch.setenv("DIFFALIGN_DATA", str(d))
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    return d


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def atomic_writes(monkeypatch):
    """The paths written through :func:`diffalign.atomic.atomic_path` (temp file + rename)."""
    from diffalign import atomic
    from diffalign.data import readers

    seen = []
    real = atomic.atomic_path

    def spy(path, *a, **k):
        seen.append(os.path.abspath(path))
        return real(path, *a, **k)

    monkeypatch.setattr(readers, "atomic_path", spy)
    monkeypatch.setattr(atomic, "atomic_path", spy)
    return seen


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _check_replay_file(path, sac_steps: int, task: str = "mujoco/hopper"):
    """The file holds exactly the SAC steps, and its recorded return and score ranges are
    its episodes' (scored with the adapter's D4RL constants)."""
    from diffalign.data.readers import read_d4rl_hdf5
    from diffalign.envs.adapters import D4RL_REF

    eps = read_d4rl_hdf5(path)
    m = eps.meta
    assert m["policy"] == "replay" and m["task"] == task
    assert eps.num_steps == m["sac_steps"] == sac_steps
    assert eps.next_observations is not None
    returns = eps.returns()
    assert m["episodes"] == len(eps) >= 2
    np.testing.assert_allclose([m["return_min"], m["return_mean"], m["return_max"]],
                               [returns.min(), returns.mean(), returns.max()], rtol=1e-6)
    lo, hi = D4RL_REF[task.split("/")[1]]
    assert (m["ref_min_score"], m["ref_max_score"]) == (lo, hi)
    norm = 100 * (returns - lo) / (hi - lo)
    np.testing.assert_allclose([m["normalized_min"], m["normalized_mean"], m["normalized_max"]],
                               [norm.min(), norm.mean(), norm.max()], rtol=1e-6)
    assert m["train_s"] > 0 and m["stopped_by"] in ("steps", "time", "target")
    # episodes split at terminals and time limits; the last always ends (cut: as a timeout)
    assert eps.terminals[-1] or eps.timeouts[-1]
    assert not (eps.terminals & eps.timeouts).any()
    assert int(eps.terminals.sum() + eps.timeouts.sum()) == len(eps)
    for i in range(len(eps)):  # next_observations chain within an episode
        ep = eps.episode(i)
        np.testing.assert_array_equal(ep["next_observations"][:-1], ep["observations"][1:])
    return eps


def test_cli_replay_quick_collection(data_dir, umask_022, atomic_writes, capsys):
    from diffalign.tasks import resolve_task, sim_dataset_path

    rc = main(["collect", "mujoco/hopper/replay", "--max-train-steps", "300",
               "--eval-every", "150", "--max-episode-steps", "50", "--json"])
    assert rc == 0
    out, err = capsys.readouterr()
    summary = json.loads(out.strip().splitlines()[-1])
    assert "SAC mujoco/hopper replay" in err and "300/300" in err  # the progress bar
    path = sim_dataset_path("mujoco/hopper", "replay")
    assert summary["path"] == str(path) and summary["policy"] == "replay"
    assert summary["steps"] == summary["agent"]["train_steps"] == 300
    eps = _check_replay_file(path, 300)
    m = eps.meta
    assert summary["return_range"] == [m["return_min"], m["return_mean"], m["return_max"]]
    assert summary["normalized_range"] == [m["normalized_min"], m["normalized_mean"],
                                           m["normalized_max"]]
    assert m["stopped_by"] == "steps" and m["max_train_steps"] == 300
    assert m["max_train_seconds"] == 1200.0  # the replay's default clock
    assert m["max_episode_steps"] == 50
    assert json.loads(m["env_kwargs"]) == {"max_episode_steps": 50}  # JSON, as in every file
    # files: the dataset and the agent beside it, each written by rename, mode 0644
    weights = path.with_name("hopper-replay.sac.safetensors")
    files = [path, weights, weights.with_suffix(".json")]
    assert all(f.is_file() and _mode(f) == 0o644 for f in files)
    assert str(path) in atomic_writes and str(weights) in atomic_writes
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(f.name for f in files)
    assert m["agent"] == str(weights)

    task = resolve_task("mujoco/hopper/replay")
    assert task.episodes.num_steps == 300 and task.meta["sim_task"] == "mujoco/hopper"
    assert (task.ref_min, task.ref_max) == (m["ref_min_score"], m["ref_max_score"])
    env = task.make_env()
    assert env.max_episode_steps == 50 and env.observation_space.shape == (11,)
    env.close()

    # a medium dataset beside it reuses the agent of that training instead of training again
    from diffalign.data.collect import agent_paths, collect_medium

    medium = path.with_name("hopper-medium.hdf5")
    eps2, info = collect_medium("mujoco/hopper", medium, episodes=1, max_train_steps=300,
                                max_train_seconds=1200.0, max_episode_steps=50,
                                progress=False)
    assert info["reused"] and info["reused_from"] == str(weights)
    assert info["train_steps"] == 300 and agent_paths(medium)[0].is_file()
    assert len(eps2) == 1 and eps2.meta["agent_train_steps"] == 300


def test_transitions_are_the_replay_buffer_in_order():
    """What is recorded is SAC's replay buffer, step for step (actions in the env's units)."""
    import torch

    from diffalign.data.collect import TransitionLog, train_sac

    log = TransitionLog(10)  # fewer than the steps: the log grows
    torch.set_num_threads(1)
    model, info = train_sac("mujoco/walker2d", max_train_steps=160, max_episode_steps=30,
                            eval_every=10**6, progress=False, recorder=log)
    assert info["train_steps"] == log.n == 160 and info["stopped_by"] == "steps"
    a = log.arrays()
    buf = model.replay_buffer
    n = buf.pos
    assert n == 160
    np.testing.assert_array_equal(a["observations"], buf.observations[:n, 0])
    np.testing.assert_array_equal(a["next_observations"], buf.next_observations[:n, 0])
    np.testing.assert_allclose(a["actions"], model.policy.unscale_action(buf.actions[:n, 0]),
                               atol=1e-6)
    np.testing.assert_array_equal(a["rewards"], buf.rewards[:n, 0])
    # the last episode, cut off by the end of training, ends in a timeout here only
    assert log.cut_short == (buf.dones[n - 1, 0] == 0) and a["timeouts"][-1]
    np.testing.assert_array_equal((a["terminals"] | a["timeouts"])[:-1],
                                  buf.dones[: n - 1, 0] > 0)
    np.testing.assert_array_equal(a["timeouts"][:-1], buf.timeouts[: n - 1, 0] > 0)
    assert a["timeouts"][:-1].any()  # walker2d survives 30 steps of random actions at times


def test_replay_time_budget_and_ensure_dataset(data_dir, umask_022, atomic_writes,
                                               monkeypatch):
    from diffalign.data import collect as col

    path = data_dir / "mujoco" / "halfcheetah-replay.hdf5"
    monkeypatch.setitem(col.COLLECT_SIZES, False, {"episodes": 2, "max_train_steps": 100_000,
                                                   "replay_train_seconds": 2.0})
    assert col.ensure_dataset("mujoco/halfcheetah/replay", progress=False) == path
    from diffalign.data.readers import read_d4rl_hdf5

    m = read_d4rl_hdf5(path).meta
    assert m["stopped_by"] == "time" and m["max_train_seconds"] == 2.0
    assert 0 < m["sac_steps"] < 100_000
    eps = _check_replay_file(path, m["sac_steps"], task="mujoco/halfcheetah")
    assert m["last_episode_cut"] and eps.timeouts[-1]
    assert _mode(path) == 0o644 and str(path) in atomic_writes

    def no_collecting(*a, **k):
        raise AssertionError("collected again")

    monkeypatch.setattr(col, "collect_dataset", no_collecting)
    assert col.ensure_dataset("mujoco/halfcheetah/replay") == path


def test_failed_write_keeps_the_old_file(data_dir, monkeypatch):
    """A collection that fails while writing leaves the file that was there, and no temp."""
    from diffalign.data import collect as col
    from diffalign.data import readers

    path = data_dir / "mujoco" / "hopper-replay.hdf5"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"old")

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(readers, "_meta_to_attrs", broken)
    with pytest.raises(OSError, match="disk full"):
        col.collect_dataset("mujoco/hopper/replay", max_train_steps=120, progress=False)
    assert path.read_bytes() == b"old"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]


def test_replay_is_a_mujoco_policy():
    from diffalign.data.collect import collect_dataset, collect_policies, collect_replay

    for t in ("mujoco/hopper", "mujoco/walker2d", "mujoco/halfcheetah"):
        assert "replay" in collect_policies(t)
    for t in ("metaworld/button-press-v3", "pusht/pusht", "kitchen/complete"):
        assert "replay" not in collect_policies(t)
    with pytest.raises(ValueError, match="for MuJoCo tasks.*expert, noisy, random, mixed"):
        collect_replay("metaworld/button-press-v3", None)
    with pytest.raises(ValueError, match="unknown policy 'replay'.*expert, noisy, random, mixed"):
        collect_dataset("metaworld/button-press-v3/replay")


@pytest.mark.parametrize("argv,needle", [
    (["collect", "metaworld/button-press-v3", "--policy", "replay"],
     "unknown policy 'replay' for task 'metaworld/button-press-v3' (the SAC-trained policies "
     "are for MuJoCo tasks); choose one of expert, noisy, random, mixed"),
    (["collect", "metaworld/button-press-v3/replay"], "choose one of expert, noisy, random"),
    (["collect", "mujoco/hopper/replay", "--episodes", "5"],
     "--episodes is not for --policy replay"),
    (["collect", "mujoco/hopper", "--policy", "replay", "--max-train-seconds", "0"],
     "max_train_seconds=0.0"),
])
def test_replay_bad_input_exits_2(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--out", "x.hdf5"]) == 2
    err = " ".join(capsys.readouterr().err.replace("│", " ").split())  # tyro boxes the error
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "x.hdf5").exists()
