"""`diffalign run nav1d --preset quick` end to end: every stage reported, files written,
a second run resumes from what is on disk."""

import json

import pytest

from diffalign.cli import main
from diffalign.recipes import NAV1D_PRESETS

STAGE_KEYS = {"name", "return_mean", "return_std", "normalized", "coherency", "entropy",
              "candidates", "denoise_steps", "wall_s"}


@pytest.mark.slow
def test_run_nav1d_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "nav1d", "--preset", "quick", "--out", str(out), "--eval-episodes", "4",
            "--no-progress"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "nav1d/full" and report["model"] == "diffuser"
    assert report["optimal_return"] > 10
    names = [s["name"] for s in report["stages"]]
    assert names == ["reference", "reference@64", "dpo", "sft", "rl", "cascade"]
    for s in report["stages"]:
        assert STAGE_KEYS <= set(s), s["name"]
        assert s["coherency"] is not None and 0 <= s["coherency"] <= 1
        assert s["normalized"] == pytest.approx(100 * s["return_mean"] /
                                                report["optimal_return"])
    assert [s["candidates"] for s in report["stages"]] == [1, 64, 1, 1, 1, 1]
    assert isinstance(report["events"], list)
    md = (out / "report.md").read_text()
    assert "| reference@64 | 64 |" in md and "| cascade | 1 |" in md
    for png in ("returns.png", "reward_distribution.png", "trajectories.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert (out / "align" / "adapter" / "adapter_model.safetensors").exists()
    # the answer is chosen on episodes from held-out starts the evaluation never plays: one
    # of the stages, said why, marked in the md; the reference unless a stage's paired gain
    # in return clears 2 standard errors, and then the one with the largest gain
    assert report["final"]["stage"] in names and report["final"]["reason"]
    assert "held-out starts (reset seeds 10000-10001)" in report["final"]["reason"]
    assert set(report["final"]["heldout"]) == {"reference", "dpo", "sft", "rl", "cascade"}
    sel = report["final"]["selection"]
    assert set(sel) == {"reference", "dpo", "sft", "rl", "cascade"}
    clear = {k: v["gain"] for k, v in sel.items()
             if k != "reference" and v["gain"] > 2 * v["se"] and v["gain"] > 0}
    assert report["final"]["stage"] == (max(clear, key=clear.get) if clear else "reference")
    ev = json.loads((out / "select" / "reference" / "eval.json").read_text())
    assert ev["seed"] == 10000 and ev["episodes"] == 2
    assert f"| {report['final']['stage']} **(final)** |" in md
    for st in ("dpo", "sft", "rl"):
        assert (out / "align" / "stages" / st / "adapter" / "adapter_model.safetensors").exists()
    # random-policy data, measured so: the recipe for data that tried every action
    recipe = NAV1D_PRESETS["quick"]
    assert report["action_coverage"] >= recipe.covered_at
    assert json.loads((out / "behavior" / "config.json").read_text())["kind"] == \
        "behavior_model"
    # align.json lists each stage's validations; the kept adapter is the best of them so far
    aj = json.loads((out / "align" / "align.json").read_text())
    # RL runs last, from the SFT adapter, without a KL to the reference on random-policy data
    assert aj["config"]["rl"]["kl_coef"] == 0.0 and aj["config"]["rl"]["lr"] == 1e-3
    best = aj["reference_val_reward"]
    for st in aj["stages"]:
        vals = [v["val_reward"] for v in st["validations"]]
        assert all(v["iteration"] < st["iterations"] for v in st["validations"])
        best = max([best, *vals])
        assert st["val_reward"] == pytest.approx(best)
    # random-policy data: the planner sees the state as a condition, the critic backs up a max
    found = json.loads((out / "foundation" / "config.json").read_text())
    assert found["spec"]["state_cond"] is True
    crit = json.loads((out / "critic" / "config.json").read_text())
    for k in ("backup_actions", "backup_refine", "backup_states", "backup_proposals",
              "backup_select"):
        assert crit["config"][k] == getattr(recipe, f"covered_{k}")
    assert crit["config"]["hidden"] == recipe.critic_hidden
    # the quick preset trains two critics (the default one): the ensemble runs end to end
    assert crit["kind"] == "iql_critic_ensemble" and crit["config"]["ensemble"] == 2
    assert report["critic_ensemble"] == 2 and report["critic_steps"] == 800
    # half the conditions come from the critic's greedy rollouts through learned dynamics
    assert json.loads((out / "dynamics" / "config.json").read_text())["kind"] == \
        "dynamics_model"
    assert aj["conditions"]["rollout_states"] == aj["conditions"]["dataset_states"] == 64
    assert aj["config"]["rollouts"]["dynamics"]["steps"] == 300  # the preset's, as trained
    assert "dynamics_train_s" in report["timings"]
    # a stage that kept an earlier stage's adapter reuses that stage's evaluation
    by_name = {s["name"]: s for s in report["stages"]}
    for s in report["stages"]:
        ev = json.loads((out / "eval" / s["name"] / "eval.json").read_text())
        if "same_model_as" in ev:
            assert s["return_mean"] == by_name[ev["same_model_as"]]["return_mean"]
    # every stage was evaluated: no stage weights are left behind
    assert not list((out / "eval").glob("*/weights.safetensors"))
    # the reference and the final stage again at 1, 2, 5 and 20 denoising steps, each
    # with its decision rate for one environment on one thread (the quick model: 20 steps)
    sweep = report["steps_sweep"]
    final = report["final"]["stage"]
    want = {(st, k) for st in {"reference", final} for k in (1, 2, 5, 20)}
    assert {(r["stage"], r["steps"]) for r in sweep["rows"]} == want
    assert sweep["episodes"] == recipe.steps_sweep_episodes and sweep["threads"] == 1
    for r in sweep["rows"]:
        ev = json.loads((out / "steps" / r["stage"] / str(r["steps"]) / "eval.json").read_text())
        assert ev["steps"] == r["steps"] and ev["episodes"] == sweep["episodes"]
        assert r["score"] == pytest.approx(ev["normalized"]) and r["decisions_per_s"] > 0
    assert "## Denoising steps" in md
    _readme_quickstart(out, tmp_path, report)
    capsys.readouterr()
    # a second run finds everything on disk and only rewrites the report
    assert main(args) == 0
    log = capsys.readouterr().out
    assert "foundation: loaded" in log and "critic: loaded" in log
    assert "dynamics: loaded" in log
    # killed before the last stage's evaluation (in the side process) was written: the run
    # evaluates it again from the stage's weights, to the same result
    _kill_last_stage_evaluation(out)
    assert main(args) == 0
    again = json.loads((out / "report.json").read_text())
    # (the adapter read back from disk merges to the same weights up to float rounding)
    assert [s["return_mean"] for s in again["stages"]] == pytest.approx(
        [s["return_mean"] for s in report["stages"]], rel=1e-5)
    assert not (out / "eval" / "rl" / "weights.safetensors").exists()
    # without those weights the stage's adapter is gone: a clear error, not a wrong number
    (out / "eval" / "rl" / "eval.json").unlink()
    assert main(args) == 2
    assert "'rl'" in capsys.readouterr().err
    _kill_last_stage_evaluation(out)
    assert main(args) == 0
    # the alignment-gap benchmark reads the run: both tables (its numbers are checked by
    # test_alignment_gap_state_stats_by_hand)
    gap = _load_benchmark("alignment_gap")
    gap.main([str(out), "--episodes", "2", "--candidates", "4"])
    text = capsys.readouterr().out
    assert "of the optimum (2 episodes, layout 0)" in text
    rows = [line.split() for line in text.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 8  # four bands of steps, visited and dataset states
    assert sum(int(r[1]) for r in rows[4:]) == 512  # every held-out state in one band
    _aligned_again_for_two_steps(out, tmp_path, args)


def _aligned_again_for_two_steps(out, tmp_path, args):
    """Another run handed this run's data, foundation and critics, with --deploy-steps 2:
    the foundation it loads samples with 2 steps, in every stage's evaluation and for what
    loads it later, and its weights are untouched."""
    import shutil

    from diffalign.models.base import ControlModel

    two = tmp_path / "two_steps"
    for sub in ("data", "behavior", "foundation", "critic", "dynamics"):
        shutil.copytree(out / sub, two / sub)
    argv = [a if a != str(out) else str(two) for a in args]
    argv[argv.index("--eval-episodes") + 1] = "2"
    assert main([*argv, "--deploy-steps", "2", "--methods", "dpo", "--no-cascade"]) == 0
    report = json.loads((two / "report.json").read_text())
    assert {s["denoise_steps"] for s in report["stages"]} == {2}
    assert json.loads((two / "eval" / "dpo" / "eval.json").read_text())["steps"] == 2
    assert ControlModel.load(two / "foundation").process.default_steps == 2
    assert (two / "foundation" / "model.safetensors").read_bytes() == \
        (out / "foundation" / "model.safetensors").read_bytes()


def _readme_quickstart(out, tmp_path, report):
    """The README's quickstart, as written, on this run (its `run nav1d` line is the run
    above, with the quick preset): evaluate reproduces the final stage's own evaluation,
    export writes the policy, and the Python script plays an episode with it."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    bash = re.search(r"```bash\n(.*?)```", section, re.S).group(1).strip().splitlines()
    script = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert bash[0].startswith("diffalign run nav1d --out runs/nav1d")
    for line in bash[1:]:
        argv = line.replace("runs/nav1d", str(out)).split()
        assert argv[0] == "diffalign" and main(argv[1:]) == 0, line
    final = report["final"]["stage"]
    again = json.loads((out / "eval-again" / final / "eval.json").read_text())
    own = json.loads((out / "eval" / final / "eval.json").read_text())
    assert again["returns"] == pytest.approx(own["returns"], rel=1e-4)
    env = {**os.environ, "MPLBACKEND": "Agg"}
    res = subprocess.run([sys.executable, "-c", script.replace("runs/nav1d", str(out))],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert re.fullmatch(r"return -?\d+\.\d\d\n", res.stdout)


def _kill_last_stage_evaluation(out):
    """The state a kill leaves while RL's evaluation runs: RL's merged weights on disk (RL
    is the last stage, so its adapter is the saved one), no eval.json."""
    from diffalign.align.lora import load_adapter, merged_copy
    from diffalign.models.base import ControlModel
    from diffalign.pipeline.jobs import save_stage_weights

    net = load_adapter(ControlModel.load(out / "foundation").net, out / "align" / "adapter")
    (out / "eval" / "rl" / "eval.json").unlink(missing_ok=True)
    save_stage_weights(merged_copy(net), out / "eval" / "rl" / "weights.safetensors")


def _load_benchmark(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _GapModel:
    """A stand-in model for ``alignment_gap``: its first actions are drawn from the generator,
    near 0.5 for the aligned net and uniform on [-1, 1] for the reference (no net), and each
    draw is recorded per net."""

    def __init__(self):
        self.draws = {"aligned": [], "reference": []}

    def sample(self, obs, n, generator=None, net=None):
        import types

        import torch

        u = torch.rand(len(obs) * n, generator=generator)
        a = 0.5 + 0.2 * (u - 0.5) if net is not None else 2 * u - 1
        self.draws["aligned" if net is not None else "reference"].append(a.view(len(obs), n))
        return types.SimpleNamespace(x0=a.view(-1, 1, 1))

    def actions_from_x(self, x0):
        return x0


class _GapCritic:
    """Q(s, a) = −(a − 0.8 x)², x = s[0]."""

    def q(self, obs, act):
        return -((act[:, 0] - 0.8 * obs[:, 0]) ** 2)


class _GapSolution:
    """A layout's Q*(x, t, a) = −(1 + t)(a − 0.3 − 0.1 x)² on 21 actions."""

    actions = __import__("numpy").linspace(-1, 1, 21)

    def q_values(self, x, t):
        return -(1 + t[:, None]) * (self.actions[None, :] - 0.3 - 0.1 * x[:, None]) ** 2


def test_alignment_gap_state_stats_by_hand(capsys):
    import numpy as np
    import torch

    gap = _load_benchmark("alignment_gap")
    horizon, n, cands = 8, 6, 5
    g = torch.Generator().manual_seed(0)
    obs = torch.stack([torch.rand(n, generator=g) * 2 - 1,
                       torch.tensor([0, 1, 2, 5, 6, 7]) / horizon], 1)
    grid = torch.linspace(-1, 1, 41)
    model, critic, sol = _GapModel(), _GapCritic(), _GapSolution()
    rows = gap._state_stats(model, critic, "aligned-net", obs, torch.Generator().manual_seed(1),
                            cands, grid, sol, horizon, chunk=4)  # two chunks
    # per chunk: 8 samples of the aligned net (the spread), N of the reference (best-of-N)
    assert [d.shape for d in model.draws["aligned"]] == [(4, 8), (2, 8)]
    assert [d.shape for d in model.draws["reference"]] == [(4, cands), (2, cands)]
    al, ref = torch.cat(model.draws["aligned"]), torch.cat(model.draws["reference"])

    def q(a):
        return -(a - 0.8 * obs[:, 0]) ** 2

    x, t = obs[:, 0].double().numpy(), np.rint(obs[:, 1].numpy() * horizon)
    q_grid = torch.stack([q(torch.full((n,), float(a))) for a in grid], 1)
    best = grid[q_grid.argmax(1)]

    def regret(a):
        qs = sol.q_values(x, t)
        return qs.max(1) - np.array([np.interp(ai, sol.actions, qi) for ai, qi in zip(a, qs)])

    want = np.stack([
        q(al[:, 0]).numpy(),                                       # Q(aligned)
        q_grid.max(1).values.numpy(),                              # max Q over the grid
        torch.stack([q(ref[:, j]) for j in range(cands)], 1).max(1).values.numpy(),  # best-of-N
        q(ref[:, 0]).numpy(),                                      # one reference sample
        (al[:, 0] - best).abs().numpy(),                           # |a - a*|
        al.std(1).numpy(),                                         # spread
        regret(al[:, 0].double().numpy()),                         # regret*
        regret(best.double().numpy()),                             # regret*(a*)
    ], 1)
    np.testing.assert_allclose(rows, want, rtol=1e-5, atol=1e-6)
    # best-of-N beats one sample somewhere (else the column test above proves little)
    assert (want[:, 2] > want[:, 3] + 1e-3).any()

    # the table: per band of steps the mean of its states' rows; capture from the means
    gap._print_table("title", rows, t.astype(int), horizon)
    lines = [ln.split() for ln in capsys.readouterr().out.splitlines()
             if ln.strip()[:1].isdigit()]
    # width 2: steps 0-1 hold states 0 and 1, 2-3 state 2, 4-5 state 3, 6-7 states 4 and 5
    bands = [[0, 1], [2], [3], [4, 5]]
    assert [ln[0] for ln in lines] == ["0-1", "2-3", "4-5", "6-7"]
    for ln, idx in zip(lines, bands):
        m = want[idx].mean(0)
        assert int(ln[1]) == len(idx)
        np.testing.assert_allclose([float(v) for v in ln[2:6]], m[:4], atol=6e-4)
        capture = (m[0] - m[3]) / (m[1] - m[3])
        assert float(ln[6]) == pytest.approx(capture, abs=6e-3)
        np.testing.assert_allclose([float(v) for v in ln[7:]], m[4:], atol=6e-4)


def test_adapter_fingerprint_follows_the_lora_weights_only():
    import copy

    import torch

    from diffalign.align.lora import add_lora
    from diffalign.pipeline import adapter_fingerprint

    net = add_lora(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)), r=2)
    twin = copy.deepcopy(net)
    assert adapter_fingerprint(net) == adapter_fingerprint(twin)
    with torch.no_grad():
        next(p for n, p in twin.named_parameters() if "lora_" not in n).add_(1.0)
    assert adapter_fingerprint(net) == adapter_fingerprint(twin)  # base weights: ignored
    with torch.no_grad():
        next(p for n, p in twin.named_parameters() if "lora_B" in n).add_(1e-3)
    assert adapter_fingerprint(net) != adapter_fingerprint(twin)


