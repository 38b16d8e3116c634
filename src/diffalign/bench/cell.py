"""One cell of the benchmark: a run of the pipeline (:mod:`diffalign.pipeline`, the code
path of ``diffalign run``) with the suite's recipe, in the cell's directory, taking the
data and critic shared by its (task, seed); then, for a Diffusion Policy, the selection
evaluations of Table 3; then ``result.json``.

Every step is kept on disk and reused, so a killed cell resumes; ``result.json`` is written
last and marks the cell finished.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..data.collect import COLLECT_SIZES
from ..pipeline.run import stage_score
from .grid import SUITE_METRIC, Cell, task_string

__all__ = ["COLLECT_HOOK", "COLLECT_SIZES", "DatasetUnavailable", "aligned_stage",
           "collect_task", "ensure_critic", "ensure_dataset", "run_cell"]

COLLECT_HOOK = ("diffalign.bench.cell", "collect_task")
"""Module and function :func:`ensure_dataset` calls to collect a missing simulator dataset:
``collect_task(task_string, quick=bool, out=None)``, which must leave the dataset where
``tasks.resolve_task(task_string)`` finds it (or at ``out``)."""

class DatasetUnavailable(FileNotFoundError):
    """A suite's dataset is missing and cannot be collected here."""


def _log(msg: str) -> None:
    print(f"[diffalign bench] {msg}", flush=True)


def _collector():
    """The collect function of :data:`COLLECT_HOOK`, or None when that module is absent."""
    import importlib

    module, fn = COLLECT_HOOK
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        return None
    collect = getattr(mod, fn, None)
    if not callable(collect):
        raise DatasetUnavailable(f"{module} has no function {fn}(task, quick=...) for "
                                 "diffalign bench to collect datasets with")
    return collect


def collect_task(task: str, quick: bool = False, out: str | Path | None = None) -> Path:
    """Collect dataset ``FAMILY/NAME/POLICY`` into ``out`` (default: where ``resolve_task``
    finds it) with :data:`COLLECT_SIZES`, as ``diffalign collect`` does by default."""
    from ..data.collect import collect_dataset

    return collect_dataset(task, quick=quick, out=out, progress=False)


def ensure_dataset(suite: str, task: str, quick: bool = False) -> str:
    """Make sure the dataset of a suite task can be loaded; returns its task string.

    Nav1D datasets are generated in memory. A simulator task (``metaworld/<task>/expert``,
    ``mujoco/<task>/medium``) that :func:`~diffalign.tasks.resolve_task` cannot load is
    collected first with the collect command's function (:data:`COLLECT_HOOK`; smaller with
    ``quick``). Raises :class:`DatasetUnavailable` when it is missing and cannot be collected.

    Quick datasets are tiny: they go to ``data_dir()/quick/`` and the returned task string is
    that file's path, so a later full bench never mistakes them for the real dataset.
    """
    from ..tasks import data_dir, resolve_task

    name = task_string(suite, task)  # validates suite and task
    if suite == "nav1d":
        return name
    if quick:
        family, sim, dataset = name.split("/")
        path = data_dir() / "quick" / family / f"{sim}-{dataset}.hdf5"
        if not path.exists():
            collect = _collector()
            if collect is None:
                raise DatasetUnavailable(f"dataset {name!r} cannot be collected: this version "
                                         f"has no {COLLECT_HOOK[0]} (`diffalign collect`)")
            _log(f"collecting {name} (quick) -> {path}")
            collect(name, quick=True, out=path)
        return str(path)
    try:
        resolve_task(name)
        return name
    except (FileNotFoundError, ValueError) as e:
        missing = e
    collect = _collector()
    if collect is None:
        raise DatasetUnavailable(
            f"dataset {name!r} is not available ({missing}) and cannot be collected: this "
            f"version has no {COLLECT_HOOK[0]} (`diffalign collect`)")
    _log(f"collecting {name}" + (" (quick)" if quick else ""))
    collect(name, quick=quick)
    try:
        resolve_task(name)
    except (FileNotFoundError, ValueError) as e:
        raise DatasetUnavailable(f"dataset {name!r} is still not available after collecting "
                                 f"it: {e}") from e
    return name


def _options(task_name: str, out: str | Path, seed: int, recipe, device: str,
             progress: bool, cascade: bool = False, **kw):
    from ..pipeline import RunOptions

    return RunOptions(task=task_name, out=Path(out), recipe=recipe, seed=seed, device=device,
                      progress=progress, parallel=False, cascade=cascade, **kw)


def ensure_critic(task_name: str, critic_dir: str, seed: int, recipe, device: str = "cpu",
                  progress: bool = False) -> str:
    """The shared directory of ``task_name`` and ``seed``: the run's data, the data's action
    band and the critic, made by the pipeline's own steps unless they are there."""
    from ..pipeline.data import load_run_task, write_run_data
    from ..pipeline.run import train_run_critic
    from ..train.trainer import resolve_device

    out = Path(critic_dir)
    if (out / "critic" / "config.json").exists():
        _log(f"critic {out.name}: loaded")
        return str(out)
    opts = _options(task_name, out, seed, recipe, str(resolve_device(device)), progress)
    t0 = time.perf_counter()
    data = write_run_data(task_name, out, episodes=recipe.data_episodes, seed=seed)
    _log(f"critic {out.name}: training")
    *_, fut = train_run_critic(opts, data, load_run_task(**data))
    if fut is not None:
        fut.result()
    from ..atomic import write_json

    write_json(out / "bench_timing.json", {"train_s": time.perf_counter() - t0})
    return str(out)


