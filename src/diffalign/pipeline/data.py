"""The pipeline's data step: the task's dataset written into ``OUT/data/``, and the task read
back from that file by every later step, in either process.

A run is then reproducible from ``OUT`` alone: a simulator dataset that is later collected
again, or a ``DIFFALIGN_DATA`` that points elsewhere, does not change what a resumed run
trains on. Nav1D data is generated from (dataset, episodes, layout seed, seed) and written
as it is; reading it back gives the same arrays, bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

__all__ = ["data_file", "load_run_task", "write_run_data"]


def data_file(out: str | Path, task: str) -> Path:
    """Where the run keeps the dataset of ``task``: ``OUT/data/<name>.hdf5``."""
    data = Path(out) / "data"
    if task.startswith("nav1d/"):
        return data / f"nav1d-{task.split('/', 1)[1]}.hdf5"
    p = Path(task)
    if p.suffix.lower() in (".hdf5", ".h5"):
        return data / f"{p.stem}.hdf5"
    return data / (task.strip("/").replace("/", "-") + ".hdf5")


def write_run_data(task: str, out: str | Path, episodes: int = 1000, layout_seed: int = 0,
                   seed: int = 0, download: bool = False, plot: bool = True,
                   progress: bool = True) -> dict[str, Any]:
    """Resolve ``task`` and write its dataset into ``OUT/data/`` unless it is there; returns
    the arguments of :func:`load_run_task` (plain values: they go to the second process).

    ``episodes``, ``layout_seed`` and ``seed`` size and seed a generated Nav1D dataset (with
    a picture of 50 of its episodes when ``plot``); other datasets are copied whole, with
    what their environment needs recorded in the file (a missing simulator dataset is
    collected first, with a progress bar when ``progress``).
    """
    from ..tasks import resolve_task

    path = data_file(out, task)
    spec = {"file": str(path.resolve()), "task": task if task.startswith("nav1d/") else None,
            "layout_seed": int(layout_seed)}
    if path.exists():
        return spec
    if task.startswith("nav1d/"):
        from ..data.nav1d_datasets import plot_nav1d_dataset, write_nav1d_hdf5

        ep = resolve_task(task, layout_seed=layout_seed, episodes=episodes, seed=seed).episodes
        arrays = {k: getattr(ep, k) for k in ("observations", "actions", "rewards", "terminals",
                                              "timeouts", "next_observations")}
        attrs = {k: v for k, v in ep.meta.items() if isinstance(v, (str, int, float, bool))}
        write_nav1d_hdf5(path, arrays, attrs)
        if plot:
            plot_nav1d_dataset(arrays, layout_seed, path.with_suffix(".png"),
                               title=f"Nav1D {task.split('/', 1)[1]}: 50 of {len(ep)} "
                                     "episodes")
        return spec
    from ..data.collect import ensure_dataset
    from ..data.readers import write_d4rl_hdf5

    ensure_dataset(task, progress=progress)  # a missing simulator dataset: collected first
    t = resolve_task(task, download=download)
    meta = {k: v for k, v in t.episodes.meta.items() if k not in ("source", "format")}
    if t.meta.get("sim_task"):  # the adapter and its settings: the file names its env
        meta["task"] = t.meta["sim_task"]
        meta["env_kwargs"] = t.meta.get("env_kwargs") or {}
    if t.ref_min is not None and t.ref_max is not None:
        meta["ref_min_score"], meta["ref_max_score"] = t.ref_min, t.ref_max
    meta["run_task"] = task
    path.parent.mkdir(parents=True, exist_ok=True)
    write_d4rl_hdf5(path, dataclasses.replace(t.episodes, meta=meta))
    return spec


def load_run_task(file: str, task: str | None = None, layout_seed: int = 0):
    """The :class:`~diffalign.tasks.Task` of a run's dataset file. ``task``: the Nav1D task
    string (``nav1d/<dataset>``), whose environment and name the models record; other files
    name their environment themselves and the task's name is the file's path."""
    # keyed on the file's mtime too: a file written again is read again
    return _load(str(file), task, int(layout_seed), Path(file).stat().st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _load(file: str, task: str | None, layout_seed: int, _mtime: int):
    from ..tasks import Task, resolve_task

    if task is None:
        return resolve_task(file)
    import gymnasium as gym

    from ..data.readers import read_d4rl_hdf5
    from ..envs import NAV1D_ID

    eps = read_d4rl_hdf5(file)
    meta = dict(eps.meta, kind=task.split("/", 1)[1], layout_seed=layout_seed, env_id=NAV1D_ID)
    return Task(name=task, episodes=eps,
                make_env=functools.partial(gym.make, NAV1D_ID, layout_seed=layout_seed),
                ref_min=0.0, ref_max=float(eps.meta["ref_max_score"]), meta=meta)
