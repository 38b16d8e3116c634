"""``diffalign run TASK`` and ``diffalign run nav1d``: the whole pipeline on a task, data →
foundation → critic → alignment → cascade → evaluation → report.

Thin calls into :func:`diffalign.pipeline.run_pipeline` with the task's recipe
(:mod:`diffalign.recipes`); see :mod:`diffalign.pipeline.run` for what a run writes and how it
resumes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import tyro

from ..errors import UserError

__all__ = ["RunArgs", "RunNav1DArgs", "run_main", "run_nav1d"]


@dataclass(kw_only=True)
class AlignFlags:
    """Alignment settings as flags (``run``, ``run nav1d`` and ``bench``): each, when given,
    overrides the recipe field of the same name."""

    rl_algo: Literal["qvpg", "ppo", "reinforce"] | None = None
    """RL: "qvpg" backpropagates the critic's reward through the last K denoising steps;
    "ppo" and "reinforce" take the policy gradient with each state's group of samples as the
    baseline (where the recipe samples one per state, as on partial/full data, they sample
    the recipe's rl_pg_group, 8). Default from the recipe: qvpg."""
    rl_grad_k: int | None = None
    """RL (QV-PG): backpropagate through the last K denoising steps (default 3); with
    --rl-grad-k-max, the lower end of K's range (default 1 there)."""
    rl_grad_k_max: int | None = None
    """RL (QV-PG): draw K uniformly from [--rl-grad-k, this] for each update; unset: K is
    fixed."""
    rl_credit: Literal["none", "decreasing", "x0_similarity"] | None = None
    """RL: credit of each denoising step: "decreasing" (γ^k, γ = 0.9) or "x0_similarity"
    (how close each step's x0-prediction is to the final sample). Default from the recipe:
    none."""
    rl_entropy_coef: float | None = None
    """RL: weight c of the entropy bonus E[R] + c·H (nearest-neighbour estimate over each
    state's samples). Default from the recipe: 0 (off)."""
    sft_likelihood: Literal["data", "current"] | None = None
    """SFT: the out-of-distribution guard's floor, a quantile of the reference's likelihood
    of the dataset's windows ("data") or of the round's own candidates ("current"); the
    guard is off on data that tried most actions (partial, full). Default from the recipe:
    data."""
    cascade_passes: int | None = None
    """Cascade: passes of the refiner at inference; the report gives the validation reward,
    coherency and distance after each pass (align.json cascade.pass_metrics). Default from
    the recipe: 1."""

    def alignment_overrides(self) -> dict:
        """The recipe fields these flags set: only the flags given."""
        names = ("rl_algo", "rl_grad_k", "rl_grad_k_max", "rl_credit", "rl_entropy_coef",
                 "sft_likelihood", "cascade_passes")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}

    def with_flags(self, recipe, methods: str = "dpo,sft,rl", seed: int = 0):
        """``recipe`` with :meth:`alignment_overrides` applied; a ``UserError`` names a bad
        value, also one that only the alignment's configs refuse (checked for data with and
        without coverage)."""
        from ..recipes import with_overrides

        recipe = with_overrides(recipe, self.alignment_overrides())
        order = tuple(m.strip() for m in methods.split(",") if m.strip())
        for covered in (False, True):
            try:
                recipe.align_config(covered, order, seed)
            except ValueError as e:
                raise UserError(str(e)) from None
        return recipe


