"""`diffalign run TASK` on a simulator task: the quick preset end to end on a few collected
MetaWorld episodes, a run reproducible from its directory alone, evaluate/export of the run,
and a run killed by SIGKILL mid-run that resumes to the same result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffalign.cli import main

TASK = "metaworld/button-press-v3/expert"
RUN = ["run", TASK, "--preset", "quick", "--process", "ddim", "--no-progress"]
STAGES = ["reference", "reference@4", "dpo", "sft", "rl", "cascade"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Four expert episodes of 20 steps where ``resolve_task(TASK)`` finds them."""
    pytest.importorskip("metaworld")
    pytest.importorskip("peft")
    d = tmp_path_factory.mktemp("data")
    assert main(["collect", "metaworld/button-press-v3", "--policy", "expert", "--episodes",
                 "4", "--max-episode-steps", "20", "--no-progress", "--out",
                 str(d / "metaworld" / "button-press-v3-expert.hdf5")]) == 0
    return d


@pytest.fixture(scope="module")
def run_dir(data_dir, tmp_path_factory):
    """One uninterrupted quick run of TASK."""
    out = tmp_path_factory.mktemp("run") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFALIGN_DATA", str(data_dir))
        assert main([*RUN, "--out", str(out)]) == 0
    return out


def _files(out):
    """The run's files, less TensorBoard's (their names hold the time), what evaluate wrote
    and the temporary file a killed write may leave (``diffalign.atomic``)."""
    from diffalign.atomic import TEMP_TAG

    return sorted(str(p.relative_to(out)) for p in out.rglob("*")
                  if p.is_file() and TEMP_TAG not in p.name
                  and not {"tb", "eval-again"} & set(p.relative_to(out).parts))


def test_run_metaworld_quick_end_to_end(run_dir, data_dir, tmp_path, capsys, monkeypatch):
    report = json.loads((run_dir / "report.json").read_text())
    assert report["task"] == TASK and report["metric"] == "success_rate"
    assert [s["name"] for s in report["stages"]] == STAGES
    for s in report["stages"]:  # the task's own metric: MetaWorld's success rate, in %
        assert s["score"] == pytest.approx(100 * s["success_rate"])
        assert s["normalized"] is not None
    assert report["final"]["stage"] in STAGES and report["final"]["reason"]
    # chosen on held-out starts the evaluation never plays (quick preset: 2 episodes)
    sel = report["final"]["selection"]
    assert sorted(sel) == sorted(s for s in STAGES if s != "reference@4")
    assert "held-out starts (reset seeds 10000-10001)" in report["final"]["reason"]
    played = [n for n in sel if (run_dir / "select" / n / "eval.json").exists()]
    assert "reference" in played  # a stage that left the model as it was shares its returns
    for name in played:
        ev = json.loads((run_dir / "select" / name / "eval.json").read_text())
        assert ev["seed"] == 10000 and ev["episodes"] == 2
    assert report["critic_greedy_normalized"] is None  # a Nav1D-only measure
    md = (run_dir / "report.md").read_text()
    assert "success rate (%)" in md and f"| {report['final']['stage']} **(final)** |" in md
    for png in ("returns.png", "reward_distribution.png"):
        assert (run_dir / png).read_bytes()[:4] == b"\x89PNG"
    # every step reads the run's own copy of the data
    data = run_dir / "data" / "metaworld-button-press-v3-expert.hdf5"
    assert report["data"] == str(data.resolve())
    found = json.loads((run_dir / "foundation" / "config.json").read_text())
    assert found["meta"]["task"] == str(data.resolve())
    assert not list((run_dir / "eval").glob("*/weights.safetensors"))

    # reproducible from the directory alone: the collected dataset is gone, and the run
    # resumes, evaluates and exports from what it holds
    monkeypatch.setenv("DIFFALIGN_DATA", str(tmp_path / "nothing-here"))
    capsys.readouterr()
    assert main([*RUN, "--out", str(run_dir)]) == 0
    log = capsys.readouterr().out
    assert "foundation: loaded" in log and "critic: loaded" in log and "alignment: loaded" in log
    again = json.loads((run_dir / "report.json").read_text())
    assert [s["return_mean"] for s in again["stages"]] == \
        [s["return_mean"] for s in report["stages"]]
    final = report["final"]["stage"]
    assert main(["evaluate", str(run_dir), "--no-progress"]) == 0
    ev = json.loads((run_dir / "eval-again" / final / "eval.json").read_text())
    own = json.loads((run_dir / "eval" / final / "eval.json").read_text())
    assert ev["returns"] == pytest.approx(own["returns"], rel=1e-4)
    assert main(["export", str(run_dir), "--out", str(tmp_path / "export")]) == 0
    exported = json.loads((tmp_path / "export" / "config.json").read_text())
    assert exported["export"]["stage"] == final and exported["export"]["task"] == TASK


