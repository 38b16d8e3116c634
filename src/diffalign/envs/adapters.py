"""Simulator adapters: one interface over gymnasium MuJoCo, MetaWorld, PushT, Kitchen, AntMaze.

A *sim task* is ``FAMILY/NAME`` (``mujoco/hopper``, ``metaworld/button-press-v3``,
``pusht/pusht``, ``kitchen/complete``, ``antmaze/umaze``). :func:`make_sim_env` builds it as a
gymnasium ``Env`` with

* a flat ``float32`` ``Box`` observation (dict observations are flattened with their keys
  sorted, recursively: the same order :func:`diffalign.data.readers.read_minari` uses, so a
  Minari dataset of the same environment lines up with the env's observations),
* a ``float32`` ``Box`` action space, actions clipped into it,
* a fixed time limit (``max_episode_steps``; truncation, never a terminal, at the limit),
* ``info["success"]`` (bool) on every step where the benchmark defines success
  (MetaWorld, PushT, Kitchen: all its tasks done, AntMaze).

Every family is an optional extra, imported only when its env is built; a missing package
raises :class:`ImportError` naming the ``pip install`` line. Each task is also registered
with gymnasium as ``diffalign/FAMILY.NAME-v0`` (see :func:`register_sim_envs`), so that
``gym.make`` and Minari env specs can rebuild it.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

__all__ = [
    "SIM_TASKS",
    "MetaWorldEnv",
    "SimEnv",
    "SimSpec",
    "flatten_obs",
    "make_sim_env",
    "register_sim_envs",
    "sim_spec",
]

# D4RL reference returns (random, expert): normalised score = 100 (R - min) / (max - min).
D4RL_REF = {
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
    "kitchen": (0.0, 4.0),
    "antmaze": (0.0, 1.0),
}

#: The pip extra of each family (``pip install "diffalign[EXTRA]"``) and its packages.
EXTRAS = {
    "mujoco": ("mujoco", '"gymnasium[mujoco]" mujoco==3.3.0'),
    "metaworld": ("metaworld", "metaworld==3.1.1 mujoco==3.3.0"),
    "pusht": ("pusht", "gym-pusht"),
    "kitchen": ("robotics", "gymnasium-robotics mujoco==3.3.0"),
    "antmaze": ("robotics", "gymnasium-robotics mujoco==3.3.0"),
}


@dataclass(frozen=True)
class SimSpec:
    """One simulator task: how to build it and how to score it."""

    task: str
    """``FAMILY/NAME``."""
    family: str
    """mujoco, metaworld, pusht, kitchen or antmaze."""
    name: str
    """The benchmark's own name (hopper, button-press-v3, …)."""
    max_episode_steps: int
    """Default time limit."""
    ref_min: float | None = None
    """Return mapped to a normalised score of 0 (None: not defined)."""
    ref_max: float | None = None
    """Return mapped to 100."""
    has_success: bool = False
    """Whether ``info["success"]`` is reported."""
    policies: tuple[str, ...] = ()
    """Behaviour policies ``diffalign collect`` offers for it."""
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    """Fixed keyword arguments of the family's factory."""

    @property
    def extra(self) -> str:
        """The pip extra that installs this family."""
        return EXTRAS[self.family][0]

    @property
    def gym_id(self) -> str:
        """The gymnasium id this task is registered under."""
        return f"diffalign/{self.family}.{self.name}-v0"


_MUJOCO = {"hopper": "Hopper-v5", "halfcheetah": "HalfCheetah-v5", "walker2d": "Walker2d-v5"}
METAWORLD_TASKS = ("button-press-v3", "drawer-open-v3", "sweep-into-v3", "plate-slide-v3")
METAWORLD_HORIZON = 200
_KITCHEN = {
    "complete": ("microwave", "kettle", "light switch", "slide cabinet"),
    "partial": ("microwave", "kettle", "bottom burner", "light switch"),
    "mixed": ("microwave", "kettle", "bottom burner", "light switch"),
}
_ANTMAZE = {
    "umaze": "AntMaze_UMaze-v5",
    "medium": "AntMaze_Medium_Diverse_GR-v5",
    "large": "AntMaze_Large_Diverse_GR-v5",
}


