"""The benchmark grid: suites, cells, sizes, and the run over all cells.

A *cell* is one (suite task, model, process, seed). The run is done in two waves: first one
IQL critic per (task, seed) (shared by every model and process of that task and seed), then
the cells (:func:`~diffalign.bench.cell.run_cell`). Both waves run through Ray when it can be
imported (a local cluster, or ``ray_address``), one after the other otherwise. A cell whose
``cells/<id>/result.json`` exists is finished and skipped, so a killed bench is resumed by
running it again; a cell that fails is reported (``cells/<id>/error.txt``) and the others go on.

Layout of ``OUT``::

    OUT/cells/<cell id>/result.json    the cell's numbers (written last, atomically)
    OUT/cells/<cell id>/foundation/    the reference model
    OUT/cells/<cell id>/align/         the LoRA adapter and align.json
    OUT/cells/<cell id>/eval/<stage>/  eval.json and eval.png of each evaluation
    OUT/critics/<suite>__<task>__s<seed>/   the shared IQL critics
    OUT/table2.md, table2.csv, table3.md, table3.csv, OUT/<suite>.png
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from ..errors import UserError

__all__ = ["MODELS", "PROCESSES", "SUITES", "SUITE_METRIC", "BenchSizes", "Cell", "make_cells",
           "parse_list", "parse_seeds", "parse_sizes", "run_bench", "task_string"]

SUITES: dict[str, tuple[str, ...]] = {
    "nav1d": ("partial", "full", "expert"),
    "metaworld": ("button-press-v3", "drawer-open-v3", "sweep-into-v3", "plate-slide-v3"),
    "mujoco": ("hopper", "walker2d", "halfcheetah"),
}
"""Tasks of each suite, in table order."""

SUITE_DATASET = {"metaworld": "expert", "mujoco": "medium"}
"""The collected dataset of each simulator suite (Nav1D names its dataset in the task)."""

SUITE_METRIC = {"nav1d": "normalized", "metaworld": "success_rate", "mujoco": "normalized"}
"""What a cell's score is: the normalised score (Nav1D: % of the DP optimum; MuJoCo: D4RL
normalised) or the success rate (MetaWorld, in %)."""

MODELS = ("diffuser", "dd", "dp")
PROCESSES = ("ddpm", "ddim", "sm", "fm")


def task_string(suite: str, task: str) -> str:
    """The ``--task`` string of a suite task: ``nav1d/full``, ``metaworld/<task>/expert``,
    ``mujoco/<task>/medium``."""
    check_task(suite, task)
    if suite == "nav1d":
        return f"nav1d/{task}"
    return f"{suite}/{task}/{SUITE_DATASET[suite]}"


def check_task(suite: str, task: str) -> None:
    """Raise ValueError naming ``suite`` or ``task`` when it is not in :data:`SUITES`."""
    if suite not in SUITES:
        raise UserError(f"unknown suite {suite!r}; choose one of {', '.join(SUITES)}")
    if task not in SUITES[suite]:
        raise UserError(f"task {task!r} is not in suite {suite!r}; its tasks are "
                         f"{', '.join(SUITES[suite])}")


@dataclass(frozen=True)
class Cell:
    """One cell of the grid."""

    suite: str
    task: str
    model: str
    process: str
    seed: int

    @property
    def id(self) -> str:
        """Directory name under ``OUT/cells``: ``<suite>__<task>__<model>__<process>__s<seed>``."""
        return f"{self.suite}__{self.task}__{self.model}__{self.process}__s{self.seed}"

    @property
    def task_string(self) -> str:
        return task_string(self.suite, self.task)

    @property
    def critic_id(self) -> str:
        """Directory name under ``OUT/critics`` of the critic this cell uses."""
        return f"{self.suite}__{self.task}__s{self.seed}"


@dataclass
class BenchSizes:
    """How big each step of a cell is (``--quick`` takes :meth:`quick`)."""

    data_episodes: int = 1000
    """Nav1D dataset size in episodes (simulator suites use their collected dataset)."""
    foundation_steps: int = 3000
    """Optimiser steps of the foundation model."""
    batch_size: int = 64
    """Foundation batch size."""
    critic_steps: int = 3000
    """Optimiser steps of the IQL critic."""
    eval_episodes: int = 50
    """Evaluation episodes of every evaluation."""
    candidates: int = 16
    """Candidates per decision of the Diffusion Policy selection evaluations (Table 3)."""
    denoise_steps: int = 0
    """Denoising steps when aligning and evaluating (0: the process's default)."""
    conditions: int = 512
    """Dataset states alignment optimises on."""
    val_conditions: int = 128
    """Held-out states of alignment's validation reward."""
    passes: int = 2
    """Maximum passes over the alignment methods."""
    max_iters: int = 24
    """Maximum updates of one method in one pass."""
    eval_every: int = 3
    """Updates between validation evaluations while aligning."""
    patience: int = 3
    """Validation evaluations without gain before a method stops."""
    rl_states: int = 32
    """RL: conditions per update."""
    rl_group: int = 8
    """RL: samples per condition."""
    dpo_states: int = 32
    """DPO: conditions per update."""
    dpo_candidates: int = 8
    """DPO: samples ranked per condition."""
    sft_states: int = 64
    """SFT: conditions per round."""
    sft_candidates: int = 16
    """SFT: samples per condition."""
    sft_epochs: int = 4
    """SFT: epochs over the kept samples per round."""
    rl_kl: float = 0.005
    """RL: weight of the KL to the reference. Simulator suites default to
    :data:`SIM_RL_KL` unless it is given: with 0.005 the aligned Diffusion Policy on
    MetaWorld button-press exploited its expert-data critic and fell from 100% success to 0;
    with 0.5 and 5.0 it kept 100%."""

    rl_group_scale: int = 0
    """RL: 1 divides QV-PG's reward by its spread over each condition's group
    (``RLConfig.qvpg_scale="group"``), which makes ``rl_kl`` independent of the reward's
    scale; 0 uses the reward as it is."""

    def __post_init__(self) -> None:
        if self.rl_group_scale not in (0, 1):
            raise UserError(f"size rl_group_scale must be 0 or 1, got "
                             f"rl_group_scale={self.rl_group_scale!r}")
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in FLOAT_SIZES:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                    raise UserError(f"size {f.name} must be a number >= 0, got "
                                     f"{f.name}={v!r}")
                continue
            low = 0 if f.name in ("denoise_steps", "rl_group_scale") else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise UserError(f"size {f.name} must be an integer >= {low}, got "
                                 f"{f.name}={v!r}")

    @classmethod
    def quick(cls) -> BenchSizes:
        """Smoke-test sizes: one Nav1D cell in about a minute on 2 CPU cores."""
        return cls(data_episodes=200, foundation_steps=400, critic_steps=400, eval_episodes=8,
                   candidates=8, conditions=128, val_conditions=32, passes=1, max_iters=4,
                   eval_every=2, patience=2, rl_states=8, rl_group=4, dpo_states=16,
                   dpo_candidates=4, sft_states=16, sft_candidates=8, sft_epochs=2)


FLOAT_SIZES = ("rl_kl",)
"""Sizes that are real numbers (the others are integers)."""
SIM_RL_KL = 0.5
"""RL's KL weight on the simulator suites unless ``rl_kl`` is given (see BenchSizes.rl_kl)."""


def parse_sizes(text: str | dict | None, quick: bool = False, suite: str = "nav1d"
                ) -> BenchSizes:
    """The preset sizes of ``suite`` with ``KEY=VALUE,…`` (or a dict) applied; ValueError
    names bad keys. Simulator suites start from ``rl_kl=SIM_RL_KL``."""
    base = BenchSizes.quick() if quick else BenchSizes()
    if suite != "nav1d":
        base = replace(base, rl_kl=SIM_RL_KL)
    if not text:
        return base
    if isinstance(text, dict):
        items = dict(text)
    else:
        items = {}
        for part in str(text).split(","):
            if not part.strip():
                continue
            key, eq, value = part.partition("=")
            key = key.strip()
            if not eq:
                raise UserError(f"size override {part.strip()!r} is not KEY=VALUE")
            try:
                items[key] = float(value) if key in FLOAT_SIZES else int(value)
            except ValueError:
                kind = "a number" if key in FLOAT_SIZES else "an integer"
                raise UserError(f"size {key} must be {kind}, got {key}={value.strip()!r}"
                                 ) from None
    known = {f.name for f in fields(BenchSizes)}
    bad = sorted(set(items) - known)
    if bad:
        raise UserError(f"unknown size(s) {', '.join(bad)}; valid: {', '.join(sorted(known))}")
    return replace(base, **items)


def parse_list(value: str | Sequence[str] | None, name: str, choices: Sequence[str],
               default: Sequence[str]) -> tuple[str, ...]:
    """A comma-separated string (or a sequence) checked against ``choices``."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return tuple(default)
    items = [v.strip() for v in (value.split(",") if isinstance(value, str) else value)]
    items = [v for v in items if v]
    bad = [v for v in items if v not in choices]
    if bad:
        raise UserError(f"unknown {name} {', '.join(repr(b) for b in bad)}; choose from "
                         f"{', '.join(choices)}")
    if not items:
        raise UserError(f"{name} must name at least one value, got {value!r}")
    return tuple(dict.fromkeys(items))


def parse_seeds(value: str | Sequence[int]) -> tuple[int, ...]:
    """Seeds from ``"0,1,2"`` (or a sequence); ValueError when empty or not integers >= 0."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        try:
            seeds = [int(p) for p in parts]
        except ValueError:
            raise UserError(f"seeds must be integers, got seeds={value!r}") from None
    else:
        seeds = list(value)
    if not seeds:
        raise UserError(f"seeds must name at least one seed, got seeds={value!r}")
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int) or s < 0]
    if bad:
        raise UserError(f"seeds must be integers >= 0, got seeds={value!r}")
    return tuple(dict.fromkeys(seeds))


