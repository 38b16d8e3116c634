"""The benchmark grid: suites, cells, sizes, and the run over all cells.

A *cell* is one (suite task, model, process, seed): a run of the pipeline of ``diffalign run``
(:mod:`diffalign.pipeline`) with the suite's recipe. The bench is done in two waves: first
the data and IQL critic of each (task, seed) (shared by every model and process of that
task and seed, made by the pipeline's own steps), then the cells
(:func:`~diffalign.bench.cell.run_cell`). Both waves run through Ray when it can be
imported (a local cluster, or ``ray_address``), one after the other otherwise. A cell whose
``cells/<id>/result.json`` exists is finished and skipped, so a killed bench is resumed by
running it again; a cell that fails is reported (``cells/<id>/error.txt``) and the others go on.

Layout of ``OUT``::

    OUT/cells/<cell id>/result.json    the cell's numbers (written last, atomically)
    OUT/cells/<cell id>/               a run directory of the pipeline (report.json,
                                       foundation/, align/, eval/<stage>/, ...)
    OUT/critics/<suite>__<task>__s<seed>/   the shared data/, behavior/ and critic/
    OUT/table2.md, table2.csv, table2.png, table3.md, table3.csv, table3.png
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..recipes import Recipe

__all__ = ["MODELS", "PROCESSES", "SUITES", "SUITE_METRIC", "BenchSizes", "Cell", "make_cells",
           "parse_list", "parse_seeds", "parse_sizes", "run_bench", "suite_recipe",
           "task_string"]

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


@dataclass(frozen=True)
class BenchSizes:
    """How big each step of a cell is: the suite's recipe (:mod:`diffalign.recipes`) with
    the ``--sizes`` overrides, and the bench's own ``candidates``."""

    recipe: Recipe
    """The recipe every cell's run takes."""
    candidates: int = 16
    """Candidates per decision of the Diffusion Policy selection evaluations (Table 3)."""

    def __post_init__(self) -> None:
        if isinstance(self.candidates, bool) or not isinstance(self.candidates, int) or \
                self.candidates < 1:
            raise UserError(f"size candidates must be an integer >= 1, got "
                            f"candidates={self.candidates!r}")


CELL_RECIPE = {"ref_candidates": 0}
"""What a cell's run leaves out unless ``--sizes`` asks for it: the ``reference@N`` stage (N
times dearer per decision; the tables do not use it)."""


def suite_recipe(suite: str, quick: bool = False) -> Recipe:
    """The recipe of a suite's cells: its family's ``quick`` or ``default`` preset."""
    from ..recipes import NAV1D_PRESETS, SIM_PRESETS

    presets = NAV1D_PRESETS if suite == "nav1d" else SIM_PRESETS
    return replace(presets["quick" if quick else "default"], **CELL_RECIPE)


def parse_sizes(text: str | dict | None, quick: bool = False, suite: str = "nav1d"
                ) -> BenchSizes:
    """The suite's recipe (:func:`suite_recipe`) with ``KEY=VALUE,…`` (or a dict) applied:
    any field of :class:`~diffalign.recipes.Recipe`, and ``candidates``. A ``UserError``
    names a bad key or value."""
    from ..recipes import with_overrides

    items: dict = {}
    if isinstance(text, dict):
        items = dict(text)
    elif text:
        for part in str(text).split(","):
            if not part.strip():
                continue
            key, eq, value = part.partition("=")
            if not eq:
                raise UserError(f"size override {part.strip()!r} is not KEY=VALUE")
            items[key.strip()] = value.strip()
    candidates = items.pop("candidates", 8 if quick else 16)
    try:
        candidates = int(candidates)
    except ValueError:
        raise UserError(f"size candidates must be an integer, got candidates="
                        f"{candidates!r}") from None
    if str(items.get("denoise_steps")) == "0":  # 0: the process's own
        items["denoise_steps"] = None
    return BenchSizes(with_overrides(suite_recipe(suite, quick), items), candidates)


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


DEFAULT_METHODS = "dpo,sft,rl"
"""The cells' alignment methods unless given: the unified sequence of ``diffalign run``."""


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
              methods: str | Sequence[str] = DEFAULT_METHODS, cascade: bool = True,
              seeds: str | Sequence[int] = (0,),
              quick: bool = False, sizes: str | dict | BenchSizes | None = None,
              device: str = "cpu", ray: str = "auto", ray_address: str | None = None,
              cpus_per_cell: float = 1.0, gpus_per_cell: float = 0.0,
              threads: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Run every unfinished cell, then write the tables and plots over all finished cells.

    ``methods`` and ``cascade``: the alignment of every cell, by default that of ``diffalign
    run`` (the unified sequence :data:`DEFAULT_METHODS`, then the cascade). ``ray``:
    ``"auto"`` uses Ray when it imports, ``"on"`` requires it, ``"off"`` runs the
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
        results = mapper(ensure_critic,
                         [(task_names[c.task], str(out / "critics" / cid), c.seed, size.recipe,
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
                 str(out / "critics" / c.critic_id), method_list, size.recipe,
                 size.candidates, quick, device, progress, cascade) for c in todo]
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
