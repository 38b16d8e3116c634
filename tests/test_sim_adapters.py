"""Simulator adapters: real environments (each skipped when its optional package is absent)."""

from __future__ import annotations

import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from diffalign.envs.adapters import SIM_TASKS, make_sim_env, sim_spec

MUJOCO = ["mujoco/hopper", "mujoco/halfcheetah", "mujoco/walker2d"]
METAWORLD = ["metaworld/button-press-v3", "metaworld/drawer-open-v3",
             "metaworld/sweep-into-v3", "metaworld/plate-slide-v3"]
OBS_DIM = {"mujoco/hopper": 11, "mujoco/halfcheetah": 17, "mujoco/walker2d": 17}


def _check_steps(env, n: int = 5, seed: int = 3):
    obs, info = env.reset(seed=seed)
    assert isinstance(env.observation_space, gym.spaces.Box)
    assert env.observation_space.dtype == np.float32 and len(env.observation_space.shape) == 1
    assert env.action_space.dtype == np.float32
    assert obs.dtype == np.float32 and obs.shape == env.observation_space.shape
    assert isinstance(info, dict)
    infos = []
    for _ in range(n):
        obs, r, term, trunc, info = env.step(env.action_space.sample())
        assert obs.dtype == np.float32 and obs.shape == env.observation_space.shape
        assert np.isfinite(obs).all() and isinstance(r, float)
        infos.append(info)
        if term or trunc:
            break
    return infos


def _reset_is_reproducible(env, seed: int = 7) -> None:
    a = env.reset(seed=seed)[0]
    env.step(env.action_space.sample())
    b = env.reset(seed=seed)[0]
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("task", MUJOCO)
def test_mujoco_adapter(task):
    pytest.importorskip("mujoco")
    env = make_sim_env(task, max_episode_steps=4)
    assert env.observation_space.shape == (OBS_DIM[task],)
    _check_steps(env)
    _reset_is_reproducible(env)
    # the time limit truncates (halfcheetah never terminates)
    if task == "mujoco/halfcheetah":
        env.reset(seed=0)
        flags = [env.step(np.zeros(6, np.float32))[2:4] for _ in range(4)]
        assert flags[-1] == (False, True) and not any(any(f) for f in flags[:-1])
    spec = sim_spec(task)
    assert spec.ref_min is not None and spec.ref_max > spec.ref_min
    env.close()


def test_mujoco_d4rl_constants():
    assert (sim_spec("mujoco/hopper").ref_min, sim_spec("mujoco/hopper").ref_max) == \
        (-20.272305, 3234.3)
    assert sim_spec("mujoco/halfcheetah").ref_max == 12135.0
    assert sim_spec("mujoco/walker2d").ref_min == 1.629008


def test_registered_gym_id_builds_the_adapter():
    pytest.importorskip("mujoco")
    import diffalign.envs  # noqa: F401  (registers the ids)

    spec = sim_spec("mujoco/hopper")
    env = gym.make(spec.gym_id, max_episode_steps=3)
    obs, _ = env.reset(seed=0)
    assert obs.dtype == np.float32 and obs.shape == (11,)
    env.close()


@pytest.mark.parametrize("task", METAWORLD)
def test_metaworld_adapter(task):
    pytest.importorskip("metaworld")
    env = make_sim_env(task, max_episode_steps=6)
    assert env.observation_space.shape == (39,) and env.action_space.shape == (4,)
    infos = _check_steps(env, n=6)
    assert len(infos) == 6  # fixed horizon: truncated at 6, never terminated
    assert all(isinstance(i["success"], bool) for i in infos)
    _reset_is_reproducible(env)
    env.close()


def test_metaworld_seeded_goals():
    pytest.importorskip("metaworld")
    env = make_sim_env("metaworld/button-press-v3")
    obs = {s: env.reset(seed=s)[0] for s in range(6)}
    # the goal variation (object/goal position) is part of the observation and depends on the
    # reset seed only
    assert len({tuple(np.round(o[4:7], 5)) for o in obs.values()}) > 1
    again = make_sim_env("metaworld/button-press-v3")
    np.testing.assert_array_equal(again.reset(seed=3)[0], obs[3])
    idx = env.reset(options={"task_index": 5})[1]["task_index"]
    assert idx == 5
    assert env.max_episode_steps == 200  # default horizon
    env.close()
    again.close()


def test_pusht_adapter():
    pytest.importorskip("gym_pusht")
    env = make_sim_env("pusht/pusht", max_episode_steps=5)
    assert env.observation_space.shape == (5,)
    infos = _check_steps(env)
    assert all(isinstance(i["success"], bool) for i in infos)
    _reset_is_reproducible(env)
    env.close()


@pytest.mark.parametrize("task", ["kitchen/complete", "antmaze/umaze"])
def test_robotics_adapters(task):
    pytest.importorskip("gymnasium_robotics")
    env = make_sim_env(task, max_episode_steps=4)
    infos = _check_steps(env, n=4)
    assert all(isinstance(i["success"], bool) for i in infos)
    assert sim_spec(task).ref_max in (1.0, 4.0)
    xml = getattr(env.unwrapped, "tmp_xml_file_path", None)
    assert xml is None or not Path(xml).exists(), "the maze's temporary MJCF was left in /tmp"
    env.close()


def test_unknown_task_names_it():
    with pytest.raises(ValueError, match="metaworld/button-push-v3"):
        make_sim_env("metaworld/button-push-v3")
    with pytest.raises(ValueError, match="frob/x"):
        sim_spec("frob/x")


@pytest.mark.parametrize("task,module,extra", [
    ("pusht/pusht", "gym_pusht", "pusht"),
    ("kitchen/complete", "gymnasium_robotics", "robotics"),
    ("metaworld/button-press-v3", "metaworld", "metaworld"),
])
def test_missing_package_names_the_extra(monkeypatch, task, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(ImportError, match=rf"diffalign\[{extra}\]"):
        make_sim_env(task)


def test_every_task_has_a_policy_and_an_extra():
    for spec in SIM_TASKS.values():
        assert spec.policies and spec.extra
        assert spec.gym_id.startswith("diffalign/")