def make_cells(suite: str, tasks=None, models=None, processes=None,
               seeds: str | Sequence[int] = (0,)) -> list[Cell]:
    """Every cell of the grid, validated (ValueError naming any bad value)."""
    if suite not in SUITES:
        raise UserError(f"unknown suite {suite!r}; choose one of {', '.join(SUITES)}")
    for t in (tasks.split(",") if isinstance(tasks, str) else (tasks or ())):
        if t.strip():
            check_task(suite, t.strip())  # names the suite in the message
    task_list = parse_list(tasks, "task", SUITES[suite], SUITES[suite])
    model_list = parse_list(models, "model", MODELS, MODELS)
    proc_list = parse_list(processes, "process", PROCESSES, PROCESSES)
    seed_list = parse_seeds(seeds)
    return [Cell(suite, t, m, p, s) for t in task_list for m in model_list for p in proc_list
            for s in seed_list]


def parse_methods(methods: str | Sequence[str]) -> tuple[str, ...]:
    """Alignment methods in order (rl, dpo, sft), comma-separated."""
    from ..align.sequence import METHODS

    items = methods.split(",") if isinstance(methods, str) else list(methods)
    items = [m.strip() for m in items if m.strip()]
    bad = [m for m in items if m not in METHODS]
    if bad or not items:
        raise UserError(f"unknown alignment method(s) {', '.join(map(repr, bad or [methods]))};"
                         f" choose from {', '.join(METHODS)} (comma-separated)")
    return tuple(items)


