"""Collecting offline datasets in the simulator adapters (``diffalign collect``).

Behaviour policies:

* ``random``: uniform actions over the action box (every task);
* ``expert``: MetaWorld's scripted policy of the task (``metaworld.policies``);
* ``noisy``: the same plus Gaussian action noise of std ``noise`` (clipped to the box);
* ``mixed`` (MetaWorld): episodes of the scripted expert at several noise levels plus
  random-action episodes, in fixed proportions (:data:`MIXED_NOISE_LEVELS`,
  :data:`MIXED_RANDOM_FRACTION`) that put the data's own success rate near 45%, so that an
  aligned policy has room to do better than its data;
* ``medium``: a stable-baselines3 SAC agent trained here until its (stochastic) return
  reaches a target (default: a D4RL-normalised score of 40, about D4RL's medium level), or a
  step budget runs out; its weights are kept as safetensors + JSON and reused.
* ``replay`` (MuJoCo): D4RL's medium-replay analogue: every transition a SAC agent saw while
  it was trained to the ``medium`` target (or until its step or wall-clock budget ran out),
  in the order it saw them (see :func:`collect_replay`).

Episode ``i`` is reset with seed ``seed + i``; policy noise comes from a generator seeded with
``seed``, so a collection is reproducible (which episodes of a ``mixed`` dataset get which
policy is drawn from ``seed`` as well). The result is an :class:`Episodes` whose ``meta``
holds ``task, env_id, env_kwargs, policy, seed, ref_min_score, ref_max_score,
success_rate, return_mean, …`` (written as HDF5 attributes by ``write_d4rl_hdf5``).

:func:`ensure_dataset` is what ``diffalign run TASK`` calls for a simulator dataset
``FAMILY/NAME/POLICY``: the file where :func:`diffalign.tasks.resolve_task` finds it,
collected there first when it is missing.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..envs.adapters import make_sim_env, sim_spec
from ..errors import UserError
from .episodes import Episodes

__all__ = [
    "COLLECT_SIZES",
    "DEFAULT_TARGET_SCORE",
    "MIXED_NOISE_LEVELS",
    "MIXED_RANDOM_FRACTION",
    "REPLAY_TRAIN_SECONDS",
    "TransitionLog",
    "collect_dataset",
    "collect_episodes",
    "collect_policies",
    "collect_replay",
    "default_target_return",
    "ensure_dataset",
    "make_policy",
    "metaworld_expert_return",
    "mixed_components",
    "train_sac",
]

#: D4RL-normalised score the ``medium`` agent is trained to by default (D4RL's medium
#: datasets score about 40-60; a third of the expert, as the D4RL paper describes them).
DEFAULT_TARGET_SCORE = 40.0

#: Episodes (reset seeds 0, 1, …) over which MetaWorld's scripted expert's mean return is
#: measured: the ``ref_max_score`` of MetaWorld datasets (their ``ref_min_score`` is 0).
_REF_EPISODES = 50

#: That reference, measured once for the default horizon (200) and task seed (0): the scripted
#: expert's mean return over reset seeds 0-49 (button-press 50/50 successes, drawer-open
#: 50/50, sweep-into 44/50, plate-slide 50/50). Other horizons are measured when collecting.
METAWORLD_EXPERT_RETURN = {
    ("button-press-v3", 200, 0): 207.23,
    ("drawer-open-v3", 200, 0): 1348.39,
    ("sweep-into-v3", 200, 0): 762.00,
    ("plate-slide-v3", 200, 0): 1609.32,
}


#: Noise levels (std of the Gaussian action noise added to the scripted expert's actions,
#: which lie in [-1, 1]) of a ``mixed`` MetaWorld dataset; each gets an equal share of the
#: episodes that are not random. Measured over 20 episodes per level (reset seeds 1000-1019,
#: 200 steps), the expert's success rate at noise 0.1 / 0.5 / 1.0 / 1.5 / 2.0 is:
#: button-press 1.00 / 1.00 / 1.00 / 0.75 / 0.35, drawer-open 1.00 / 1.00 / 0.75 / 0.30 /
#: 0.10, sweep-into 0.85 / 0.80 / 0.80 / 0.85 / 0.80, plate-slide 1.00 / 0.95 / 0.90 /
#: 0.60 / 0.10; uniform random actions never succeed.
MIXED_NOISE_LEVELS = (0.1, 0.5, 1.0, 1.5, 2.0)

#: Fraction of uniform-random-action episodes in the ``mixed`` dataset of each MetaWorld
#: task, chosen with the rates above so that the data succeeds in about 45% of its episodes
#: (expected: button-press 0.45, drawer-open 0.44, sweep-into 0.45, plate-slide 0.46).
MIXED_RANDOM_FRACTION = {
    "button-press-v3": 0.45,
    "drawer-open-v3": 0.30,
    "sweep-into-v3": 0.45,
    "plate-slide-v3": 0.35,
}

#: Random fraction of a MetaWorld task missing from :data:`MIXED_RANDOM_FRACTION`.
_MIXED_RANDOM_DEFAULT = 0.4

#: Wall-clock budget (s) of the SAC training behind a ``replay`` dataset: what a 2-core
#: machine can spend per task (``medium`` has no clock by default: it trains to its target).
REPLAY_TRAIN_SECONDS = 1200.0

#: Episodes, SAC step budget (``medium``, ``replay``) and SAC wall-clock budget in seconds
#: (``replay``) of :func:`ensure_dataset` / :func:`collect_dataset`, full or ``quick``.
COLLECT_SIZES = {False: {"episodes": 100, "max_train_steps": 300_000,
                         "replay_train_seconds": REPLAY_TRAIN_SECONDS},
                 True: {"episodes": 10, "max_train_steps": 10_000,
                        "replay_train_seconds": 60.0}}


def collect_policies(task: str) -> tuple[str, ...]:
    """The behaviour policies ``diffalign collect`` offers for ``task`` (``FAMILY/NAME``):
    the adapter's (MuJoCo: ``random, medium, replay``), plus ``mixed`` on MetaWorld."""
    spec = sim_spec(task)
    extra = ("mixed",) if spec.family == "metaworld" else ()
    return tuple(spec.policies) + extra