def _build_specs() -> dict[str, SimSpec]:
    specs: list[SimSpec] = []
    for name, gid in _MUJOCO.items():
        lo, hi = D4RL_REF[name]
        specs.append(SimSpec(f"mujoco/{name}", "mujoco", name, 1000, lo, hi, False,
                             ("random", "medium", "replay"), {"env_id": gid}))
    for name in METAWORLD_TASKS:
        # ref_max: the scripted expert's mean return over the first 50 seeds at 200 steps is
        # written into each collected file; here there is no universal constant.
        specs.append(SimSpec(f"metaworld/{name}", "metaworld", name, METAWORLD_HORIZON, None,
                             None, True, ("expert", "noisy", "random")))
    specs.append(SimSpec("pusht/pusht", "pusht", "pusht", 300, None, None, True,
                         ("random",)))
    for name, tasks in _KITCHEN.items():
        specs.append(SimSpec(f"kitchen/{name}", "kitchen", name, 280, *D4RL_REF["kitchen"],
                             True, ("random",), {"tasks_to_complete": tasks}))
    for name, gid in _ANTMAZE.items():
        specs.append(SimSpec(f"antmaze/{name}", "antmaze", name, 700, *D4RL_REF["antmaze"],
                             True, ("random",), {"env_id": gid}))
    return {s.task: s for s in specs}


#: Every simulator task, by ``FAMILY/NAME``.
SIM_TASKS: dict[str, SimSpec] = _build_specs()


def sim_spec(task: str) -> SimSpec:
    """The :class:`SimSpec` of ``task``; ``ValueError`` naming it when unknown."""
    spec = SIM_TASKS.get(task)
    if spec is None:
        fam = task.split("/", 1)[0]
        same = [t for t in SIM_TASKS if t.startswith(fam + "/")]
        hint = f"; {fam} tasks: {', '.join(same)}" if same else ""
        raise ValueError(f"unknown simulator task {task!r}{hint} (all: {', '.join(SIM_TASKS)})")
    return spec


def _missing(family: str, exc: ImportError) -> ImportError:
    extra, pkgs = EXTRAS[family]
    return ImportError(
        f"the {family} environments need the '{extra}' extra: pip install \"diffalign[{extra}]\" "
        f"(or: pip install {pkgs}); import failed: {exc}"
    )


# ---------------------------------------------------------------------- observation flattening
def flatten_obs(obs: Any) -> np.ndarray:
    """One observation (array, or dict/tuple, possibly nested) -> flat float32 vector.

    Dict keys are taken sorted, as :func:`diffalign.data.readers.read_minari` does.
    """
    if isinstance(obs, Mapping):
        parts = [flatten_obs(obs[k]) for k in sorted(obs)]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)
    if isinstance(obs, tuple):
        return np.concatenate([flatten_obs(o) for o in obs])
    return np.asarray(obs, dtype=np.float32).reshape(-1)


def _flat_dim(space) -> int:
    if isinstance(space, spaces.Dict):
        return sum(_flat_dim(s) for s in space.spaces.values())
    if isinstance(space, spaces.Tuple):
        return sum(_flat_dim(s) for s in space.spaces)
    return int(np.prod(space.shape))


def _box_f32(space):
    return spaces.Box(np.asarray(space.low, np.float32), np.asarray(space.high, np.float32),
                      dtype=np.float32)


