"""The recipe of a run: one frozen dataclass of sizes and settings, and the library configs
built from it.

A field's docstring says what it sets; a family's subclass (:mod:`.nav1d`, :mod:`.sim`)
redeclares the fields it sets otherwise, each with a one-line reason. ``None`` leaves the
library's own default. What depends on the data is not a field: the pipeline measures the
data's action coverage and passes ``covered`` (coverage >= :attr:`Recipe.covered_at`) to the
builders, which then use the ``covered_*`` settings.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

__all__ = ["RENAMED_FIELDS", "Recipe", "renamed_fields", "with_overrides"]


@dataclass(frozen=True)
class Recipe:
    """Sizes and settings of one run of the pipeline (library defaults where ``None``)."""

    # ---------------------------------------------------------------- sizes
    data_episodes: int = 1000
    """Episodes of a generated dataset (Nav1D); a collected dataset is used whole."""
    foundation_steps: int = 3000
    """Optimiser steps of the foundation model."""
    planner_steps_factor: float = 1.0
    """A planner foundation (diffuser, dd) trains ``round(factor × foundation_steps)``
    steps: its plans hold every state feature besides the actions."""
    foundation_batch: int = 64
    """Batch size of the foundation model."""
    critic_steps: int = 3000
    """Optimiser steps of each critic."""
    critic_ensemble: int = 1
    """Critics trained side by side; their mean Q is used."""
    behavior_steps: int | None = None
    """Optimiser steps of the data's action band (``BehaviorConfig.steps``)."""
    dynamics_steps: int | None = None
    """Optimiser steps of the dynamics model of the rollout conditions."""
    conditions: int = 512
    """Dataset states the alignment optimises on."""
    val_conditions: int = 128
    """Held-out states of the validation reward that keeps each stage's best adapter."""
    passes: int = 1
    """Maximum passes over the alignment methods."""
    max_updates: int = 40
    """Maximum updates of one method in one pass."""
    eval_every: int = 4
    """Updates between validations."""
    patience: int = 3
    """Validations without gain before a method stops."""
    rl_updates: int | None = None
    """Cap on RL's updates per pass, below ``max_updates``."""
    rl_eval_every: int | None = None
    """Updates between RL's validations (its updates are cheap)."""
    dpo_updates: int | None = None
    """Cap on DPO's updates per pass."""
    sft_updates: int | None = None
    """Cap on SFT's updates (rounds) per pass."""
    rl_states: int | None = None
    """RL: conditions per update (applied after the ``covered_*`` settings)."""
    rl_group: int | None = None
    """RL: samples per condition."""
    rl_ppo_epochs: int | None = None
    """RL: epochs over each batch."""
    rl_kl: float | None = None
    """RL: weight of the KL to the reference."""
    rl_group_scale: bool = False
    """RL: divide QV-PG's reward by its spread over each condition's group."""
    rl_algo: str = "qvpg"
    """RL: "qvpg" (reward gradient through the last K steps), "ppo" or "reinforce"
    (``RLConfig.algo``)."""
    rl_grad_k: int | None = None
    """RL (QV-PG): backpropagate through the last K steps; with ``rl_grad_k_max`` the lower end
    of K's range (default 1 there; None: ``RLConfig.grad_last_k``, 3)."""
    rl_grad_k_max: int | None = None
    """RL (QV-PG): draw K uniformly from [``rl_grad_k``, this] for each update (None: K fixed)."""
    rl_credit: str = "none"
    """RL: credit of each denoising step, none, decreasing or x0_similarity
    (``RLConfig.credit``)."""
    rl_entropy_coef: float = 0.0
    """RL: weight of the nearest-neighbour entropy bonus over each state's samples (0: off)."""
    rl_pg_group: int = 8
    """RL: samples per state where PPO/REINFORCE or the entropy bonus meet a group below 2
    (covered data's QV-PG samples 1; an explicit ``rl_group`` is kept as given)."""
    sft_likelihood: str = "data"
    """SFT: the OOD guard's quantile of the reference's likelihood of the dataset's windows
    ("data") or of the round's candidates ("current") (``SFTConfig.likelihood_source``)."""
    sft_source: str = "current"
    """SFT: which model proposes the candidates whose winners it trains on, "current" (the
    adapter's own: each round starts where the last ended) or "reference" (SFT then distils
    the reference's critic-ranked best of N and cannot drift past it)."""
    dpo_states: int | None = None
    """DPO: conditions per update."""
    dpo_candidates: int | None = None
    """DPO: samples ranked per condition."""
    dpo_updates_per_batch: int | None = None
    """DPO: updates per batch of pairs."""
    sft_states: int | None = None
    """SFT: conditions per round."""
    sft_candidates: int | None = None
    """SFT: samples per condition."""
    sft_epochs: int | None = None
    """SFT: epochs over the kept samples per round."""
    cascade_rounds: int = 2
    """Rounds of the cascaded refiner (aligned mode: the most updates of each method)."""
    cascade_steps: int = 25
    """Optimiser steps per cascade round (supervised mode)."""
    cascade_states: int = 32
    """States per cascade round."""
    cascade_passes: int = 1
    """Refinement passes of the cascade at inference (more than one is known to lower
    coherency; align.json records each pass's reward and coherency)."""
    cascade_mode: str = "aligned"
    """How the refiner is trained: "aligned" (its own adapter, by SFT and QV-PG on
    re-noised aligned samples) or "supervised" (regression on best-of-branches pairs)."""
    denoise_steps: int | None = None
    """Denoising steps the foundation samples with, in alignment, evaluation and later use
    (its process's ``default_steps``; None: the process's own)."""
    eval_episodes: int = 50
    """Evaluation episodes per stage."""
    ref_candidates: int = 64
    """Candidates of the ``reference@N`` stage, ranked by the critic (0: no such stage)."""
    ref_eval_episodes: int = 16
    """Evaluation episodes of ``reference@N`` (N times dearer per decision)."""
    select_episodes: int = 0
    """Episodes in the environment from held-out starts (reset seeds apart from the
    evaluation's) on which the final stage is chosen (docs/design.md §9); 0: chosen by the
    critic on held-out dataset states instead."""
    steps_sweep_episodes: int = 0
    """Episodes of the steps sweep: the reference and the final stage evaluated and timed at
    1, 2, 5 and 20 denoising steps (report ``steps_sweep``, docs/design.md §10); 0: none."""

    # ---------------------------------------------------------------- models
    planner_state_cond: bool = False
    """Planners (diffuser, dd) also see the present state as a global condition."""
    planner_action_weight: float = 1.0
    """Diffuser: loss weight of the executed action's entries (``ModelSpec.action_weight``)."""
    cond_fourier: int = 0
    """Fourier frequencies of the global condition (0: raw values)."""
    dp_action_horizon: int | None = None
    """Actions a Diffusion Policy executes per sample (T_a)."""
    critic_expectile: float = 0.7
    """IQL expectile of the value regression."""
    critic_hidden: int = 256
    """Width of the critic's MLPs."""
    critic_depth: int = 2
    """Hidden layers of the critic's MLPs."""
    lora_rank: int = 8
    """Rank of the LoRA adapter (alpha is twice the rank)."""

    # ---------------------------------------------------------------- covered data
    covered_at: float = 0.4
    """Action coverage at or above which the data counts as having tried most actions near
    every state; the ``covered_*`` settings then apply."""
    covered_backup_actions: int = 0
    """Covered data: V regresses onto the max of Q over this many actions (0: the expectile)."""
    covered_backup_refine: int = 0
    """Covered data: more actions across the two grid cells beside the best one."""
    covered_backup_states: int = 64
    """Covered data: states of each batch the max backup runs on."""
    covered_backup_proposals: str = "batch"
    """Covered data: the max backup's actions, from the batch or an even grid."""
    covered_backup_select: str = "min"
    """Covered data: the max backup's choice, by the min of the twins or by the first."""
    covered_sft_search: bool = False
    """Covered data: SFT's winners take the critic's best of ``covered_sft_proposals``
    actions, with the ``covered_sft_*`` settings."""
    covered_sft_proposals: int = 201
    """Covered data: evenly spaced first actions SFT's search scores."""
    covered_sft_states: int = 128
    """Covered data: SFT states per round."""
    covered_sft_epochs: int = 64
    """Covered data: SFT steps per round."""
    covered_sft_batch: int = 64
    """Covered data: SFT batch size."""
    covered_sft_lr: float = 4e-3
    """Covered data: SFT learning rate."""
    covered_sft_replay: int = 4096
    """Covered data: last winners SFT trains on."""
    covered_rl: bool = False
    """Covered data: RL with the ``covered_rl_*`` settings."""
    covered_rl_lr: float = 1e-3
    """Covered data: RL learning rate."""
    covered_rl_kl: float = 0.0
    """Covered data: RL's KL to the reference."""
    covered_rl_states: int = 256
    """Covered data: RL states per update."""
    covered_rl_group: int = 1
    """Covered data: RL samples per state."""
    covered_rollout_conditions: float = 0.0
    """Covered data: share of the conditions from greedy rollouts through learned dynamics."""

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or v is None or isinstance(v, str):
                continue
            low = 0 if f.name in _MAY_BE_ZERO else 1
            if isinstance(v, float) or f.name in _REALS:
                if not v >= 0:
                    raise ValueError(f"recipe {f.name} must be >= 0, got {f.name}={v!r}")
            elif v < low:
                raise ValueError(f"recipe {f.name} must be >= {low}, got {f.name}={v!r}")
        if not self.planner_steps_factor > 0:
            raise ValueError(f"recipe planner_steps_factor must be > 0, got "
                             f"planner_steps_factor={self.planner_steps_factor!r}")
        if not self.planner_action_weight > 0:
            raise ValueError(f"recipe planner_action_weight must be > 0, got "
                             f"planner_action_weight={self.planner_action_weight!r}")
        if not 0 <= self.covered_rollout_conditions <= 1:
            raise ValueError(f"recipe covered_rollout_conditions must be in [0, 1], got "
                             f"{self.covered_rollout_conditions}")
        for name, choices in (("rl_algo", ("qvpg", "ppo", "reinforce")),
                              ("rl_credit", ("none", "decreasing", "x0_similarity")),
                              ("sft_likelihood", ("data", "current")),
                              ("sft_source", ("current", "reference")),
                              ("cascade_mode", ("aligned", "supervised"))):
            if getattr(self, name) not in choices:
                raise ValueError(f"recipe {name} must be one of {', '.join(choices)}, got "
                                 f"{name}={getattr(self, name)!r}")
        for name in ("rl_grad_k", "rl_grad_k_max"):
            k = getattr(self, name)
            if k is not None and self.rl_algo != "qvpg":
                raise ValueError(f"recipe {name}={k} truncates QV-PG's gradient; rl_algo="
                                 f"{self.rl_algo!r} takes every step")
        if (self.rl_grad_k is not None and self.rl_grad_k_max is not None
                and self.rl_grad_k_max < self.rl_grad_k):
            raise ValueError(f"recipe needs rl_grad_k <= rl_grad_k_max, got rl_grad_k="
                             f"{self.rl_grad_k}, rl_grad_k_max={self.rl_grad_k_max}")
        if self.rl_pg_group < 2:
            raise ValueError(f"recipe rl_pg_group must be >= 2, got rl_pg_group="
                             f"{self.rl_pg_group}")

    # ---------------------------------------------------------------- library configs
    def foundation_config(self, model: str, process: str, seed: int, device: str):
        """The :class:`~diffalign.train.foundation.FoundationConfig` of ``model``."""
        from ..train.foundation import FoundationConfig

        planner = model in ("diffuser", "dd")
        return FoundationConfig(
            model=model, process=process,
            steps=max(1, round(self.planner_steps_factor * self.foundation_steps)) if planner
            else self.foundation_steps,
            sample_steps=self.denoise_steps,
            batch_size=self.foundation_batch, seed=seed, device=device,
            state_cond=planner and self.planner_state_cond,
            action_weight=self.planner_action_weight if model == "diffuser" else 1.0,
            action_horizon=self.dp_action_horizon if model == "dp" else None,
            cond_fourier=self.cond_fourier if (model == "dp" or (planner and
                                                                 self.planner_state_cond))
            else 0)

    def critic_config(self, covered: bool, seed: int, device: str, bf16: bool = False,
                      ensemble: int | None = None, steps: int | None = None):
        """The :class:`~diffalign.models.critic.CriticConfig`; ``bf16``: evaluate the max
        backup's actions in bfloat16 (where that is fast)."""
        from ..models.critic import CriticConfig

        backup: dict[str, Any] = {}
        if covered and self.covered_backup_actions:
            backup = dict(backup_actions=self.covered_backup_actions,
                          backup_refine=self.covered_backup_refine,
                          backup_states=self.covered_backup_states,
                          backup_proposals=self.covered_backup_proposals,
                          backup_select=self.covered_backup_select, backup_bf16=bool(bf16))
        return CriticConfig(steps=steps or self.critic_steps, seed=seed,
                            expectile=self.critic_expectile, depth=self.critic_depth,
                            hidden=self.critic_hidden,
                            ensemble=ensemble or self.critic_ensemble, device=device, **backup)

    def behavior_config(self, seed: int, device: str):
        """The :class:`~diffalign.models.behavior.BehaviorConfig` of the data's action band."""
        from ..models.behavior import BehaviorConfig

        extra = {} if self.behavior_steps is None else {"steps": self.behavior_steps}
        return BehaviorConfig(seed=seed, device=device, **extra)

    def dynamics_config(self, seed: int, device: str):
        """The :class:`~diffalign.models.dynamics.DynamicsConfig` of the rollout conditions."""
        from ..models.dynamics import DynamicsConfig

        extra = {} if self.dynamics_steps is None else {"steps": self.dynamics_steps}
        return DynamicsConfig(seed=seed, device=device, **extra)

    def rollout_share(self, covered: bool, override: float | None = None) -> float:
        """Share of the conditions from greedy rollouts (``override`` if given)."""
        if override is not None:
            return float(override)
        return self.covered_rollout_conditions if covered else 0.0

    def align_config(self, covered: bool, methods: tuple[str, ...], seed: int,
                     passes: int | None = None, dpo_pairs: str = "reference",
                     online: bool = False, cascade: bool = True, rollouts: float = 0.0,
                     dynamics=None, action_search: bool = True):
        """The :class:`~diffalign.align.runner.AlignConfig`; ``rollouts``: share of the
        conditions from greedy rollouts through a model trained with ``dynamics``;
        ``action_search=False`` for a model that infers its actions from states (the
        Decision Diffuser): SFT then keeps the best of its candidates, without the search
        over first actions that covered data otherwise gets."""
        from ..align.conditions import RolloutConditions
        from ..align.runner import AlignConfig
        from ..align.sequence import SequenceConfig

        seq = SequenceConfig(methods=tuple(methods), passes=passes or self.passes,
                             max_updates=self.max_updates, eval_every=self.eval_every,
                             patience=self.patience)
        cfg = AlignConfig(sequence=seq, conditions=self.conditions,
                          val_conditions=self.val_conditions, seed=seed,
                          lora_rank=self.lora_rank, lora_alpha=2.0 * self.lora_rank)
        cfg.dpo = replace(cfg.dpo, max_updates=self.dpo_updates, pair_source=dpo_pairs)
        cfg.sft = replace(cfg.sft, max_updates=self.sft_updates)
        cfg.rl = replace(cfg.rl, max_updates=self.rl_updates, eval_every=self.rl_eval_every)
        if covered:  # the critic rates every action from data: no support to leave
            cfg.sequence = replace(seq, guard=replace(seq.guard, support_frac=1.0))
            cfg.sft = replace(cfg.sft, likelihood_quantile=0.0)
            if self.covered_sft_search and action_search:
                cfg.sft = replace(cfg.sft, action_proposals=self.covered_sft_proposals,
                                  candidates=1, states_per_update=self.covered_sft_states,
                                  epochs=self.covered_sft_epochs,
                                  batch_size=self.covered_sft_batch, lr=self.covered_sft_lr,
                                  replay=self.covered_sft_replay)
            if self.covered_rl:
                cfg.rl = replace(cfg.rl, lr=self.covered_rl_lr, kl_coef=self.covered_rl_kl,
                                 states_per_update=self.covered_rl_states,
                                 group_size=self.covered_rl_group)
        if rollouts > 0:
            cfg.rollouts = RolloutConditions(fraction=rollouts, dynamics=dynamics)
        if online:
            from ..align.online import OnlineConfig

            cfg.online = OnlineConfig()
        cfg.rl = replace(cfg.rl, **_given(states_per_update=self.rl_states,
                                          group_size=self.rl_group,
                                          ppo_epochs=self.rl_ppo_epochs, kl_coef=self.rl_kl))
        if self.rl_group_scale:
            cfg.rl = replace(cfg.rl, qvpg_scale="group")
        rl = dict(algo=self.rl_algo, credit=self.rl_credit, entropy_coef=self.rl_entropy_coef,
                  **self._grad_k())
        if ((self.rl_algo != "qvpg" or self.rl_entropy_coef > 0) and cfg.rl.group_size < 2
                and self.rl_group is None):  # a group baseline or entropy needs a group
            rl["group_size"] = self.rl_pg_group
        cfg.rl = replace(cfg.rl, **rl)
        cfg.dpo = replace(cfg.dpo, **_given(states_per_update=self.dpo_states,
                                            candidates=self.dpo_candidates,
                                            updates_per_batch=self.dpo_updates_per_batch))
        cfg.sft = replace(cfg.sft, likelihood_source=self.sft_likelihood, source=self.sft_source)
        cfg.sft = replace(cfg.sft, **_given(states_per_update=self.sft_states,
                                            candidates=self.sft_candidates,
                                            epochs=self.sft_epochs))
        if cascade:
            cfg.cascade = replace(cfg.cascade, rounds=self.cascade_rounds,
                                  steps_per_round=self.cascade_steps,
                                  states_per_update=self.cascade_states,
                                  passes=self.cascade_passes, mode=self.cascade_mode)
        else:
            cfg.cascade = None
        return cfg

    def _grad_k(self) -> dict[str, Any]:
        """The ``RLConfig`` truncation fields of ``rl_grad_k``/``rl_grad_k_max`` (as ``align``
        maps ``--rl-grad-k``/``--rl-grad-k-max``)."""
        if self.rl_grad_k_max is not None:
            return dict(random_k=True, grad_last_k=self.rl_grad_k_max,
                        grad_k_min=1 if self.rl_grad_k is None else self.rl_grad_k)
        return _given(grad_last_k=self.rl_grad_k)


