"""``diffalign run nav1d``: the main job, data → foundation → critic → alignment → cascade →
evaluation → report, on the paper's Nav1D task.

Every step writes into ``OUT`` and is skipped when its result is already there, so a killed
run resumes (the trainers also resume mid-run from their ``train_state``)::

    OUT/data/nav1d-<dataset>.hdf5 (+ .png)   the offline dataset
    OUT/foundation/                           the reference model
    OUT/critic/                               the IQL critic
    OUT/dynamics/                             the learned dynamics model (partial, full)
    OUT/align/                                adapter, cascade, align.json
    OUT/eval/<stage>/eval.json (+ eval.png)   per-stage evaluation in the environment
                                              (weights.safetensors: the stage's merged
                                              weights, until it is evaluated)
    OUT/report.json, OUT/report.md, OUT/*.png
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from ..errors import UserError
from .run_jobs import (
    SideJobs,
    critic_job,
    done,
    dynamics_job,
    eval_job,
    greedy_job,
    save_stage_weights,
)

__all__ = ["PRESETS", "RunNav1DArgs", "bf16_is_fast", "critic_sizes", "critic_warnings",
           "run_nav1d"]

PRESETS: dict[str, dict] = {
    "quick": dict(data_episodes=200, foundation_steps=400, critic_steps=800, critic_ensemble=2,
                  dynamics_steps=300, max_iters=4,
                  eval_every=2, patience=2, passes=1, eval_episodes=8, ref_eval_episodes=4,
                  ref_candidates=64,
                  cascade_rounds=1, cascade_steps=10, conditions=128, val_conditions=32),
    "default": dict(data_episodes=1000, foundation_steps=2500, critic_steps=4500, critic_ensemble=2,
                    max_iters=120, rl_updates=50, rl_eval_every=10, dpo_updates=4, sft_rounds=20,
                    eval_every=4,
                    patience=10, passes=1, eval_episodes=64, ref_eval_episodes=16,
                    ref_candidates=64, cascade_rounds=2, cascade_steps=25, conditions=4096,
                    val_conditions=512),
    "paper": dict(data_episodes=1000, foundation_steps=10000, critic_steps=10000, critic_ensemble=2,
                  max_iters=240, eval_every=4, patience=10, passes=3, eval_episodes=200,
                  ref_eval_episodes=100, ref_candidates=64, cascade_rounds=10, cascade_steps=50,
                  conditions=8192, val_conditions=512),
}
"""Sizes of the run: quick (CI, about two minutes), default (under 10 minutes on 2 CPU cores),
paper. ``critic_ensemble`` IQL critics are trained side by side for ``critic_steps`` each
(``--critic-ensemble``, ``--critic-steps`` override them), and alignment and the best-of-n
ranking use their mean Q. One critic's quality depends a lot on its seed (greedy policy of
one 6000-step critic on nav1d/full: 94.0 / 91.9 / 91.3% of the optimum for seeds 0-2 on
layout 0, 83.9 / 95.1 / 94.7% on layout 4); two critics of 4000 steps (width 256, grid of
32) reached 93.1 / 92.3 / 93.9 / 94.1 / 96.0 / 91.3% on layouts 0-5 (session 13). On the
AVX2 CPU of session 14 (no bfloat16 kernels) a step of those two took 144 ms, 3.5x the
earlier machine's, so the default now trains two critics of width 128 (``CRITIC_HIDDEN``) with
a refined grid (``CRITIC_BACKUP``) for 4500 steps, in the second process while the
foundation trains (``run_jobs``): 42-45 ms a step on one thread, greedy policy 93.5% on
layout 0 and 94.9% on layout 4 (one critic of width 256 and 3200 steps, the same time: 87.1
and 94.6%).

