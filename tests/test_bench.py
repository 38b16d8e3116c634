"""`diffalign bench`: a one-cell Nav1D grid end to end with the default alignment (tables
hold the cell's numbers), a resumed bench skips the finished cell, a failed cell is reported
while the others go on, a cell killed mid-run resumes from its disk, dataset glue, and bad
input (exit 2, the value named, nothing written). The tables' layout on synthetic cells:
tests/test_bench_tables.py."""

import csv
import json
import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest

from diffalign.bench.cell import DatasetUnavailable, ensure_dataset
from diffalign.bench.grid import ray_available
from diffalign.cli import main

pytest.importorskip("peft")

TINY = ("data_episodes=50,foundation_steps=30,critic_steps=30,critic_ensemble=1,"
        "behavior_steps=30,dynamics_steps=30,eval_episodes=2,candidates=3,denoise_steps=3,"
        "conditions=16,val_conditions=8,eval_every=1,patience=1,rl_states=4,rl_group=2")
CELL = "nav1d__full__dp__ddim__s0"


def _bench_args(out, processes="ddim", methods=None):
    return ["bench", "--suite", "nav1d", "--tasks", "full", "--models", "dp", "--processes",
            processes, "--seeds", "0", "--quick", "--sizes", TINY, "--ray", "off",
            "--threads", "1", "--no-progress", "--out", str(out),
            *(["--methods", methods] if methods else [])]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_one_cell_bench_end_to_end_then_resume_skips(tmp_path, capsys):
    out = tmp_path / "bench"
    args = _bench_args(out)  # the default alignment: dpo, sft, rl, then the cascade
    assert main(args) == 0
    result_file = out / "cells" / CELL / "result.json"
    res = json.loads(result_file.read_text())
    assert (res["suite"], res["task"], res["model"], res["process"], res["seed"]) == (
        "nav1d", "full", "dp", "ddim", 0)
    assert res["metric"] == "normalized" and res["methods"] == ["dpo", "sft", "rl"]
    assert res["cascade"] is True
    ev = res["evals"]
    assert set(ev) == {"reference", "reference_expectation", "reference_idql", "aligned",
                       "aligned_expectation", "aligned_idql"}
    assert res["reference"] == ev["reference"]["score"] == ev["reference"]["normalized"]
    assert ev["reference"]["candidates"] == 1 and ev["reference_idql"]["candidates"] == 3
    assert ev["reference_idql"]["selection"] == "idql_greedy"
    assert ev["aligned_expectation"]["selection"] == "expectation"
    assert [s["method"] for s in res["align"]["stages"]][:3] == ["dpo", "sft", "rl"]
    assert (out / "cells" / CELL / "align" / "adapter" / "adapter_model.safetensors").exists()
    # a cell is a run of the pipeline, with the data and critic its (task, seed) shares
    shared = out / "critics" / "nav1d__full__s0"
    assert (shared / "critic" / "config.json").exists()
    report = json.loads((out / "cells" / CELL / "report.json").read_text())
    names = [s["name"] for s in report["stages"]]
    assert names[0] == "reference" and names[-1] == "cascade" and "rl" in names
    # aligned: the stage the run chose, which need not be the last
    final = report["final"]["stage"]
    assert res["aligned_stage"] == res["final"] == final and res["last_stage"] in names
    row = next(s for s in report["stages"] if s["name"] == final)
    assert res["aligned"] == row["score"] == ev["aligned"]["score"]
    assert ev["aligned"]["return_std"] == row["return_std"]
    # Table 3's evaluations are kept under the stage they evaluated: a re-chosen final
    # stage is evaluated again, not served another stage's numbers
    for sel in ("expectation", "idql"):
        kept = json.loads((out / "cells" / CELL / "eval" / f"{final}_{sel}" /
                           "eval.json").read_text())
        assert kept["return_mean"] == ev[f"aligned_{sel}"]["return_mean"]
        assert sorted(p.name for p in (out / "cells" / CELL / "eval").glob(f"*_{sel}")) == \
            sorted({f"reference_{sel}", f"{final}_{sel}"})
    assert (out / "cells" / CELL / "critic" / "model.safetensors").read_bytes() == \
        (shared / "critic" / "model.safetensors").read_bytes()

    # Table 3 holds exactly the cell's numbers (CSV at full precision, Markdown at 0.1):
    # expectation vs IDQL, reference -> aligned; Table 2 (planners) has no row
    assert _rows(out / "table2.csv") == []
    sel = res["selection"]
    rows3 = _rows(out / "table3.csv")
    assert [(r["task"], r["column"], r["candidates"], r["n_seeds"]) for r in rows3] == [
        ("full", "Expectation (DDIM)", "3", "1"), ("full", "IDQL (DDIM)", "3", "1")]
    md3 = (out / "table3.md").read_text()
    cells = []
    for r, s in zip(rows3, ("expectation", "idql")):
        assert float(r["ref_mean"]) == sel[s]["reference"]
        assert float(r["aligned_mean"]) == sel[s]["aligned"]
        assert float(r["aligned_return_std"]) == ev[f"aligned_{s}"]["return_std"]
        assert r["ref_std"] == r["aligned_std"] == ""
        cells.append(f"{sel[s]['reference']:.1f} → {sel[s]['aligned']:.1f}<br>return std")
    assert f"| full | {cells[0]}" in md3 and f"| {cells[1]}" in md3
    for name in ("table2.png", "table3.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out  # the tables printed at the end
    assert "# Table 2" in printed and f"| full | {cells[0]}" in printed

    # resumed: the finished cell is skipped, not retrained
    mtime = result_file.stat().st_mtime_ns
    model_mtime = (out / "cells" / CELL / "foundation" / "model.safetensors").stat().st_mtime_ns
    assert main(args) == 0
    log = capsys.readouterr().out
    assert f"skipped {CELL}" in log and "0 to run, 1 skipped" in log
    assert "training" not in log and "aligning" not in log
    assert result_file.stat().st_mtime_ns == mtime
    assert (out / "cells" / CELL / "foundation" / "model.safetensors").stat().st_mtime_ns == \
        model_mtime


@pytest.mark.slow
def test_a_failed_cell_is_reported_the_others_go_on_and_a_rerun_retries_it(tmp_path, capsys,
                                                                          monkeypatch):
    import diffalign.pipeline as pipeline

    out = tmp_path / "bench"
    bad, good = "nav1d__full__dp__ddim__s0", "nav1d__full__dp__ddpm__s0"  # in this order
    real = pipeline.run_pipeline

    def faulty(opts):
        if Path(opts.out).name == bad:
            raise ValueError(f"injected fault in {bad}")
        return real(opts)

    monkeypatch.setattr(pipeline, "run_pipeline", faulty)
    args = _bench_args(out, "ddim,ddpm", methods="rl")
    # a failed cell is a fault, not bad input: it leaves `main` after the tables are written
    with pytest.raises(RuntimeError, match=rf"1 cell\(s\) failed.*{bad}.*injected fault"):
        main(args)
    log = capsys.readouterr().out
    assert f"cell {bad} FAILED" in log and "1 ran, 0 skipped, 1 failed" in log
    error = (out / "cells" / bad / "error.txt").read_text()
    assert "Traceback" in error and f"injected fault in {bad}" in error
    assert not (out / "cells" / bad / "result.json").exists()
    # the cell after the failed one ran to the end, and the tables hold it alone
    result = out / "cells" / good / "result.json"
    res = json.loads(result.read_text())
    assert not (out / "cells" / good / "error.txt").exists()
    row, _ = _rows(out / "table3.csv")
    assert row["process"] == "ddpm"
    assert float(row["aligned_mean"]) == res["selection"]["expectation"]["aligned"]

    # the fault gone, a rerun runs the failed cell only and clears its error
    monkeypatch.setattr(pipeline, "run_pipeline", real)
    mtime = result.stat().st_mtime_ns
    assert main(args) == 0
    log = capsys.readouterr().out
    assert "2 cell(s): 1 to run, 1 skipped" in log and f"skipped {good}" in log
    assert "1 ran, 1 skipped, 0 failed" in log
    assert (out / "cells" / bad / "result.json").exists()
    assert not (out / "cells" / bad / "error.txt").exists()
    assert result.stat().st_mtime_ns == mtime
    assert {r["process"] for r in _rows(out / "table3.csv")} == {"ddim", "ddpm"}


# Runs the bench in a child process that stalls when its cell reaches the alignment (the
# foundation trained and saved, the reference evaluated), so the test can kill it there.
_STALLING_BENCH = """
import sys, time
from pathlib import Path

import diffalign.align.runner as runner

def stall(*args, **kwargs):
    Path(sys.argv[1]).write_text("aligning")
    time.sleep(600)

runner.align = stall
from diffalign.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_a_cell_killed_mid_run_resumes_from_what_it_saved(tmp_path, capsys):
    import os
    import signal
    import subprocess
    import time

    out, marker = tmp_path / "bench", tmp_path / "aligning"
    args = _bench_args(out, methods="rl")
    cell = out / "cells" / CELL
    with open(tmp_path / "child.log", "w") as child_log:
        proc = subprocess.Popen([sys.executable, "-c", _STALLING_BENCH, str(marker), *args],
                                stdout=child_log, stderr=subprocess.STDOUT, env=os.environ)
        try:
            deadline = time.monotonic() + 120
            while not marker.exists():
                assert proc.poll() is None, (proc.returncode,
                                             (tmp_path / "child.log").read_text())
                assert time.monotonic() < deadline, "the cell never reached its alignment"
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)  # mid-cell: no chance to clean up
            assert proc.wait(timeout=30) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    foundation = cell / "foundation" / "model.safetensors"
    ref_eval = cell / "eval" / "reference" / "eval.json"
    assert foundation.exists() and ref_eval.exists()
    assert not (cell / "result.json").exists() and not (cell / "align" / "align.json").exists()
    mtimes = {f: f.stat().st_mtime_ns for f in (foundation, ref_eval)}

    assert main(args) == 0
    log = capsys.readouterr().out
    assert "1 cell(s): 1 to run, 0 skipped" in log  # not finished, so not skipped
    # what the killed run saved is taken up, not made again
    assert "critic nav1d__full__s0: loaded" in log
    assert "foundation: loaded" in log and "foundation: training" not in log
    assert all(f.stat().st_mtime_ns == m for f, m in mtimes.items())
    res = json.loads((cell / "result.json").read_text())
    assert [s["method"] for s in res["align"]["stages"]] == ["rl"]
    assert res["reference"] == json.loads(ref_eval.read_text())["normalized"]
    row, _ = _rows(out / "table3.csv")
    assert float(row["ref_mean"]) == res["selection"]["expectation"]["reference"]


@pytest.mark.parametrize("flags, named", [
    (["--suite", "atari"], "atari"),
    (["--tasks", "hopper"], "hopper"),
    (["--models", "diffuser,gpt"], "gpt"),
    (["--processes", "edm"], "edm"),
    (["--methods", "rl,ppo2"], "ppo2"),
    (["--seeds", ""], "seeds"),
    (["--seeds", "0,x"], "seeds"),
    (["--sizes", "bogus_steps=3"], "bogus_steps"),
])
def test_bad_input_exits_2_naming_the_value(tmp_path, capsys, flags, named):
    out = tmp_path / "b"
    assert main(["bench", "--out", str(out), "--ray", "off", *flags]) == 2
    assert named in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.skipif(ray_available(), reason="ray is installed here")
def test_ray_required_but_missing_exits_2(tmp_path, capsys):
    out = tmp_path / "b"
    assert main(["bench", "--out", str(out), "--ray-address", "ray://nowhere:10001",
                 "--seeds", "0"]) == 2
    assert "Ray is not installed" in capsys.readouterr().err
    assert not out.exists()


def test_ensure_dataset_collects_missing_data_or_says_it_cannot(monkeypatch, tmp_path):
    import diffalign.bench.cell as cell
    import diffalign.tasks as tasks

    monkeypatch.setenv("DIFFALIGN_DATA", str(tmp_path))
    assert ensure_dataset("nav1d", "expert") == "nav1d/expert"
    have = set()

    def fake_resolve(name, **kw):
        if name not in have:
            raise FileNotFoundError(f"no dataset {name}")
        return name

    monkeypatch.setattr(tasks, "resolve_task", fake_resolve)
    monkeypatch.setattr(cell, "COLLECT_HOOK", ("diffalign_no_such_collect", "collect_task"))
    for quick in (True, False):
        with pytest.raises(DatasetUnavailable, match="metaworld/button-press-v3/expert"):
            ensure_dataset("metaworld", "button-press-v3", quick=quick)

    calls = []
    fake = types.ModuleType("diffalign_fake_collect")

    def collect_task(name, quick, out=None):
        calls.append((name, quick, out))
        if out is not None:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text("data")
        else:
            have.add(name)

    fake.collect_task = collect_task
    monkeypatch.setitem(sys.modules, "diffalign_fake_collect", fake)
    monkeypatch.setattr(cell, "COLLECT_HOOK", ("diffalign_fake_collect", "collect_task"))
    # quick data is tiny: it goes to its own folder, never where the full dataset belongs
    quick_file = tmp_path / "quick" / "mujoco" / "hopper-medium.hdf5"
    assert ensure_dataset("mujoco", "hopper", quick=True) == str(quick_file)
    assert calls == [("mujoco/hopper/medium", True, quick_file)]
    assert ensure_dataset("mujoco", "hopper", quick=True) == str(quick_file)  # reused
    assert ensure_dataset("mujoco", "hopper") == "mujoco/hopper/medium"
    assert calls[1:] == [("mujoco/hopper/medium", False, None)]
    assert ensure_dataset("mujoco", "hopper") == "mujoco/hopper/medium"  # now present
    assert len(calls) == 2
    with pytest.raises(ValueError, match="walker"):
        ensure_dataset("metaworld", "walker2d")


def test_ray_map_runs_jobs_as_ray_tasks_and_reports_failures():
    """The cells' executor on a real local Ray cluster (one CPU): results by name, a failed
    job reported with its exception while the others finish."""
    ray = pytest.importorskip("ray")
    import torch

    from diffalign.bench.grid import _ray_map, parse_seeds

    threads = torch.get_num_threads()
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        res = _ray_map(parse_seeds, [("0,1",), ("x",), ((2, 2, 3),)], ["a", "b", "c"],
                       cpus=1.0, threads=1)
    finally:
        ray.shutdown()
        torch.set_num_threads(threads)
    got = {name: (value, err) for name, value, err in res}
    assert got["a"] == ((0, 1), None) and got["c"] == ((2, 3), None)
    assert got["b"][0] is None and "seeds must be integers" in repr(got["b"][1][0])


def test_sizes_are_recipe_overrides():
    from diffalign.bench.grid import BenchSizes, parse_sizes, suite_recipe
    from diffalign.recipes import NAV1D_PRESETS, SIM_PRESETS

    size = parse_sizes("rl_kl=0.25,max_updates=3,candidates=5,denoise_steps=0")
    assert (size.recipe.rl_kl, size.recipe.max_updates, size.candidates) == (0.25, 3, 5)
    assert size.recipe.denoise_steps is None  # 0: the process's own
    # a cell is the suite's preset without the reference@N stage
    assert suite_recipe("nav1d") == replace(NAV1D_PRESETS["default"], ref_candidates=0)
    assert parse_sizes("", quick=True, suite="mujoco").recipe == replace(
        SIM_PRESETS["quick"], ref_candidates=0)
    assert parse_sizes("", suite="metaworld").recipe.rl_kl == 0.5
    on = parse_sizes("rl_group_scale=1", suite="mujoco").recipe
    assert on.align_config(False, ("rl",), seed=0).rl.qvpg_scale == "group"
    with pytest.raises(ValueError, match="rl_kl must be"):
        parse_sizes("rl_kl=lots")
    with pytest.raises(ValueError, match="rl_kl"):
        parse_sizes("rl_kl=-1")
    with pytest.raises(ValueError, match="candidates"):
        BenchSizes(NAV1D_PRESETS["quick"], candidates=0)


def test_sizes_set_the_rl_and_sft_variants():
    # run nav1d's --rl-*/--sft-likelihood flags are recipe fields: --sizes reaches them
    from diffalign.bench.grid import parse_sizes
    from diffalign.errors import UserError

    r = parse_sizes("rl_algo=reinforce,rl_credit=x0_similarity,rl_entropy_coef=0.02,"
                    "sft_likelihood=current").recipe
    cfg = r.align_config(True, ("sft", "rl"), 0)
    assert (cfg.rl.algo, cfg.rl.credit, cfg.rl.entropy_coef) == ("reinforce", "x0_similarity",
                                                                 0.02)
    assert cfg.rl.group_size == r.rl_pg_group and cfg.sft.likelihood_source == "current"
    rl = parse_sizes("rl_grad_k_max=4", suite="mujoco").recipe.align_config(False, ("rl",), 0).rl
    assert (rl.random_k, rl.grad_k_min, rl.grad_last_k) == (True, 1, 4)
    for bad, named in (("rl_algo=nope", "rl_algo='nope'"), ("rl_credit=x", "rl_credit='x'"),
                       ("rl_algo=ppo,rl_grad_k=2", "rl_grad_k=2")):
        with pytest.raises(UserError, match=named):
            parse_sizes(bad)


def test_alignment_flags_reach_every_cells_recipe(tmp_path, capsys):
    # the same --rl-*/--sft-likelihood/--cascade-passes flags as run, added to --sizes
    from diffalign.bench.grid import parse_sizes
    from diffalign.commands.bench import BenchArgs

    args = BenchArgs(out=tmp_path / "b", ray="off", sizes="eval_episodes=4",
                     rl_algo="ppo", rl_credit="decreasing", rl_entropy_coef=0.01,
                     sft_likelihood="current", cascade_passes=3)
    assert args.all_sizes() == ("eval_episodes=4,rl_algo=ppo,rl_credit=decreasing,"
                                "rl_entropy_coef=0.01,sft_likelihood=current,cascade_passes=3")
    r = parse_sizes(args.all_sizes()).recipe
    assert (r.eval_episodes, r.rl_algo, r.rl_credit, r.rl_entropy_coef, r.sft_likelihood,
            r.cascade_passes) == (4, "ppo", "decreasing", 0.01, "current", 3)
    assert BenchArgs(out=tmp_path / "b", ray="off").all_sizes() == ""
    for flags, named in ((["--rl-algo", "ppo", "--rl-grad-k", "2"], "rl_grad_k=2"),
                         (["--cascade-passes", "0"], "cascade_passes=0"),
                         (["--rl-entropy-coef", "-1"], "rl_entropy_coef=-1")):
        assert main(["bench", "--out", str(tmp_path / "b"), "--ray", "off", *flags]) == 2
        assert named in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
