"""``diffalign critic``: train the IQL critic on a task's offline data (a thin library call).

The global RNGs are seeded from ``--seed`` first, so two runs with the same settings write
bit-identical critics (on CPU). A killed run resumes from ``OUT/train_state``; a state
written with other critic settings (expectile, gamma, backup, ensemble, seed, task, ...) is
refused.
"""

from __future__ import annotations

import json as _json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from diffalign.models.critic import CriticConfig

from ..errors import UserError
from ..eval.nav1d_critic import nav1d_critic_check, nav1d_greedy_return

__all__ = ["CriticArgs", "critic_main", "nav1d_critic_check", "nav1d_greedy_return",
           "resume_settings"]

_DEFAULTS = CriticConfig()


@dataclass
class CriticArgs:
    """Train the IQL critic (twin Q, expectile V, target Qs) and save it to --out."""

    out: Path
    """Output directory: config.json + model.safetensors (+ train_state/, metrics)."""
    task: str = "nav1d/full"
    """nav1d/{partial,full,expert}; FAMILY/NAME/DATASET (mujoco/hopper/medium,
    metaworld/button-press-v3/expert: see `diffalign collect`); a D4RL/robomimic HDF5 file;
    or a local Minari id."""
    download: bool = False
    """Download a Minari --task (FAMILY/NAME/DATASET-vN) that is not found locally."""
    layout_seed: int = 0
    """Nav1D reward layout seed."""
    episodes: int = 1000
    """Nav1D dataset size in episodes (ignored for dataset files)."""
    data_seed: int = 0
    """Seed of the generated Nav1D dataset (ignored for dataset files)."""
    steps: int = _DEFAULTS.steps
    """Optimiser steps."""
    batch_size: int = _DEFAULTS.batch_size
    """Transitions per step."""
    lr: float = _DEFAULTS.lr
    """Adam learning rate."""
    hidden: int = _DEFAULTS.hidden
    """Hidden width of the Q and V MLPs."""
    depth: int = _DEFAULTS.depth
    """Hidden layers of the Q and V MLPs."""
    fourier_features: int = _DEFAULTS.fourier_features
    """Random Fourier features of the inputs (0 = plain inputs). (experimental: 64 features at
    --fourier-scale 0.5 / 3.0 gave a greedy policy of 82.6 / 77.6% of the optimum on
    nav1d/full, 85.6% without)"""
    fourier_scale: float = _DEFAULTS.fourier_scale
    """Std of the Fourier frequencies."""
    expectile: float = _DEFAULTS.expectile
    """Expectile tau of the value regression."""
    backup_actions: int = _DEFAULTS.backup_actions
    """0 = IQL's expectile; K > 0 = V regresses onto max Q over K actions drawn from the
    data (only for data that tried every action everywhere, e.g. a random policy)."""
    backup_states: int = _DEFAULTS.backup_states
    """With backup_actions: V trains on this many states of each batch."""
    backup_proposals: Literal["batch", "grid"] = _DEFAULTS.backup_proposals
    """The max backup's K actions: drawn from the batch, or an even grid over the batch's
    action range (one action dimension)."""
    backup_select: Literal["min", "first"] = _DEFAULTS.backup_select
    """The max backup's choice: by min of the target twins, or by the first twin (half the
    cost; valued by the min)."""
    backup_refine: int = _DEFAULTS.backup_refine
    """With the grid: this many more actions across the two grid cells beside each state's
    best grid action (a coarse-to-fine max; 0 = one grid)."""
    backup_bf16: bool = _DEFAULTS.backup_bf16
    """Evaluate the max backup's proposals in bfloat16 (float32, with a note, where the
    device has no bfloat16 kernels)."""
    gamma: float = _DEFAULTS.gamma
    """Discount factor."""
    target_tau: float = _DEFAULTS.target_tau
    """Polyak rate of the target Qs."""
    reward_scale: float = _DEFAULTS.reward_scale
    """Rewards become reward_scale * r + reward_bias for the TD target."""
    reward_bias: float = _DEFAULTS.reward_bias
    """See reward_scale."""
    timeouts_as_terminals: bool | None = None
    """Stop bootstrapping at time-outs (default: auto, True for Nav1D only)."""
    ensemble: int = _DEFAULTS.ensemble
    """Critics trained side by side (own initialisation and batches); more than one saves a
    mean-Q ensemble, which every command that takes a critic loads."""
    seed: int = 0
    """Seed of the initialisation and batch sampling."""
    device: str = "auto"
    """'auto', 'cpu', 'cuda', ..."""
    progress: bool = True
    """Show a progress bar."""
    json: bool = False
    """Print the summary as one JSON object."""

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.episodes < 1:
            raise UserError(f"episodes must be >= 1, got episodes={self.episodes}")
        if self.layout_seed < 0 or self.data_seed < 0:
            raise UserError(f"seeds must be >= 0, got layout_seed={self.layout_seed} "
                             f"data_seed={self.data_seed}")
        self.critic_config()  # validate now, naming the field
        from ..train.trainer import bf16_if_fast

        self.backup_bf16 = bf16_if_fast(self.backup_bf16, self.device, "--backup-bf16")

    def critic_config(self) -> CriticConfig:
        return CriticConfig(
            steps=self.steps, batch_size=self.batch_size, lr=self.lr, hidden=self.hidden,
            depth=self.depth, fourier_features=self.fourier_features,
            fourier_scale=self.fourier_scale, expectile=self.expectile,
            backup_actions=self.backup_actions, backup_states=self.backup_states,
            backup_proposals=self.backup_proposals, backup_select=self.backup_select,
            backup_refine=self.backup_refine, backup_bf16=self.backup_bf16, gamma=self.gamma,
            target_tau=self.target_tau, reward_scale=self.reward_scale,
            reward_bias=self.reward_bias, timeouts_as_terminals=self.timeouts_as_terminals,
            ensemble=self.ensemble, seed=self.seed, device=self.device)


