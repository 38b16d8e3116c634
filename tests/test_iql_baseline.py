"""``benchmarks/iql_baseline.py``: the IQL agent trained on a dataset and scored in its
environment with the pipeline's metric and evaluation seeds."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

FIELDS = ("task", "data_file", "steps", "seed", "episodes", "reset_seeds", "returns",
          "return_mean", "return_std", "success_rate", "normalized", "metric", "score",
          "train_seconds", "eval_seconds", "data_return_mean")


def _script():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "iql_baseline.py"
    spec = importlib.util.spec_from_file_location("bench_iql_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record_resets(monkeypatch, module, name) -> list:
    """Wrap ``module.name`` (an env factory) so every env records its reset seeds."""
    import gymnasium as gym

    seeds: list = []

    class Recorder(gym.Wrapper):
        def reset(self, *, seed=None, options=None):
            seeds.append(seed)
            return self.env.reset(seed=seed, options=options)

    make = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: Recorder(make(*a, **kw)))
    return seeds


def _run(argv: list[str]) -> tuple[dict, Path]:
    """The script's ``main`` under umask 022; returns (the JSON written, its path)."""
    old = os.umask(0o022)
    try:
        res = _script().main(argv + ["--no-progress"])
    finally:
        os.umask(old)
    path = Path(res["file"])
    return json.loads(path.read_text()), path


def test_mujoco_file_json_seeds_and_mode(tmp_path, monkeypatch, capsys):
    pytest.importorskip("mujoco")
    import diffalign.envs.adapters as adapters
    from diffalign.data.collect import collect_episodes
    from diffalign.data.readers import write_d4rl_hdf5

    eps = collect_episodes("mujoco/hopper", "random", episodes=4, max_episode_steps=40,
                           progress=False)
    data = write_d4rl_hdf5(tmp_path / "run" / "data" / "hopper-random.hdf5", eps)
    seeds = _record_resets(monkeypatch, adapters, "make_sim_env")
    out = tmp_path / "baseline"
    res, path = _run([str(data), "--steps", "150", "--episodes", "3", "--seed", "7",
                      "--out", str(out)])

    assert path == out / "iql_baseline.json"
    assert (path.stat().st_mode & 0o777) == 0o644
    assert not [p for p in out.iterdir() if p.name != "iql_baseline.json"]  # no temp left
    for f in FIELDS:
        assert f in res, f
    assert res["task"] == str(data) and res["data_file"] == str(data.resolve())
    assert (res["steps"], res["seed"], res["episodes"]) == (150, 7, 3)
    assert res["config"]["steps"] == res["config"]["critic"]["steps"] == 150
    assert res["config"]["seed"] == res["config"]["critic"]["seed"] == 7
    # the pipeline's evaluation seeds: episode i resets with seed + i, each once
    assert seeds == [7, 8, 9] and res["reset_seeds"] == [7, 8, 9]
    assert all(1 <= n <= 40 for n in res["episode_lengths"])  # the file's time limit
    rets = np.array(res["returns"])
    assert res["return_mean"] == pytest.approx(rets.mean())
    assert res["return_std"] == pytest.approx(rets.std())
    # hopper reports no success: the D4RL-normalised score is the task's metric
    assert res["success_rate"] is None and res["metric"] == "normalized"
    norm = 100 * (rets.mean() - eps.meta["ref_min_score"]) / (
        eps.meta["ref_max_score"] - eps.meta["ref_min_score"])
    assert res["normalized"] == pytest.approx(norm) and res["score"] == res["normalized"]
    assert res["data_return_mean"] == pytest.approx(eps.returns().mean())
    assert res["train_seconds"] > 0 and res["eval_seconds"] > 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"IQL {data}: normalised score {res['score']:.1f}")
    assert "reset seeds 7-9" in line and str(path) in line