def _fmt(values) -> str:
    return "(" + ", ".join(repr(v) for v in values) + ")"


def mixed_components(task: str, noise_levels=None,
                     random_fraction: float | None = None) -> list[dict[str, Any]]:
    """The components of ``task``'s ``mixed`` dataset: one ``{"policy", "noise",
    "fraction"}`` per noise level (``policy`` is ``expert`` at noise 0, ``noisy`` above),
    sharing ``1 - random_fraction`` of the episodes equally, then ``{"policy": "random",
    "fraction": random_fraction}`` when that is > 0. Defaults: :data:`MIXED_NOISE_LEVELS`
    and the task's :data:`MIXED_RANDOM_FRACTION`. Bad values raise :class:`UserError` naming
    them."""
    spec = sim_spec(task)
    if spec.family != "metaworld":
        raise UserError(f"policy 'mixed' needs a MetaWorld task (a scripted expert), got "
                        f"task {task!r}")
    levels = MIXED_NOISE_LEVELS if noise_levels is None else noise_levels
    try:
        levels = tuple(float(x) for x in levels)
    except (TypeError, ValueError):
        raise UserError(f"noise_levels must be numbers >= 0, got "
                        f"noise_levels={noise_levels!r}") from None
    bad = [x for x in levels if not (np.isfinite(x) and x >= 0)]
    if not levels or bad:
        what = f"{bad[0]!r} in " if bad else ""
        raise UserError(f"noise_levels must be one or more finite numbers >= 0, got "
                        f"{what}noise_levels={_fmt(levels)}")
    if len(set(levels)) != len(levels):
        raise UserError(f"noise_levels must differ from each other, got "
                        f"noise_levels={_fmt(levels)}")
    if random_fraction is None:
        random_fraction = MIXED_RANDOM_FRACTION.get(spec.name, _MIXED_RANDOM_DEFAULT)
    rf = random_fraction
    if isinstance(rf, bool) or not isinstance(rf, (int, float)) or not 0 <= rf < 1:
        raise UserError(f"random_fraction must be >= 0 and < 1, got "
                        f"random_fraction={random_fraction!r}")
    share = (1.0 - float(rf)) / len(levels)
    comps: list[dict[str, Any]] = [
        {"policy": "expert" if x == 0 else "noisy", "noise": x, "fraction": round(share, 6)}
        for x in levels]
    if rf > 0:
        comps.append({"policy": "random", "noise": None, "fraction": float(rf)})
    return comps


def _assign_components(fractions, n: int, seed: int) -> np.ndarray:
    """Component of each of ``n`` episodes: counts in proportion to ``fractions`` (largest
    remainders; ties to the earlier component), in an order shuffled by ``seed``."""
    f = np.asarray(fractions, np.float64)
    exact = f / f.sum() * n
    counts = np.floor(exact + 1e-9).astype(int)
    order = sorted(range(len(f)), key=lambda k: (-(exact[k] - counts[k]), k))
    for k in order[: n - int(counts.sum())]:
        counts[k] += 1
    assign = np.repeat(np.arange(len(f)), counts)
    np.random.default_rng(np.random.SeedSequence([int(seed), 0x6D6978])).shuffle(assign)
    return assign


def default_target_return(task: str) -> float:
    """The return a ``medium`` agent is trained to by default: D4RL-normalised 40."""
    spec = sim_spec(task)
    if spec.ref_min is None or spec.ref_max is None:
        raise ValueError(f"task {task!r} has no reference scores: give --target-return")
    return round(spec.ref_min + DEFAULT_TARGET_SCORE / 100.0 * (spec.ref_max - spec.ref_min))


