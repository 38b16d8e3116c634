"""What every alignment method shares: conditions, frozen critic, validation reward."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ..processes import Inpaint
from ..train.trainer import adam

__all__ = ["RENAMED_FIELDS", "AdapterMethod", "AlignSetup", "MethodConfig", "condition_pool",
           "diversity_bonus", "expand_condition", "fraction_below", "freeze", "outside_support",
           "reference_likelihood", "renamed_fields", "reward_spread", "support_floor",
           "validation_draw", "validation_reward"]


def freeze(module: nn.Module) -> nn.Module:
    """Turn off gradients of every parameter (the critic and the reference stay fixed)."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def condition_pool(episodes, obs_history: int, n: int, seed: int = 0) -> Tensor:
    """``n`` random dataset states with their observation histories, ``(n, T_o, obs_dim)``.

    The history before an episode's start is padded by repeating the first observation.
    These are the conditions c the aligned model is optimised (and validated) on.
    """
    rng = np.random.default_rng(seed)
    obs = episodes.observations
    starts = np.repeat(episodes.starts, episodes.lengths())
    idx = rng.integers(0, len(obs), size=n)
    offs = np.arange(-obs_history + 1, 1)
    rows = np.maximum(idx[:, None] + offs[None, :], starts[idx][:, None])
    return torch.as_tensor(obs[rows], dtype=torch.float32)


def expand_condition(model, obs_hist: Tensor, n: int
                     ) -> tuple[Tensor | None, Inpaint | None, tuple[int, int, int]]:
    """The model's condition for ``n`` samples per row, row-major, and the sample shape."""
    return model.expanded_condition(obs_hist, n)


def free_mask(inpaint: Inpaint | None, shape) -> Tensor | None:
    """Bool mask of the entries the model generates (not in-painted), or None for all."""
    if inpaint is None:
        return None
    return ~inpaint.mask.expand(shape)


def diversity_bonus(x0: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """Entropy surrogate per sample: log mean distance to the other members of its group.

    Adding ``coef · bonus`` to the reward resists the narrowing of the distribution that
    reward maximisation causes (a nearest-neighbour entropy estimate, up to constants).
    """
    if group_size < 2:
        return torch.zeros(x0.shape[0], device=x0.device)
    g = x0.flatten(1).view(-1, group_size, x0[0].numel())
    d = torch.cdist(g, g)  # (G, n, n)
    mean_d = d.sum(-1) / (group_size - 1)
    return torch.log(mean_d + eps).reshape(-1)


RENAMED_FIELDS: dict[str, dict[str, str]] = {
    "sequence": {"max_iters": "max_updates"},
    "rl": {"states_per_iter": "states_per_update"},
    "dpo": {"states_per_iter": "states_per_update"},
    "sft": {"states_per_round": "states_per_update"},
    "cascade": {"states_per_round": "states_per_update"},
}
"""Fields of :class:`~diffalign.align.runner.AlignConfig`'s sections under the other names
that run directories written by earlier versions hold (``align.json``'s ``"config"``, the
resume fingerprint of ``progress/state.json``): section -> {old name: name}."""


def renamed_fields(config: dict, to_old: bool = False) -> dict:
    """An AlignConfig as a dict (``asdict``, or ``align.json``'s ``"config"``) with the
    fields of :data:`RENAMED_FIELDS` under their names; ``to_old``: under the old names (to
    recognise what was saved under them). Other entries are kept as they are."""
    out = dict(config)
    for section, names in RENAMED_FIELDS.items():
        if not isinstance(out.get(section), dict):
            continue
        mapping = {new: old for old, new in names.items()} if to_old else names
        out[section] = {mapping.get(k, k): v for k, v in out[section].items()}
    return out


@dataclass
class MethodConfig:
    """What every alignment method's config has."""

    max_updates: int | None = None
    """Cap on this method's updates in one pass of the sequence (None: the sequence's
    ``max_updates``)."""
    eval_every: int | None = None
    """Updates between this method's validations (None: the sequence's ``eval_every``).
    Cheap updates (an RL step) can validate less often than dear ones (an SFT round)."""

    def __post_init__(self):
        if self.max_updates is not None and self.max_updates < 1:
            raise ValueError(f"max_updates must be >= 1 or None, got max_updates="
                             f"{self.max_updates}")
        if self.eval_every is not None and self.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1 or None, got eval_every="
                             f"{self.eval_every}")


class AdapterMethod:
    """Shared set-up of the alignment methods: the frozen parts, the adapter, its optimiser."""

    name = "method"

    def __init__(self, setup: AlignSetup, net: nn.Module, cfg, generator: torch.Generator):
        from .lora import ReferenceView, lora_parameters

        self.setup, self.net, self.cfg, self.gen = setup, net, cfg, generator
        self.model = setup.model
        self.ref = ReferenceView(net)
        self.params = lora_parameters(net)
        if not self.params:
            raise ValueError(f"{self.name} needs a LoRA-wrapped net (no trainable adapter "
                             "parameters)")
        self.optimizer = adam(self.params, lr=cfg.lr)


