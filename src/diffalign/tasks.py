"""Task strings: what ``--task`` means.

* ``nav1d/{partial,full,expert}`` — the Nav1D dataset of that kind, generated in memory
  (deterministic in the layout seed and data seed), with its environment and the DP optimum
  as reference score.
* ``FAMILY/NAME/DATASET`` — a simulator task of :mod:`diffalign.envs.adapters`
  (``mujoco/hopper/medium``, ``metaworld/button-press-v3/expert``) and a dataset of it found
  locally: ``$DIFFALIGN_DATA/FAMILY/NAME-DATASET.hdf5`` (``DIFFALIGN_DATA`` defaults to
  ``~/.diffalign/data``; ``diffalign collect`` writes there), ``$DIFFALIGN_DATA/NAME-DATASET.hdf5``,
  or the local Minari dataset ``FAMILY/NAME/DATASET-v0`` (a DATASET ending in ``-vN`` is taken
  as that Minari id as is). With ``download=True`` a missing Minari dataset is downloaded.
  The environment is the adapter, with the time limit recorded in the file.
* a path to a dataset file (D4RL HDF5, robomimic HDF5) or a local Minari dataset id — its
  environment is the simulator adapter named by the file's ``task`` attribute (files written
  by ``diffalign collect``), else made from its ``env_id`` attribute when gymnasium knows it.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data.episodes import Episodes
from .errors import UserError

__all__ = ["Task", "data_dir", "resolve_task", "sim_dataset_path"]

NAV1D_KINDS = ("partial", "full", "expert")


@dataclass
class Task:
    """A resolved task: the offline data, how to make its environment, and its metadata."""

    name: str
    """The task string as given."""
    episodes: Episodes
    """The offline dataset."""
    make_env: Callable[[], Any] | None
    """Builds one gymnasium environment for evaluation (None when unknown)."""
    ref_min: float | None = None
    """Reference score mapped to 0 by the normalised score."""
    ref_max: float | None = None
    """Reference score mapped to 100."""
    meta: dict = field(default_factory=dict)
    """Everything else known (env id, layout seed, behaviour policy …)."""

    @property
    def obs_dim(self) -> int:
        return self.episodes.obs_dim

    @property
    def act_dim(self) -> int:
        return self.episodes.act_dim


@functools.lru_cache(maxsize=16)
def _nav1d_episodes(kind: str, episodes: int, layout_seed: int, seed: int) -> Episodes:
    from .data.nav1d_datasets import generate_nav1d_dataset, nav1d_dataset_attrs, to_episodes

    data = generate_nav1d_dataset(kind, episodes=episodes, layout_seed=layout_seed, seed=seed)
    attrs = nav1d_dataset_attrs(kind, layout_seed=layout_seed, seed=seed, episodes=episodes)
    return to_episodes(data, attrs)


def resolve_task(task: str, layout_seed: int = 0, episodes: int = 1000, seed: int = 0,
                 download: bool = False) -> Task:
    """Turn a task string into data + environment factory + reference scores.

    Raises ``ValueError`` naming the task when it is neither a known task nor a dataset, and
    ``FileNotFoundError`` saying where to put (or how to collect) a missing dataset.
    ``download``: fetch a missing Minari dataset (needs network access).
    """
    if task.startswith("nav1d/"):
        kind = task.split("/", 1)[1]
        if kind not in NAV1D_KINDS:
            raise UserError(f"unknown Nav1D dataset {kind!r} in task {task!r}; choose one of "
                             f"{', '.join('nav1d/' + k for k in NAV1D_KINDS)}")
        import gymnasium as gym

        from .envs import NAV1D_ID

        eps = _nav1d_episodes(kind, episodes, layout_seed, seed)
        meta = dict(eps.meta, kind=kind, layout_seed=layout_seed, env_id=NAV1D_ID)
        return Task(name=task, episodes=eps,
                    make_env=functools.partial(gym.make, NAV1D_ID, layout_seed=layout_seed),
                    ref_min=0.0, ref_max=float(eps.meta["ref_max_score"]), meta=meta)
    sim = _split_sim_task(task)
    if sim is not None:
        return _resolve_sim_task(task, *sim, download=download)
    from .data.readers import load_dataset

    path = Path(task)
    if path.suffix in (".hdf5", ".h5") and not path.exists():
        raise FileNotFoundError(f"dataset file {task!r} does not exist")
    if path.suffix not in (".hdf5", ".h5") and "/" not in task:
        raise UserError(f"unknown task {task!r}: use nav1d/{{partial,full,expert}}, "
                         "FAMILY/NAME/DATASET (e.g. mujoco/hopper/medium), a dataset "
                         "file (.hdf5/.h5) or a local Minari dataset id")
    if download and not path.exists():
        _download_minari(task)
    return _task_from_episodes(task, load_dataset(task))


def _task_from_episodes(name: str, eps: Episodes, sim_task: str | None = None) -> Task:
    """Task of loaded data: the simulator adapter when the data names one, else env_id."""
    from .envs.adapters import SIM_TASKS, make_sim_env

    if sim_task is None and eps.meta.get("task") in SIM_TASKS:
        sim_task = eps.meta["task"]
    if sim_task is None:  # e.g. a Minari dataset collected in an adapter env
        by_id = {s.gym_id: t for t, s in SIM_TASKS.items()}
        sim_task = by_id.get(eps.meta.get("env_id"))
    rmin, rmax = eps.meta.get("ref_min_score"), eps.meta.get("ref_max_score")
    meta = dict(eps.meta)
    make_env = None
    if sim_task is not None:
        spec = SIM_TASKS[sim_task]
        kwargs = _env_kwargs(eps.meta, spec)
        make_env = functools.partial(make_sim_env, sim_task, **kwargs)
        if rmin is None or rmax is None:
            rmin, rmax = spec.ref_min, spec.ref_max
        meta.update(sim_task=sim_task, env_kwargs=kwargs)
    else:
        env_id = eps.meta.get("env_id") or eps.meta.get("env")
        if env_id:
            import gymnasium as gym

            if env_id in gym.registry:
                make_env = functools.partial(gym.make, env_id)
    return Task(name=name, episodes=eps, make_env=make_env,
                ref_min=None if rmin is None else float(rmin),
                ref_max=None if rmax is None else float(rmax), meta=meta)


def _env_kwargs(meta: dict, spec) -> dict[str, Any]:
    """The adapter's keyword arguments recorded in a dataset's metadata."""
    import json

    kw = meta.get("env_kwargs")
    if isinstance(kw, str):
        try:
            kw = json.loads(kw)
        except json.JSONDecodeError:
            kw = None
    kwargs: dict[str, Any] = {}
    if isinstance(kw, dict):
        kwargs = {k: v for k, v in kw.items() if k in ("max_episode_steps", "task_seed")}
    if "max_episode_steps" not in kwargs and meta.get("max_episode_steps") is not None:
        kwargs["max_episode_steps"] = int(meta["max_episode_steps"])
    return kwargs


# ---------------------------------------------------------------------- simulator datasets
_MINARI_VERSION = re.compile(r"-v\d+$")


def data_dir() -> Path:
    """Where simulator datasets are looked for: ``$DIFFALIGN_DATA`` or ``~/.diffalign/data``."""
    return Path(os.environ.get("DIFFALIGN_DATA") or Path.home() / ".diffalign" / "data")


def sim_dataset_path(sim_task: str, dataset: str) -> Path:
    """The canonical file of dataset ``dataset`` of ``sim_task`` (where collect writes it):
    ``data_dir()/FAMILY/NAME-DATASET.hdf5``."""
    family, name = sim_task.split("/", 1)
    return data_dir() / family / f"{name}-{dataset}.hdf5"


def _split_sim_task(task: str) -> tuple[str, str] | None:
    """``FAMILY/NAME/DATASET`` -> (``FAMILY/NAME``, ``DATASET``) for simulator families."""
    from .envs.adapters import EXTRAS, SIM_TASKS

    parts = task.split("/")
    if len(parts) < 2 or parts[0] not in EXTRAS or Path(task).suffix in (".hdf5", ".h5"):
        return None
    if Path(task).exists():
        return None  # a local Minari folder that happens to look like one
    sim = "/".join(parts[:2])
    if sim not in SIM_TASKS:
        from .envs.adapters import sim_spec

        sim_spec(sim)  # raises ValueError naming the task and listing the known ones
    if len(parts) == 2:
        raise UserError(f"task {task!r} names an environment but no dataset: use "
                         f"{task}/DATASET, e.g. {task}/{SIM_TASKS[sim].policies[0]} "
                         f"(collect one with `diffalign collect {task} --policy "
                         f"{SIM_TASKS[sim].policies[0]} --out FILE.hdf5`)")
    if len(parts) > 3 or not parts[2]:
        raise UserError(f"task {task!r}: expected FAMILY/NAME/DATASET, e.g. {sim}/"
                         f"{SIM_TASKS[sim].policies[0]}")
    return sim, parts[2]


def _minari_local(dataset_id: str) -> bool:
    root = Path(os.environ.get("MINARI_DATASETS_PATH")
                or Path.home() / ".minari" / "datasets")
    return (root / dataset_id).is_dir()


def _download_minari(dataset_id: str) -> None:
    try:
        import minari
    except ImportError as exc:
        raise ImportError("downloading Minari datasets needs minari: pip install "
                          "\"minari[hf]==0.5.4\"") from exc
    try:
        minari.download_dataset(dataset_id)
    except Exception as exc:  # offline, unknown id, missing remote dependencies, …
        raise FileNotFoundError(
            f"could not download the Minari dataset {dataset_id!r} ({type(exc).__name__}: "
            f"{exc}); without network access, copy the dataset folder into "
            f"{os.environ.get('MINARI_DATASETS_PATH') or '~/.minari/datasets'}/{dataset_id} "
            "or use a local HDF5 file") from exc


def _resolve_sim_task(task: str, sim: str, dataset: str, download: bool = False) -> Task:
    from .data.readers import load_dataset
    from .envs.adapters import SIM_TASKS

    if _MINARI_VERSION.search(dataset):
        files: list[Path] = []
        minari_id = task
    else:
        files = [sim_dataset_path(sim, dataset), data_dir() / f"{sim.split('/')[1]}-{dataset}.hdf5"]
        minari_id = f"{task}-v0"
    for f in files:
        if f.is_file():
            return _task_from_episodes(task, load_dataset(f), sim_task=sim)
    if not _minari_local(minari_id) and download:
        _download_minari(minari_id)
    if _minari_local(minari_id):
        return _task_from_episodes(task, load_dataset(minari_id), sim_task=sim)
    looked = [str(f) for f in files] + [f"the local Minari dataset {minari_id!r}"]
    spec = SIM_TASKS[sim]
    hint = ""
    policy = dataset.split("-")[0]
    if policy in spec.policies and files:
        hint = (f"; collect it with `diffalign collect {sim} --policy {policy} --out "
                f"{files[0]}`")
    raise FileNotFoundError(
        f"no dataset for task {task!r}: looked for {', '.join(looked)}{hint}; or put a "
        f"D4RL-layout HDF5 file at {files[0] if files else looked[-1]} (set DIFFALIGN_DATA to "
        f"use another folder), or download the Minari dataset with --download")
