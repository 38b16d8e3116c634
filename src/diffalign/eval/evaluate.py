"""Evaluate a control model in its environment: ``eval.json`` and a picture.

``evaluate(model_or_dir, critic=None, episodes=100, candidates=1, steps=None,
selection="auto", out_dir=...)`` rolls the model out (:func:`~diffalign.eval.rollout.rollout`)
and writes ``OUT/eval.json`` with ``return_mean``, ``return_std``, ``normalized`` (D4RL-style
x100; for Nav1D 100 = the DP optimum), ``coherency``, ``entropy``, ``decisions_per_s`` and,
where the env reports it, ``success_rate``; plus ``OUT/eval.png`` (for Nav1D the evaluation
trajectories over the reward field).

Coherency (docs/design.md §5): planners — ``coherency_planner`` of the chosen plans under the env's
dynamics (Nav1D: position dynamics, tol = step_size / 10; plan positions past an episode's
end are left out; DD's actions come from its inverse dynamics); policies —
``coherency_policy`` of the sampled first actions under the dataset's behaviour policy (Nav1D:
``behaviour_policy(kind)``). It is ``null`` where the dynamics or the behaviour policy is
unknown. Entropy: ``candidate_entropy`` of the first actions of N >= 2 candidates per state.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_path, write_json
from .metrics import (
    candidate_entropy,
    coherency_planner,
    coherency_policy,
    normalized_score,
    return_stats,
)
from .rollout import RolloutResult, rollout

__all__ = ["EVAL_JSON", "EVAL_PNG", "evaluate", "load_critic"]

EVAL_JSON = "eval.json"
EVAL_PNG = "eval.png"


def load_critic(critic: Any, device: str = "cpu"):
    """A critic object as is, or the critic saved in a directory (one IQL critic or an
    ensemble, :func:`diffalign.models.critic.load_critic`); None stays None."""
    if critic is None or not isinstance(critic, (str, Path)):
        return critic
    path = Path(critic)
    if not path.exists():
        raise FileNotFoundError(f"critic directory {str(path)!r} does not exist")
    from ..models.critic import load_critic as load_critic_dir

    return load_critic_dir(path, device=device)


def _is_nav1d(meta: dict) -> bool:
    from ..envs import NAV1D_ID

    return meta.get("env_id") == NAV1D_ID or str(meta.get("task", "")).startswith("nav1d/")


def _nav1d_env_factory(meta: dict):
    import functools

    import gymnasium as gym

    from ..envs import NAV1D_ID

    return functools.partial(gym.make, NAV1D_ID, layout_seed=int(meta.get("layout_seed", 0)))


def task_env(meta: dict) -> tuple[Any, float | None, float | None]:
    """(make_env, ref_min, ref_max) from a model's task metadata."""
    if _is_nav1d(meta):
        from ..envs.nav1d_optimum import nav1d_optimum

        opt = nav1d_optimum(layout_seed=int(meta.get("layout_seed", 0)))
        return _nav1d_env_factory(meta), 0.0, float(opt["optimal_return"])
    task = meta.get("task")
    if not task:
        raise ValueError("the model's config names no task: cannot build its environment")
    from ..tasks import resolve_task

    t = resolve_task(task, layout_seed=int(meta.get("layout_seed", 0)))
    if t.make_env is None:
        raise ValueError(f"task {task!r} has no known environment to evaluate in")
    return t.make_env, t.ref_min, t.ref_max


def _nav1d_next_state_fn(step_size: float, horizon: int):
    from ..envs.nav1d import dynamics

    def f(s: np.ndarray, a: np.ndarray) -> np.ndarray:
        x = dynamics(s[:, 0], a[:, 0], step_size)
        return np.stack([x, s[:, 1] + 1.0 / horizon], axis=1)

    return f


def planner_coherency(res: RolloutResult, next_state_fn, tol: float,
                      dims: list[int] | None = None) -> float | None:
    """Coherency of the recorded plans over their in-episode positions only."""
    if res.plan_states is None or len(res.plan_states) == 0:
        return None
    total, weight = 0.0, 0
    for length in np.unique(res.plan_valid):
        if length < 2:
            continue
        sel = res.plan_valid == length
        c = coherency_planner(res.plan_states[sel, :length], res.plan_actions[sel, :length],
                              next_state_fn, tol, dims=dims)
        w = int(sel.sum()) * (int(length) - 1)
        total += c * w
        weight += w
    return total / weight if weight else None


