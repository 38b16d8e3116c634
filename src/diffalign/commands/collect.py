"""``diffalign collect TASK --policy … --episodes N --out FILE``: offline data from a simulator.

TASK is a simulator task of :mod:`diffalign.envs.adapters` (``metaworld/button-press-v3``,
``mujoco/hopper``, …), or ``FAMILY/NAME/POLICY`` (``mujoco/hopper/medium``), which also
names the policy and, without ``--out``, writes where ``--task FAMILY/NAME/POLICY`` finds it
(:func:`diffalign.tasks.sim_dataset_path`). ``--policy replay`` (MuJoCo) writes a SAC
training's transitions rather than episodes of a policy (:func:`diffalign.data.collect.
collect_replay`).
"""

from __future__ import annotations

import json as _json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import tyro

from ..errors import UserError

__all__ = ["CollectArgs", "collect_main", "collect_task"]


@dataclass
class CollectArgs:
    """Collect an offline dataset in a simulator (D4RL-layout HDF5 or a Minari dataset)."""

    task: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="TASK")]
    """FAMILY/NAME: mujoco/{hopper,halfcheetah,walker2d}, metaworld/{button-press-v3,
    drawer-open-v3,sweep-into-v3,plate-slide-v3}, pusht/pusht, kitchen/{complete,partial,mixed},
    antmaze/{umaze,medium,large}; or FAMILY/NAME/POLICY."""
    policy: str | None = None
    """expert (MetaWorld's scripted policy), noisy (expert + Gaussian noise of std --noise),
    mixed (MetaWorld: the expert at each of --noise-levels plus a --random-fraction of
    random-action episodes; about 45% of its episodes succeed), random (uniform actions),
    medium (MuJoCo: a SAC agent trained here to --target-return), replay (MuJoCo: every
    transition of that SAC training, D4RL's medium-replay). Default: the task's first
    (metaworld: expert, others: random)."""
    episodes: int | None = None
    """Number of episodes (default 100). Not for replay: its episodes are SAC's, as many as
    --max-train-steps / --max-train-seconds let it run."""
    out: Path | None = None
    """Output .hdf5/.h5 file, or with --format minari the Minari dataset id. Default:
    $DIFFALIGN_DATA/FAMILY/NAME-POLICY.hdf5 (DIFFALIGN_DATA defaults to ~/.diffalign/data),
    where --task FAMILY/NAME/POLICY finds it."""
    format: Literal["auto", "hdf5", "minari"] = "auto"
    """auto: HDF5 (--out must end in .hdf5/.h5); minari: --out is a Minari dataset id such as
    mujoco/hopper/random-v0 (written under MINARI_DATASETS_PATH, default ~/.minari/datasets)."""
    seed: int = 0
    """Episode i is reset with seed + i; seeds the policy's noise and the SAC agent."""
    max_episode_steps: int | None = None
    """Time limit per episode (default: mujoco 1000, metaworld 200, pusht 300, kitchen 280,
    antmaze 700)."""
    noise: float = 0.1
    """Std of the Gaussian action noise of --policy noisy (actions lie in [-1, 1])."""
    noise_levels: tuple[float, ...] | None = None
    """mixed: the expert's noise stds, each given an equal share of the episodes that are not
    random (0 is the clean expert). Default: 0.1 0.5 1.0 1.5 2.0."""
    random_fraction: float | None = None
    """mixed: fraction of uniform-random-action episodes, >= 0 and < 1. Default, per task:
    button-press 0.45, drawer-open 0.30, sweep-into 0.45, plate-slide 0.35."""
    target_return: float | None = None
    """medium, replay: train SAC until its return reaches this (default: a D4RL-normalised
    score of 40: hopper 1282, halfcheetah 4686, walker2d 1838)."""
    max_train_steps: int = 300_000
    """medium, replay: SAC environment-step budget (about 25 s per 1000 steps on a 2-core
    CPU)."""
    max_train_seconds: float | None = None
    """medium, replay: wall-clock budget of SAC training in seconds (default: none for
    medium, 1200 for replay; inf: none); training stops at whichever of this and
    --max-train-steps comes first, and the agent is then used as is."""
    eval_every: int = 5000
    """medium, replay: evaluate (5 episodes), save the agent and check the target every this
    many steps."""
    task_seed: int = 0
    """metaworld: seed of the benchmark's 50 goal variations (MT1)."""
    progress: bool = True
    """Show progress bars."""
    json: bool = False
    """Print the summary as one JSON object."""

    def __post_init__(self) -> None:
        from diffalign.data.collect import collect_policies, mixed_components
        from diffalign.envs.adapters import SIM_TASKS, sim_spec

        parts = self.task.split("/")
        if len(parts) == 3:
            if self.policy is not None and self.policy != parts[2]:
                raise UserError(f"task {self.task!r} names policy {parts[2]!r} but "
                                 f"policy={self.policy!r}")
            self.policy = parts[2]
            self.task = "/".join(parts[:2])
        spec = sim_spec(self.task)  # ValueError naming an unknown task
        if self.policy is None:
            self.policy = spec.policies[0]
        policies = collect_policies(self.task)
        if self.policy not in policies:
            hint = ""
            if spec.family == "pusht" and self.policy in ("expert", "noisy", "mixed"):
                hint = " (there is no scripted PushT policy)"
            elif self.policy in ("medium", "replay"):
                hint = " (the SAC-trained policies are for MuJoCo tasks)"
            raise UserError(f"unknown policy {self.policy!r} for task {self.task!r}{hint}; "
                             f"choose one of {', '.join(policies)}")
        if self.policy == "replay" and self.episodes is not None:
            raise UserError("--episodes is not for --policy replay: its episodes are those SAC "
                             "ran while training; size it with --max-train-steps or "
                             "--max-train-seconds")
        n = 100 if self.episodes is None else self.episodes
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise UserError(f"episodes must be an integer >= 1, got episodes={n!r}")
        self.episodes = n
        if self.max_episode_steps is not None and self.max_episode_steps < 1:
            raise UserError(f"max_episode_steps must be >= 1, got "
                             f"max_episode_steps={self.max_episode_steps}")
        if self.policy == "replay" and self.max_train_seconds is None:
            from diffalign.data.collect import REPLAY_TRAIN_SECONDS

            self.max_train_seconds = REPLAY_TRAIN_SECONDS
        if self.max_train_seconds is not None and not self.max_train_seconds > 0:
            raise UserError(f"max_train_seconds must be > 0, got "
                             f"max_train_seconds={self.max_train_seconds}")
        if self.max_train_steps < 1:
            raise UserError(f"max_train_steps must be >= 1, got "
                             f"max_train_steps={self.max_train_steps}")
        if self.eval_every < 1:
            raise UserError(f"eval_every must be >= 1, got eval_every={self.eval_every}")
        if not self.noise >= 0:
            raise UserError(f"noise must be >= 0, got noise={self.noise}")
        if self.policy == "noisy" and self.noise == 0:
            raise UserError("policy 'noisy' needs noise > 0, got noise=0.0")
        if self.policy == "mixed":
            mixed_components(self.task, self.noise_levels, self.random_fraction)  # UserError
        else:
            for flag in ("noise_levels", "random_fraction"):
                if getattr(self, flag) is not None:
                    raise UserError(f"--{flag.replace('_', '-')} is for --policy mixed, got "
                                     f"policy={self.policy!r}")
        if self.format not in ("auto", "hdf5", "minari"):
            raise UserError(f"format must be auto, hdf5 or minari, got format={self.format!r}")
        if self.format == "minari":
            if self.out is None:
                raise UserError("format='minari' needs --out DATASET_ID, e.g. "
                                 f"{self.task}/{self.policy}-v0")
            self.out = Path(self.out)
            return
        if self.out is None:
            from diffalign.tasks import sim_dataset_path

            self.out = sim_dataset_path(self.task, self.policy)
        self.out = Path(self.out)
        if self.out.is_dir():
            raise UserError(f"out {str(self.out)!r} exists and is a directory, not a file")
        if self.out.suffix.lower() not in (".hdf5", ".h5"):
            raise UserError(f"out must end in .hdf5 or .h5, got out={str(self.out)!r} (for a "
                             "Minari dataset give --format minari and its id as --out)")
        assert self.task in SIM_TASKS