def test_metaworld_success_rate_is_the_metric(tmp_path, monkeypatch):
    pytest.importorskip("metaworld")
    import diffalign.envs.adapters as adapters
    from diffalign.data.collect import collect_episodes
    from diffalign.data.readers import write_d4rl_hdf5

    eps = collect_episodes("metaworld/button-press-v3", "expert", episodes=2,
                           max_episode_steps=30, progress=False)
    data = write_d4rl_hdf5(tmp_path / "bp.hdf5", eps)
    seeds = _record_resets(monkeypatch, adapters, "make_sim_env")
    res, _ = _run([str(data), "--steps", "20", "--episodes", "2", "--seed", "3",
                   "--out", str(tmp_path / "o")])
    assert seeds == [3, 4]
    assert res["success_rate"] is not None and res["metric"] == "success_rate"
    assert res["score"] == pytest.approx(100 * res["success_rate"])
    assert res["normalized"] is not None  # reported too, but not the score


def test_nav1d_agent_beats_its_random_data(tmp_path, monkeypatch):
    """On Nav1D ``full`` (a correlated random behaviour policy) a short IQL run must beat
    both the dataset's mean return and an untrained actor by a clear margin. Measured
    (300 data episodes, 1000 steps, seeds 0-2): 9.0-9.2 against a data mean of 5.4 and an
    untrained actor's 5.9."""
    import gymnasium

    seeds = _record_resets(monkeypatch, gymnasium, "make")
    common = ["nav1d/full", "--episodes", "20", "--seed", "0", "--data-episodes", "300"]
    res, _ = _run(common + ["--steps", "1000", "--out", str(tmp_path / "trained")])
    assert seeds == list(range(20)) and res["reset_seeds"] == list(range(20))
    for f in FIELDS:
        assert f in res, f
    assert res["data_file"] is None and res["transitions"] == 300 * 32
    assert res["success_rate"] is None and res["metric"] == "normalized"
    assert res["score"] == pytest.approx(100 * res["return_mean"] / res["ref_max"])
    untrained, _ = _run(common + ["--steps", "1", "--out", str(tmp_path / "untrained")])
    assert res["return_mean"] > res["data_return_mean"] + 2.0, res
    assert res["return_mean"] > untrained["return_mean"] + 2.0, (res, untrained)


def test_run_agent_episodes_seeds_and_success(monkeypatch):
    """The library helper: seeds ``seed + i``, one env per episode, success when any step
    reports it, None when no step reports anything."""
    import gymnasium as gym

    from diffalign.models.iql_agent import run_agent_episodes

    class Toy(gym.Env):
        observation_space = gym.spaces.Box(-1, 1, (2,), np.float32)
        action_space = gym.spaces.Box(-1, 1, (1,), np.float32)

        def __init__(self, report):
            self.report, self.t, self.seed_ = report, 0, None

        def reset(self, *, seed=None, options=None):
            self.t, self.seed_ = 0, seed
            return np.zeros(2, np.float32), {}

        def step(self, action):
            self.t += 1
            info = {"success": self.t == 2 and self.seed_ % 2 == 0} if self.report else {}
            return np.zeros(2, np.float32), float(action[0]), False, self.t == 3, info

    class Agent:
        def act(self, obs, deterministic=True, generator=None):
            return np.array([0.5], np.float32)

    made = []

    def make(report):
        made.append(Toy(report))
        return made[-1]

    res = run_agent_episodes(Agent(), lambda: make(True), episodes=3, seed=4)
    assert res.seeds == [4, 5, 6] and [e.seed_ for e in made] == [4, 5, 6]
    np.testing.assert_allclose(res.returns, 1.5)
    np.testing.assert_array_equal(res.lengths, 3)
    np.testing.assert_array_equal(res.success, [True, False, True])
    assert run_agent_episodes(Agent(), lambda: make(False), episodes=2).success is None
    with pytest.raises(ValueError, match="episodes"):
        run_agent_episodes(Agent(), lambda: make(True), episodes=0)