# ---------------------------------------------------------------------- the one wrapper
class SimEnv(gym.Wrapper):
    """Flat float32 observations, clipped float32 actions, a time limit, ``success``."""

    def __init__(self, env, task: str, max_episode_steps: int,
                 success_fn: Callable[[dict], bool | None] | None = None):
        super().__init__(env)
        self.task = task
        self.max_episode_steps = int(max_episode_steps)
        self._success_fn = success_fn
        self._t = 0
        space = env.observation_space
        if isinstance(space, spaces.Box) and space.shape is not None and len(space.shape) == 1:
            self.observation_space = _box_f32(space)
        else:
            self.observation_space = spaces.Box(-np.inf, np.inf, (_flat_dim(space),), np.float32)
        self.action_space = _box_f32(env.action_space)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        self._t = 0
        obs, info = self.env.reset(seed=seed, options=options)
        if seed is not None:
            self.action_space.seed(seed)
        return flatten_obs(obs), dict(info)

    def step(self, action):
        a = np.clip(np.asarray(action, dtype=np.float32).reshape(self.action_space.shape),
                    self.action_space.low, self.action_space.high)
        obs, r, term, trunc, info = self.env.step(a)
        self._t += 1
        info = dict(info)
        if self._success_fn is not None:
            flag = self._success_fn(info)
            if flag is not None:
                info["success"] = bool(flag)
        trunc = bool(trunc) or self._t >= self.max_episode_steps
        return flatten_obs(obs), float(r), bool(term), trunc and not bool(term), info


# ---------------------------------------------------------------------- families
def _make_mujoco(name: str, max_episode_steps: int | None = None, **kwargs: Any):
    spec = sim_spec(f"mujoco/{name}")
    try:
        import mujoco  # noqa: F401
    except ImportError as exc:
        raise _missing("mujoco", exc) from exc
    h = int(max_episode_steps or spec.max_episode_steps)
    env = gym.make(spec.kwargs["env_id"], max_episode_steps=h, **kwargs)
    return SimEnv(env, spec.task, h)


@functools.lru_cache(maxsize=16)
def _metaworld_tasks(name: str, task_seed: int):
    """The 50 goal variations MetaWorld's MT1 benchmark makes for ``name`` (cached: building
    them resets the env 50 times)."""
    import metaworld

    if name not in metaworld.MT1.ENV_NAMES:
        raise ValueError(f"unknown MetaWorld environment {name!r}")
    mt1 = metaworld.MT1(name, seed=task_seed)
    return mt1.train_classes[name], list(mt1.train_tasks)


