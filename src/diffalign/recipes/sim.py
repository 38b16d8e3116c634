"""The recipe of simulator tasks (``metaworld/<task>/<dataset>``, ``mujoco/<task>/<dataset>``,
dataset files and Minari ids) and its presets.

Where a setting is not redeclared here it is the library's default (IQL's published critic,
the models' own horizons); Nav1D's tuned settings are not carried over unmeasured.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .base import Recipe

__all__ = ["SIM_PRESETS", "SimRecipe"]


@dataclass(frozen=True)
class SimRecipe(Recipe):
    """The ``default`` preset of simulator tasks."""

    passes: int = 2
    """A second pass lets each method start from the others' adapter."""
    max_updates: int = 24
    """Simulator decisions are dearer than Nav1D's; 24 updates per method and pass."""
    eval_every: int = 3
    """Validations every 3 updates: a method's few updates are each checked soon."""
    rl_kl: float | None = 0.5
    """With 0.005 the aligned DP on MetaWorld button-press fell from 100% success to 0."""
    eval_episodes: int = 20
    """Episodes are 10-15 times Nav1D's 32 steps; 20 per stage bound the evaluation time."""
    ref_candidates: int = 16
    """Best of 16: a 64-candidate stage is 64 times dearer per decision."""
    ref_eval_episodes: int = 10
    """Half the stages' episodes: the best-of-N stage is N times dearer per decision."""
    sft_source: str = "reference"
    """On MetaWorld button-press (mixed data) SFT on the adapter's own winners saturated the
    actions (45% success to 0); on the reference's, 45% to 95% after two passes."""
    select_episodes: int = 20
    """A critic's held-out gain went with a fall from 45% success to 0 on MetaWorld (the
    actions saturated): the simulator itself judges the stages, from held-out starts."""
    planner_state_cond: bool = True
    """The Diffuser on MetaWorld button-press succeeded in 20% of episodes with the present
    state as a condition, 15% without (10000 steps, action weight 10; docs/results.md)."""
    planner_action_weight: float = 10.0
    """Janner et al.'s weight on the executed action. Without it the Diffuser's loss left
    the action features unlearned on MetaWorld and its first action did not depend on the
    state: 0% success after 3000 or 10000 steps, whatever the prediction target (ε, x0, v)."""
    planner_steps_factor: float = 3.0
    """Planners train 9000 steps: with 3000 the Diffuser succeeded in 0% of button-press
    episodes even with the action weight and the state condition, with 10000 in 20%."""


_DEFAULT = SimRecipe()

SIM_PRESETS: dict[str, SimRecipe] = {
    "default": _DEFAULT,
    # a smoke test of every step on a few collected episodes
    "quick": replace(_DEFAULT, foundation_steps=100, planner_steps_factor=1.0,
                     critic_steps=100, behavior_steps=100,
                     dynamics_steps=100, denoise_steps=5, passes=1, max_updates=2, eval_every=1,
                     patience=1, conditions=64, val_conditions=16, eval_episodes=2,
                     ref_candidates=4, ref_eval_episodes=2, select_episodes=2,
                     cascade_rounds=1, cascade_steps=5, cascade_states=8,
                     rl_states=8, rl_group=4, rl_ppo_epochs=1, dpo_states=8,
                     dpo_candidates=4, dpo_updates_per_batch=1, sft_states=8, sft_candidates=4,
                     sft_epochs=1),
    # longer training and more episodes: meant for a GPU
    "paper": replace(_DEFAULT, foundation_steps=20000, planner_steps_factor=1.0,
                     critic_steps=20000, critic_ensemble=2,
                     max_updates=60, eval_episodes=50, ref_eval_episodes=25, cascade_rounds=6,
                     conditions=2048, val_conditions=512),
}
"""The run sizes of ``diffalign run TASK --preset`` for simulator tasks."""
