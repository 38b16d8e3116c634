"""Diffusion Policy (Chi et al. 2023): diffuse an action chunk given an observation history.

``x`` is a normalised action chunk ``(T_p, act_dim)`` starting at the current step; the
backbone's global condition is the flattened normalised history of the last ``T_o``
observations (``T_o * obs_dim``; at an episode's start the first observation is repeated, as
in the training windows). The first ``T_a`` actions are executed before the policy is queried
again (an action queue per environment, reset every episode). Actions past an episode's end
are padding and excluded from the loss.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..data.windows import make_windows
from ..nets.embeddings import fourier_features
from .base import Cond, ControlModel
from .diffuser import _backbone

__all__ = ["DiffusionPolicy"]


class DiffusionPolicy(ControlModel):
    """Action-chunk diffusion conditioned on T_o observations (see module doc)."""

    kind = "dp"

    @property
    def cond_dim(self) -> int:
        return self.spec.obs_history * self.obs_dim * (1 + 2 * self.spec.cond_fourier)

    def _build_net(self) -> nn.Module:
        return _backbone(self.spec, x_dim=self.act_dim, horizon=self.spec.horizon,
                         cond_dim=self.cond_dim)

    def make_dataset(self, episodes):
        self._fit_normalizers(episodes)
        return make_windows(episodes, self.spec.horizon, obs_history=self.spec.obs_history,
                            keys=("actions",), pad="edge", normalizers=self.normalizers)

    def loss(self, batch: dict[str, Tensor], generator: torch.Generator | None = None
             ) -> dict[str, Tensor]:
        batch = self._batch_to_device(batch)
        cond = fourier_features(batch["obs_history"].flatten(1), self.spec.cond_fourier)
        out = self.process.loss(self.net, batch["x"], cond=cond, mask=batch["mask"][..., None],
                                generator=generator)
        return {"loss": out["loss"]}

    def condition(self, obs_hist: Tensor) -> Cond:
        hist = self.norm("observations", self._check_hist(obs_hist))
        cond = fourier_features(hist.flatten(1), self.spec.cond_fourier)
        return Cond(cond=cond, inpaint=None, shape=(self.spec.horizon, self.act_dim))

    def actions_from_x(self, x: Tensor, obs_hist: Tensor | None = None) -> Tensor:
        """RAW actions ``(B, T_a, act_dim)``: the first T_a of the chunk."""
        return self.unnorm("actions", x[:, : self.spec.action_horizon])

    def executed_mask(self, shape: tuple[int, int, int]) -> Tensor:
        """The first ``T_a`` actions of the chunk."""
        return self._entry_mask(shape, slice(0, self.spec.action_horizon))

    def first_action_mask(self, shape: tuple[int, int, int]) -> Tensor:
        """The chunk's first action."""
        return self._entry_mask(shape, slice(0, 1))

    def plan_states_actions(self, x: Tensor) -> tuple[None, None]:
        return None, None

    def reward(self, x: Tensor, obs_hist: Tensor, critic) -> Tensor:
        """R(x0) = Q(s, a_0): the critic at the current observation and the first action,
        clamped to the data's range (:meth:`in_data_range`)."""
        s = self._check_hist(obs_hist)[:, -1]
        s = self._match_rows(s, x.shape[0])
        a = self.in_data_range("actions", self.actions_from_x(x)[:, 0])
        return critic.q(s, a)