def test_run_nav1d_bad_method_names_it(tmp_path, capsys):
    assert main(["run", "nav1d", "--methods", "rl,ppo2", "--out", str(tmp_path / "x")]) == 2
    assert "ppo2" in capsys.readouterr().err
    assert main(["run", "nav1d", "--rollout-conditions", "-0.5", "--out", str(tmp_path / "x")]) == 2
    assert "rollout_conditions=-0.5" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_final_names_an_evaluated_stage_or_the_reference():
    from diffalign.pipeline import final_row

    stages = [{"name": "reference"}, {"name": "reference@64"}, {"name": "rl"}]
    assert final_row({"stage": "rl", "reason": "r"}, stages)["stage"] == "rl"
    f = final_row({"stage": "cascade", "reason": "r"}, stages)
    assert f["stage"] == "reference" and "cascade" in f["reason"]
    assert final_row({}, stages)["stage"] == "reference"


def test_critic_warning_when_best_of_n_falls_below_one_sample():
    from diffalign.pipeline import critic_warnings

    ref = {"name": "reference", "normalized": 64.3, "candidates": 1}
    worse = {"name": "reference@64", "normalized": 40.9, "candidates": 64}
    better = {**worse, "normalized": 85.0}
    assert critic_warnings(ref, better) == []
    (w,) = critic_warnings(ref, worse)
    assert w["kind"] == "warning" and "40.9%" in w["reason"] and "64.3%" in w["reason"]