@dataclass(kw_only=True)
class _RunFlags(AlignFlags):
    """The flags both run commands share."""

    model: Literal["diffuser", "dd", "dp"] = "diffuser"
    """Foundation model: Diffuser, Decision Diffuser or Diffusion Policy."""
    process: Literal["ddpm", "ddim", "sm", "fm"] = "ddpm"
    """Diffusion process."""
    layout_seed: int = 0
    """Nav1D reward layout (Nav1D tasks only)."""
    preset: Literal["quick", "default", "paper"] = "default"
    """Run size: quick (a smoke test), default, paper (meant for a GPU)."""
    methods: str = "dpo,sft,rl"
    """Alignment methods in order, comma-separated (rl, dpo, sft). The default runs RL last,
    from the SFT adapter; rl,dpo,sft is the paper's order."""
    passes: int | None = None
    """Maximum passes over the methods (default from the preset)."""
    cascade: bool = True
    """Train and evaluate the cascaded refiner after alignment."""
    dpo_pairs: Literal["reference", "current", "dataset"] = "reference"
    """DPO pairs: reference or current-model samples ranked by the critic, or dataset
    windows ranked by their return. (experimental for "dataset": DPO alone with it reached
    41.9% of the optimum on nav1d/full, below one reference sample's 45.5%)"""
    online: bool = False
    """Online fine-tuning during alignment: every 8 updates, 16 episodes of the current
    model join the critic's buffer and the critic trains 200 more steps (OUT/align/
    critic_online/). Off by default: the paper's setting is offline. (experimental: on
    nav1d/full 64.0% of the optimum against 64.2% offline, in 6x the alignment time)"""
    rollout_conditions: float | None = None
    """Share of the alignment's conditions taken from rollouts of the critic's greedy policy
    through dynamics learned from the dataset (OUT/dynamics/); default from the recipe: 0.5
    on Nav1D data that tried most actions (partial, full), else 0 (dataset states only)."""
    critic_ensemble: int | None = None
    """IQL critics trained side by side, their mean Q used (default from the preset). One
    critic's quality depends much on its seed; the mean of two is steadier across layouts."""
    critic_steps: int | None = None
    """Training steps of each critic (default from the preset)."""
    eval_episodes: int | None = None
    """Evaluation episodes per stage (default from the preset)."""
    deploy_steps: int | None = None
    """Denoising steps of the policy you will deploy: the alignment, every stage's
    evaluation and the exported policy sample with this many, so the adapter is trained for
    them (the recipe's denoise_steps; default: the process's own, 20 for DDPM, 10 for DDIM). On
    nav1d/full, 2 steps gave 94.0% of the optimum at about 10x the 20-step decision rate."""
    seed: int = 0
    """Seed of every step."""
    device: str = "cpu"
    """Torch device: cpu, cuda or auto."""
    progress: bool = True
    """Show progress bars."""
    parallel: bool = True
    """On a CPU, use a second process (one torch thread each): the critic trains beside the
    foundation and each stage is evaluated beside the alignment (diffalign.pipeline.jobs).
    ``--no-parallel`` runs everything here, one step after another."""
    overwrite: bool = False
    """Delete what an earlier run left in --out first (its data, models, alignment,
    evaluations and report), instead of resuming it. Without it, a run over a directory
    made with other settings stops and names them."""

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
        if self.deploy_steps is not None and self.deploy_steps < 1:
            raise UserError(f"deploy_steps must be >= 1, got deploy_steps={self.deploy_steps}")
        if self.eval_episodes is not None and self.eval_episodes < 1:
            raise UserError(f"eval_episodes must be >= 1, got eval_episodes={self.eval_episodes}")
        if self.layout_seed < 0:
            raise UserError(f"layout_seed must be >= 0, got layout_seed={self.layout_seed}")
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"out {str(self.out)!r} exists and is not a directory")

    def options(self, task: str, recipe, **kw):
        """The pipeline's :class:`~diffalign.pipeline.RunOptions` of these flags."""
        from dataclasses import replace

        from ..pipeline import RunOptions

        if self.deploy_steps is not None:
            recipe = replace(recipe, denoise_steps=self.deploy_steps)
        if recipe.denoise_steps is not None:  # the process's own check, before any work
            from ..models.registry import PROCESS_DEFAULTS
            from ..processes import build_process

            try:
                build_process(self.process, **{**PROCESS_DEFAULTS[self.process],
                                               "default_steps": recipe.denoise_steps})
            except ValueError as e:
                raise UserError(f"deploy_steps={recipe.denoise_steps} does not fit process "
                                f"{self.process!r}: {e}") from e
        return RunOptions(
            task=task, out=self.out, recipe=recipe, model=self.model, process=self.process,
            preset=self.preset, layout_seed=self.layout_seed,
            methods=tuple(m.strip() for m in self.methods.split(",") if m.strip()),
            passes=self.passes, cascade=self.cascade, dpo_pairs=self.dpo_pairs,
            online=self.online, rollout_conditions=self.rollout_conditions,
            critic_ensemble=self.critic_ensemble, critic_steps=self.critic_steps,
            eval_episodes=self.eval_episodes, seed=self.seed, device=self.device,
            progress=self.progress, parallel=self.parallel, overwrite=self.overwrite, **kw)