def _log(msg: str) -> None:
    print(f"[diffalign bench] {msg}", flush=True)


# ----------------------------------------------------------------------------- executors
def ray_available() -> bool:
    """Whether ``import ray`` works (Ray is optional and never a dependency)."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def _sequential_map(fn: Callable, jobs: list[tuple], names: list[str], **_) -> list:
    out = []
    for job, name in zip(jobs, names):
        try:
            out.append((name, fn(*job), None))
        except Exception as e:  # a failed job is reported; the others go on
            out.append((name, None, (e, traceback.format_exc())))
    return out


def _ray_map(fn: Callable, jobs: list[tuple], names: list[str], address: str | None = None,
             cpus: float = 1.0, gpus: float = 0.0, threads: int | None = None) -> list:
    import ray

    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True)
    remote = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(_threaded)
    n_threads = threads or max(1, int(cpus))
    refs = {remote.remote(fn, n_threads, *job): name for job, name in zip(jobs, names)}
    out, pending = [], list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        for ref in done:
            try:
                out.append((refs[ref], ray.get(ref), None))
            except Exception as e:
                out.append((refs[ref], None, (e, traceback.format_exc())))
    return out


def _threaded(fn: Callable, threads: int, *job):
    """Run ``fn(*job)`` in a Ray worker with torch limited to the worker's CPUs."""
    import torch

    torch.set_num_threads(threads)
    return fn(*job)