``max_iters`` caps every method's updates per pass; ``rl_updates``, ``dpo_updates``
and ``sft_rounds`` (where given) cap RL, DPO and SFT lower, to keep the default job near 10
minutes; RL validates every ``rl_eval_every`` updates (its updates are cheap). The
alignment's length decides its result: from one layout-0 foundation (3000 steps) and critic
pair on the AVX2 CPU (alignment on one thread, % of the optimum after SFT / final, against
the critic's best of 64 at 93.0%): SFT 24 rounds x 64 steps at batch 128 and RL 100 updates
(session 13's schedule) 92.2 / 94.6%; SFT 16 x 48 and RL 70 84.7 / 90.9%; SFT 12 x 48 and
RL 60 84.2 / 85.3%; SFT 24 x 64 and RL 50 89.7 / 95.0%, and the same at batch 64 89.9 /
95.3% in 231 s of SFT instead of 287 s (the default since session 14, with 4 DPO updates and
2 cascade rounds instead of 8 and 4, which changed nothing there). In the
default job SFT with the critic's action search (``SFT_ACTION_SEARCH``) does most of the
work and RL after it (``RL_AFTER_SFT``) the rest. ``conditions`` is the pool of dataset
states the methods train on: with 512 of them SFT stopped at 78-80% of the optimum (layout
0, the session-9 critic), with 4096 at 86-91%. ``val_conditions`` are the states of the
validation reward that picks each stage's adapter: with 128 of them one layout-0 run kept an
earlier SFT adapter at 87.3%; 512 picked one at 89.5%, and two other runs kept the same
adapter either way (92.6%, 91.4%)."""

STAGE_WEIGHTS = "weights.safetensors"
"""An aligned stage's merged weights, in ``OUT/eval/<stage>/`` until the stage is evaluated."""

CRITIC_EXPECTILE = 0.95
"""IQL expectile of the run's critic. On nav1d/full the greedy policy of the critic
(argmax_a Q over 201 actions, 200 episodes) reached 77.5% of the optimum with IQL's usual 0.7
and 3000 steps, 80.8% with 0.9 and 6000 steps, 81.2% with 0.95 and 6000; 0.97 (3000 steps)
gave 75.5% and 0.99 (6000) 73.9%. Alignment cannot do better than its critic."""
CRITIC_BACKUP = dict(backup_actions=8, backup_refine=8, backup_states=256,
                     backup_proposals="grid", backup_select="first")
"""Max backup of the run's critic on random-policy data (partial, full): V regresses onto
max Q over an even grid of 8 actions across the data's range, refined by 8 more across the
two cells beside the best of them (``CriticConfig.backup_refine``; since session 14: half the
cost of the grid of 32 below, whose step took 89 ms of a critic's 24 ms without backup on
the AVX2 CPU, 37 ms with the refined grid), at every state of the batch
(``CriticConfig.backup_actions``), instead of the expectile; the first target twin chooses
the action and the min of the twins values it, and the grid is evaluated in bfloat16 where
that is fast (``backup_bf16``, see :func:`bf16_is_fast`). On nav1d/full, layout 0, 6000
steps, the critic's greedy policy reached 85.6% of the optimum with the expectile (0.95),
89.4% with 32 batch actions on 64 states per batch (the default until session 10, 125 s),
93.2% with 32 batch actions on every state (297 s), 94.2% with this grid in float32 and 95.0%
in bfloat16 (118-131 s in the main job alone on 2 cores); on layout 1 89.1% before and 95.9%
after. Expert data keeps the expectile: it never tried other actions, and the max would
trust the critic there."""
COND_FOURIER = 16
"""Fourier frequencies of the foundation's global condition (``ModelSpec.cond_fourier``).
Nav1D's rewards change independently from one time step to the next, so the best action is
a sharp function of t: a policy MLP regressed on the critic's argmax (layout 0, 8192
dataset states) reached 76.8% of the optimum from [x, t/T] and 88.9% from their 16-frequency
features, against the critic's own greedy 89.4%."""
DP_ACTION_HORIZON = 1
"""Actions a Diffusion Policy executes per sample in the run (T_a; the model's default is 4).
The critic scores a sample by its first action only, and Nav1D's rewards change from one step
to the next, so the other executed actions would be the data's random ones, unranked: with
T_a = 4 on nav1d/full (layout 0) the critic's best of 64 reached 61.6% of the optimum (the
Diffuser's, executing one action, 89.5%) and RL 39.7%."""
SFT_ACTION_SEARCH = dict(action_proposals=201, candidates=1, states_per_round=128, epochs=64,
                         batch_size=64, lr=4e-3, replay=4096)
"""SFT settings of the run on random-policy data (partial, full), where the critic has seen
every action: each round's winners take the critic's best of 201 evenly spaced first actions,
in-painted by the model (``SFTConfig.action_proposals``), and the adapter trains on the last
4096 winners (64 steps of 64 per round; 128 until session 13). The winner is then the
critic's argmax, not the best of a few samples. The rate was 2e-3 until session 14; see
``LORA_RANK`` for what 4e-3 changed."""
LORA_RANK = 16
"""Rank of the run's LoRA adapter (alpha twice the rank, so the scaling stays 2; the library's
default is 8); 8 until session 14. By the critic's own measure the session-14 schedule left
SFT short of its target: on layout 5 (nav1d/full) the critics' greedy first action scores
5.054 on the 512 validation states, the reference's samples 4.906, SFT's 5.015 and RL's
5.027, and in the environment the stages reached 76.3% (sft) and 79.2% (rl) of the optimum
against the greedy policy's 90.8%. Re-aligning that foundation and critic pair (methods sft
then rl, alignment seed 0, 64 episodes; % of the optimum after SFT / RL): rank 8 at SFT rate
2e-3 81.3 / 82.2; rank 8 at 4e-3 81.3 / 89.0; rank 16 at 2e-3 83.1 / 85.5; rank 16 at 4e-3
86.6 / 87.3; rank 32 at 4e-3 83.1 / 88.2. The spread between runs is as large: rank 16 at
4e-3 with alignment seed 1 gave 81.8 / 82.1, and with the DPO stage first (the run's
methods) 79.3 / 80.5, so the gain of this setting is a few points at most."""
RL_AFTER_SFT = dict(lr=1e-3, kl_coef=0.0, states_per_iter=256, group_size=1)
"""RL settings of the run on random-policy data (partial, full), where RL comes last (the
default ``--methods dpo,sft,rl``): QV-PG, the critic's gradient through the last 3 denoising
steps, from the SFT adapter, on 256 states per update at learning rate 1e-3, without a KL to
the reference (the critic has seen every action). SFT leaves the first action spread around
the critic's argmax, and on about a tenth of the states in the other basin; the reward
gradient narrows the spread (entropy about -1.4 -> -4.5) and moves those samples. From two
SFT adapters (nav1d/full, layouts 0 and 1, at 90.8% and 90.4% of the optimum), 100 updates
of 256 states reached 93.6 / 93.5% with lr 3e-4, 94.3 / 93.7% with 6e-4, 95.4 / 94.6% with
1e-3 and 90.7 / 94.3% with 2e-3 (200 episodes each); with 32 states x 8 samples per update
lr 1e-3 fell to 91.1% on layout 0, so the larger rate needs the larger batch. Gradient
through the last 10 steps instead of 3 gave 94.3 / 93.4% at lr 3e-4, at 1.3x the time. Run
first, from the reference (session 10's order rl,dpo,sft), QV-PG reached 48-60% and SFT then
redid its work."""
ROLLOUT_CONDITIONS = 0.5
"""Share of the alignment's conditions taken from rollouts of the critic's greedy policy
through dynamics learned from the dataset (``AlignConfig.rollouts``, see
:mod:`~diffalign.align.conditions`), on random-policy data (partial, full); the rest are
dataset states. The dynamics model trains in the second process after the critic
(``OUT/dynamics/``). Why: the aligned policy's mistakes were on the states it visits. On
layout 5 (nav1d/full, session 16) the job ended at 82.8% of the optimum against a best of
64 of 90.2% and a greedy critic of 90.8%; its rollouts followed narrow paths that crossed
the point where the best action flips from one end of the range to the other, and the
aligned model put that point elsewhere (at t = 30 every episode sat at x = 0.45-0.53 and
took +1 where the critic and the optimum take -1). Re-aligning that foundation and critic
(methods dpo,sft,rl, 200 episodes; alignment seeds 0 / 1): dataset states only 84.6%;
half the states from greedy rollouts through Nav1D's true dynamics 90.6 / 90.4%; through the
learned dynamics 86.2 / 91.4%. Fresh runs with it (nav1d/full, Diffuser): layouts 4 / 5 / 6 /
7 ended at 92.8 / 90.6 / 94.7 / 93.9% against best-of-64 references of 92.6 / 90.1 / 92.8 /
93.6% (session 15, without it: 92.0 / 81.7 / 88.8 / 93.7%); the Diffusion Policy on layout 5
at 90.3% (82.9% without). On partial data the change was within the noise (layout 5:
Diffuser 72.6 -> 78.7%, Diffusion Policy 77.9 -> 75.6%)."""
COVERED = 0.4
"""Action coverage (:meth:`~diffalign.models.behavior.BehaviorModel.coverage`) at or above
which the data counts as having tried most actions near every state, like random-policy
data: the critic then takes the max backup, SFT searches the critic's best action, RL runs
without a KL, the conditions include greedy rollouts, and the support guard is off. Nav1D's
random-policy datasets measure 0.7-0.85, its expert dataset about 0.13; the midpoint of the
pessimism's ramp (:class:`~diffalign.align.pessimism.PessimismConfig`)."""
CRITIC_HIDDEN = 128
"""Width of the run's critic MLPs (256 until session 13). A step of one width-128 critic with
the refined grid took 20 ms against 57 ms at width 256 (one thread, AVX2 CPU), which is what
lets two critics train within the foundation's time (see ``PRESETS``)."""
CRITIC_DEPTH = 3
"""Hidden layers of the run's critic MLPs. With expectile 0.95 and 6000 steps on nav1d/full
the greedy policy reached 81.2% with 2 layers, 85.6% and 84.7% (two seeds) with 3, 84.3%
with 4 and 83.3% with 3 layers of width 512; random Fourier input features (64 frequencies,
scale 0.5 / 3.0) gave 82.6% / 77.6%, and gamma 1.0 83.6%."""


def bf16_is_fast(device: str = "auto") -> bool:
    """Whether bfloat16 matmuls are native on ``device``: a CUDA GPU that supports them, or
    a CPU whose oneDNN build has bfloat16 kernels (AVX512-BF16 or AMX)."""
    import torch

    from ..train.trainer import resolve_device

    try:
        dev = resolve_device(device)
    except ValueError:  # CUDA asked for, none here
        return False
    if dev.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass
class RunNav1DArgs:
    """Run the whole pipeline on Nav1D and write a report of what alignment changed."""

    out: Path = Path("runs/nav1d")
    """Output directory (re-running resumes and skips finished steps)."""
    dataset: Literal["partial", "full", "expert"] = "full"
    """Offline dataset: random policy from part of the line, from all of it, or expert."""
    model: Literal["diffuser", "dd", "dp"] = "diffuser"
    """Foundation model: Diffuser, Decision Diffuser or Diffusion Policy."""
    process: Literal["ddpm", "ddim", "sm", "fm"] = "ddpm"
    """Diffusion process."""
    layout_seed: int = 0
    """Nav1D reward layout."""
    preset: Literal["quick", "default", "paper"] = "default"
    """Run size."""
    methods: str = "dpo,sft,rl"
    """Alignment methods in order, comma-separated (rl, dpo, sft). The default runs RL last,
    from the SFT adapter (run.py's RL_AFTER_SFT); rl,dpo,sft is the paper's order."""
    passes: int | None = None
    """Maximum passes over the methods (default from the preset)."""
    cascade: bool = True
    """Train and evaluate the cascaded refiner after alignment."""
    dpo_pairs: Literal["reference", "current", "dataset"] = "reference"
    """DPO pairs: reference or current-model samples ranked by the critic, or dataset
    windows ranked by their return."""
    online: bool = False
    """Online fine-tuning during alignment: every 8 updates, 16 episodes of the current
    model join the critic's buffer and the critic trains 200 more steps (OUT/align/
    critic_online/). Off by default: the paper's setting is offline."""
    rollout_conditions: float | None = None
    """Share of the alignment's conditions taken from rollouts of the critic's greedy policy
    through dynamics learned from the dataset (OUT/dynamics/); default 0.5 on partial and
    full data (ROLLOUT_CONDITIONS), 0 (dataset states only) on expert data, whose critic
    has not seen the actions its greedy policy takes."""
    critic_ensemble: int | None = None
    """IQL critics trained side by side, their mean Q used (default from the preset: 2). One
    critic's quality depends much on its seed; the mean of two is steadier across layouts."""
    critic_steps: int | None = None
    """Training steps of each critic (default from the preset)."""
    eval_episodes: int | None = None
    """Evaluation episodes per stage (default from the preset)."""
    seed: int = 0
    """Seed of every step."""
    device: str = "cpu"
    """Torch device: cpu, cuda or auto."""
    progress: bool = True
    """Show progress bars."""
    parallel: bool = True
    """On a CPU, use a second process (one torch thread each): the critic trains beside the
    foundation and each stage is evaluated beside the alignment (see ``run_jobs``).
    ``--no-parallel`` runs everything here, one step after another."""

    def __post_init__(self):
        from ..align.sequence import METHODS

        self.out = Path(self.out)
        methods = [m.strip() for m in self.methods.split(",") if m.strip()]
        bad = [m for m in methods if m not in METHODS]
        if bad or not methods:
            raise UserError(f"unknown alignment method(s) {bad or self.methods!r}; choose from "
                             f"{', '.join(METHODS)} (comma-separated)")
        if self.passes is not None and self.passes < 1:
            raise UserError(f"passes must be >= 1, got passes={self.passes}")
        for name in ("critic_ensemble", "critic_steps"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise UserError(f"{name} must be >= 1, got {name}={v}")
        if self.rollout_conditions is not None and not 0 <= self.rollout_conditions <= 1:
            raise UserError(f"rollout_conditions must be in [0, 1], got rollout_conditions="
                             f"{self.rollout_conditions}")
        if self.eval_episodes is not None and self.eval_episodes < 1:
            raise UserError(f"eval_episodes must be >= 1, got eval_episodes={self.eval_episodes}")
        if self.layout_seed < 0:
            raise UserError(f"layout_seed must be >= 0, got layout_seed={self.layout_seed}")
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"out {str(self.out)!r} exists and is not a directory")


def _log(msg: str) -> None:
    print(f"[diffalign run] {msg}", flush=True)


def critic_sizes(args: RunNav1DArgs) -> tuple[int, int]:
    """(critics, steps of each) of the run: the arguments, or the preset's."""
    P = PRESETS[args.preset]
    return (args.critic_ensemble or P["critic_ensemble"], args.critic_steps or P["critic_steps"])


def run_nav1d(args: RunNav1DArgs) -> dict:
    """Run every step (skipping finished ones) and write the report; returns report.json."""
    from ..data.nav1d_datasets import plot_nav1d_dataset, write_nav1d_hdf5
    from ..tasks import resolve_task

    P = PRESETS[args.preset]
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    task_name = f"nav1d/{args.dataset}"
    timings: dict[str, float] = {}

    # 1. data
    t0 = time.perf_counter()
    task = resolve_task(task_name, layout_seed=args.layout_seed, episodes=P["data_episodes"],
                        seed=args.seed)
    data_file = out / "data" / f"nav1d-{args.dataset}.hdf5"
    if not data_file.exists():
        ep = task.episodes
        arrays = {k: getattr(ep, k) for k in ("observations", "actions", "rewards", "terminals",
                                              "timeouts", "next_observations")}
        attrs = {k: v for k, v in ep.meta.items() if isinstance(v, (str, int, float, bool))}
        write_nav1d_hdf5(data_file, arrays, attrs)
        plot_nav1d_dataset(arrays, args.layout_seed, data_file.with_suffix(".png"),
                           title=f"Nav1D {args.dataset}: 50 of {len(ep)} episodes")
    _log(f"data: {len(task.episodes)} episodes of {task_name} (mean return "
         f"{float(task.episodes.returns().mean()):.2f}, optimum {task.ref_max:.2f}) -> {data_file}")
    timings["data"] = time.perf_counter() - t0

    from ..train.trainer import resolve_device

    with SideJobs(args.parallel and resolve_device(args.device).type == "cpu") as jobs:
        return _pipeline(args, P, out, task, task_name, timings, jobs)


def _pipeline(args: RunNav1DArgs, P: dict, out: Path, task, task_name: str, timings: dict,
              jobs: SideJobs) -> dict:
    """Steps 2-6 of :func:`run_nav1d`; ``jobs`` runs the critic and the evaluations."""
    import torch

    from ..align.conditions import RolloutConditions
    from ..align.lora import merged_copy
    from ..align.runner import AlignConfig, align
    from ..align.sequence import SequenceConfig
    from ..commands.train import TrainArgs, train_model
    from ..eval.evaluate import evaluate
    from ..models.base import ControlModel
    from ..models.critic import CriticConfig, load_critic
    from ..models.dynamics import DynamicsConfig, DynamicsModel
    from ..report.nav1d_report import write_report

    # 2-3. critic (in the side process) beside the foundation (here). What the critic and
    # the alignment may assume is measured from the data first: the band of actions the
    # data took near each state, and how much of the action space it covers.
    behavior, coverage = _behavior_band(task.episodes, out / "behavior", args)
    covered = coverage >= COVERED
    _log(f"data: action coverage {coverage:.2f} ("
         + ("most actions tried near every state: the critic is trusted everywhere"
            if covered else "the critic is distrusted off the data's actions") + ")")
    cdir, fdir = out / "critic", out / "foundation"
    critic_trained = not (cdir / "config.json").exists()
    if critic_trained:
        backup = (dict(CRITIC_BACKUP, backup_bf16=bf16_is_fast(args.device))
                  if covered else {})
        n_critics, critic_steps = critic_sizes(args)
        _log(f"critic: training {n_critics} IQL critic{'s' if n_critics > 1 else ''} for "
             f"{critic_steps} steps"
             + (f" (max backup over a grid of {backup['backup_actions']}+"
                f"{backup['backup_refine']} actions)" if backup else "")
             + (" in a second process, beside the foundation" if jobs.enabled else ""))
        ccfg = CriticConfig(steps=critic_steps, seed=args.seed, expectile=CRITIC_EXPECTILE,
                            depth=CRITIC_DEPTH, hidden=CRITIC_HIDDEN, ensemble=n_critics,
                            device=args.device, **backup)
        critic_future = jobs.submit(critic_job, task_name,
                                    dict(layout_seed=args.layout_seed,
                                         episodes=P["data_episodes"], seed=args.seed),
                                    ccfg, str(cdir))
    rollouts = (args.rollout_conditions if args.rollout_conditions is not None
                else ROLLOUT_CONDITIONS if covered else 0.0)
    ddir = out / "dynamics"
    dcfg = DynamicsConfig(steps=P.get("dynamics_steps", DynamicsConfig.steps), seed=args.seed,
                          device=args.device)
    dynamics_trained = rollouts > 0 and not (ddir / "config.json").exists()
    if dynamics_trained:  # queued after the critic: it runs while the foundation trains
        dyn_future = jobs.submit(dynamics_job, task_name,
                                 dict(layout_seed=args.layout_seed,
                                      episodes=P["data_episodes"], seed=args.seed),
                                 dcfg, str(ddir))
    t0 = time.perf_counter()
    if (fdir / "config.json").exists():
        model = ControlModel.load(fdir, device=args.device)
        _log(f"foundation: loaded {fdir}")
        trained = False
    else:
        trained = True
        targs = TrainArgs(out=fdir, task=task_name, model=args.model, process=args.process,
                          layout_seed=args.layout_seed, episodes=P["data_episodes"],
                          steps=P["foundation_steps"], seed=args.seed, device=args.device,
                          state_cond=args.model in ("diffuser", "dd"),
                          action_horizon=DP_ACTION_HORIZON if args.model == "dp" else None,
                          cond_fourier=COND_FOURIER, progress=args.progress)
        _log(f"foundation: training {args.model}/{args.process} for {targs.steps} steps")
        model, _, _ = train_model(targs)
    foundation_s = _remember(out, "foundation_train_s", time.perf_counter() - t0, trained)
    if critic_trained:
        if jobs.enabled:
            _log("critic: waiting for the second process")
        critic_s = critic_future.result()
    t0 = time.perf_counter()
    critic = load_critic(cdir, device=args.device)
    if not critic_trained:  # loaded: what _remember stores only if the first run did not
        critic_s = time.perf_counter() - t0
    _log(f"critic: {'trained' if critic_trained else 'loaded'} {cdir}")
    _remember(out, "critic_train_s", critic_s, critic_trained)
    dynamics = None
    if rollouts > 0:
        if dynamics_trained:
            _remember(out, "dynamics_train_s", dyn_future.result(), True)
        dynamics = DynamicsModel.load(ddir, device=args.device)
        _log(f"dynamics: {'trained' if dynamics_trained else 'loaded'} {ddir}")
    greedy = jobs.submit(greedy_job, str(cdir), args.layout_seed)

    episodes = args.eval_episodes or P["eval_episodes"]
    pending: list[list] = []  # [name, candidates, wall_s, future, same_as], in stage order
    evaluated: dict[str, str] = {}  # adapter fingerprint -> stage that had it
    stages: list[dict] = []

    def run_eval(name: str, candidates: int, wall_s: float, n_episodes: int | None = None,
                 net=None, model_obj=None) -> None:
        """Evaluate a stage: the foundation (``net`` None), the foundation with an aligned
        ``net``'s weights (in the side process), or another model (``model_obj``, here)."""
        edir = out / "eval" / name
        cached, weights = edir / "eval.json", edir / STAGE_WEIGHTS
        key = adapter_fingerprint(net) if net is not None else None
        same_as = None
        if not cached.exists() and net is not None:
            # kept until evaluated: a killed run evaluates the stage from them on resume
            # (the adapter folded into a plain copy of the net: faster to sample)
            save_stage_weights(merged_copy(net), weights)
        if cached.exists():
            fut = done(json.loads(cached.read_text()))
        elif key in evaluated:
            # the stage kept the adapter of an earlier stage (no update beat it): same
            # model, same seed, same rollouts -- that evaluation is copied at the end
            fut, same_as = None, evaluated[key]
        else:
            kw = dict(episodes=n_episodes or episodes, candidates=candidates,
                      out_dir=str(edir), seed=args.seed, device=args.device)
            if model_obj is not None:
                fut = done(evaluate(model_obj, critic=critic, **kw))
            else:
                if net is None and not name.startswith("reference"):
                    if not weights.exists():
                        raise FileNotFoundError(
                            f"stage {name!r} has neither {cached} nor {weights}: its adapter "
                            f"is gone; delete {out / 'align'} to run the alignment again")
                fut = jobs.submit(eval_job, str(fdir), str(cdir),
                                  str(weights) if weights.exists() else None, **kw)
        if key is not None:
            evaluated.setdefault(key, name)
        pending.append([name, candidates, wall_s, fut, same_as])
        collect(wait=False)

    def collect(wait: bool) -> None:
        """Turn finished evaluations into report rows, in stage order."""
        from ..atomic import write_json

        while len(stages) < len(pending):
            name, candidates, wall_s, fut, same_as = pending[len(stages)]
            if same_as is not None:
                edir, same = out / "eval" / name, out / "eval" / same_as
                res = {**json.loads((same / "eval.json").read_text()), "same_model_as": same_as}
                if (same / "eval.png").exists():
                    edir.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(same / "eval.png", edir / "eval.png")
                write_json(edir / "eval.json", res)
                (edir / STAGE_WEIGHTS).unlink(missing_ok=True)
            elif wait or fut.done():
                res = fut.result()
                (out / "eval" / name / STAGE_WEIGHTS).unlink(missing_ok=True)  # evaluated
            else:
                return
            row = {"name": name, "return_mean": res["return_mean"],
                   "return_std": res["return_std"], "normalized": res["normalized"],
                   "coherency": res["coherency"], "entropy": res["entropy"],
                   "candidates": candidates, "denoise_steps": res["steps"], "wall_s": wall_s,
                   "eval_s": res.get("wall_seconds"), "eval_episodes": res.get("episodes"),
                   "returns": res.get("returns"),
                   "picture": str(out / "eval" / name / "eval.png")}
            stages.append(row)
            _log(f"stage {name}: return {row['return_mean']:.2f} ± {row['return_std']:.2f} "
                 f"({row['normalized']:.1f}% of optimum), coherency {_fmt(row['coherency'])}, "
                 f"entropy {_fmt(row['entropy'])}")

    # 4. reference stages
    run_eval("reference", 1, foundation_s)
    # best-of-N is N times dearer per decision: evaluated on fewer episodes
    run_eval(f"reference@{P['ref_candidates']}", P["ref_candidates"], foundation_s,
             n_episodes=min(episodes, P["ref_eval_episodes"]))

    # 5. alignment sequence (+ cascade)
    seq = SequenceConfig(methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
                         passes=args.passes or P["passes"], max_iters=P["max_iters"],
                         eval_every=P["eval_every"], patience=P["patience"])
    acfg = AlignConfig(sequence=seq, conditions=P["conditions"],
                       val_conditions=P["val_conditions"], seed=args.seed, lora_rank=LORA_RANK,
                       lora_alpha=2.0 * LORA_RANK)
    acfg.dpo = replace(acfg.dpo, max_updates=P.get("dpo_updates"), pair_source=args.dpo_pairs)
    acfg.sft = replace(acfg.sft, max_updates=P.get("sft_rounds"))
    acfg.rl = replace(acfg.rl, max_updates=P.get("rl_updates"),
                      eval_every=P.get("rl_eval_every"))
    if covered:  # the critic rates every action from data: no support to leave
        acfg.sequence = replace(seq, guard=replace(seq.guard, support_frac=1.0))
        acfg.sft = replace(acfg.sft, likelihood_quantile=0.0, **SFT_ACTION_SEARCH)
        acfg.rl = replace(acfg.rl, **RL_AFTER_SFT)
    if rollouts > 0:
        acfg.rollouts = RolloutConditions(fraction=rollouts, dynamics=dcfg)
    if args.online:
        from ..align.online import OnlineConfig

        acfg.online = OnlineConfig()
    if args.preset == "quick":  # smoke-test sizes: a few conditions and candidates per update
        acfg.rl = replace(acfg.rl, states_per_iter=8, group_size=4, ppo_epochs=1)
        acfg.dpo = replace(acfg.dpo, states_per_iter=16, candidates=4, updates_per_batch=1)
        acfg.sft = replace(acfg.sft, states_per_round=16, candidates=8, epochs=2)
    if args.cascade:
        acfg.cascade = replace(acfg.cascade, rounds=P["cascade_rounds"],
                               steps_per_round=P["cascade_steps"],
                               states_per_round=8 if args.preset == "quick" else 32)
    else:
        acfg.cascade = None
    t_align = time.perf_counter()
    adir = out / "align"
    if (adir / "align.json").exists():  # finished earlier: reuse adapter, cascade, evaluations
        from ..align.runner import reuse_alignment

        events, stage_walls, cascade_model, cascade_s, final = reuse_alignment(
            model, adir, args.cascade)
        _log(f"alignment: loaded {adir}")
        for name, wall in stage_walls:
            run_eval(name, 1, wall)  # their eval.json are there from the first run
        if cascade_model is not None:
            run_eval("cascade", 1, cascade_s, model_obj=cascade_model)
        align_train_s = sum(w for _, w in stage_walls) + cascade_s
    else:
        result = align(model, critic, task.episodes, acfg, out_dir=adir,
                       on_stage_end=lambda st, net: run_eval(st.name, 1, st.wall_s, net=net),
                       progress=args.progress, make_env=task.make_env, on_update=jobs.poll,
                       dynamics=dynamics, behavior=behavior)
        if result.cascade is not None:
            run_eval("cascade", 1, result.cascade_wall_s, model_obj=result.cascade.merged())
        events, final = result.events, result.final
        align_train_s = sum(st.wall_s for st in result.stages) + result.cascade_wall_s
    collect(wait=True)
    timings["alignment"] = time.perf_counter() - t_align
    ceiling = greedy.result()
    _log(f"critic: its greedy policy reaches {ceiling['greedy_normalized']:.1f}% of the "
         "optimum (the ceiling of a one-candidate policy aligned to it)")
    warnings = critic_warnings(stages[0], stages[1])
    for w in warnings:
        _log(f"warning: {w['reason']}")

    report = {
        "task": task_name, "dataset": args.dataset, "model": args.model,
        "process": args.process, "layout_seed": args.layout_seed, "preset": args.preset,
        "optimal_return": task.ref_max,
        "dataset_return": float(task.episodes.returns().mean()),
        "critic_greedy_normalized": ceiling["greedy_normalized"],
        "critic_ensemble": int(critic.cfg.ensemble), "critic_steps": int(critic.cfg.steps),
        "online": args.online, "dpo_pairs": args.dpo_pairs,
        "stages": stages,
        "final": _final(final, stages),
        "action_coverage": coverage,
        "events": warnings + events,
        "alignment_seconds": align_train_s,
        "foundation_seconds": foundation_s,
        "alignment_fraction_of_foundation": align_train_s / max(foundation_s, 1e-9),
        "timings": {**timings, **_remembered(out)},
        "device": str(torch.device(args.device)),
    }
    write_report(out, report)
    _log(f"report: {out / 'report.md'} (alignment took {align_train_s:.0f}s = "
         f"{report['alignment_fraction_of_foundation']:.2f}x foundation training)")
    return report


def _behavior_band(episodes, where: Path, args: RunNav1DArgs):
    """The data's action band (trained here, or loaded from ``where``) and its coverage on
    the dataset's states."""
    import numpy as np
    import torch

    from ..models.behavior import BehaviorConfig, BehaviorModel, train_behavior

    if (where / "config.json").exists():
        behavior = BehaviorModel.load(where, device=args.device)
    else:
        behavior = train_behavior(episodes, BehaviorConfig(seed=args.seed, device=args.device),
                                  out_dir=where, progress=args.progress)
    idx = np.random.default_rng(args.seed).integers(0, len(episodes.observations), 4096)
    obs = torch.as_tensor(episodes.observations[idx], dtype=torch.float32)
    return behavior, behavior.coverage(obs)


def _final(final: dict, stages: list[dict]) -> dict:
    """The report's ``final``: the stage chosen on held-out states (``align.json``), as the
    name of one of the report's stages, and why."""
    names = [st["name"] for st in stages]
    name = final.get("stage", "reference")
    if name not in names:  # e.g. the cascade chosen but not evaluated
        name, why = "reference", f"{name!r} was chosen but has no evaluation in this report"
    else:
        why = final.get("reason", "")
    return {"stage": name, "reason": why, "heldout": final.get("heldout", {})}


def critic_warnings(reference: dict, best_of_n: dict) -> list[dict]:
    """A warning event when ranking the reference's candidates by the critic LOWERS the return:
    the critic then prefers worse actions, and aligning to it is expected to hurt (seen with
    expert data, whose critic never saw other actions)."""
    if best_of_n["normalized"] >= reference["normalized"]:
        return []
    return [{"kind": "warning", "stage": best_of_n["name"],
             "reason": (f"the critic's best of {best_of_n['candidates']} scores "
                        f"{best_of_n['normalized']:.1f}% of the optimum, below one reference "
                        f"sample ({reference['normalized']:.1f}%): this critic ranks actions "
                        "worse than chance, so alignment to it is expected to lower the "
                        "return")}]


def adapter_fingerprint(net) -> str:
    """A hash of the LoRA parameters of ``net``: equal for equal adapters."""
    h = hashlib.sha1()
    for name, p in net.named_parameters():
        if "lora_" in name:
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _remembered(out: Path) -> dict:
    p = out / "timings.json"
    return json.loads(p.read_text()) if p.exists() else {}


def _remember(out: Path, key: str, seconds: float, ran: bool) -> float:
    """Store a step's wall time when the step ran; when it was loaded, read the stored one."""
    from ..atomic import write_json

    known = _remembered(out)
    if ran or key not in known:
        known[key] = seconds
        write_json(out / "timings.json", known)
    return float(known[key])
