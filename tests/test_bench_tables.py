"""The bench's Table 2 and Table 3 on tiny synthetic grids of ``result.json`` files (no cell
is run): rows and columns in the paper's order, mean ± std over seeds against hand
computation, a missing cell, the CSV columns, the figures, the header's selection and
alignment, a cell whose final stage is not its last, and the bench's defaults."""

import csv
import dataclasses
import json
import os

import pytest

from diffalign.bench.tables import CSV_COLUMNS, write_tables

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _summary(score, return_std, coherency, entropy=None, candidates=1, selection="auto"):
    # the keys run_cell's evaluation summaries have
    return {"score": score, "return_mean": score / 10, "return_std": return_std,
            "normalized": score, "success_rate": None, "coherency": coherency,
            "entropy": entropy, "candidates": candidates, "selection": selection,
            "episodes": 4, "steps": 3, "decisions_per_s": 100.0, "wall_seconds": 1.0}


def _write(out, task, model, process, seed, ref, ali, suite="nav1d", sel=None, final="rl",
           cascade=True):
    """A result.json as run_cell writes it. ``ref``/``ali``: (score, return std, coherency);
    ``sel``: {"expectation"|"idql": {"reference"|"aligned": (score, return std, coherency,
    entropy)}} for a Diffusion Policy."""
    cid = f"{suite}__{task}__{model}__{process}__s{seed}"
    metric = "success_rate" if suite == "metaworld" else "normalized"
    evals = {"reference": _summary(*ref), "aligned": _summary(*ali)}
    selection = None
    if sel is not None:
        selection = {"candidates": 16}
        for key, rule in (("expectation", "expectation"), ("idql", "idql_greedy")):
            selection[key] = {}
            for stage in ("reference", "aligned"):
                evals[f"{stage}_{key}"] = _summary(*sel[key][stage], candidates=16,
                                                   selection=rule)
                selection[key][stage] = sel[key][stage][0]
    result = {
        "cell": cid, "suite": suite, "task": task, "task_string": f"{suite}/{task}",
        "model": model, "process": process, "seed": seed, "methods": ["dpo", "sft", "rl"],
        "metric": metric, "quick": True, "reference": ref[0], "aligned": ali[0],
        "aligned_stage": final, "final": final, "last_stage": "rl", "cascade": cascade,
        "selection": selection, "evals": evals,
        "align": {"reference_val_reward": 0.1, "stages": [], "events": []},
        "sizes": {"foundation_steps": 30, "candidates": 16}, "timings": {"cell_s": 1.0},
        "device": "cpu", "torch": "2"}
    d = out / "cells" / cid
    d.mkdir(parents=True)
    (d / "result.json").write_text(json.dumps(result))
    return d


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _table(md):
    """The Markdown table lines of ``md`` (one suite), split into cells."""
    return [[c.strip() for c in ln.strip().strip("|").split("|")]
            for ln in md.splitlines() if ln.startswith("|")]


@pytest.fixture
def grid(tmp_path):
    """Nav1D planners: partial and full, Diffuser with every process and Decision Diffuser
    with DDPM, two seeds where it matters, one cell (partial, Diffuser SM) missing."""
    out = tmp_path / "bench"
    # written out of the paper's order: the tables must not follow the directory names
    _write(out, "full", "dd", "ddpm", 0, (20.0, 1.0, 0.5), (30.0, 1.0, 0.5))
    for seed, ref, ali in ((0, (40.0, 2.0, 0.8), (60.0, 1.0, 0.9)),
                           (1, (50.0, 4.0, 0.9), (66.0, 2.0, 1.0))):
        _write(out, "full", "diffuser", "fm", seed, ref, ali)
    for process in ("sm", "ddim", "ddpm"):
        _write(out, "full", "diffuser", process, 0, (10.0, 1.0, None), (12.0, 1.0, None))
    for process in ("ddpm", "ddim", "fm"):
        _write(out, "partial", "diffuser", process, 0, (5.0, 1.0, None), (7.0, 1.0, None))
    _write(out, "partial", "dd", "ddpm", 0, (5.0, 1.0, None), (8.0, 1.0, None))
    return out


PAPER_COLUMNS = ["Diffuser DDPM", "Diffuser DDIM", "Diffuser SM", "Diffuser FM",
                 "Decision Diffuser DDPM"]