# CriticConfig fields that are the trainer's own: it warns when the optimisation settings
# change on resume, and the step count may grow
_NOT_SETTINGS = {"steps", "device", "lr", "batch_size", "weight_decay", "grad_clip",
                 "warmup_steps", "schedule", "log_every", "ckpt_every"}


def resume_settings(args: CriticArgs) -> dict[str, Any]:
    """What determines a critic run's result: recorded in its training state, and a resume
    with other values is refused."""
    from dataclasses import asdict

    settings = {k: v for k, v in asdict(args.critic_config()).items() if k not in _NOT_SETTINGS}
    settings["task"] = args.task
    if args.task.startswith("nav1d/"):  # the generated dataset
        settings.update(layout_seed=args.layout_seed, episodes=args.episodes,
                        data_seed=args.data_seed)
    return settings


def critic_main(args: CriticArgs) -> dict[str, Any]:
    """Train and save the critic; print and return a summary (losses and values on the data)."""
    from diffalign.errors import UserError
    from diffalign.models.critic import (
        evaluate_critic,
        resolve_timeouts_as_terminals,
        train_critic,
        transitions_from_episodes,
    )
    from diffalign.tasks import resolve_task
    from diffalign.train.trainer import run_settings, seed_everything

    try:
        task = resolve_task(args.task, layout_seed=args.layout_seed, episodes=args.episodes,
                            seed=args.data_seed, download=args.download)
    except ValueError as e:  # an unknown task or dataset name
        raise UserError(str(e)) from e
    cfg = args.critic_config()
    seed_everything(args.seed)
    with run_settings(resume_settings(args)):
        critic = train_critic(task.episodes, cfg, args.out, progress=args.progress)
    data = transitions_from_episodes(task.episodes,
                                     resolve_timeouts_as_terminals(cfg, task.episodes))
    stats = evaluate_critic(critic, data)
    summary: dict[str, Any] = {
        "task": args.task,
        "out": str(args.out),
        "transitions": int(len(data["observations"])),
        "steps": cfg.steps,
        **{f"critic/{k}": v for k, v in stats.items()},
    }
    if args.task.startswith("nav1d/"):
        check = nav1d_critic_check(critic, task.episodes, args.layout_seed, args.seed)
        check.update(nav1d_greedy_return(critic, args.layout_seed))
        summary.update({f"critic/nav1d/{k}": v for k, v in check.items()})
    from diffalign.atomic import write_json

    write_json(args.out / "critic_summary.json", summary)
    if args.json:
        print(_json.dumps(summary))
    else:
        line = (f"critic on {args.task} ({summary['transitions']} transitions, {cfg.steps} "
                f"steps) -> {args.out}: loss_q {stats['loss_q']:.4f}, loss_v "
                f"{stats['loss_v']:.4f}, mean Q {stats['q_mean']:.3f}, mean V "
                f"{stats['v_mean']:.3f}")
        if "critic/nav1d/v_start" in summary:
            line += (f"; V(s0) {summary['critic/nav1d/v_start']:.3f} (optimum "
                     f"{summary['critic/nav1d/v_star_start']:.3f} undiscounted), "
                     f"Q(pi*) > Q(random) on "
                     f"{100 * summary['critic/nav1d/frac_opt_over_random']:.1f}% of states; "
                     f"its greedy policy reaches "
                     f"{summary['critic/nav1d/greedy_normalized']:.1f}% of the optimum")
        print(line)
    return summary