def aligned_stage(report: dict) -> str:
    """The last aligned stage of a run's report (the adapter alignment ended with)."""
    names = [s["name"] for s in report["stages"]
             if not s["name"].startswith("reference") and s["name"] != "cascade"]
    return names[-1] if names else "reference"


def _summary(res: dict, metric: str) -> dict[str, Any]:
    keys = ("return_mean", "return_std", "normalized", "success_rate", "coherency", "entropy",
            "candidates", "selection", "episodes", "steps", "decisions_per_s", "wall_seconds")
    return {"score": stage_score(res, metric), **{k: res.get(k) for k in keys}}


def run_cell(cell: dict, task_name: str, cell_dir: str, critic_dir: str,
             methods: Sequence[str], recipe, candidates: int = 16, quick: bool = False,
             device: str = "cpu", progress: bool = False, cascade: bool = True
             ) -> dict[str, Any]:
    """Run one cell: the pipeline (:func:`~diffalign.pipeline.run_pipeline`) in ``cell_dir``
    with the shared data and critic of ``critic_dir``, then for a Diffusion Policy the
    selection evaluations of Table 3; writes ``result.json`` last.

    The cell's ``aligned`` numbers are those of the stage the run chose as its final one
    (``report.json``'s ``final``), which may be the cascade, an earlier stage or the
    reference itself.

    Arguments are plain values so the call can be shipped to a Ray worker.
    """
    import torch

    from ..atomic import write_json
    from ..eval.evaluate import evaluate
    from ..pipeline import run_pipeline
    from ..runs import load_stage
    from ..train.trainer import resolve_device

    device = str(resolve_device(device))
    c = Cell(**cell)
    out = Path(cell_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "error.txt").unlink(missing_ok=True)
    t_cell = time.perf_counter()
    _log(f"cell {c.id}: start")
    report = run_pipeline(_options(task_name, out, c.seed, recipe, device, progress,
                                   model=c.model, process=c.process, methods=tuple(methods),
                                   preset="quick" if quick else "default",
                                   shared=Path(critic_dir), cascade=cascade))
    metric = SUITE_METRIC[c.suite]
    rows = {s["name"]: s for s in report["stages"]}
    aligned = report["final"]["stage"]
    evals = {"reference": _summary(rows["reference"], metric),
             "aligned": _summary(rows[aligned], metric)}
    for k in ("reference", "aligned"):
        evals[k]["selection"] = "auto"
        evals[k]["episodes"] = rows["reference" if k == "reference" else aligned].get(
            "eval_episodes")
    timings = dict(report.get("timings", {}))
    if c.model == "dp":  # Table 3: N candidates chosen by expectation or by IDQL
        t0 = time.perf_counter()
        for key, stage in (("reference", "reference"), ("aligned", aligned)):
            if key == "aligned" and stage == "reference":  # same model: same evaluations
                for sel in ("expectation", "idql"):
                    evals[f"aligned_{sel}"] = dict(evals[f"reference_{sel}"])
                continue
            st = load_stage(out, stage, device=device)
            for sel, with_critic in (("expectation", False), ("idql", True)):
                name = f"{key}_{sel}"
                edir = out / "eval" / f"{stage}_{sel}"  # by stage: a re-chosen final re-runs
                if (edir / "eval.json").exists():
                    res = json.loads((edir / "eval.json").read_text())
                else:
                    res = evaluate(st.model, critic=str(out / "critic") if with_critic else None,
                                   episodes=recipe.eval_episodes, candidates=candidates,
                                   selection="idql_greedy" if with_critic else "expectation",
                                   out_dir=edir, seed=c.seed, device=device)
                evals[name] = _summary(res, metric)
        timings["selection_eval_s"] = time.perf_counter() - t0
    timings["cell_s"] = time.perf_counter() - t_cell
    info = json.loads((out / "align" / "align.json").read_text())
    result: dict[str, Any] = {
        "cell": c.id, "suite": c.suite, "task": c.task, "task_string": task_name,
        "model": c.model, "process": c.process, "seed": c.seed, "methods": list(methods),
        "metric": metric, "quick": quick,
        "reference": evals["reference"]["score"], "aligned": evals["aligned"]["score"],
        "aligned_stage": aligned, "final": aligned, "last_stage": aligned_stage(report),
        "cascade": cascade,
        "selection": None, "evals": evals,
        "align": {"reference_val_reward": info.get("reference_val_reward"),
                  "stages": info.get("stages", []), "events": info.get("events", [])},
        "sizes": {**asdict(recipe), "candidates": candidates}, "timings": timings,
        "device": device, "torch": torch.__version__,
    }
    if c.model == "dp":
        result["selection"] = {
            "candidates": candidates,
            "expectation": {"reference": evals["reference_expectation"]["score"],
                            "aligned": evals["aligned_expectation"]["score"]},
            "idql": {"reference": evals["reference_idql"]["score"],
                     "aligned": evals["aligned_idql"]["score"]},
        }
    write_json(out / "result.json", result)
    _log(f"cell {c.id}: done in {timings['cell_s']:.0f}s (reference "
         f"{_fmt(result['reference'])} -> aligned {_fmt(result['aligned'])})")
    return result


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.1f}"