def test_table2_layout_mean_std_and_missing_cell(grid):
    files = write_tables(grid)
    assert [f.name for f in files] == ["table2.md", "table2.csv", "table2.png", "table3.md",
                                       "table3.csv", "table3.png"]
    md = (grid / "table2.md").read_text()
    assert "1 candidate per decision" in md and "no greedy selection by Q" in md
    assert "Alignment: dpo → sft → rl, then the cascade." in md
    assert "the stage each run chose as its final one" in md
    head, rule, *body = _table(md)
    assert head == ["task", *PAPER_COLUMNS]
    assert len(rule) == len(head) and all(len(r) == len(head) for r in body)
    assert [r[0] for r in body] == ["partial", "full"]  # the suite's order
    partial, full = (dict(zip(head, r)) for r in body)
    assert partial["Diffuser SM"] == "—"
    # 2 seeds: ref 40, 50 -> 45 ± 7.07; aligned 60, 66 -> 63 ± 4.24; return std (2+4)/2,
    # (1+2)/2; coherency (0.8+0.9)/2, (0.9+1.0)/2; no entropy with one candidate
    assert full["Diffuser FM"] == ("45.0 ± 7.1 → 63.0 ± 4.2<br>return std 3.00 → 1.50<br>"
                                   "coherency 0.85 → 0.95")
    # one seed where another column has two: the mean alone, marked
    assert full["Diffuser DDPM"] == "10.0 (n=1) → 12.0 (n=1)<br>return std 1.00 → 1.00"
    assert full["Decision Diffuser DDPM"].startswith("20.0 (n=1) → 30.0 (n=1)")