@dataclass
class AlignSetup:
    """The frozen parts of an alignment run."""

    model: nn.Module
    """The reference control model; during alignment its ``net`` carries the LoRA adapter."""
    critic: nn.Module
    """The reward model R (an IQL critic), frozen."""
    states: Tensor
    """Training conditions ``(N, T_o, obs_dim)`` (RAW)."""
    val_states: Tensor
    """Validation conditions ``(M, T_o, obs_dim)`` (RAW)."""
    steps: int | None = None
    """Denoising steps while aligning (None: the process default)."""
    episodes: object = None
    """The offline dataset (:class:`~diffalign.data.episodes.Episodes`), for methods that
    learn from it directly (DPO with dataset pairs)."""

    def reward(self, x0: Tensor, obs_rows: Tensor) -> Tensor:
        """R(x0) for samples whose rows match ``obs_rows``."""
        return self.model.reward(x0, obs_rows, self.critic)

    def draw_states(self, n: int, generator: torch.Generator) -> Tensor:
        idx = torch.randint(0, len(self.states), (n,), generator=generator)
        return self.states[idx].to(self.model.device)


@torch.no_grad()
def validation_draw(setup: AlignSetup, net: nn.Module | None = None, seed: int = 1234,
                    candidates: int = 1) -> tuple[float, Tensor, Tensor]:
    """:func:`validation_reward` plus the samples it scored, ``(mean, per-state, x0)``; ``x0``
    has ``candidates`` rows per validation state, in order."""
    from .lora import merged_view

    model = setup.model
    g = torch.Generator().manual_seed(seed)
    obs = setup.val_states.to(model.device)
    out = model.sample(obs, n=candidates, generator=g, steps=setup.steps,
                       net=merged_view(net))  # the adapter folded in: the same, faster
    rows = obs.repeat_interleave(candidates, 0)
    r = setup.reward(out.x0, rows).view(-1, candidates).max(1).values
    return float(r.mean()), r, out.x0


def validation_reward(setup: AlignSetup, net: nn.Module | None = None, seed: int = 1234,
                      candidates: int = 1) -> tuple[float, Tensor]:
    """Mean reward of one sample per validation state with a fixed seed: ``(mean, per-state)``."""
    mean, r, _ = validation_draw(setup, net, seed, candidates)
    return mean, r


@torch.no_grad()
def reference_likelihood(setup: AlignSetup, net: nn.Module, x0: Tensor, obs: Tensor,
                         n_samples: int = 4, seed: int = 99) -> Tensor:
    """The reference's likelihood proxy of samples ``x0`` (one per row of ``obs``), ``(B,)``:
    the process's denoising-error proxy with the adapter switched off."""
    from .lora import reference

    model = setup.model
    cond, inpaint, shape = expand_condition(model, obs, 1)
    g = torch.Generator().manual_seed(seed)
    with reference(net):
        return model.process.likelihood(net, x0, cond=cond, n_samples=n_samples, generator=g,
                                        mask=free_mask(inpaint, shape))


@torch.no_grad()
def support_floor(setup: AlignSetup, net: nn.Module, quantile: float = 0.1,
                  seed: int = 2468) -> float:
    """The ``quantile`` of the reference's likelihood of its OWN samples on the validation
    states: samples below it are ones the reference itself rarely draws."""
    from .lora import reference

    obs = setup.val_states.to(setup.model.device)
    with reference(net):
        x0 = setup.model.sample(obs, generator=torch.Generator().manual_seed(seed),
                                steps=setup.steps, net=net).x0
    return float(torch.quantile(reference_likelihood(setup, net, x0, obs), quantile))


@torch.no_grad()
def outside_support(setup: AlignSetup, net: nn.Module, floor: float, seed: int = 1357
                    ) -> float:
    """Fraction of the current model's samples on the validation states whose reference
    likelihood is below ``floor`` (:func:`support_floor`); about the quantile for the
    reference itself, near 1 for a model that left the data."""
    _, _, x0 = validation_draw(setup, net, seed)
    return fraction_below(setup, net, x0, setup.val_states.to(x0.device), floor)


@torch.no_grad()
def fraction_below(setup: AlignSetup, net: nn.Module, x0: Tensor, obs: Tensor, floor: float
                   ) -> float:
    """Fraction of samples ``x0`` whose reference likelihood is below ``floor`` (a
    non-finite likelihood counts as below)."""
    ll = reference_likelihood(setup, net, x0, obs)
    return float((~(ll >= floor)).float().mean())


@torch.no_grad()
def reward_spread(setup: AlignSetup, net: nn.Module | None = None, candidates: int = 8,
                  seed: int = 4321, states: int = 128) -> float:
    """How much the choice of sample matters: the mean over validation states (``states``
    of them, evenly spaced through the pool, whose parts come from different sources) of
    the std of R across ``candidates`` samples of one state.

    Gains, plateaus and collapses are measured in this unit: a critic's values can carry a
    large state-dependent baseline that says nothing about what alignment can change.
    """
    from .lora import merged_view

    model = setup.model
    g = torch.Generator().manual_seed(seed)
    every = max(1, len(setup.val_states) // states)
    obs = setup.val_states[::every][:states].to(model.device)
    out = model.sample(obs, n=candidates, generator=g, steps=setup.steps,
                       net=merged_view(net))
    r = setup.reward(out.x0, obs.repeat_interleave(candidates, 0)).view(-1, candidates)
    return float(r.std(1).mean())
