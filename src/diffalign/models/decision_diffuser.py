"""Decision Diffuser (Ajay et al. 2023) without return conditioning.

``x`` is a normalised state trajectory ``(H, obs_dim)``; the current state(s) are in-painted
as in :class:`~diffalign.models.diffuser.Diffuser`. Actions come from an inverse-dynamics MLP
``a_t = g(s_t, s_{t+1})`` (normalised in, normalised out), trained jointly with the denoiser
on the dataset's real transitions (its MSE is added to the diffusion loss). The paper this
project implements drops return conditioning (the wanted return is unknown), so there is none.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..nets.embeddings import Mish
from .diffuser import Planner

__all__ = ["DecisionDiffuser", "InverseDynamics"]


class InverseDynamics(nn.Module):
    """``g(s_t, s_{t+1}) -> a_t``: a two-hidden-layer MLP on normalised states/actions."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 128) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(2 * obs_dim, hidden), Mish(),
            nn.Linear(hidden, hidden), Mish(),
            nn.Linear(hidden, act_dim))
        """The MLP."""

    def forward(self, s: Tensor, s_next: Tensor) -> Tensor:
        return self.mlp(torch.cat([s, s_next], -1))


class DecisionDiffuser(Planner):
    """State-only plans plus inverse dynamics (see module doc)."""

    kind = "dd"
    samples_actions = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.inv_dyn = InverseDynamics(self.obs_dim, self.act_dim, self.spec.inv_dyn_hidden)
        """Inverse dynamics g(s_t, s_{t+1}) (not touched by alignment)."""

    @property
    def x_dim(self) -> int:
        return self.obs_dim

    def loss(self, batch: dict[str, Tensor], generator: torch.Generator | None = None
             ) -> dict[str, Tensor]:
        batch = self._batch_to_device(batch)
        states, actions, mask = batch["observations"], batch["actions"], batch["mask"]
        diff = self._diffusion_loss(states, generator)["loss"]
        pred = self.inv_dyn(states[:, :-1], states[:, 1:])
        valid = mask[:, 1:].to(pred.dtype)[..., None]  # s_{t+1} must be a real step
        err = ((pred - actions[:, :-1]) ** 2 * valid).sum()
        inv = err / (valid.sum() * self.act_dim).clamp_min(1.0)
        return {"loss": diff + inv, "loss_diffusion": diff.detach(),
                "loss_inv_dyn": inv.detach()}

    def diffused(self, batch: dict[str, Tensor]) -> Tensor:
        """The windows' normalised states: the plan has no actions."""
        return batch["observations"]

    def _plan_actions_norm(self, x: Tensor) -> Tensor:
        """Normalised actions for each consecutive pair of the plan, ``(B, H - 1, act)``."""
        return self.inv_dyn(x[:, :-1], x[:, 1:])

    def actions_from_x(self, x: Tensor, obs_hist: Tensor | None = None) -> Tensor:
        """RAW actions ``(B, T_a, act_dim)`` from inverse dynamics at positions ``K-1 ..``."""
        k = self.spec.obs_history - 1
        ta = self.spec.action_horizon
        a = self.inv_dyn(x[:, k : k + ta], x[:, k + 1 : k + 1 + ta])
        return self.unnorm("actions", a)

    def executed_mask(self, shape: tuple[int, int, int]) -> Tensor:
        """The next states the executed actions are inferred from: rows ``K .. K-1+T_a``."""
        k = self.spec.obs_history
        return self._entry_mask(shape, slice(k, k + self.spec.action_horizon))

    def plan_states_actions(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """RAW states ``(B, H, obs)`` and inverse-dynamics actions ``(B, H, act)`` (the last
        action repeats the one before it: a plan of H states has H - 1 transitions)."""
        a = self._plan_actions_norm(x)
        a = torch.cat([a, a[:, -1:]], 1)
        return self.plan_states(x), self.unnorm("actions", a)
