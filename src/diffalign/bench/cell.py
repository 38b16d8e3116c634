"""One cell of the benchmark: foundation → (shared) critic → reference evaluations →
alignment → aligned evaluations → ``result.json``.

Built from the same library functions as ``diffalign run nav1d`` (``train_model``,
``train_critic``, ``evaluate``, ``align``/``reuse_alignment``) rather than calling
``run_nav1d``: a cell needs sizes below the run's presets, the Diffusion Policy selection
evaluations of Table 3, no best-of-64 stage and no cascade, and the same code path for every
suite. Every step is kept on disk and reused, so a killed cell resumes; ``result.json`` is
written last and marks the cell finished.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from .grid import SUITE_METRIC, BenchSizes, Cell, task_string

__all__ = ["COLLECT_HOOK", "DatasetUnavailable", "ensure_critic", "ensure_dataset", "run_cell"]

COLLECT_HOOK = ("diffalign.commands.collect", "collect_task")
"""Module and function :func:`ensure_dataset` calls to collect a missing simulator dataset:
``collect_task(task_string, quick=bool)``, which must leave the dataset where
``tasks.resolve_task(task_string)`` finds it."""


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


def ensure_critic(task_name: str, critic_dir: str, seed: int, sizes: dict, device: str = "cpu",
                  progress: bool = False) -> str:
    """Train the IQL critic of ``task_name`` into ``critic_dir`` unless it is there already."""
    from ..models.critic import CriticConfig, train_critic
    from ..tasks import resolve_task
    from ..train.trainer import resolve_device

    device = str(resolve_device(device))
    out = Path(critic_dir)
    if (out / "config.json").exists():
        _log(f"critic {out.name}: loaded")
        return str(out)
    size = BenchSizes(**sizes)
    task = resolve_task(task_name, episodes=size.data_episodes)
    _log(f"critic {out.name}: training IQL for {size.critic_steps} steps")
    t0 = time.perf_counter()
    train_critic(task.episodes, CriticConfig(steps=size.critic_steps, seed=seed, device=device),
                 out_dir=out, progress=progress)
    from ..atomic import write_json

    write_json(out / "bench_timing.json", {"train_s": time.perf_counter() - t0})
    return str(out)


def _score(res: dict, metric: str) -> float | None:
    if metric == "success_rate":
        sr = res.get("success_rate")
        return None if sr is None else 100.0 * float(sr)
    v = res.get(metric)
    return None if v is None else float(v)


def _summary(res: dict, metric: str) -> dict[str, Any]:
    keys = ("return_mean", "return_std", "normalized", "success_rate", "coherency", "entropy",
            "candidates", "selection", "episodes", "steps", "decisions_per_s", "wall_seconds")
    return {"score": _score(res, metric), **{k: res.get(k) for k in keys}}


def align_config(size: BenchSizes, methods: Sequence[str], seed: int, quick: bool):
    """The :class:`~diffalign.align.runner.AlignConfig` of a cell (no cascade)."""
    from ..align.runner import AlignConfig
    from ..align.sequence import SequenceConfig

    seq = SequenceConfig(methods=tuple(methods), passes=size.passes, max_iters=size.max_iters,
                         eval_every=size.eval_every, patience=size.patience)
    cfg = AlignConfig(sequence=seq, conditions=size.conditions,
                      val_conditions=size.val_conditions, steps=size.denoise_steps or None,
                      seed=seed, cascade=None)
    cfg.rl = replace(cfg.rl, states_per_iter=size.rl_states, group_size=size.rl_group,
                     kl_coef=float(size.rl_kl),
                     qvpg_scale="group" if size.rl_group_scale else "none",
                     **({"ppo_epochs": 1} if quick else {}))
    cfg.dpo = replace(cfg.dpo, states_per_iter=size.dpo_states, candidates=size.dpo_candidates,
                      **({"updates_per_batch": 1} if quick else {}))
    cfg.sft = replace(cfg.sft, states_per_round=size.sft_states, candidates=size.sft_candidates,
                      epochs=size.sft_epochs)
    return cfg


def run_cell(cell: dict, task_name: str, cell_dir: str, critic_dir: str,
             methods: Sequence[str], sizes: dict, quick: bool = False, device: str = "cpu",
             progress: bool = False) -> dict[str, Any]:
    """Run one cell (resuming from what is in ``cell_dir``) and write its ``result.json``.

    Arguments are plain values so the call can be shipped to a Ray worker.
    """
    import torch

    from ..align.runner import align, reuse_alignment
    from ..atomic import write_json
    from ..commands.train import TrainArgs, train_model
    from ..eval.evaluate import evaluate
    from ..models.base import ControlModel
    from ..models.critic import load_critic
    from ..tasks import resolve_task
    from ..train.trainer import resolve_device

    device = str(resolve_device(device))
    c = Cell(**cell)
    size = BenchSizes(**sizes)
    out = Path(cell_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "error.txt").unlink(missing_ok=True)
    metric = SUITE_METRIC[c.suite]
    steps = size.denoise_steps or None
    t_cell = time.perf_counter()
    timings: dict[str, float] = {}
    _log(f"cell {c.id}: start")

    # foundation
    fdir = out / "foundation"
    t0 = time.perf_counter()
    if (fdir / "config.json").exists():
        model = ControlModel.load(fdir, device=device)
    else:
        targs = TrainArgs(out=fdir, task=task_name, model=c.model, process=c.process,
                          episodes=size.data_episodes, steps=size.foundation_steps,
                          batch_size=size.batch_size, seed=c.seed, device=device,
                          progress=progress)
        model, _, _ = train_model(targs)
        timings["foundation_s"] = time.perf_counter() - t0
    critic = load_critic(critic_dir, device=device)
    task = resolve_task(task_name, episodes=size.data_episodes)

    evals: dict[str, dict] = {}

    def run_eval(name: str, candidates: int, selection: str, with_critic: bool) -> None:
        edir = out / "eval" / name
        if (edir / "eval.json").exists():
            res = json.loads((edir / "eval.json").read_text())
        else:
            res = evaluate(model, critic=critic if with_critic else None,
                           episodes=size.eval_episodes, candidates=candidates, steps=steps,
                           selection=selection, out_dir=edir, seed=c.seed, device=device)
        evals[name] = _summary(res, metric)
        s = evals[name]["score"]
        _log(f"cell {c.id}: {name}: return {res['return_mean']:.2f} ± {res['return_std']:.2f}"
             + ("" if s is None else f", score {s:.1f}"))

    def run_evals(stage: str) -> None:
        """One candidate; for dp also N candidates, expectation vs IDQL (Table 3)."""
        t0 = time.perf_counter()
        run_eval(stage, 1, "auto", False)
        if c.model == "dp":
            run_eval(f"{stage}_expectation", size.candidates, "expectation", False)
            run_eval(f"{stage}_idql", size.candidates, "idql_greedy", True)
        timings[f"{stage}_eval_s"] = time.perf_counter() - t0

    run_evals("reference")

    # alignment
    adir = out / "align"
    t0 = time.perf_counter()
    if (adir / "align.json").exists():
        reuse_alignment(model, adir, cascade=False)
    else:
        _log(f"cell {c.id}: aligning with {','.join(methods)}")
        align(model, critic, task.episodes, align_config(size, methods, c.seed, quick),
              out_dir=adir, progress=progress)
        timings["align_s"] = time.perf_counter() - t0
    info = json.loads((adir / "align.json").read_text())

    run_evals("aligned")
    timings["cell_s"] = time.perf_counter() - t_cell

    result: dict[str, Any] = {
        "cell": c.id, "suite": c.suite, "task": c.task, "task_string": task_name,
        "model": c.model, "process": c.process, "seed": c.seed, "methods": list(methods),
        "metric": metric, "quick": quick,
        "reference": evals["reference"]["score"], "aligned": evals["aligned"]["score"],
        "selection": None, "evals": evals,
        "align": {"reference_val_reward": info.get("reference_val_reward"),
                  "stages": info.get("stages", []), "events": info.get("events", [])},
        "sizes": sizes, "timings": timings, "device": device,
        "torch": torch.__version__,
    }
    if c.model == "dp":
        result["selection"] = {
            "candidates": size.candidates,
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