@dataclass(kw_only=True)
class RunNav1DArgs(_RunFlags):
    """Run the whole pipeline on Nav1D and write a report of what alignment changed."""

    out: Path = Path("runs/nav1d")
    """Output directory (re-running resumes and skips finished steps)."""
    dataset: Literal["partial", "full", "expert"] = "full"
    """Offline dataset: random policy from part of the line, from all of it, or expert."""
    def __post_init__(self):
        super().__post_init__()
        self.recipe()  # the recipe's own checks of the flags (e.g. --rl-grad-k with ppo)

    def recipe(self):
        """The preset's :class:`~diffalign.recipes.Nav1DRecipe` with the flags given."""
        from ..recipes import NAV1D_PRESETS

        return self.with_flags(NAV1D_PRESETS[self.preset], self.methods, self.seed)


def run_nav1d(args: RunNav1DArgs) -> dict:
    """Entry point of ``diffalign run nav1d``: the pipeline on ``nav1d/<dataset>`` with the
    Nav1D recipe of ``--preset`` and the ``--rl-*``/``--sft-likelihood`` flags; returns
    report.json."""
    from ..pipeline import run_pipeline

    return run_pipeline(args.options(f"nav1d/{args.dataset}", args.recipe()))


@dataclass
class RunArgs(_RunFlags):
    """Run the whole pipeline on a task and write a report of what alignment changed."""

    task: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="TASK")]
    """nav1d/{partial,full,expert}; FAMILY/NAME/DATASET (metaworld/button-press-v3/expert,
    mujoco/hopper/medium: see `diffalign collect`); a D4RL/robomimic HDF5 file; or a local
    Minari dataset id."""
    out: Path = field(kw_only=True)
    """Output directory (re-running resumes and skips finished steps)."""
    recipe: str = field(default="", kw_only=True)
    """Overrides of the preset's recipe, KEY=VALUE,... (e.g. foundation_steps=1000,
    eval_episodes=10; the keys are the fields of diffalign.recipes.Recipe)."""
    download: bool = field(default=False, kw_only=True)
    """Download a Minari task (FAMILY/NAME/DATASET-vN) that is not found locally."""

    def __post_init__(self):
        super().__post_init__()
        from ..recipes import recipe_for, with_overrides

        if not self.task.strip():
            raise UserError("task must name a task, got task=''")
        if self.task.startswith("nav1d/") and self.task.split("/", 1)[1] not in (
                "partial", "full", "expert"):
            raise UserError(f"unknown Nav1D dataset in task {self.task!r}; choose one of "
                            "nav1d/partial, nav1d/full, nav1d/expert")
        self.with_flags(with_overrides(recipe_for(self.task, self.preset), self.recipe),
                        self.methods, self.seed)  # names a bad key or value


def run_main(args: RunArgs) -> dict:
    """Entry point of ``diffalign run TASK``; returns report.json."""
    from ..pipeline import run_pipeline
    from ..recipes import recipe_for, with_overrides

    recipe = args.with_flags(with_overrides(recipe_for(args.task, args.preset), args.recipe),
                             args.methods, args.seed)
    return run_pipeline(args.options(args.task, recipe, download=args.download))