_MAY_BE_ZERO = {"ref_candidates", "select_episodes", "steps_sweep_episodes", "cond_fourier",
                "covered_backup_actions", "covered_backup_refine", "covered_rollout_conditions",
                "covered_rl_kl", "rl_kl", "critic_expectile", "rl_entropy_coef"}
_REALS = {"rl_kl", "rl_entropy_coef", "covered_rl_kl", "covered_sft_lr", "covered_rl_lr",
          "critic_expectile", "covered_at", "covered_rollout_conditions"}


RENAMED_FIELDS = {"max_iters": "max_updates", "sft_rounds": "sft_updates"}
"""Recipe fields under the other names that run directories written by earlier versions
hold (``run.json``'s ``"recipe"``, a bench cell's ``"sizes"``): old name -> name."""


def renamed_fields(recipe: dict) -> dict:
    """A recipe as a dict (``asdict``, or as a run directory saved it) with the fields of
    :data:`RENAMED_FIELDS` under their names; other entries are kept as they are."""
    return {RENAMED_FIELDS.get(k, k): v for k, v in recipe.items()}


def _given(**kw: Any) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if v is not None}


def with_overrides(recipe: Recipe, overrides: str | dict | None) -> Recipe:
    """``recipe`` with ``KEY=VALUE,…`` (or a dict) applied, values converted to each field's
    type; a ``UserError`` names an unknown key or a bad value."""
    from ..errors import UserError

    if not overrides:
        return recipe
    types = {f.name: f.type for f in fields(recipe)}
    if isinstance(overrides, dict):
        items = dict(overrides)
    else:
        items = {}
        for part in str(overrides).split(","):
            if not part.strip():
                continue
            key, eq, value = part.partition("=")
            if not eq:
                raise UserError(f"recipe override {part.strip()!r} is not KEY=VALUE")
            items[key.strip()] = value.strip()
    for key in items:
        if key in RENAMED_FIELDS:
            raise UserError(f"recipe setting {key} is named {RENAMED_FIELDS[key]}: use "
                            f"{RENAMED_FIELDS[key]}={items[key]}")
    bad = sorted(set(items) - set(types))
    if bad:
        raise UserError(f"unknown recipe setting(s) {', '.join(bad)}; valid: "
                        f"{', '.join(sorted(types))}")
    conv = {}
    for key, value in items.items():
        try:
            conv[key] = _convert(value, str(types[key]))
        except ValueError:
            raise UserError(f"recipe setting {key} must be {types[key]}, got "
                            f"{key}={value!r}") from None
    try:
        return replace(recipe, **conv)
    except ValueError as e:
        raise UserError(str(e)) from None


def _convert(value: Any, kind: str) -> Any:
    if not isinstance(value, str):
        return value
    if value.lower() == "none" and "None" in kind:
        return None
    if kind.startswith("bool"):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(value)
    if kind.startswith("int"):
        return int(value)
    if kind.startswith("float"):
        return float(value)
    return value