def collect_main(args: CollectArgs) -> dict[str, Any]:
    """Collect, write and summarise the dataset; returns the printed summary."""
    from diffalign.data import collect as col
    from diffalign.envs.adapters import sim_spec

    spec = sim_spec(args.task)
    out = Path(args.out)
    agent: dict[str, Any] | None = None
    if args.policy == "medium":
        agent_at = None if args.format == "minari" else out
        eps, info = col.collect_medium(args.task, agent_at, episodes=args.episodes,
                                       seed=args.seed, target_return=args.target_return,
                                       max_train_steps=args.max_train_steps,
                                       max_train_seconds=args.max_train_seconds,
                                       max_episode_steps=args.max_episode_steps,
                                       eval_every=args.eval_every, progress=args.progress)
        agent = {k: info.get(k) for k in ("train_steps", "eval_return", "target_return",
                                           "reached", "train_s")}
        agent["path"] = eps.meta.get("agent")
    elif args.policy == "replay":
        agent_at = None if args.format == "minari" else out
        eps, info = col.collect_replay(args.task, agent_at, seed=args.seed,
                                       target_return=args.target_return,
                                       max_train_steps=args.max_train_steps,
                                       max_train_seconds=args.max_train_seconds,
                                       max_episode_steps=args.max_episode_steps,
                                       eval_every=args.eval_every, progress=args.progress)
        agent = {k: info.get(k) for k in ("train_steps", "eval_return", "target_return",
                                           "reached", "train_s", "stopped_by")}
        agent["path"] = eps.meta.get("agent")
    else:
        eps = col.collect_episodes(args.task, args.policy, episodes=args.episodes,
                                   seed=args.seed, max_episode_steps=args.max_episode_steps,
                                   noise=args.noise, task_seed=args.task_seed,
                                   progress=args.progress, noise_levels=args.noise_levels,
                                   random_fraction=args.random_fraction)
    if args.format == "minari":
        from diffalign.data.readers import write_minari

        write_minari(eps, str(out), env_id=spec.gym_id, env_kwargs=eps.meta["env_kwargs"],
                     algorithm_name=f"diffalign collect --policy {args.policy}",
                     description=f"{args.task}: {len(eps)} episodes of policy {args.policy} "
                                 f"(diffalign collect, seed {args.seed})")
        from minari.storage import get_dataset_path

        written = str(get_dataset_path(str(out)))
    else:
        from diffalign.data.readers import write_d4rl_hdf5

        written = str(write_d4rl_hdf5(out, eps))
    returns = eps.returns()
    meta = eps.meta
    summary: dict[str, Any] = {
        "task": args.task, "policy": args.policy, "path": written, "format":
        "minari" if args.format == "minari" else "hdf5", "episodes": len(eps),
        "steps": eps.num_steps, "return_mean": float(returns.mean()),
        "return_std": float(returns.std()), "collect_s": meta.get("collect_s"),
    }
    rmin, rmax = meta.get("ref_min_score"), meta.get("ref_max_score")
    if rmin is not None and rmax is not None and rmax != rmin:
        summary["normalized"] = 100.0 * (summary["return_mean"] - rmin) / (rmax - rmin)
        summary["ref_min_score"], summary["ref_max_score"] = rmin, rmax
    if meta.get("success_rate") is not None:
        summary["success_rate"] = meta["success_rate"]
    if agent is not None:
        summary["agent"] = agent
    if meta.get("mix") is not None:
        summary["mix"] = meta["mix"]
    if args.policy == "replay":
        summary["return_range"] = [meta["return_min"], meta["return_mean"], meta["return_max"]]
        summary["normalized_range"] = [meta["normalized_min"], meta["normalized_mean"],
                                       meta["normalized_max"]]
    if args.json:
        print(_json.dumps(summary))
    else:
        line = (f"wrote {written}: {summary['episodes']} episodes, {summary['steps']} steps, "
                f"return {summary['return_mean']:.1f} ± {summary['return_std']:.1f}")
        if "normalized" in summary:
            line += f" (normalised {summary['normalized']:.1f})"
        if "success_rate" in summary:
            line += f", success rate {summary['success_rate']:.2f}"
        print(line + f", {summary['collect_s']:.1f} s")
        if "normalized_range" in summary:
            lo, mean, hi = summary["normalized_range"]
            print(f"  SAC: {agent['train_steps']} steps in {agent['train_s']:.0f} s (stopped "
                  f"by {agent['stopped_by']}); episodes score {lo:.1f} / {mean:.1f} / "
                  f"{hi:.1f} (min / mean / max, normalised)")
        for c in summary.get("mix", []):
            what = "random" if c["policy"] == "random" else f"noise {c['noise']:g}"
            rate = "-" if c["success_rate"] is None else f"{c['success_rate']:.2f}"
            print(f"  {what}: {c['episodes']} episodes, success rate {rate}")
    return summary


def collect_task(task: str, quick: bool = False, out: Path | None = None) -> Path:
    """Collect dataset ``FAMILY/NAME/POLICY`` into ``out`` (default: where ``resolve_task``
    finds it); ``quick``: 10 episodes and a SAC budget of 10k steps (replay: and 60 s)
    instead of 100 and 300k (replay: and 1200 s)."""
    from ..data.collect import collect_dataset

    return collect_dataset(task, quick=quick, out=out)