# ----------------------------------------------------------------------------- the run
def run_bench(out: str | Path, suite: str, tasks=None, models=None, processes=None,
              methods: str | Sequence[str] = "rl", seeds: str | Sequence[int] = (0,),
              quick: bool = False, sizes: str | dict | BenchSizes | None = None,
              device: str = "cpu", ray: str = "auto", ray_address: str | None = None,
              cpus_per_cell: float = 1.0, gpus_per_cell: float = 0.0,
              threads: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Run every unfinished cell, then write the tables and plots over all finished cells.

    ``ray``: ``"auto"`` uses Ray when it imports, ``"on"`` requires it, ``"off"`` runs the
    cells one after the other. ``threads``: torch CPU threads of a cell (default: torch's own
    when sequential, ``cpus_per_cell`` under Ray). Returns ``{"cells", "ran", "skipped",
    "failed", "files", "seconds"}``. Raises ValueError (before anything is written) on bad
    input, and RuntimeError after the tables when cells failed.
    """
    from .cell import ensure_critic, ensure_dataset, run_cell
    from .tables import write_tables

    t_start = time.perf_counter()
    cells = make_cells(suite, tasks, models, processes, seeds)
    method_list = parse_methods(methods)
    size = sizes if isinstance(sizes, BenchSizes) else parse_sizes(sizes, quick, suite)
    if ray not in ("auto", "on", "off"):
        raise UserError(f"ray must be auto, on or off, got ray={ray!r}")
    if cpus_per_cell <= 0 or gpus_per_cell < 0:
        raise UserError(f"cpus_per_cell must be > 0 and gpus_per_cell >= 0, got "
                         f"cpus_per_cell={cpus_per_cell}, gpus_per_cell={gpus_per_cell}")
    if threads is not None and (isinstance(threads, bool) or threads < 1):
        raise UserError(f"threads must be >= 1, got threads={threads}")
    use_ray = ray == "on" or ray_address is not None or (ray == "auto" and ray_available())
    if use_ray and ray == "off":
        raise UserError(f"ray_address={ray_address!r} given with ray='off'")
    if use_ray and not ray_available():
        raise UserError("Ray is not installed (pip install ray); drop --ray-address / "
                         "--ray on to run the cells one after the other")
    if not use_ray:  # a Ray cluster's workers may have devices this machine lacks
        from ..train.trainer import resolve_device

        try:
            resolve_device(device)
        except RuntimeError as e:  # torch's message for a malformed device string
            raise UserError(f"bad device {device!r}: {e}") from None
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"out {str(out)!r} exists and is not a directory")

    skipped = [c for c in cells if (out / "cells" / c.id / "result.json").exists()]
    pending = [c for c in cells if c not in skipped]
    for c in skipped:
        _log(f"skipped {c.id} (finished: {out / 'cells' / c.id / 'result.json'})")
    _log(f"{len(cells)} cell(s): {len(pending)} to run, {len(skipped)} skipped"
         + (f"; through Ray ({ray_address or 'local'})" if use_ray and pending else ""))

    failed: dict[str, str] = {}
    ran: list[str] = []
    if pending:
        # datasets: once per task, here (collecting is shared by the task's cells)
        task_names = {}
        for c in pending:
            if c.task not in task_names:
                task_names[c.task] = ensure_dataset(c.suite, c.task, quick)
        out.mkdir(parents=True, exist_ok=True)
        if use_ray:
            def mapper(fn, jobs, names):
                return _ray_map(fn, jobs, names, address=ray_address, cpus=cpus_per_cell,
                                gpus=gpus_per_cell, threads=threads)
        else:
            mapper = _sequential_map
            if threads is not None:
                import torch

                torch.set_num_threads(threads)
        # wave 1: one critic per (task, seed)
        crit = {}
        for c in pending:
            crit.setdefault(c.critic_id, c)
        size_d = asdict(size)
        results = mapper(ensure_critic,
                         [(task_names[c.task], str(out / "critics" / cid), c.seed, size_d,
                           device, progress) for cid, c in crit.items()], list(crit))
        bad_critics = {}
        for name, _, err in results:
            if err is not None:
                bad_critics[name] = err
                _log(f"critic {name} FAILED: {err[0]!r}")
                print(err[1], flush=True)
        # wave 2: the cells
        todo = []
        for c in pending:
            if c.critic_id in bad_critics:
                failed[c.id] = f"its critic {c.critic_id} failed: {bad_critics[c.critic_id][0]!r}"
                _write_error(out, c, bad_critics[c.critic_id][1])
            else:
                todo.append(c)
        jobs = [(asdict(c), task_names[c.task], str(out / "cells" / c.id),
                 str(out / "critics" / c.critic_id), method_list, size_d, quick, device,
                 progress) for c in todo]
        for name, _res, err in mapper(run_cell, jobs, [c.id for c in todo]):
            if err is None:
                ran.append(name)
                continue
            failed[name] = repr(err[0])
            _log(f"cell {name} FAILED: {err[0]!r}")
            print(err[1], flush=True)
            _write_error(out, next(c for c in todo if c.id == name), err[1])

    files = write_tables(out) if (out / "cells").is_dir() else []
    for f in files:
        _log(f"wrote {f}")
    summary = {"cells": [c.id for c in cells], "ran": ran, "skipped": [c.id for c in skipped],
               "failed": failed, "files": [str(f) for f in files],
               "seconds": time.perf_counter() - t_start}
    _log(f"done in {summary['seconds']:.0f}s: {len(ran)} ran, {len(skipped)} skipped, "
         f"{len(failed)} failed")
    if failed:
        raise RuntimeError(f"{len(failed)} cell(s) failed (see cells/<id>/error.txt): "
                           + "; ".join(f"{k}: {v}" for k, v in failed.items()))
    return summary


def _write_error(out: Path, cell: Cell, text: str) -> None:
    from ..atomic import atomic_path

    with atomic_path(out / "cells" / cell.id / "error.txt") as tmp:
        tmp.write_text(text)