def test_run_nav1d_trains_dp_executing_one_action(tmp_path, monkeypatch):
    # the critic ranks a sample by its first action: a DP must execute only that one
    import diffalign.train.foundation as foundation
    from diffalign.commands.run import RunNav1DArgs, run_nav1d

    seen = {}

    class Stop(Exception):
        pass

    def fake_train(task, cfg, out_dir, **kw):
        seen["cfg"] = cfg
        raise Stop

    monkeypatch.setattr(foundation, "train_foundation", fake_train)
    with pytest.raises(Stop):
        run_nav1d(RunNav1DArgs(out=tmp_path / "run", model="dp", preset="quick",
                               progress=False))
    assert seen["cfg"].model == "dp" and seen["cfg"].action_horizon == 1
    assert seen["cfg"].state_cond is False and seen["cfg"].cond_fourier > 0


def test_bf16_is_fast_answers_for_the_device_asked():
    import torch

    from diffalign.train.trainer import bf16_is_fast

    assert isinstance(bf16_is_fast("cpu"), bool)
    if not torch.cuda.is_available():
        assert bf16_is_fast("cuda") is False
        assert bf16_is_fast("auto") == bf16_is_fast("cpu")


def test_run_nav1d_critic_sizes_from_preset_or_arguments(tmp_path, capsys):
    default = NAV1D_PRESETS["default"]
    cfg = default.critic_config(covered=False, seed=0, device="cpu")
    assert (cfg.ensemble, cfg.steps) == (default.critic_ensemble, default.critic_steps)
    assert cfg.backup_actions == 0 and cfg.expectile == default.critic_expectile
    assert NAV1D_PRESETS["paper"].critic_config(False, 0, "cpu").ensemble == 2
    cfg = default.critic_config(True, 0, "cpu", ensemble=3, steps=4000)
    assert (cfg.ensemble, cfg.steps, cfg.backup_actions) == (3, 4000, 8)
    assert main(["run", "nav1d", "--critic-ensemble", "0", "--out", str(tmp_path / "x")]) == 2
    assert "critic_ensemble=0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# RL/SFT settings the default nav1d recipe gave align before the --rl-*/--sft-likelihood