def test_table2_csv_columns_and_numbers(grid):
    write_tables(grid)
    with open(grid / "table2.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header == list(CSV_COLUMNS)
    for col in ("ref_mean", "ref_std", "aligned_mean", "aligned_std", "ref_return_std",
                "aligned_return_std", "coherency_ref", "coherency_aligned", "entropy_ref",
                "entropy_aligned", "n_seeds"):
        assert col in header
    rows = _rows(grid / "table2.csv")
    # one row per task × column, in the Markdown's order
    assert [(r["task"], r["column"]) for r in rows] == [
        (t, c) for t in ("partial", "full") for c in PAPER_COLUMNS]
    fm = next(r for r in rows if (r["task"], r["process"], r["model"]) ==
              ("full", "fm", "diffuser"))
    assert float(fm["ref_mean"]) == pytest.approx(45.0)
    assert float(fm["ref_std"]) == pytest.approx(7.0710678, rel=1e-6)  # n − 1
    assert float(fm["aligned_mean"]) == pytest.approx(63.0)
    assert float(fm["aligned_std"]) == pytest.approx(4.2426407, rel=1e-6)
    assert float(fm["ref_return_std"]) == pytest.approx(3.0)
    assert float(fm["aligned_return_std"]) == pytest.approx(1.5)
    assert float(fm["coherency_ref"]) == pytest.approx(0.85)
    assert float(fm["coherency_aligned"]) == pytest.approx(0.95)
    assert fm["entropy_ref"] == fm["entropy_aligned"] == ""
    assert (fm["n_seeds"], fm["seeds"], fm["candidates"]) == ("2", "0 1", "1")
    assert fm["metric"] == "normalized" and fm["suite"] == "nav1d"
    missing = next(r for r in rows if (r["task"], r["column"]) == ("partial", "Diffuser SM"))
    assert missing["n_seeds"] == "0"
    assert all(missing[c] == "" for c in ("ref_mean", "ref_std", "aligned_mean"))


def test_figures_are_pngs_and_files_are_0644(grid, monkeypatch):
    old = os.umask(0o022)
    try:
        files = write_tables(grid)
    finally:
        os.umask(old)
    for name in ("table2.png", "table3.png"):
        assert (grid / name).read_bytes()[:8] == PNG_MAGIC
    for f in files:
        assert f.stat().st_mode & 0o777 == 0o644, f
    assert not [p.name for p in grid.iterdir() if ".tmp-" in p.name]  # written atomically


def test_table3_expectation_and_idql_per_process(tmp_path):
    out = tmp_path / "bench"
    for seed, (e, i) in enumerate(((10.0, 30.0), (20.0, 50.0))):
        sel = {"expectation": {"reference": (e, 2.0, 0.7, 1.0), "aligned": (e + 4, 1.0, 0.8, 0.5)},
               "idql": {"reference": (i, 3.0, 0.6, 1.2), "aligned": (i + 1, 2.0, 0.9, 0.6)}}
        _write(out, "partial", "dp", "fm", seed, (1.0, 1.0, None), (2.0, 1.0, None), sel=sel)
    sel = {k: {s: (70.0, 1.0, None, None) for s in ("reference", "aligned")}
           for k in ("expectation", "idql")}
    _write(out, "expert", "dp", "ddpm", 0, (1.0, 1.0, None), (2.0, 1.0, None), sel=sel)
    _write(out, "expert", "diffuser", "ddpm", 0, (1.0, 1.0, None), (2.0, 1.0, None))
    write_tables(out)
    md = (out / "table3.md").read_text()
    assert "16 candidates per decision" in md and "greedy by Q" in md
    assert "expectation: their mean action" in md
    head, _, *body = _table(md)
    assert head == ["task", "Expectation (DDPM)", "IDQL (DDPM)", "Expectation (FM)",
                    "IDQL (FM)"]
    assert [r[0] for r in body] == ["partial", "expert"]
    partial, expert = (dict(zip(head, r)) for r in body)
    assert partial["Expectation (DDPM)"] == partial["IDQL (DDPM)"] == "—"
    assert expert["Expectation (FM)"] == "—"
    assert partial["Expectation (FM)"] == ("15.0 ± 7.1 → 19.0 ± 7.1<br>return std 2.00 → "
                                           "1.00<br>coherency 0.70 → 0.80<br>entropy 1.00 → "
                                           "0.50")
    assert partial["IDQL (FM)"].startswith("40.0 ± 14.1 → 41.0 ± 14.1<br>")
    assert expert["IDQL (DDPM)"] == "70.0 (n=1) → 70.0 (n=1)<br>return std 1.00 → 1.00"
    rows = {(r["task"], r["column"]): r for r in _rows(out / "table3.csv")}
    assert len(rows) == 8
    idql = rows[("partial", "IDQL (FM)")]
    assert (idql["model"], idql["process"], idql["selection"], idql["candidates"]) == (
        "dp", "fm", "idql", "16")
    assert float(idql["aligned_std"]) == pytest.approx(14.1421356, rel=1e-6)
    assert float(idql["entropy_ref"]) == pytest.approx(1.2)
    # the planner cell is in Table 2 only, the Diffusion Policy cells in Table 3 only
    assert {r["model"] for r in _rows(out / "table2.csv")} == {"diffuser"}
    assert (out / "table3.png").read_bytes()[:8] == PNG_MAGIC


def test_suites_are_separate_sections(tmp_path):
    out = tmp_path / "bench"
    _write(out, "hopper", "diffuser", "ddim", 0, (40.0, 9.0, None), (45.0, 8.0, None),
           suite="mujoco")
    _write(out, "button-press-v3", "dd", "ddpm", 0, (25.0, 1.0, None), (75.0, 1.0, None),
           suite="metaworld", cascade=False)
    write_tables(out)
    md = (out / "table2.md").read_text()
    assert md.index("## metaworld: success rate (%)") < md.index("## mujoco: D4RL")
    assert "dpo → sft → rl, no cascade; dpo → sft → rl, then the cascade (the cells differ)" \
        in md
    assert "| button-press-v3 | 25.0 → 75.0<br>return std 1.00 → 1.00 |" in md
    assert "| hopper | 40.0 → 45.0<br>return std 9.00 → 8.00 |" in md
    assert "(no Diffusion Policy cells)" in (out / "table3.md").read_text()
    assert _rows(out / "table3.csv") == []
    assert (out / "table3.png").read_bytes()[:8] == PNG_MAGIC


def test_aligned_is_the_final_stage_even_in_cells_that_recorded_the_last(tmp_path):
    out = tmp_path / "bench"
    d = _write(out, "full", "diffuser", "ddim", 0, (40.0, 2.0, None), (10.0, 3.0, None))
    # recorded by a bench that took the last stage: its report says the run chose sft
    res = json.loads((d / "result.json").read_text())
    res.update(aligned_stage="rl", final="sft")
    (d / "result.json").write_text(json.dumps(res))
    (d / "report.json").write_text(json.dumps({"final": {"stage": "sft"}, "stages": [
        {"name": "reference", "normalized": 40.0, "return_std": 2.0, "coherency": None,
         "entropy": None},
        {"name": "sft", "normalized": 55.0, "return_std": 1.5, "coherency": 0.9,
         "entropy": None, "candidates": 1},
        {"name": "rl", "normalized": 10.0, "return_std": 3.0, "coherency": None,
         "entropy": None}]}))
    d2 = _write(out, "full", "dp", "ddim", 0, (40.0, 2.0, None), (10.0, 3.0, None),
                sel={k: {"reference": (30.0, 1.0, None, 1.0), "aligned": (5.0, 1.0, None, 1.0)}
                     for k in ("expectation", "idql")})
    res = json.loads((d2 / "result.json").read_text())
    res.update(aligned_stage="rl", final="reference")
    (d2 / "result.json").write_text(json.dumps(res))
    write_tables(out)
    (row,) = _rows(out / "table2.csv")
    assert float(row["aligned_mean"]) == 55.0 and float(row["aligned_return_std"]) == 1.5
    assert float(row["coherency_aligned"]) == 0.9
    # the run kept the reference: aligned = reference, also under both selections
    for r in _rows(out / "table3.csv"):
        assert r["aligned_mean"] == r["ref_mean"] == "30.0"


def test_bench_aligns_as_run_does_by_default():
    import inspect

    from diffalign.bench.grid import run_bench
    from diffalign.commands.bench import BenchArgs
    from diffalign.commands.run import RunArgs
    from diffalign.pipeline import RunOptions

    run_default = {f.name: f.default for f in dataclasses.fields(RunArgs)}
    args = BenchArgs()
    assert args.methods == run_default["methods"] == ",".join(RunOptions.methods)
    assert args.cascade is run_default["cascade"] is True
    params = inspect.signature(run_bench).parameters
    assert params["methods"].default == args.methods and params["cascade"].default is True


def test_help_states_the_default_alignment(capsys):
    from diffalign.cli import main

    assert main(["bench", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--no-cascade" in text and "dpo,sft,rl" in text
    assert "unified sequence" in text
