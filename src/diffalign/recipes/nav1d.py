"""The Nav1D recipe (``nav1d/{partial,full,expert}``) and its presets.

The measurements behind these settings are in docs/results.md and the design behind them in
docs/design.md §3-§4 and §9; each line below gives the reason in one sentence.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .base import Recipe

__all__ = ["NAV1D_PRESETS", "Nav1DRecipe"]


@dataclass(frozen=True)
class Nav1DRecipe(Recipe):
    """The ``default`` preset: under 10 minutes on 2 CPU cores."""

    foundation_steps: int = 2500
    """Keeps the default job under 10 minutes on 2 CPU cores."""
    critic_steps: int = 4500
    """Two width-128 critics of this length train within the foundation's time."""
    critic_ensemble: int = 2
    """One critic's quality depends much on its seed; the mean of two is steadier."""
    conditions: int = 4096
    """With 512 states SFT stopped about 8 points of the optimum lower."""
    val_conditions: int = 512
    """128 validation states kept a worse SFT adapter in one run of three."""
    max_updates: int = 120
    """Caps every method's updates per pass; the per-method caps below bind first."""
    patience: int = 10
    """Validation rewards are noisy: a method stops after 10 checks without gain."""
    rl_updates: int | None = 50
    """After SFT, 50 RL updates did as well as 100 in half the time."""
    rl_eval_every: int | None = 10
    """RL's updates are cheap; validating each 10th keeps its cost down."""
    dpo_updates: int | None = 4
    """DPO before SFT changed nothing with 8 updates instead of 4."""
    sft_updates: int | None = 20
    """SFT's rounds are the alignment's dearest part, and 20 its least: with 10 the final
    stage fell 6-10 points on some cells (docs/results.md, "Alignment time")."""
    eval_episodes: int = 64
    """64 episodes per stage keep the job near 10 minutes (the paper preset takes 200)."""
    select_episodes: int = 32
    """The critic kept the reference on expert data where aligned stages gained 5-10 points
    in the environment, and chose a Decision Diffuser stage 16 points below it on partial."""
    steps_sweep_episodes: int = 32
    """Nav1D episodes are cheap: the reference and final stage at 1, 2, 5 and 20 steps."""
    planner_state_cond: bool = True
    """The best action is a sharp function of (x, t): the planner sees the state everywhere."""
    cond_fourier: int = 16
    """A policy regressed on the critic's argmax gained 12 points with Fourier features of t."""
    dp_action_horizon: int | None = 1
    """The critic scores a sample by its first action: the others would run unranked."""
    critic_expectile: float = 0.95
    """On nav1d/full the greedy policy of the critic was best with 0.95 among 0.7-0.99."""
    critic_hidden: int = 128
    """A third of width 256's step time, so two critics train beside the foundation."""
    critic_depth: int = 3
    """Three hidden layers beat two and four on nav1d/full."""
    lora_rank: int = 16
    """Rank 16 gained a few points at most over 8 and 32 in re-alignments."""
    covered_backup_actions: int = 8
    """A max backup over a grid of actions beat the expectile by about 10 points."""
    covered_backup_refine: int = 8
    """Refining the grid's best cell matched 32 actions at half their cost."""
    covered_backup_states: int = 256
    """The max backup on every state of the batch beat it on 64 of them."""
    covered_backup_proposals: str = "grid"
    """One action dimension: an even grid covers it."""
    covered_backup_select: str = "first"
    """The first twin choosing halves the cost; the min of the twins still values it."""
    covered_sft_search: bool = True
    """With every action in the data the winner can be the critic's argmax, not a sample."""
    covered_rl: bool = True
    """RL after SFT narrows the first action's spread around the critic's argmax."""
    covered_rollout_conditions: float = 0.5
    """The aligned model erred on the states it visits; half the conditions come from there."""


_DEFAULT = Nav1DRecipe()

NAV1D_PRESETS: dict[str, Nav1DRecipe] = {
    "default": _DEFAULT,
    # a smoke test of every step: about two minutes on 2 CPU cores
    "quick": replace(_DEFAULT, data_episodes=200, foundation_steps=400, critic_steps=800,
                     dynamics_steps=300, max_updates=4, eval_every=2, patience=2,
                     rl_updates=None, rl_eval_every=None, dpo_updates=None, sft_updates=None,
                     eval_episodes=8, ref_eval_episodes=4, steps_sweep_episodes=2,
                     select_episodes=2,
                     cascade_rounds=1, cascade_steps=10,
                     cascade_states=8, conditions=128, val_conditions=32, rl_states=8,
                     rl_group=4, rl_ppo_epochs=1, dpo_states=16, dpo_candidates=4,
                     dpo_updates_per_batch=1, sft_states=16, sft_candidates=8, sft_epochs=2),
    # longer training and more passes: meant for a GPU
    "paper": replace(_DEFAULT, foundation_steps=10000, critic_steps=10000, max_updates=240,
                     rl_updates=None, rl_eval_every=None, dpo_updates=None, sft_updates=None,
                     passes=3, eval_episodes=200, ref_eval_episodes=100, cascade_rounds=10,
                     cascade_steps=50, conditions=8192),
}
"""The run sizes of ``diffalign run nav1d --preset``."""