# flags existed (recorded from NAV1D_PRESETS["default"].align_config): they must not move
_RL_BEFORE = {
    "full": dict(max_updates=50, eval_every=10, algo="qvpg", states_per_update=256,
                 group_size=1, ppo_epochs=2, clip=0.2, kl_coef=0.0, lr=1e-3, credit="none",
                 credit_gamma=0.9, grad_last_k=3, random_k=False, grad_k_min=1,
                 qvpg_scale="none", entropy_coef=0.0, max_grad_norm=1.0),
    "expert": dict(max_updates=50, eval_every=10, algo="qvpg", states_per_update=32,
                   group_size=8, ppo_epochs=2, clip=0.2, kl_coef=0.005, lr=1e-3,
                   credit="none", credit_gamma=0.9, grad_last_k=3, random_k=False,
                   grad_k_min=1, qvpg_scale="none", entropy_coef=0.0, max_grad_norm=1.0)}
_SFT_BEFORE = {
    "full": dict(max_updates=20, eval_every=None, states_per_update=128, candidates=1,
                 source="current", selection="topk", top_k=1, quantile=0.9,
                 likelihood_quantile=0.0, likelihood_source="data", likelihood_windows=2048,
                 likelihood_samples=4, loss="min_snr", action_proposals=201, replay=4096,
                 min_snr_gamma=1.0, plan_weight=0.1, epochs=64, batch_size=64, lr=4e-3,
                 lr_final=1.0, max_grad_norm=1.0),
    "expert": dict(max_updates=20, eval_every=None, states_per_update=64, candidates=16,
                   source="current", selection="topk", top_k=1, quantile=0.9,
                   likelihood_quantile=0.1, likelihood_source="data", likelihood_windows=2048,
                   likelihood_samples=4, loss="min_snr", action_proposals=0, replay=0,
                   min_snr_gamma=1.0, plan_weight=0.1, epochs=4, batch_size=64, lr=3e-4,
                   lr_final=1.0, max_grad_norm=1.0)}