def test_run_killed_mid_run_resumes_to_the_same_result(run_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "DIFFALIGN_DATA": str(data_dir), "OMP_NUM_THREADS": "1",
           "MPLBACKEND": "Agg"}
    proc = subprocess.Popen([sys.executable, "-m", "diffalign.cli", *RUN, "--out", str(out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    # killed once the alignment has saved its first stage, before align.json marks it done
    marker = out / "align" / "stages"
    try:
        deadline = time.time() + 240
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its side process, no clean-up
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not (out / "report.json").exists() and not (out / "align" / "align.json").exists()
    kept = {f: (out / f).read_bytes() for f in ("foundation/model.safetensors",
                                                "critic/model.safetensors")}
    os.environ["DIFFALIGN_DATA"] = str(data_dir)
    try:
        assert main([*RUN, "--out", str(out)]) == 0
    finally:
        del os.environ["DIFFALIGN_DATA"]
    for f, blob in kept.items():  # finished steps were not redone
        assert (out / f).read_bytes() == blob
    # the same artefacts and numbers as the run never killed
    assert _files(out) == _files(run_dir)
    a = json.loads((out / "report.json").read_text())
    b = json.loads((run_dir / "report.json").read_text())
    assert [s["name"] for s in a["stages"]] == [s["name"] for s in b["stages"]]
    assert [s["return_mean"] for s in a["stages"]] == pytest.approx(
        [s["return_mean"] for s in b["stages"]], rel=1e-4)
    assert a["final"]["stage"] == b["final"]["stage"]


def test_run_task_is_the_pipeline_of_run_nav1d(tmp_path, capsys):
    """`run nav1d/full` and `run nav1d` hand the pipeline the same options; the recipe's
    overrides and bad input are checked before anything is written."""
    import tyro

    from diffalign.commands.run import RunArgs, RunNav1DArgs
    from diffalign.recipes import NAV1D_PRESETS, SIM_PRESETS, recipe_for, with_overrides

    out = tmp_path / "r"
    a = RunNav1DArgs(out=out, preset="quick", layout_seed=3, methods="sft,rl")
    b = tyro.cli(RunArgs, args=["nav1d/full", "--out", str(out), "--preset", "quick",
                                "--layout-seed", "3", "--methods", "sft,rl"])
    assert a.options("nav1d/full", NAV1D_PRESETS["quick"]) == \
        b.options(b.task, recipe_for(b.task, b.preset))
    assert recipe_for(TASK, "quick") is SIM_PRESETS["quick"]
    assert recipe_for("/some/file.hdf5") is SIM_PRESETS["default"]
    r = with_overrides(SIM_PRESETS["quick"], "foundation_steps=7,rl_kl=none,covered_rl=true")
    assert (r.foundation_steps, r.rl_kl, r.covered_rl) == (7, None, True)
    for argv, named in [(["--recipe", "bogus_steps=3"], "bogus_steps"),
                        (["--recipe", "foundation_steps=x"], "foundation_steps"),
                        (["--recipe", "foundation_steps=0"], "foundation_steps"),
                        (["--methods", "rl,ppo2"], "ppo2")]:
        assert main(["run", TASK, "--out", str(out), *argv]) == 2
        assert named in capsys.readouterr().err
    assert main(["run", "nav1d/bogus", "--out", str(out)]) == 2
    assert "nav1d/bogus" in capsys.readouterr().err
    assert not out.exists()


def test_the_final_stage_is_chosen_on_the_held_out_starts_returns():
    """Paired gains over the reference on the same starts: a stage must beat it by two
    standard errors; a stage sharing another's model shares its returns; a stage evaluated
    before the starts were played leaves the critic's choice, saying so."""
    from diffalign.pipeline.jobs import done
    from diffalign.pipeline.run import choose_in_env

    ref = [10.0, 0.0, 10.0, 0.0, 10.0, 0.0]
    critic = {"stage": "sft", "reason": "critic", "heldout": {"sft": {}}}
    better = [r + 5.0 + 0.1 * i for i, r in enumerate(ref)]
    worse = [r - 1.0 for r in ref]
    got = choose_in_env({"reference": done({"returns": ref}), "dpo": done({"returns": worse}),
                         "sft": done({"returns": better}), "rl": "sft"}, critic, 6, 10000, 2.0)
    assert got["stage"] in ("sft", "rl") and got["heldout"] == critic["heldout"]
    assert got["selection"]["sft"]["gain"] == pytest.approx(5.25)
    assert got["selection"]["rl"] == got["selection"]["sft"]
    assert "6 episodes from held-out starts (reset seeds 10000-10005)" in got["reason"]
    got = choose_in_env({"reference": done({"returns": ref}), "dpo": done({"returns": worse})},
                        critic, 6, 10000, 2.0)
    assert got["stage"] == "reference"
    noisy = [r + (4.0 if i % 2 else -3.0) for i, r in enumerate(ref)]  # +0.5 ± 1.6
    assert choose_in_env({"reference": done({"returns": ref}),
                          "sft": done({"returns": noisy})}, critic, 6, 10000, 2.0)["stage"] \
        == "reference"
    got = choose_in_env({"reference": done({"returns": ref}), "sft": None}, critic, 6, 0, 2.0)
    assert got["stage"] == "sft" and "before the held-out starts" in got["reason"]


def test_task_metric_prefers_success_then_normalised_score():
    from diffalign.pipeline.run import critic_warnings, stage_score, task_metric

    assert task_metric({"success_rate": 0.5, "normalized": 70.0}) == "success_rate"
    assert task_metric({"normalized": 70.0}) == "normalized"  # D4RL constants, no success
    assert task_metric({"normalized": None, "return_mean": 3.0}) == "return_mean"
    assert stage_score({"success_rate": 0.25}, "success_rate") == 25.0
    ref = {"name": "reference", "score": 40.0, "candidates": 1}
    best = {"name": "reference@4", "score": 20.0, "candidates": 4}
    (w,) = critic_warnings(ref, best, "success_rate")
    assert "20.0% success" in w["reason"] and "(40.0%)" in w["reason"]


def test_run_collects_a_missing_simulator_dataset(tmp_path, monkeypatch):
    """The data step of `run TASK` collects a simulator dataset that is not there yet, then
    copies it into the run's own data folder."""
    import h5py

    from diffalign.data import collect
    from diffalign.pipeline.data import write_run_data

    monkeypatch.setenv("DIFFALIGN_DATA", str(tmp_path / "store"))
    monkeypatch.setitem(collect.COLLECT_SIZES, False, {"episodes": 2, "max_train_steps": 1})
    spec = write_run_data("metaworld/button-press-v3/mixed", tmp_path / "run")
    stored = tmp_path / "store" / "metaworld" / "button-press-v3-mixed.hdf5"
    assert stored.is_file() and Path(spec["file"]).is_file()
    with h5py.File(spec["file"]) as f:
        assert f["observations"].shape[0] > 0


def _weights(out):
    """Every safetensors file of a run, by its path in the run."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.safetensors"))
            if "train_state" not in p.parts}


def test_two_fresh_runs_with_one_seed_are_bit_identical(run_dir, data_dir, tmp_path):
    """A second run from scratch, in another process and on one thread, writes the same
    foundation, critic, adapters and evaluations byte for byte: every step is seeded from
    --seed and the run's thread counts do not follow the second process's timing."""
    out = tmp_path / "again"
    env = {**os.environ, "DIFFALIGN_DATA": str(data_dir), "OMP_NUM_THREADS": "1",
           "MPLBACKEND": "Agg"}
    subprocess.run([sys.executable, "-m", "diffalign.cli", *RUN, "--out", str(out)], env=env,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    a, b = _weights(out), _weights(run_dir)
    assert {"foundation/model.safetensors", "critic/model.safetensors"} <= set(a)
    assert any(k.startswith("align/") for k in a)
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []
    ra = json.loads((out / "report.json").read_text())
    rb = json.loads((run_dir / "report.json").read_text())
    assert [(s["name"], s["return_mean"]) for s in ra["stages"]] == \
        [(s["name"], s["return_mean"]) for s in rb["stages"]]
    for stage in (out / "eval").iterdir():  # every episode's return, exactly
        assert json.loads((stage / "eval.json").read_text())["returns"] == json.loads(
            (run_dir / "eval" / stage.name / "eval.json").read_text())["returns"]


def test_a_run_over_another_runs_directory_is_refused_naming_the_settings(
        run_dir, data_dir, tmp_path, capsys, monkeypatch):
    """Resuming with other flags stops before any work, naming each differing setting;
    --overwrite starts afresh and deletes only what a run writes."""
    import shutil

    out = tmp_path / "r"
    shutil.copytree(run_dir, out)
    (out / "notes.txt").write_text("mine")
    before = sorted(p.name for p in out.iterdir())
    monkeypatch.setenv("DIFFALIGN_DATA", str(data_dir))
    assert main([*RUN, "--out", str(out), "--model", "dp", "--seed", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "model 'diffuser' -> 'dp'" in err and "seed 0 -> 1" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == before  # nothing written or removed
    assert main([*RUN, "--out", str(out), "--recipe", "foundation_steps=101"]) == 2
    assert "recipe.foundation_steps 100 -> 101" in capsys.readouterr().err

    from diffalign.pipeline.run import clear_run

    clear_run(out)  # what --overwrite does first
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_load_policy_drives_the_metaworld_env_of_a_run(run_dir, data_dir, monkeypatch):
    """The README's 10-line loop on a simulator run: load_policy(RUN) acts with the final
    stage in its own MetaWorld env and plays the evaluation's first episode."""
    import numpy as np

    import diffalign
    from diffalign.eval.evaluate import evaluate
    from diffalign.runs import load_stage

    monkeypatch.setenv("DIFFALIGN_DATA", str(data_dir))
    report = json.loads((run_dir / "report.json").read_text())
    policy = diffalign.load_policy(run_dir, seed=0)
    assert policy.stage == report["final"]["stage"]
    env = policy.make_env()
    obs, _ = env.reset(seed=0)
    policy.reset(seed=0)
    total, done = 0.0, False
    while not done:
        action = policy.act(obs)
        assert action.shape == env.action_space.shape and np.all(np.isfinite(action))
        obs, reward, terminated, truncated, _ = env.step(action)
        total += float(reward)
        done = terminated or truncated
    st = load_stage(run_dir, policy.stage)
    res = evaluate(st.model, critic=st.critic_dir, episodes=1, seed=0, write=False)
    assert total == pytest.approx(res["returns"][0], rel=1e-5)


def test_run_task_takes_the_alignment_flags_as_run_nav1d_does(tmp_path, capsys):
    from diffalign.commands.run import RunArgs, RunNav1DArgs
    from diffalign.recipes import NAV1D_PRESETS, recipe_for, with_overrides

    flags = dict(rl_algo="reinforce", rl_credit="x0_similarity", rl_entropy_coef=0.02,
                 sft_likelihood="current", cascade_passes=2)
    args = RunArgs(task="metaworld/button-press-v3/mixed", out=tmp_path / "r",
                   recipe="eval_episodes=4", **flags)
    r = args.with_flags(with_overrides(recipe_for(args.task, "default"), args.recipe))
    assert r.eval_episodes == 4 and all(getattr(r, k) == v for k, v in flags.items())
    nav = RunNav1DArgs(out=tmp_path / "n", **flags).recipe()
    assert nav == with_overrides(NAV1D_PRESETS["default"], flags)
    for argv, named in ((["--rl-algo", "ppo", "--rl-grad-k", "2"], "rl_grad_k=2"),
                        (["--cascade-passes", "0"], "cascade_passes=0"),
                        (["--rl-grad-k", "3", "--rl-grad-k-max", "2"], "rl_grad_k_max=2")):
        assert main(["run", "nav1d/full", "--out", str(tmp_path / "x"), *argv]) == 2
        assert named in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
