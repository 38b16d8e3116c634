"""IQL baseline: the project's IQL agent trained on a task's dataset and scored in its
environment with the pipeline's metric, for a standard offline-RL number beside a run's.

    python benchmarks/iql_baseline.py TASK_OR_FILE [--steps N] [--episodes E] [--seed S]
                                      [--out DIR]

TASK_OR_FILE is anything :func:`diffalign.tasks.resolve_task` takes (``nav1d/full``,
``mujoco/hopper/replay``, ``metaworld/button-press-v3/mixed``, a dataset file such as a run's
``RUN/data/*.hdf5``). A Nav1D task string is generated as ``diffalign run`` generates it (data
seed = ``--seed``, ``--layout-seed``, ``--data-episodes``); a run's Nav1D file is played in
the layout it records.

The agent is :func:`diffalign.models.iql_agent.train_iql_agent` with the hyper-parameters
:class:`~diffalign.models.iql_agent.IQLAgentConfig` holds (expectile 0.7, beta 3, weights
clipped at 100, two 256-wide hidden layers, batch 256); ``--steps`` sets the critic's steps
and then the actor's (each), both seeded from ``--seed``. It is evaluated with its
deterministic action for E episodes reset with seeds ``seed + i`` (the pipeline's
evaluation seeds; an episode succeeds when any step reports success, as in
:func:`diffalign.eval.rollout.rollout`). The score is in the task's metric
(:func:`diffalign.pipeline.run.task_metric`): the success rate in % where the environment
reports success, else the D4RL-normalised score (Nav1D: % of the DP optimum), else the mean
return.

Step rate, measured on this project's 2-core CPU machine, one torch thread, while other jobs
kept it busy (load ~3), on 20k random transitions (11-d observations, 3-d actions): critic
~94 steps/s, actor ~356 steps/s, so N steps cost ~N / 75 s. The default 20000 steps take
~4.5 min there (less on an idle machine; IQL's paper trains 1M steps, so this is a short-
budget baseline); evaluation adds seconds (10 MuJoCo episodes of at most 1000 steps).

Prints one line and writes ``DIR/iql_baseline.json`` (default ``DIR``:
``runs/iql_baseline/<task>``): task, data_file, steps, seed, episodes, reset_seeds,
returns, return_mean, return_std, success_rate (or null), normalized (or null), metric,
score, train_seconds, eval_seconds, plus the dataset's size and mean return and the config.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

DEFAULT_STEPS = 20_000
RESULT_JSON = "iql_baseline.json"


def load_task(spec: str, seed: int = 0, layout_seed: int = 0, data_episodes: int = 1000):
    """The :class:`~diffalign.tasks.Task` of ``spec`` and its dataset file (None when the
    data is generated in memory)."""
    from diffalign.envs import NAV1D_ID
    from diffalign.tasks import resolve_task

    if spec.startswith("nav1d/"):
        # the data ``diffalign run`` generates for this task and seed
        return resolve_task(spec, layout_seed=layout_seed, episodes=data_episodes,
                            seed=seed), None
    task = resolve_task(spec)
    source = task.episodes.meta.get("source")
    path = Path(str(source)) if source else None
    data_file = str(path.resolve()) if path is not None and path.exists() else None
    if task.meta.get("env_id") == NAV1D_ID and data_file is not None:
        # a Nav1D file names its env but not the layout the env needs: the run's own loader
        from diffalign.pipeline.data import load_run_task

        kind = task.meta.get("dataset_kind") or task.meta.get("kind") or "full"
        task = load_run_task(data_file, task=f"nav1d/{kind}",
                             layout_seed=int(task.meta.get("layout_seed", 0)))
    return task, data_file


def default_out(spec: str) -> Path:
    p = Path(spec)
    name = p.stem if p.suffix.lower() in (".hdf5", ".h5") else spec.strip("/").replace("/", "-")
    return Path("runs") / "iql_baseline" / name


def run_baseline(spec: str, steps: int = DEFAULT_STEPS, episodes: int = 10, seed: int = 0,
                 out: str | Path | None = None, layout_seed: int = 0,
                 data_episodes: int = 1000, device: str = "auto",
                 progress: bool = True) -> dict[str, Any]:
    """Train, evaluate, write ``out/iql_baseline.json`` and return its content."""
    from diffalign.atomic import write_json
    from diffalign.eval.metrics import normalized_score, return_stats
    from diffalign.models.critic import CriticConfig
    from diffalign.models.iql_agent import IQLAgentConfig, run_agent_episodes, train_iql_agent
    from diffalign.pipeline.run import stage_score, task_metric

    for name, v in (("steps", steps), ("episodes", episodes)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {name}={v!r}")
    out = Path(out) if out is not None else default_out(spec)
    task, data_file = load_task(spec, seed=seed, layout_seed=layout_seed,
                                data_episodes=data_episodes)
    if task.make_env is None:
        raise ValueError(f"task {spec!r} has no known environment to evaluate the agent in")
    cfg = IQLAgentConfig(critic=CriticConfig(steps=steps, seed=seed, device=device),
                         steps=steps, seed=seed, device=device)

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    agent = train_iql_agent(task.episodes, cfg, out_dir=None, progress=progress)
    t_train = time.perf_counter() - t0
    agent = agent.to("cpu")  # one state per step: the CPU is faster than a kernel launch

    t0 = time.perf_counter()
    played = run_agent_episodes(agent, task.make_env, episodes=episodes, seed=seed,
                                progress=progress)
    t_eval = time.perf_counter() - t0

    stats = return_stats(played.returns)
    normalized = None
    if task.ref_min is not None and task.ref_max is not None and task.ref_max != task.ref_min:
        normalized = float(normalized_score(stats["return_mean"], task.ref_min, task.ref_max))
    row = {**stats, "normalized": normalized,
           "success_rate": None if played.success is None else float(played.success.mean())}
    metric = task_metric(row)
    result: dict[str, Any] = {
        "task": spec,
        "data_file": data_file,
        "transitions": int(task.episodes.num_steps),
        "data_return_mean": float(task.episodes.returns().mean()),
        "steps": steps,
        "seed": seed,
        "episodes": episodes,
        "reset_seeds": played.seeds,
        "returns": [float(r) for r in played.returns],
        "episode_lengths": [int(n) for n in played.lengths],
        "return_mean": stats["return_mean"],
        "return_std": stats["return_std"],
        "success_rate": row["success_rate"],
        "normalized": normalized,
        "ref_min": task.ref_min,
        "ref_max": task.ref_max,
        "metric": metric,
        "score": stage_score(row, metric),
        "train_seconds": t_train,
        "eval_seconds": t_eval,
        "config": dataclasses.asdict(cfg),
    }
    write_json(out / RESULT_JSON, result)
    result["file"] = str(out / RESULT_JSON)
    return result


_METRIC_TEXT = {"success_rate": "success {:.1f}%", "normalized": "normalised score {:.1f}",
                "return_mean": "mean return {:.2f}"}


def summary_line(result: dict[str, Any]) -> str:
    s0, e = result["seed"], result["episodes"]
    score = _METRIC_TEXT[result["metric"]].format(result["score"])
    return (f"IQL {result['task']}: {score} (return {result['return_mean']:.2f} ± "
            f"{result['return_std']:.2f} over {e} episodes, reset seeds {s0}-{s0 + e - 1}; "
            f"data mean return {result['data_return_mean']:.2f}); {result['steps']} critic + "
            f"{result['steps']} actor steps in {result['train_seconds']:.0f} s, evaluation "
            f"{result['eval_seconds']:.1f} s -> {result['file']}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("task", help="a task string or dataset file (diffalign.tasks.resolve_task)")
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                    help=f"critic steps, then as many actor steps [{DEFAULT_STEPS}]")
    ap.add_argument("--episodes", type=int, default=10, help="evaluation episodes [10]")
    ap.add_argument("--seed", type=int, default=0,
                    help="training seed and first reset seed (and Nav1D data seed) [0]")
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder [runs/iql_baseline/<task>]")
    ap.add_argument("--layout-seed", type=int, default=0, help="Nav1D layout [0]")
    ap.add_argument("--data-episodes", type=int, default=1000,
                    help="episodes of a generated Nav1D dataset [1000]")
    ap.add_argument("--device", default="auto", help="training device [auto]")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    result = run_baseline(args.task, steps=args.steps, episodes=args.episodes, seed=args.seed,
                          out=args.out, layout_seed=args.layout_seed,
                          data_episodes=args.data_episodes, device=args.device,
                          progress=not args.no_progress)
    print(summary_line(result), flush=True)
    return result


if __name__ == "__main__":
    main()