def test_default_nav1d_align_config_rl_sft_unchanged(tmp_path):
    from dataclasses import asdict

    from diffalign.commands.run import RunNav1DArgs

    for recipe in (NAV1D_PRESETS["default"], RunNav1DArgs(out=tmp_path / "x").recipe()):
        for data, covered in (("full", True), ("expert", False)):
            cfg = recipe.align_config(covered, ("dpo", "sft", "rl"), 0)
            assert asdict(cfg.rl) == _RL_BEFORE[data], data
            assert asdict(cfg.sft) == _SFT_BEFORE[data], data


def test_run_nav1d_rl_flags_reach_align_config(tmp_path, monkeypatch):
    import diffalign.pipeline as pipeline

    seen = {}
    monkeypatch.setattr(pipeline, "run_pipeline", lambda opts: seen.update(opts=opts))
    assert main(["run", "nav1d", "--rl-algo", "ppo", "--rl-credit", "decreasing",
                 "--rl-entropy-coef", "0.01", "--sft-likelihood", "current", "--out",
                 str(tmp_path / "x"), "--no-progress"]) == 0
    opts = seen["opts"]
    for data, covered in (("full", True), ("expert", False)):  # as the pipeline builds it
        cfg = opts.recipe.align_config(covered, opts.methods, opts.seed)
        assert (cfg.rl.algo, cfg.rl.credit, cfg.rl.entropy_coef) == ("ppo", "decreasing", 0.01)
        assert cfg.sft.likelihood_source == "current"
        # PPO's group baseline: covered data's one sample per state becomes rl_pg_group
        assert cfg.rl.group_size == (8 if covered else _RL_BEFORE[data]["group_size"])
        assert cfg.rl.states_per_update == _RL_BEFORE[data]["states_per_update"]
    # QV-PG's truncation: a fixed K, or a range like align's --rl-grad-k-max
    assert main(["run", "nav1d", "--rl-grad-k", "2", "--out", str(tmp_path / "y")]) == 0
    rl = seen["opts"].recipe.align_config(True, ("rl",), 0).rl
    assert (rl.algo, rl.random_k, rl.grad_last_k, rl.group_size) == ("qvpg", False, 2, 1)
    assert main(["run", "nav1d", "--rl-grad-k", "2", "--rl-grad-k-max", "5", "--out",
                 str(tmp_path / "y")]) == 0
    rl = seen["opts"].recipe.align_config(True, ("rl",), 0).rl
    assert (rl.random_k, rl.grad_k_min, rl.grad_last_k) == (True, 2, 5)


