"""Task strings: what ``--task`` means.

* ``nav1d/{partial,full,expert}`` — the Nav1D dataset of that kind, generated in memory
  (deterministic in the layout seed and data seed), with its environment and the DP optimum
  as reference score.
* a path to a dataset file (D4RL HDF5, robomimic HDF5) or a local Minari dataset id — its
  environment is made from the dataset's ``env_id`` attribute when gymnasium knows it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data.episodes import Episodes

__all__ = ["Task", "resolve_task"]

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


def resolve_task(task: str, layout_seed: int = 0, episodes: int = 1000, seed: int = 0) -> Task:
    """Turn a task string into data + environment factory + reference scores.

    Raises ``ValueError`` naming the task when it is neither a known task nor a dataset.
    """
    if task.startswith("nav1d/"):
        kind = task.split("/", 1)[1]
        if kind not in NAV1D_KINDS:
            raise ValueError(f"unknown Nav1D dataset {kind!r} in task {task!r}; choose one of "
                             f"{', '.join('nav1d/' + k for k in NAV1D_KINDS)}")
        import gymnasium as gym

        from .envs import NAV1D_ID

        eps = _nav1d_episodes(kind, episodes, layout_seed, seed)
        meta = dict(eps.meta, kind=kind, layout_seed=layout_seed, env_id=NAV1D_ID)
        return Task(name=task, episodes=eps,
                    make_env=functools.partial(gym.make, NAV1D_ID, layout_seed=layout_seed),
                    ref_min=0.0, ref_max=float(eps.meta["ref_max_score"]), meta=meta)
    from .data.readers import load_dataset

    path = Path(task)
    if path.suffix in (".hdf5", ".h5") and not path.exists():
        raise FileNotFoundError(f"dataset file {task!r} does not exist")
    if path.suffix not in (".hdf5", ".h5") and "/" not in task:
        raise ValueError(f"unknown task {task!r}: use nav1d/{{partial,full,expert}}, a dataset "
                         "file (.hdf5/.h5) or a local Minari dataset id")
    eps = load_dataset(task)
    env_id = eps.meta.get("env_id") or eps.meta.get("env")
    make_env = None
    if env_id:
        import gymnasium as gym

        if env_id in gym.registry:
            make_env = functools.partial(gym.make, env_id)
    rmin, rmax = eps.meta.get("ref_min_score"), eps.meta.get("ref_max_score")
    return Task(name=task, episodes=eps, make_env=make_env,
                ref_min=None if rmin is None else float(rmin),
                ref_max=None if rmax is None else float(rmax), meta=dict(eps.meta))
