"""Using a run's result: evaluate a run's stage again, export it, load it as a policy.

A tiny but real run directory is built once: a foundation trained a few steps, a critic,
a perturbed LoRA adapter as stage "rl", an untrained cascade refiner, and each stage
evaluated the way ``diffalign run nav1d`` evaluates it (``pipeline.jobs.eval_job``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffalign.cli import main

pytest.importorskip("peft")

SEED = 1  # not the default 0: the run's seed must be read back from the run
EPISODES = 2
STAGES = ["reference", "reference@4", "rl", "cascade"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from diffalign.align.cascade import CascadeModel, build_refiner
    from diffalign.align.common import freeze
    from diffalign.align.lora import add_lora, merged_copy, save_adapter
    from diffalign.atomic import write_json
    from diffalign.commands.train import TrainArgs, train_model
    from diffalign.eval.evaluate import evaluate
    from diffalign.models.base import ControlModel
    from diffalign.models.critic import CriticConfig, load_critic, train_critic
    from diffalign.pipeline.jobs import eval_job, save_stage_weights
    from diffalign.tasks import resolve_task
    from diffalign.train.checkpoint import save_tensors

    out = tmp_path_factory.mktemp("run")
    fdir, cdir = out / "foundation", out / "critic"
    train_model(TrainArgs(out=fdir, task="nav1d/full", model="diffuser", process="ddim",
                          episodes=20, steps=20, batch_size=16, horizon=8, state_cond=True,
                          cond_fourier=4, progress=False))
    # 2 denoising steps instead of 10: every evaluation below samples 5x faster
    cfg = json.loads((fdir / "config.json").read_text())
    cfg["spec"]["process_kwargs"]["default_steps"] = 2
    write_json(fdir / "config.json", cfg)
    task = resolve_task("nav1d/full", layout_seed=0, episodes=20, seed=0)
    train_critic(task.episodes, CriticConfig(hidden=16, depth=2, steps=5, batch_size=16,
                                             log_every=1000), cdir, progress=False)
    kw = dict(episodes=EPISODES, seed=SEED, device="cpu")
    eval_job(str(fdir), str(cdir), None, candidates=1, out_dir=str(out / "eval/reference"), **kw)
    eval_job(str(fdir), str(cdir), None, candidates=4, out_dir=str(out / "eval/reference@4"),
             **kw)

    model = freeze(ControlModel.load(fdir))
    torch.manual_seed(0)
    net = add_lora(model.net, r=4, alpha=8.0)
    with torch.no_grad():  # a trained adapter's stand-in: the model must differ from the ref
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    for where in ("align/stages/rl/adapter", "align/adapter"):
        save_adapter(net, out / where, extra={"reference_spec": model.spec.to_dict()})
    weights = save_stage_weights(merged_copy(net), out / "eval/rl/weights.safetensors")
    eval_job(str(fdir), str(cdir), str(weights), candidates=1, out_dir=str(out / "eval/rl"),
             **kw)
    weights.unlink()

    refiner = build_refiner(model, net, warm_start="aligned")
    with torch.no_grad():  # the x_lo input starts at zero: give it a say
        for name, p in refiner.named_parameters():
            if "extra" in name:
                p.normal_(0, 0.2)
    save_tensors(out / "align/cascade/refiner.safetensors", refiner.state_dict())
    write_json(out / "align/cascade/config.json", {"kind": "cascade_refiner",
                                                   "extra_dim": refiner.extra_dim})
    evaluate(CascadeModel(model, net, refiner).merged(), critic=load_critic(cdir),
             candidates=1, out_dir=out / "eval/cascade", **kw)

    rows = []
    for name in STAGES:
        ev = json.loads((out / "eval" / name / "eval.json").read_text())
        rows.append({"name": name, "candidates": ev["candidates"], "denoise_steps": ev["steps"],
                     "eval_episodes": ev["episodes"], "return_mean": ev["return_mean"]})
    write_json(out / "report.json", {"task": "nav1d/full", "layout_seed": 0, "stages": rows,
                                     "final": {"stage": "rl", "reason": "best validation"}})
    return out


def _eval(path):
    return json.loads((path / "eval.json").read_text())


def _actions(model, seed=0):
    from diffalign.models.selection import select_actions

    obs = torch.tensor([[[-0.5, 0.0]], [[0.1, 0.25]], [[0.7, 0.5]]])
    return select_actions(model, obs, generator=torch.Generator().manual_seed(seed)).actions


def test_run_dir_stages_and_final(run_dir, tmp_path):
    from diffalign.runs import final_stage, is_run_dir, run_stages

    assert is_run_dir(run_dir) and not is_run_dir(run_dir / "foundation")
    assert run_stages(run_dir) == STAGES
    assert final_stage(run_dir) == "rl"
    # a report without "final" (runs before it was recorded): the last stage
    report = json.loads((run_dir / "report.json").read_text())
    del report["final"]
    (tmp_path / "report.json").write_text(json.dumps(report))
    assert final_stage(tmp_path) == "cascade"


@pytest.mark.parametrize("stage", STAGES[1:])  # "reference" is "reference@4" at N = 1
def test_evaluate_a_runs_stage_equals_the_runs_own_evaluation(run_dir, tmp_path, stage,
                                                              capsys):
    assert main(["evaluate", str(run_dir), "--stage", stage, "--out", str(tmp_path),
                 "--no-progress"]) == 0
    own, again = _eval(run_dir / "eval" / stage), _eval(tmp_path)
    assert again["stage"] == stage and again["seed"] == SEED
    assert again["episodes"] == EPISODES and again["candidates"] == own["candidates"]
    assert again["returns"] == own["returns"]
    assert again["return_mean"] == own["return_mean"]
    assert "same episodes and seed" in capsys.readouterr().out


def test_evaluate_a_run_defaults_to_its_final_stage(run_dir):
    assert main(["evaluate", str(run_dir), "--episodes", "1", "--no-progress"]) == 0
    again = _eval(run_dir / "eval-again" / "rl")
    assert again["stage"] == "rl" and again["episodes"] == 1 and again["seed"] == SEED


def test_a_bad_stage_exits_2_naming_the_stages(run_dir, capsys):
    from diffalign.runs import load_stage

    assert main(["evaluate", str(run_dir), "--stage", "sft", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'sft'" in err
    assert ", ".join(STAGES) in err
    assert main(["export", str(run_dir), "--stage", "nope", "--out", str(run_dir / "x")]) == 2
    assert ", ".join(STAGES) in capsys.readouterr().err
    assert not (run_dir / "x").exists()
    with pytest.raises(ValueError, match="reference@4"):
        load_stage(run_dir, "dpo")
    with pytest.raises(ValueError, match="stage"):  # --stage on a plain model directory
        from diffalign.commands.evaluate import EvaluateArgs, evaluate_main

        evaluate_main(EvaluateArgs(model_dir=run_dir / "foundation", stage="rl"))


def test_export_merges_the_stages_adapter(run_dir, tmp_path, capsys):
    from diffalign.models.base import ControlModel
    from diffalign.runs import load_stage

    out = tmp_path / "rl"
    assert main(["export", str(run_dir), "--stage", "rl", "--out", str(out)]) == 0
    assert "exported stage rl" in capsys.readouterr().out
    exported = ControlModel.load(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["export"]["stage"] == "rl" and cfg["export"]["final"] is True
    assert cfg["export"]["candidates"] == 1 and not (out / "critic").exists()
    assert "train" in cfg  # the foundation's training settings are kept
    stage = load_stage(run_dir, "rl")
    want = _actions(stage.model)
    torch.testing.assert_close(_actions(exported), want, atol=0, rtol=0)
    assert not torch.equal(_actions(ControlModel.load(run_dir / "foundation")), want)
    # no adapter left: a plain network under the reference's parameter names
    assert not any("lora" in k for k in exported.state_dict())


def test_export_cascade_and_best_of_n(run_dir, tmp_path):
    from diffalign.policy import load_policy
    from diffalign.runs import export_stage, load_cascade_export, load_stage

    out = export_stage(run_dir, tmp_path / "cascade", stage="cascade")
    casc = load_cascade_export(out)
    assert type(casc).__name__ == "CascadeModel"
    g = torch.Generator
    obs = torch.tensor([[[-0.5, 0.0]], [[0.1, 0.25]]])
    want = load_stage(run_dir, "cascade").model.sample(obs, 2, generator=g().manual_seed(3)).x0
    got = casc.sample(obs, 2, generator=g().manual_seed(3)).x0
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert json.loads((out / "config.json").read_text())["export"]["cascade"] == "cascade"

    best = export_stage(run_dir, tmp_path / "best")
    assert json.loads((best / "config.json").read_text())["export"]["stage"] == "rl"
    best = export_stage(run_dir, tmp_path / "best4", stage="reference@4")
    assert (best / "critic" / "config.json").is_file()
    assert not (best / "critic" / "train_state").exists()
    pol = load_policy(best)
    assert pol.stage == "reference@4" and pol.candidates == 4 and pol.critic is not None
    assert main(["evaluate", str(best), "--no-progress"]) == 0
    again = _eval(best)
    assert again["candidates"] == 4 and again["selection"] == "best"
    assert again["returns"] == _eval(run_dir / "eval" / "reference@4")["returns"]


def test_export_refuses_a_non_empty_out(run_dir, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(run_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not empty" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no temporary left
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", str(run_dir), "--out", str(empty)]) == 0
    assert (empty / "model.safetensors").is_file()


def _episode(policy, env, seed):
    obs, _ = env.reset(seed=seed)
    policy.reset()
    total, steps, done, actions = 0.0, 0, False, []
    while not done:
        a = policy.act(obs)
        assert isinstance(a, np.ndarray) and a.shape == (1,)
        actions.append(a)
        obs, r, term, trunc, _ = env.step(a)
        total, steps, done = total + float(r), steps + 1, term or trunc
    return total, steps, np.stack(actions)


def test_load_policy_plays_an_episode_like_the_evaluation(run_dir):
    import diffalign
    from diffalign.eval.evaluate import evaluate
    from diffalign.runs import load_stage

    policy = diffalign.load_policy(run_dir, seed=SEED)  # a run directory: its final stage
    assert policy.stage == "rl" and policy.candidates == 1
    env = policy.make_env()
    total, steps, actions = _episode(policy, env, seed=SEED)
    assert steps == 32
    st = load_stage(run_dir, "rl")
    res = evaluate(st.model, critic=st.critic_dir, episodes=1, seed=SEED, write=False)
    assert total == pytest.approx(res["returns"][0], abs=1e-9)
    # a new episode: a fresh history (else the first decision would see the last episode)
    policy.reset(seed=SEED)
    obs, _ = env.reset(seed=SEED)
    np.testing.assert_array_equal(policy.act(obs), actions[0])
    assert diffalign.load_policy(run_dir, stage="reference").stage == "reference"
    with pytest.raises(ValueError, match="shape"):
        policy.act(np.zeros(3))


def test_load_policy_executes_a_policys_queued_actions(tmp_path):
    import functools

    import gymnasium as gym

    from diffalign.commands.train import TrainArgs, train_model
    from diffalign.eval.rollout import rollout
    from diffalign.policy import load_policy

    out = tmp_path / "dp"
    train_model(TrainArgs(out=out, task="nav1d/full", model="dp", process="ddim", episodes=10,
                          steps=3, batch_size=8, horizon=4, obs_history=2, action_horizon=3,
                          progress=False))
    policy = load_policy(out, seed=5)
    assert policy.stage is None and policy.candidates == 1
    calls = []
    sample = policy.model.sample
    policy.model.sample = lambda *a, **k: calls.append(1) or sample(*a, **k)
    total, steps, _ = _episode(policy, policy.make_env(), seed=5)
    assert len(calls) == -(-steps // 3)  # one sample per 3 executed actions
    del policy.model.sample
    make_env = functools.partial(gym.make, "diffalign/Nav1D-v0")
    res = rollout(policy.model, make_env, episodes=1, seed=5)
    assert total == pytest.approx(float(res.returns[0]), abs=1e-9)


@pytest.mark.parametrize("stage", ["rl", "cascade"])
def test_compiled_policy_acts_as_the_eager_one(run_dir, stage):
    import diffalign

    eager = diffalign.load_policy(run_dir, stage=stage, seed=SEED)
    fast = diffalign.load_policy(run_dir, stage=stage, seed=SEED, compile=True)
    assert fast.model.net is not eager.model.net
    if stage == "rl":  # one candidate of a small net: the narrow compiled form
        assert not fast.model.net.uses_wide(1)
    env = eager.make_env()
    obs, _ = env.reset(seed=SEED)
    for _ in range(3):  # frozen weights, generated C++: the same actions to float rounding
        a = eager.act(obs)
        np.testing.assert_allclose(fast.act(obs), a, rtol=0, atol=1e-5)
        obs, *_ = env.step(a)
    # the whole plan too, and the compiled net still has the state in-painted where the
    # model in-paints it (the sampler loop around the compiled net is the eager one)
    model = fast.model
    hist = torch.as_tensor(obs, dtype=torch.float32).reshape(1, 1, -1)
    hist = hist.repeat(1, model.spec.obs_history, 1)
    with torch.no_grad():
        xs = [p.model.sample(hist, generator=torch.Generator().manual_seed(0)).x0
              for p in (eager, fast)]
    torch.testing.assert_close(xs[1], xs[0], rtol=0, atol=1e-5)
    _, inpaint, _ = model.expanded_condition(hist)
    if inpaint is not None:
        mask = inpaint.mask.expand_as(xs[1])
        torch.testing.assert_close(xs[1][mask], inpaint.value.expand_as(xs[1])[mask])