def test_deploy_steps_set_the_steps_every_stage_samples_with(tmp_path, monkeypatch, capsys):
    import diffalign.pipeline as pipeline

    seen = {}
    monkeypatch.setattr(pipeline, "run_pipeline", lambda opts: seen.update(opts=opts))
    for cmd in (["nav1d"], ["nav1d/expert", "--recipe", "eval_episodes=3"]):
        assert main(["run", *cmd, "--deploy-steps", "2", "--out", str(tmp_path / "x")]) == 0
        assert seen["opts"].recipe.denoise_steps == 2  # the foundation's sampling steps
        fcfg = seen["opts"].recipe.foundation_config("diffuser", "ddpm", 0, "cpu")
        assert fcfg.sample_steps == 2
    assert main(["run", "nav1d", "--out", str(tmp_path / "x")]) == 0
    assert seen["opts"].recipe.denoise_steps is None
    assert main(["run", "nav1d", "--deploy-steps", "0", "--out", str(tmp_path / "y")]) == 2
    assert "deploy_steps=0" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()
    monkeypatch.undo()  # the real pipeline: a step count the process cannot take stops it
    for cmd in (["nav1d", "--deploy-steps", "500"],
                ["nav1d/full", "--recipe", "denoise_steps=500"]):
        assert main(["run", *cmd, "--out", str(tmp_path / "z")]) == 2
        assert "deploy_steps=500" in capsys.readouterr().err
        assert not (tmp_path / "z").exists()  # before anything is written