def _coherency(model, res: RolloutResult, meta: dict) -> float | None:
    if not _is_nav1d(meta):
        return None
    step = float(meta.get("step_size", 0.1))
    if model.kind != "dp":
        fn = _nav1d_next_state_fn(step, int(meta.get("horizon", 32)))
        return planner_coherency(res, fn, tol=step / 10.0, dims=[0])
    kind = meta.get("dataset_kind") or meta.get("kind")
    if kind is None or len(res.decision_states) == 0:
        return None
    from ..data.nav1d_datasets import behaviour_policy

    pol = behaviour_policy(kind, layout_seed=int(meta.get("layout_seed", 0)))
    n = res.decision_candidates.shape[1]
    states = np.repeat(res.decision_states, n, axis=0)
    actions = res.decision_candidates.reshape(-1, res.decision_candidates.shape[-1])
    return coherency_policy(states, actions, pol.density, pol.max_density)


def _picture(path: Path, res: RolloutResult, meta: dict, title: str) -> None:
    paths = [t[:, 0] for t in res.trajectories[:50]]
    if _is_nav1d(meta):
        from ..envs.nav1d import nav1d_layout, render_reward_field

        mu, sigma = nav1d_layout(int(meta.get("layout_seed", 0)))
        with atomic_path(path) as tmp:
            render_reward_field(mu, sigma, paths=paths, title=title, path=tmp)
        return
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=80)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for p in paths:
        ax.plot(np.arange(len(p)), p, lw=0.8, alpha=0.7)
    ax.set_xlabel("t")
    ax.set_ylabel("observation[0]")
    ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def evaluate(model: Any, critic: Any = None, episodes: int = 100, candidates: int = 1,
             steps: int | None = None, selection: str = "auto", out_dir: str | Path | None = None,
             seed: int = 0, device: str = "cpu", vectorised: bool = True,
             temperature: float = 1.0, max_parallel: int | None = None, net=None,
             progress: bool = False, write: bool = True) -> dict[str, Any]:
    """Roll out ``model`` (a ControlModel or a model directory) and compute the metrics.

    Writes ``out_dir/eval.json`` and ``out_dir/eval.png`` when ``write`` (``out_dir``
    defaults to the model directory; a model object without ``out_dir`` writes nothing).
    Everything is validated (model, critic, options) before anything is written.
    """
    from ..models.base import ControlModel
    from ..models.selection import resolve_selection

    for name, v in (("episodes", episodes), ("candidates", candidates)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {name}={v!r}")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive integer, got steps={steps!r}")
    model_dir = None
    if isinstance(model, (str, Path)):
        model_dir = Path(model)
        if not model_dir.exists():
            raise FileNotFoundError(f"model directory {str(model_dir)!r} does not exist")
        model = ControlModel.load(model_dir, device=device)
    critic_dir = str(critic) if isinstance(critic, (str, Path)) else None
    critic = load_critic(critic, device)
    sel = resolve_selection(model.kind, selection, critic)
    meta = dict(model.meta)
    make_env, ref_min, ref_max = task_env(meta)
    out = Path(out_dir) if out_dir is not None else model_dir
    if out is not None and out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {str(out)!r} exists and is not a directory")

    t0 = time.perf_counter()
    res = rollout(model, make_env, episodes=episodes, candidates=candidates, steps=steps,
                  selection=sel, critic=critic, seed=seed, vectorised=vectorised,
                  temperature=temperature, max_parallel=max_parallel, net=net,
                  progress=progress)
    stats = return_stats(res.returns)
    normalized = None
    if ref_min is not None and ref_max is not None and ref_max != ref_min:
        normalized = normalized_score(stats["return_mean"], ref_min, ref_max)
    entropy = (candidate_entropy(res.entropy_samples) if len(res.entropy_samples)
               and res.entropy_samples.shape[1] >= 2 else None)
    result: dict[str, Any] = {
        **stats,
        "normalized": normalized,
        "coherency": _coherency(model, res, meta),
        "entropy": entropy,
        "decisions_per_s": res.decisions_per_s,
        "decisions": res.decisions,
        "decision_seconds": res.decision_seconds,
        "episodes": episodes,
        "candidates": candidates,
        "steps": steps if steps is not None else model.process.default_steps,
        "selection": sel,
        "seed": seed,
        "kind": model.kind,
        "process": model.spec.process,
        "backbone": model.spec.backbone,
        "task": meta.get("task"),
        "model_dir": None if model_dir is None else str(model_dir),
        "critic_dir": critic_dir,
        "ref_min": ref_min,
        "ref_max": ref_max,
        "episode_length_mean": float(res.lengths.mean()),
        "returns": [float(r) for r in res.returns],
        "wall_seconds": time.perf_counter() - t0,
    }
    if res.success is not None:
        result["success_rate"] = float(res.success.mean())
    if write and out is not None:
        out.mkdir(parents=True, exist_ok=True)
        title = (f"{model.kind}/{model.spec.process}: return {stats['return_mean']:.2f}"
                 + (f" ({normalized:.0f}%)" if normalized is not None else ""))
        _picture(out / EVAL_PNG, res, meta, title)
        write_json(out / EVAL_JSON, result)
        result["files"] = [str(out / EVAL_JSON), str(out / EVAL_PNG)]
    return result