class MetaWorldEnv(gym.Env):
    """One MetaWorld v3 task (MT1, goal observable) with seeded goal sampling.

    ``reset(seed=s)`` picks one of the benchmark's 50 goal variations with a generator
    seeded by ``s`` (``options={"task_index": i}`` picks one directly), so a reset seed
    fixes the whole episode; MetaWorld itself ignores reset seeds.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 80}

    def __init__(self, name: str, task_seed: int = 0, render_mode: str | None = None):
        cls, self._tasks = _metaworld_tasks(name, int(task_seed))
        self.name = name
        self.render_mode = render_mode
        self._env = cls(render_mode=render_mode)
        self._env.set_task(self._tasks[0])  # goal observable (MT1), as the experts expect
        dim = int(np.prod(self._env.sawyer_observation_space.shape))
        self.observation_space = spaces.Box(-np.inf, np.inf, (dim,), np.float64)
        self.action_space = spaces.Box(-1.0, 1.0, (4,), np.float32)
        self.task_index = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = dict(options or {})
        if "task_index" in options:
            idx = int(options["task_index"]) % len(self._tasks)
        else:
            idx = int(self.np_random.integers(len(self._tasks)))
        self.task_index = idx
        self._env.set_task(self._tasks[idx])
        self._env.max_path_length = 10**9  # the SimEnv wrapper owns the time limit
        obs, info = self._env.reset()
        return np.asarray(obs, np.float64), dict(info, task_index=idx)

    def step(self, action):
        obs, r, term, trunc, info = self._env.step(np.asarray(action, np.float32))
        return np.asarray(obs, np.float64), float(r), bool(term), bool(trunc), dict(info)

    def render(self):
        return self._env.render()

    def close(self):
        self._env.close()


def _make_metaworld(name: str, max_episode_steps: int | None = None, task_seed: int = 0,
                    render_mode: str | None = None):
    spec = sim_spec(f"metaworld/{name}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import metaworld  # noqa: F401
    except ImportError as exc:
        raise _missing("metaworld", exc) from exc
    h = int(max_episode_steps or spec.max_episode_steps)
    env = MetaWorldEnv(name, task_seed=task_seed, render_mode=render_mode)
    return SimEnv(env, spec.task, h, success_fn=lambda i: i.get("success"))


def _make_pusht(name: str = "pusht", max_episode_steps: int | None = None, **kwargs: Any):
    spec = sim_spec(f"pusht/{name}")
    try:
        import gym_pusht  # noqa: F401
    except ImportError as exc:
        raise _missing("pusht", exc) from exc
    h = int(max_episode_steps or spec.max_episode_steps)
    kwargs.setdefault("obs_type", "state")
    env = gym.make("gym_pusht/PushT-v0", max_episode_steps=h, **kwargs)
    return SimEnv(env, spec.task, h, success_fn=lambda i: i.get("is_success"))


def _import_robotics(family: str):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import gymnasium_robotics
    except ImportError as exc:
        raise _missing(family, exc) from exc
    gym.register_envs(gymnasium_robotics)
    return gym


def _make_kitchen(name: str, max_episode_steps: int | None = None, **kwargs: Any):
    spec = sim_spec(f"kitchen/{name}")
    gym = _import_robotics("kitchen")
    h = int(max_episode_steps or spec.max_episode_steps)
    tasks = list(spec.kwargs["tasks_to_complete"])
    env = gym.make("FrankaKitchen-v1", tasks_to_complete=tasks, max_episode_steps=h, **kwargs)

    def success(info: dict) -> bool | None:
        left = info.get("tasks_to_complete")
        return None if left is None else len(left) == 0

    return SimEnv(env, spec.task, h, success_fn=success)


def _make_antmaze(name: str, max_episode_steps: int | None = None, **kwargs: Any):
    spec = sim_spec(f"antmaze/{name}")
    gym = _import_robotics("antmaze")
    h = int(max_episode_steps or spec.max_episode_steps)
    kwargs.setdefault("include_cfrc_ext_in_observation", False)
    env = gym.make(spec.kwargs["env_id"], max_episode_steps=h, **kwargs)
    # gymnasium-robotics writes the maze's MJCF to /tmp and never removes it; MuJoCo has
    # loaded the model by now, so the file can go.
    xml = getattr(env.unwrapped, "tmp_xml_file_path", None)
    if xml:
        Path(xml).unlink(missing_ok=True)
    return SimEnv(env, spec.task, h, success_fn=lambda i: i.get("success"))


_FACTORIES: dict[str, Callable[..., Any]] = {
    "mujoco": _make_mujoco,
    "metaworld": _make_metaworld,
    "pusht": _make_pusht,
    "kitchen": _make_kitchen,
    "antmaze": _make_antmaze,
}


def make_sim_env(task: str, **kwargs: Any):
    """Build simulator task ``task`` (``FAMILY/NAME``) as a gymnasium env.

    ``kwargs``: ``max_episode_steps`` (all), ``task_seed`` (MetaWorld: seed of the 50 goal
    variations), or keyword arguments of the underlying gymnasium env. Raises ``ValueError``
    for an unknown task and ``ImportError`` naming the pip extra when its package is missing.
    """
    spec = sim_spec(task)
    return _FACTORIES[spec.family](spec.name, **kwargs)


def _entry_point(family: str, name: str, **kwargs: Any):
    """gymnasium entry point of ``diffalign/FAMILY.NAME-v0``."""
    return _FACTORIES[family](name, **kwargs)


def register_sim_envs() -> None:
    """Register every sim task with gymnasium as ``diffalign/FAMILY.NAME-v0`` (idempotent;
    imports none of the simulators)."""
    from gymnasium.envs.registration import register, registry

    for spec in SIM_TASKS.values():
        if spec.gym_id not in registry:
            register(id=spec.gym_id, entry_point="diffalign.envs.adapters:_entry_point",
                     kwargs={"family": spec.family, "name": spec.name},
                     disable_env_checker=True, order_enforce=False)
