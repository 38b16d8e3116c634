"""Rollouts, evaluate (eval.json + eval.png) and the train/evaluate commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffalign.commands.evaluate import EvaluateArgs, evaluate_main
from diffalign.commands.train import TrainArgs, train_main
from diffalign.data.nav1d_datasets import generate_nav1d_dataset, nav1d_dataset_attrs, to_episodes
from diffalign.eval.evaluate import evaluate
from diffalign.eval.rollout import rollout
from diffalign.models import build_model
from diffalign.train.checkpoint import CheckpointError

KEYS = ("return_mean", "return_std", "normalized", "coherency", "entropy", "decisions_per_s")
TINY = {"unet": {"dim": 8, "dim_mults": [1, 2]}, "dit": {"hidden": 16, "depth": 1, "heads": 2}}


def _saved_model(tmp_path, kind: str, dataset: str = "full"):
    torch.manual_seed(0)
    data = generate_nav1d_dataset(dataset, episodes=10, seed=2)
    eps = to_episodes(data, nav1d_dataset_attrs(dataset, seed=2, episodes=10))
    backbone = "dit" if kind == "dp" else "unet"
    meta = {"task": f"nav1d/{dataset}", "layout_seed": 0, "env_id": "diffalign/Nav1D-v0",
            "dataset_kind": dataset}
    model = build_model(kind, "ddim", backbone, obs_dim=2, act_dim=1,
                        horizon=4 if kind == "dp" else 8, backbone_kwargs=TINY[backbone],
                        meta=meta)
    ds = model.make_dataset(eps)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        loss = model.loss(ds.sample(8, g), generator=g)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path / kind
    model.save(out)
    return model, out


class _Critic:
    def q(self, obs, act):
        return -((act[..., 0] - 0.3) ** 2) + 0.0 * obs[..., 0]


@pytest.mark.parametrize("kind", ["diffuser", "dd", "dp"])
def test_evaluate_writes_all_metrics_and_picture(kind, tmp_path):
    _, d = _saved_model(tmp_path, kind, "expert" if kind == "dp" else "full")
    res = evaluate(d, critic=_Critic(), episodes=3, candidates=2, steps=2, selection="auto")
    saved = json.loads((d / "eval.json").read_text())
    for k in KEYS:
        assert k in saved and saved[k] is not None, k
    assert (d / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert saved["selection"] == ("idql_greedy" if kind == "dp" else "best")
    assert 0.0 < saved["coherency"] < 1.0  # an untrained model's plans break the dynamics
    assert saved["episode_length_mean"] == 32
    assert res["return_mean"] == pytest.approx(saved["return_mean"])
    # % of the optimum, the optimum solved here by dynamic programming (layout 0, x0 ~ U(-1, 1))
    from diffalign.envs.nav1d_optimum import nav1d_optimum

    optimum = nav1d_optimum(0)["optimal_return"]
    assert saved["normalized"] == pytest.approx(100 * saved["return_mean"] / optimum)


def test_rollout_records_and_is_reproducible(tmp_path):
    import functools

    import gymnasium as gym

    model, _ = _saved_model(tmp_path, "diffuser")
    make_env = functools.partial(gym.make, "diffalign/Nav1D-v0")
    a = rollout(model, make_env, episodes=3, candidates=1, steps=2, seed=5)
    b = rollout(model, make_env, episodes=3, candidates=1, steps=2, seed=5, vectorised=False)
    assert a.returns.shape == (3,) and (a.lengths == 32).all()
    assert [t.shape for t in a.trajectories] == [(33, 2)] * 3
    assert a.plan_states.shape[1:] == (8, 2) and a.plan_actions.shape[1:] == (8, 1)
    assert a.plan_valid.max() == 8 and a.plan_valid.min() == 1  # the last step's plan
    assert a.entropy_samples.shape[1] == 16  # extra samples when candidates == 1
    assert a.decisions == 3 * 32 and a.decisions_per_s > 0
    # the same starts (reset seeds) whether vectorised or not
    np.testing.assert_allclose([t[0] for t in a.trajectories], [t[0] for t in b.trajectories])


def test_evaluate_bad_inputs_write_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        evaluate_main(EvaluateArgs(model_dir=tmp_path / "nope", progress=False))
    _, d = _saved_model(tmp_path, "dp", "expert")
    before = sorted(p.name for p in d.iterdir())
    with pytest.raises(FileNotFoundError, match="no-critic"):
        evaluate_main(EvaluateArgs(model_dir=d, critic=tmp_path / "no-critic", episodes=2,
                                   progress=False))
    with pytest.raises(ValueError, match="critic"):
        evaluate_main(EvaluateArgs(model_dir=d, selection="idql_greedy", episodes=2,
                                   progress=False))
    (d / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError):
        evaluate_main(EvaluateArgs(model_dir=d, episodes=2, progress=False))
    assert sorted(p.name for p in d.iterdir()) == before
    with pytest.raises(ValueError, match="episodes"):
        EvaluateArgs(model_dir=d, episodes=0)


def test_train_command_end_to_end_and_bad_inputs(tmp_path):
    out = tmp_path / "run"
    summary = train_main(TrainArgs(out=out, model="dp", process="fm", task="nav1d/expert",
                                   episodes=20, steps=2, batch_size=8, progress=False))
    assert summary["steps"] == 2
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["kind"] == "dp" and cfg["spec"]["process"] == "fm"
    assert cfg["meta"]["task"] == "nav1d/expert" and cfg["meta"]["dataset_kind"] == "expert"
    assert (out / "model.safetensors").is_file()
    res = evaluate_main(EvaluateArgs(model_dir=out, episodes=2, steps=2, progress=False))
    assert (out / "eval.json").is_file() and res["coherency"] is not None

    for bad, match in [
        (dict(task="nav1d/medium"), "medium"),
        (dict(model="diffuser", horizon=10), "horizon=10"),
        (dict(model="dp", backbone="unet", horizon=6), "horizon=6"),
    ]:
        target = tmp_path / "bad"
        with pytest.raises(ValueError, match=match):
            train_main(TrainArgs(out=target, episodes=20, steps=2, progress=False, **bad))
        assert not target.exists()
    with pytest.raises(ValueError, match="steps"):
        TrainArgs(out=tmp_path / "x", steps=0)


def test_decision_rate_times_one_environment_on_the_threads_asked(tmp_path):
    from diffalign.eval.steps_sweep import decision_rate

    model, _ = _saved_model(tmp_path, "diffuser")
    before = torch.get_num_threads()
    calls = []
    sample = model.sample

    def counted(obs, n=1, **k):
        calls.append((tuple(obs.shape), n, k["steps"], torch.get_num_threads()))
        return sample(obs, n, **k)

    model.sample = counted
    assert decision_rate(model, steps=2, candidates=3, critic=_Critic(), repeats=4) > 0
    # one observation history, 3 candidates, 2 steps, one thread; two warm-up calls
    assert calls == [((1, model.spec.obs_history, 2), 3, 2, 1)] * 6
    assert torch.get_num_threads() == before  # restored
    with pytest.raises(ValueError, match="repeats=0"):
        decision_rate(model, repeats=0)