# ---------------------------------------------------------------------- policies
class RandomPolicy:
    """Uniform actions in the env's action box."""

    name = "random"

    def __init__(self, action_space) -> None:
        self.low = np.asarray(action_space.low, np.float32)
        self.high = np.asarray(action_space.high, np.float32)

    def reset(self) -> None:
        pass

    def __call__(self, obs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return rng.uniform(self.low, self.high).astype(np.float32)


class MetaWorldExpert:
    """MetaWorld's scripted policy of a task, plus optional Gaussian action noise."""

    def __init__(self, env_name: str, noise: float = 0.0) -> None:
        import warnings

        from metaworld.policies import ENV_POLICY_MAP

        if env_name not in ENV_POLICY_MAP:
            raise ValueError(f"metaworld has no scripted policy for {env_name!r}")
        self.policy = ENV_POLICY_MAP[env_name]()
        self.noise = float(noise)
        self.name = "expert" if self.noise == 0 else "noisy"
        # "Constant(s) may be too high. Environments clip response to [-1, 1]": they do.
        warnings.filterwarnings("ignore", message="Constant", category=UserWarning,
                                module="metaworld")

    def reset(self) -> None:
        pass

    def __call__(self, obs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        a = np.asarray(self.policy.get_action(np.asarray(obs, np.float64)), np.float32)
        if self.noise > 0:
            a = a + rng.normal(0.0, self.noise, a.shape).astype(np.float32)
        return np.clip(a, -1.0, 1.0)


class SB3Policy:
    """A stable-baselines3 agent acting stochastically (as D4RL's behaviour agents did)."""

    def __init__(self, model, deterministic: bool = False, name: str = "medium") -> None:
        self.model = model
        self.deterministic = deterministic
        self.name = name

    def reset(self) -> None:
        pass

    def __call__(self, obs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        a, _ = self.model.predict(obs, deterministic=self.deterministic)
        return np.asarray(a, np.float32)


def make_policy(task: str, policy: str, env, noise: float = 0.1, model=None):
    """The behaviour policy ``policy`` of ``task``; ``ValueError`` naming it when the task
    has no such policy."""
    spec = sim_spec(task)
    if policy not in collect_policies(task):
        hint = ""
        if spec.family == "pusht" and policy == "expert":
            hint = " (there is no scripted PushT policy; collect random data, or bring " \
                   "demonstrations as a Minari/HDF5 file)"
        raise ValueError(f"unknown policy {policy!r} for task {task!r}{hint}; choose one of "
                         f"{', '.join(collect_policies(task))}")
    if policy == "mixed":
        raise ValueError("policy 'mixed' changes policy from episode to episode: collect it "
                         "with collect_episodes(task, 'mixed')")
    if policy == "random":
        return RandomPolicy(env.action_space)
    if policy in ("expert", "noisy"):
        if policy == "noisy" and noise <= 0:
            raise ValueError(f"policy 'noisy' needs noise > 0, got noise={noise}")
        return MetaWorldExpert(spec.name, noise=noise if policy == "noisy" else 0.0)
    if policy == "medium":
        if model is None:
            raise ValueError("policy 'medium' needs a trained agent (train_sac)")
        return SB3Policy(model)
    if policy == "replay":
        raise ValueError("policy 'replay' is the data of a SAC training, not a policy to run: "
                         "collect it with collect_replay(task, out)")
    raise ValueError(f"unknown policy {policy!r}")  # pragma: no cover


# ---------------------------------------------------------------------- collection
def _run_episode(env, policy, seed: int, rng: np.random.Generator) -> dict[str, Any]:
    obs, _ = env.reset(seed=seed)
    policy.reset()
    cols: dict[str, list] = {k: [] for k in ("observations", "actions", "rewards",
                                             "terminals", "timeouts", "next_observations")}
    success: bool | None = None
    done = False
    while not done:
        a = policy(obs, rng)
        nxt, r, term, trunc, info = env.step(a)
        cols["observations"].append(obs)
        cols["actions"].append(np.asarray(a, np.float32))
        cols["rewards"].append(r)
        cols["terminals"].append(bool(term))
        cols["timeouts"].append(bool(trunc) and not bool(term))
        cols["next_observations"].append(nxt)
        if "success" in info:
            success = bool(success) or bool(info["success"])
        obs = nxt
        done = bool(term) or bool(trunc)
    ep = {k: np.asarray(v) for k, v in cols.items()}
    ep["success"] = success
    return ep


def collect_episodes(task: str, policy: str = "random", episodes: int = 100, seed: int = 0,
                     max_episode_steps: int | None = None, noise: float = 0.1, model=None,
                     task_seed: int = 0, progress: bool = True,
                     extra_meta: dict | None = None, noise_levels=None,
                     random_fraction: float | None = None) -> Episodes:
    """Run ``episodes`` episodes of ``policy`` in ``task`` and return them as Episodes.

    ``policy="mixed"`` (MetaWorld): the episodes are split between the components of
    :func:`mixed_components` (``noise_levels``, ``random_fraction``) in proportion to their
    fractions, in an order drawn from ``seed``; ``meta`` then also holds ``mix`` (each
    component with its fraction, episodes and success rate), ``noise_levels``,
    ``random_fraction`` and per episode ``episode_policy``, ``episode_noise`` (None for
    random) and ``episode_success``."""
    spec = sim_spec(task)
    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
        raise ValueError(f"episodes must be an integer >= 1, got episodes={episodes!r}")
    comps = mixed_components(task, noise_levels, random_fraction) if policy == "mixed" \
        else None
    h = int(max_episode_steps or spec.max_episode_steps)
    env_kwargs: dict[str, Any] = {"max_episode_steps": h}
    if spec.family == "metaworld":
        env_kwargs["task_seed"] = int(task_seed)
    env = make_sim_env(task, **env_kwargs)
    if comps is None:
        pols = [make_policy(task, policy, env, noise=noise, model=model)]
        assign = np.zeros(episodes, dtype=int)
    else:
        pols = [make_policy(task, c["policy"], env, noise=c["noise"] or 0.0) for c in comps]
        assign = _assign_components([c["fraction"] for c in comps], episodes, seed)
    rng = np.random.default_rng(seed)
    eps, succ, ep_succ = [], [], []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=episodes, desc=f"collect {task} {policy}", dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        for i in range(episodes):
            ep = _run_episode(env, pols[assign[i]], seed + i, rng)
            flag = ep.pop("success")
            ep_succ.append(flag)
            if flag is not None:
                succ.append(bool(flag))
            eps.append(ep)
            if bar is not None:
                ret = float(np.sum(ep["rewards"]))
                post = {"return": f"{ret:.1f}"}
                if succ:
                    post["success"] = f"{np.mean(succ):.2f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
    finally:
        env.close()
        if bar is not None:
            bar.close()
    returns = np.array([float(np.sum(e["rewards"])) for e in eps])
    meta: dict[str, Any] = {
        "task": task,
        "env_id": spec.gym_id,
        "env_kwargs": env_kwargs,
        "max_episode_steps": h,
        "policy": policy,
        "seed": int(seed),
        "episodes": int(episodes),
        "collector": "diffalign collect",
        "return_mean": float(returns.mean()),
        "return_std": float(returns.std()),
        "collect_s": time.perf_counter() - t0,
    }
    if policy == "noisy":
        meta["noise"] = float(noise)
    if comps is not None:
        for k, c in enumerate(comps):
            mine = [ep_succ[i] for i in range(episodes) if assign[i] == k]
            c["episodes"] = len(mine)
            known = [bool(x) for x in mine if x is not None]
            c["success_rate"] = float(np.mean(known)) if known else None
        meta["mix"] = comps
        meta["noise_levels"] = [c["noise"] for c in comps if c["policy"] != "random"]
        meta["random_fraction"] = sum(c["fraction"] for c in comps if c["policy"] == "random")
        meta["episode_policy"] = [comps[k]["policy"] for k in assign]
        meta["episode_noise"] = [comps[k]["noise"] for k in assign]
        meta["episode_success"] = ep_succ
    if spec.family == "metaworld":
        meta["task_seed"] = int(task_seed)
    if succ:
        meta["success_rate"] = float(np.mean(succ))
    if spec.ref_min is not None and spec.ref_max is not None:
        meta["ref_min_score"], meta["ref_max_score"] = spec.ref_min, spec.ref_max
    elif spec.family == "metaworld":
        meta["ref_min_score"] = 0.0
        meta["ref_max_score"] = metaworld_expert_return(spec.name, h, int(task_seed))
        meta["ref_max_note"] = (f"mean return of the scripted expert over reset seeds "
                                f"0-{_REF_EPISODES - 1}, {h} steps, task_seed {task_seed}")
    meta.update(extra_meta or {})
    return Episodes.from_episode_list(eps, meta=meta)


@functools.lru_cache(maxsize=32)
def metaworld_expert_return(env_name: str, max_episode_steps: int, task_seed: int = 0,
                            episodes: int = _REF_EPISODES, measure: bool = False) -> float:
    """Mean return of MetaWorld's scripted expert over reset seeds ``0 … episodes - 1``: the
    ``ref_max_score`` of MetaWorld datasets. Taken from :data:`METAWORLD_EXPERT_RETURN` when
    it holds the setting (unless ``measure``), measured otherwise."""
    key = (env_name, int(max_episode_steps), int(task_seed))
    if not measure and episodes == _REF_EPISODES and key in METAWORLD_EXPERT_RETURN:
        return METAWORLD_EXPERT_RETURN[key]
    env = make_sim_env(f"metaworld/{env_name}", max_episode_steps=max_episode_steps,
                       task_seed=task_seed)
    pol = MetaWorldExpert(env_name)
    rng = np.random.default_rng(0)
    try:
        rets = [float(np.sum(_run_episode(env, pol, i, rng)["rewards"]))
                for i in range(episodes)]
    finally:
        env.close()
    return float(np.mean(rets))


# ---------------------------------------------------------------------- SAC behaviour agent
def _import_sb3():
    try:
        import stable_baselines3
    except ImportError as exc:
        raise ImportError(
            "policy 'medium' trains a SAC agent with stable-baselines3: pip install "
            f"\"diffalign[sac]\" (or: pip install stable-baselines3); import failed: {exc}"
        ) from exc
    return stable_baselines3


def agent_paths(out: str | Path) -> tuple[Path, Path]:
    """Where the behaviour agent of the dataset ``out`` is kept: ``<out stem>.sac.safetensors``
    and ``<out stem>.sac.json`` beside it."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix else out
    return stem.with_name(stem.name + ".sac.safetensors"), stem.with_name(stem.name + ".sac.json")


def _save_agent(model, weights: Path, info: dict) -> None:
    from safetensors.torch import save_file

    from ..atomic import atomic_path, write_json

    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.policy.state_dict().items()}
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp))
    write_json(weights.with_suffix(".json"), info)


def _evaluate_agent(model, task: str, h: int, episodes: int, seed: int) -> float:
    env = make_sim_env(task, max_episode_steps=h)
    pol = SB3Policy(model)
    rng = np.random.default_rng(seed)
    try:
        return float(np.mean([np.sum(_run_episode(env, pol, seed + i, rng)["rewards"])
                              for i in range(episodes)]))
    finally:
        env.close()


class TransitionLog:
    """Every transition of a SAC training in the order the agent took them: what its replay
    buffer holds, plus the last step (SB3 stores a step after the callback that may stop
    training, so a stopped run's buffer lacks it) and without the buffer's size limit.

    Actions are the env's actions (the buffer keeps them rescaled to [-1, 1]); a transition
    that ends an episode has the episode's last observation as its next observation (the
    vectorised env has already reset), and is a terminal or, at the time limit, a timeout.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, int(capacity))
        self.n = 0
        self._cols: dict[str, np.ndarray] | None = None

    def add(self, obs, action, reward: float, next_obs, terminal: bool, timeout: bool) -> None:
        obs = np.asarray(obs, np.float32).reshape(-1)
        action = np.asarray(action, np.float32).reshape(-1)
        if self._cols is None:
            c = self.capacity
            self._cols = {"observations": np.empty((c, obs.size), np.float32),
                          "next_observations": np.empty((c, obs.size), np.float32),
                          "actions": np.empty((c, action.size), np.float32),
                          "rewards": np.empty(c, np.float32),
                          "terminals": np.zeros(c, bool), "timeouts": np.zeros(c, bool)}
        if self.n == self.capacity:  # more steps than announced: grow rather than drop any
            self.capacity *= 2
            self._cols = {k: np.concatenate([v, np.zeros_like(v)])
                          for k, v in self._cols.items()}
        i, c = self.n, self._cols
        c["observations"][i] = obs
        c["next_observations"][i] = np.asarray(next_obs, np.float32).reshape(-1)
        c["actions"][i] = action
        c["rewards"][i] = reward
        c["terminals"][i] = bool(terminal)
        c["timeouts"][i] = bool(timeout) and not bool(terminal)
        self.n += 1

    def arrays(self) -> dict[str, np.ndarray]:
        """The transitions so far as D4RL columns (copies); a last episode that training cut
        off ends in a timeout, as a time limit would have ended it."""
        if self._cols is None or self.n == 0:
            raise ValueError("no transitions were recorded")
        out = {k: v[: self.n].copy() for k, v in self._cols.items()}
        if not (out["terminals"][-1] or out["timeouts"][-1]):
            out["timeouts"][-1] = True
        return out

    @property
    def cut_short(self) -> bool:
        """Whether training stopped in the middle of an episode."""
        c = self._cols
        return c is not None and self.n > 0 and not (c["terminals"][self.n - 1]
                                                    or c["timeouts"][self.n - 1])


def _reusable(info: dict, task: str, h: int, target_return: float, max_train_steps: int,
              max_train_seconds: float | None) -> bool:
    """Whether a saved agent's ``info`` stands for the training asked for: finished on the
    same task and time limit, and either at or above the target, or with the same target
    and at least the budget (a clock-stopped agent: for the same or a smaller clock)."""
    if info.get("task") != task or info.get("max_episode_steps") != h or not info.get("finished"):
        return False
    if info.get("reached"):
        return float(info.get("target_return", -np.inf)) >= target_return
    return (info.get("target_return") == target_return
            and int(info.get("max_train_steps", 0)) >= max_train_steps
            and (info.get("stopped_by") != "time"
                 or (max_train_seconds is not None and info.get("max_train_seconds") is not None
                     and max_train_seconds <= float(info["max_train_seconds"]))))


def train_sac(task: str, target_return: float | None = None, max_train_steps: int = 300_000,
              seed: int = 0, agent_path: str | Path | None = None,
              max_episode_steps: int | None = None, eval_every: int = 5000,
              eval_episodes: int = 5, learning_starts: int | None = None,
              device: str = "auto", progress: bool = True,
              max_train_seconds: float | None = None, recorder: TransitionLog | None = None,
              reuse_from=(), desc: str | None = None) -> tuple[Any, dict]:
    """Train a SAC agent on ``task`` until its mean stochastic return over ``eval_episodes``
    episodes reaches ``target_return`` (checked every ``eval_every`` steps), or
    ``max_train_steps`` steps, or ``max_train_seconds`` of wall-clock time are spent (then
    ``info["stopped_by"]`` says which). Returns ``(model, info)``.

    With ``agent_path`` (``….sac.safetensors``) the weights and ``info`` (JSON beside them)
    are saved at every evaluation, and an agent saved there that finished with the same task
    and at least the same target (or the same budget) is loaded instead of trained again;
    so is one saved at a path of ``reuse_from`` (then copied to ``agent_path``).
    ``recorder``: a :class:`TransitionLog` that gets every transition; a recorded training
    is always run, since a saved agent does not keep the transitions it saw.
    """
    sb3 = _import_sb3()
    spec = sim_spec(task)
    if target_return is None:
        target_return = default_target_return(task)
    if isinstance(max_train_steps, bool) or int(max_train_steps) < 1:
        raise ValueError(f"max_train_steps must be >= 1, got max_train_steps={max_train_steps}")
    h = int(max_episode_steps or spec.max_episode_steps)
    env = make_sim_env(task, max_episode_steps=h)
    starts = learning_starts if learning_starts is not None else \
        min(10_000, max(100, max_train_steps // 10))
    model = sb3.SAC("MlpPolicy", env, seed=seed, verbose=0, device=device,
                    learning_starts=starts)
    # SB3's default logger makes an empty /tmp/SB3-<time> folder at every learn()
    from stable_baselines3.common.logger import Logger

    model.set_logger(Logger(folder=None, output_formats=[]))
    weights = Path(agent_path) if agent_path is not None else None
    candidates = [] if recorder is not None else \
        [p for p in [weights, *(Path(p) for p in reuse_from)] if p is not None]
    for cand in candidates:
        if not (cand.exists() and cand.with_suffix(".json").exists()):
            continue
        info = json.loads(cand.with_suffix(".json").read_text())
        if _reusable(info, task, h, target_return, max_train_steps, max_train_seconds):
            from safetensors.torch import load_file

            model.policy.load_state_dict(load_file(str(cand)))
            print(f"SAC agent for {task}: reusing {cand} ({info['train_steps']} steps, "
                  f"return {info['eval_return']:.1f})", flush=True)
            env.close()
            if weights is not None and cand != weights:
                info = dict(info, reused_from=str(cand))
                _save_agent(model, weights, info)
            return model, dict(info, reused=True)

    info: dict[str, Any] = {
        "task": task, "algorithm": "SAC (stable-baselines3 defaults)", "seed": seed,
        "target_return": float(target_return), "max_train_steps": int(max_train_steps),
        "max_episode_steps": h, "train_steps": 0, "eval_return": None, "reached": False,
        "finished": False, "train_s": 0.0, "evals": [], "stopped_by": None,
        "max_train_seconds": max_train_seconds,
    }
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=int(max_train_steps),
                   desc=desc or f"SAC {task} (target {target_return:.0f})",
                   dynamic_ncols=True, unit="step")
    t0 = time.perf_counter()

    def evaluate_now(steps: int) -> bool:
        ret = _evaluate_agent(model, task, h, eval_episodes, seed=10_000 + steps)
        info.update(train_steps=steps, eval_return=ret, train_s=time.perf_counter() - t0,
                    reached=bool(ret >= target_return))
        info["evals"].append([steps, ret])
        if bar is not None:
            bar.set_postfix({"eval_return": f"{ret:.1f}"})
        else:
            print(f"SAC {task}: {steps} steps, return {ret:.1f} (target {target_return:.0f}), "
                  f"{info['train_s']:.0f} s", flush=True)
        if weights is not None:
            _save_agent(model, weights, info)
        return info["reached"]

    from stable_baselines3.common.callbacks import BaseCallback

    class _Progress(BaseCallback):
        def _on_step(self) -> bool:
            if recorder is not None:
                loc = self.locals
                done, step_info = bool(loc["dones"][0]), loc["infos"][0]
                nxt = step_info.get("terminal_observation") if done else None
                timeout = done and bool(step_info.get("TimeLimit.truncated", False))
                recorder.add(self.model._last_obs[0], loc["actions"][0], loc["rewards"][0],
                             loc["new_obs"][0] if nxt is None else nxt,
                             done and not timeout, timeout)
            if bar is not None:
                bar.update(1)
            n = self.num_timesteps
            if n % eval_every == 0 and n >= starts and evaluate_now(n):
                info["stopped_by"] = "target"
                return False
            if max_train_seconds is not None and time.perf_counter() - t0 > max_train_seconds:
                info["stopped_by"] = "time"
                return False
            return True

    try:
        model.learn(total_timesteps=int(max_train_steps), callback=_Progress())
        steps = int(model.num_timesteps)
        if info["train_steps"] != steps:
            evaluate_now(steps)
        info["stopped_by"] = info["stopped_by"] or "steps"
    finally:
        if bar is not None:
            bar.close()
        env.close()
    info["finished"] = True
    info["train_s"] = time.perf_counter() - t0
    if weights is not None:
        _save_agent(model, weights, info)
    return model, info


@contextlib.contextmanager
def _torch_threads(n: int | None):
    """Run with ``n`` torch threads (SAC's small MLPs: more threads only add contention)."""
    import torch

    prev = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def collect_medium(task: str, out: str | Path | None, episodes: int, seed: int = 0,
                   target_return: float | None = None, max_train_steps: int = 300_000,
                   max_episode_steps: int | None = None, eval_every: int = 5000,
                   progress: bool = True, threads: int | None = 1,
                   max_train_seconds: float | None = None) -> tuple[Episodes, dict]:
    """Train (or reuse) the SAC behaviour agent next to ``out`` and collect with it.

    ``threads``: torch threads while training and acting (1 is fastest for SAC's MLPs on a
    CPU; None leaves torch's setting)."""
    with _torch_threads(threads):
        return _collect_medium(task, out, episodes, seed, target_return, max_train_steps,
                               max_episode_steps, eval_every, progress, max_train_seconds)


def _replay_sibling(out: str | Path) -> Path | None:
    """The ``replay`` dataset next to ``medium`` dataset ``out`` (``NAME-medium.hdf5`` ->
    ``NAME-replay.hdf5``), whose agent is the last agent of a training the medium one would
    repeat; None when ``out`` is not named that way."""
    out = Path(out)
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    if not stem.endswith("-medium"):
        return None
    return out.with_name(stem[: -len("medium")] + "replay" + out.suffix)


def _collect_medium(task, out, episodes, seed, target_return, max_train_steps,
                    max_episode_steps, eval_every, progress, max_train_seconds=None):
    weights = agent_paths(out)[0] if out is not None else None
    sibling = _replay_sibling(out) if out is not None else None
    model, info = train_sac(task, target_return=target_return, max_train_steps=max_train_steps,
                            seed=seed, agent_path=weights, max_episode_steps=max_episode_steps,
                            eval_every=eval_every, progress=progress,
                            max_train_seconds=max_train_seconds,
                            reuse_from=[agent_paths(sibling)[0]] if sibling else ())
    extra = {"agent": None if weights is None else str(weights),
             "agent_train_steps": info["train_steps"], "agent_eval_return": info["eval_return"],
             "target_return": info["target_return"], "agent_reached_target": info["reached"]}
    eps = collect_episodes(task, "medium", episodes=episodes, seed=seed,
                           max_episode_steps=max_episode_steps, model=model, progress=progress,
                           extra_meta=extra)
    return eps, info


def collect_replay(task: str, out: str | Path | None, seed: int = 0,
                   target_return: float | None = None, max_train_steps: int = 300_000,
                   max_train_seconds: float | None = REPLAY_TRAIN_SECONDS,
                   max_episode_steps: int | None = None, eval_every: int = 5000,
                   progress: bool = True, threads: int | None = 1) -> tuple[Episodes, dict]:
    """The ``replay`` dataset of MuJoCo task ``task``: train a SAC agent as ``medium`` does
    (to ``target_return``, default D4RL-normalised 40, or until ``max_train_steps`` or
    ``max_train_seconds`` runs out) and return every transition it took while training, in
    order, as Episodes (split at terminals and time limits; an episode cut off by the end of
    training ends in a timeout), with ``(model, info)``'s ``info`` of :func:`train_sac`.

    The data are what D4RL's medium-replay datasets are: from random-action warm-up to a
    medium policy. ``meta`` adds to the usual attributes ``sac_steps`` (= transitions),
    ``train_s``, ``stopped_by``, the budget, ``last_episode_cut``, and over the episodes
    (the cut one included) ``return_{min,mean,max,std}`` and their D4RL-normalised
    ``normalized_{min,mean,max}``. The agent at the end is saved beside ``out`` (as for
    ``medium``; a ``NAME-medium`` dataset next to it reuses it when its budget allows).
    ``threads``: torch threads while training (None leaves torch's setting)."""
    spec = sim_spec(task)
    if spec.family != "mujoco":
        raise UserError(f"policy 'replay' is for MuJoCo tasks (SAC's replay buffer), got task "
                        f"{task!r}; choose one of {', '.join(collect_policies(task))}")
    h = int(max_episode_steps or spec.max_episode_steps)
    weights = agent_paths(out)[0] if out is not None else None
    log = TransitionLog(int(max_train_steps))
    t0 = time.perf_counter()
    with _torch_threads(threads):
        _, info = train_sac(task, target_return=target_return, max_train_steps=max_train_steps,
                            seed=seed, agent_path=weights, max_episode_steps=h,
                            eval_every=eval_every, progress=progress,
                            max_train_seconds=max_train_seconds, recorder=log,
                            desc=f"SAC {task} replay")
    cut = log.cut_short
    eps = Episodes.from_arrays(**log.arrays())
    returns = eps.returns()
    lo, hi = spec.ref_min, spec.ref_max
    norm = 100.0 * (returns - lo) / (hi - lo)
    meta: dict[str, Any] = {
        "task": task, "env_id": spec.gym_id, "env_kwargs": {"max_episode_steps": h},
        "max_episode_steps": h, "policy": "replay", "seed": int(seed),
        "episodes": len(eps), "collector": "diffalign collect",
        "algorithm": info["algorithm"], "sac_steps": int(eps.num_steps),
        "train_s": float(info["train_s"]), "stopped_by": info["stopped_by"],
        "max_train_steps": int(max_train_steps),
        "max_train_seconds": None if max_train_seconds is None else float(max_train_seconds),
        "target_return": info["target_return"], "agent_reached_target": info["reached"],
        "agent_eval_return": info["eval_return"],
        "agent": None if weights is None else str(weights),
        "last_episode_cut": bool(cut),
        "return_min": float(returns.min()), "return_mean": float(returns.mean()),
        "return_max": float(returns.max()), "return_std": float(returns.std()),
        "normalized_min": float(norm.min()), "normalized_mean": float(norm.mean()),
        "normalized_max": float(norm.max()),
        "ref_min_score": lo, "ref_max_score": hi,
        "collect_s": time.perf_counter() - t0,
    }
    if eps.num_steps != info["train_steps"]:  # SB3 changed when its callback runs
        raise RuntimeError(f"recorded {eps.num_steps} transitions of {info['train_steps']} "
                           "SAC steps")
    eps.meta = meta
    return eps, info


# ---------------------------------------------------------------------- datasets by name
def _sim_dataset(task: str) -> tuple[str, str] | None:
    """``FAMILY/NAME/POLICY`` -> (``FAMILY/NAME``, ``POLICY``); None for a task string that
    names no collectable simulator dataset (``nav1d/*``, a file, a Minari id ``…-vN``)."""
    from ..tasks import _MINARI_VERSION, _split_sim_task

    sim = _split_sim_task(task)  # UserError/ValueError for malformed or unknown sim tasks
    if sim is None or _MINARI_VERSION.search(sim[1]):
        return None
    return sim


def collect_dataset(task: str, out: str | Path | None = None, quick: bool = False,
                    episodes: int | None = None, seed: int = 0,
                    max_train_steps: int | None = None, progress: bool = True,
                    max_train_seconds: float | None = None) -> Path:
    """Collect dataset ``FAMILY/NAME/POLICY`` (``metaworld/drawer-open-v3/mixed``) and write
    it as HDF5 to ``out`` (default: :func:`diffalign.tasks.sim_dataset_path`, where
    ``resolve_task`` finds it), replacing any file there; returns the path written.

    ``episodes`` / ``max_train_steps`` default to :data:`COLLECT_SIZES` (``quick``: 10
    episodes and a 10k-step SAC budget instead of 100 and 300k). Policies are
    :func:`collect_policies`' with their defaults (``noisy``: noise 0.1; ``mixed``: the task's
    default mix; ``medium``: SAC trained to a D4RL-normalised 40, which takes hours;
    ``replay``: the transitions of that training, which stops after ``max_train_seconds``,
    default :data:`COLLECT_SIZES`' 20 minutes, quick 1; ``episodes`` does not apply)."""
    from ..tasks import sim_dataset_path
    from .readers import write_d4rl_hdf5

    sim = _sim_dataset(task)
    if sim is None:
        raise UserError(f"{task!r} names no simulator dataset to collect: expected "
                        "FAMILY/NAME/POLICY, e.g. metaworld/button-press-v3/mixed")
    name, policy = sim
    if policy not in collect_policies(name):
        raise UserError(f"cannot collect {task!r}: unknown policy {policy!r} for task "
                        f"{name!r}; choose one of {', '.join(collect_policies(name))}")
    size = COLLECT_SIZES[bool(quick)]
    n = size["episodes"] if episodes is None else episodes
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"episodes must be an integer >= 1, got episodes={n!r}")
    path = Path(out) if out is not None else sim_dataset_path(name, policy)
    if policy == "medium":
        eps, _ = collect_medium(name, path, episodes=n, seed=seed, progress=progress,
                                max_train_steps=max_train_steps or size["max_train_steps"],
                                max_train_seconds=max_train_seconds)
    elif policy == "replay":
        secs = max_train_seconds if max_train_seconds is not None else \
            size.get("replay_train_seconds", REPLAY_TRAIN_SECONDS)
        eps, _ = collect_replay(name, path, seed=seed, progress=progress,
                                max_train_steps=max_train_steps or size["max_train_steps"],
                                max_train_seconds=secs)
    else:
        eps = collect_episodes(name, policy, episodes=n, seed=seed, progress=progress)
    return write_d4rl_hdf5(path, eps)


def ensure_dataset(task: str, quick: bool = False, episodes: int | None = None,
                   seed: int = 0, progress: bool = True) -> Path | None:
    """The dataset of task string ``FAMILY/NAME/POLICY`` where ``resolve_task`` finds it,
    collected first (:func:`collect_dataset`, same arguments) when it is missing.

    Returns the file found or written (a local Minari dataset: its folder), or None when
    ``task`` names no collectable simulator dataset (``nav1d/*``, a dataset file, a Minari id
    ``…-vN``: ``resolve_task`` makes, reads or downloads those itself). An existing dataset
    is used as it is, whatever ``quick``, ``episodes`` and ``seed`` say."""
    from ..tasks import _minari_local, data_dir, sim_dataset_path

    sim = _sim_dataset(task)
    if sim is None:
        return None
    name, policy = sim
    # the order in which tasks._resolve_sim_task looks
    for f in (sim_dataset_path(name, policy), data_dir() / f"{name.split('/')[1]}-{policy}.hdf5"):
        if f.is_file():
            return f
    if _minari_local(f"{task}-v0"):
        import os

        root = Path(os.environ.get("MINARI_DATASETS_PATH")
                    or Path.home() / ".minari" / "datasets")
        return root / f"{task}-v0"
    if progress:
        print(f"{task}: not found, collecting it into {sim_dataset_path(name, policy)}",
              flush=True)
    return collect_dataset(task, quick=quick, episodes=episodes, seed=seed, progress=progress)