def test_a_loaded_foundation_samples_with_the_deploy_steps(tmp_path):
    """A run given a trained foundation (another run's, copied in) and --deploy-steps keeps
    the weights and samples with the new count, and so does whatever loads it later."""
    import torch

    from diffalign.models.base import ControlModel
    from diffalign.models.registry import build_model
    from diffalign.pipeline.run import set_default_steps
    from diffalign.tasks import resolve_task

    task = resolve_task("nav1d/full", episodes=4)
    model = build_model("diffuser", "ddpm", None, obs_dim=task.obs_dim, act_dim=task.act_dim,
                        horizon=8, backbone_kwargs={"dim": 8, "dim_mults": [1, 2]})
    model.make_dataset(task.episodes)
    fdir = tmp_path / "foundation"
    model.save(fdir)
    loaded = ControlModel.load(fdir)
    assert loaded.process.default_steps == 20
    set_default_steps(fdir, loaded, 2)
    assert loaded.process.default_steps == 2
    again = ControlModel.load(fdir)
    assert again.process.default_steps == 2 and again.spec.process_kwargs["default_steps"] == 2
    for k, v in model.net.state_dict().items():
        assert torch.equal(again.net.state_dict()[k], v)
    with pytest.raises(ValueError, match="default_steps=5000"):
        set_default_steps(fdir, again, 5000)
    assert ControlModel.load(fdir).process.default_steps == 2  # the file is untouched


@pytest.mark.parametrize("flags, named", [
    (["--rl-algo", "nope"], "nope"),
    (["--rl-algo", "ppo", "--rl-grad-k", "2"], "rl_grad_k=2"),
    (["--rl-grad-k", "3", "--rl-grad-k-max", "2"], "rl_grad_k_max=2"),
    (["--rl-entropy-coef", "-1"], "rl_entropy_coef=-1"),
    (["--sft-likelihood", "nope2"], "nope2")])
def test_run_nav1d_bad_rl_flag_exits_2_naming_it(tmp_path, capsys, flags, named):
    assert main(["run", "nav1d", *flags, "--out", str(tmp_path / "x")]) == 2
    assert named in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "x").exists()
