"""Diffuser (Janner et al. 2022): diffuse state-action trajectories, in-paint the present.

``x`` is a normalised trajectory ``(H, obs_dim + act_dim)``, states first. The current state
(and ``obs_history - 1`` past states before it) is in-painted at positions ``0 .. K-1``; the
executed action is the one at position ``K - 1`` (of the best of N candidates), and the model
replans at every environment step. Because it replans every step with a fixed horizon H, an
episode longer than H is handled by a sliding window automatically: each plan covers the next
H steps only.

Training windows run past an episode's end with edge padding (the last step repeated) and the
padding is learned, so a plan near the end of an episode continues with a constant state
instead of leaving the data (the evaluation excludes those positions from coherency).
With ``spec.prefix_masks`` (default) training in-paints a random causal prefix of
``K .. max(K, H // 4)`` states, so the model learns in-painting from a few known steps.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..data.windows import make_windows
from ..nets import build_backbone
from ..nets.embeddings import fourier_features
from ..processes.base import Inpaint
from ..processes.inpainting import prefix_inpaint, random_prefix_mask
from .base import Cond, ControlModel

__all__ = ["Diffuser", "Planner"]


class Planner(ControlModel):
    """Shared parts of the trajectory planners (Diffuser, Decision Diffuser)."""

    x_fields: tuple[str, ...] = ("observations",)
    """The normalised fields laid side by side in a plan's features, in order."""

    @property
    def x_dim(self) -> int:
        raise NotImplementedError

    @property
    def window_keys(self) -> tuple[str, ...]:
        return ("observations", "actions")

    @property
    def cond_dim(self) -> int:
        """Width of the global condition: the flattened context states, or 0."""
        if not self.spec.state_cond:
            return 0
        return self.spec.obs_history * self.obs_dim * (1 + 2 * self.spec.cond_fourier)

    def _build_net(self) -> nn.Module:
        return _backbone(self.spec, x_dim=self.x_dim, horizon=self.spec.horizon,
                         cond_dim=self.cond_dim)

    def _state_cond(self, x: Tensor) -> Tensor | None:
        """The global condition of (normalised) plans ``x``: their context states."""
        if not self.spec.state_cond:
            return None
        return fourier_features(x[:, : self.spec.obs_history, : self.obs_dim].flatten(1),
                                self.spec.cond_fourier)

    def make_dataset(self, episodes):
        self._fit_normalizers(episodes)
        return make_windows(episodes, self.spec.horizon, obs_history=1, keys=self.window_keys,
                            pad="edge", normalizers=self.normalizers)

    def fixed_features(self) -> Tensor | None:
        """``(x_dim,)`` bool: the plan features constant in the training data, known at every
        position (value 0, their normalised constant) when ``spec.fixed_known``; else None."""
        if not self.spec.fixed_known or not all(f in self.normalizers for f in self.x_fields):
            return None
        fixed = torch.cat([self.normalizers[f].constant() for f in self.x_fields])
        return fixed.to(self.device) if bool(fixed.any()) else None

    def _known(self, batch: int, generator: torch.Generator | None) -> Tensor:
        """Known (in-painted) entries for training: a causal prefix of states, and the
        constant features everywhere (:meth:`fixed_features`)."""
        k, h = self.spec.obs_history, self.spec.horizon
        hi = max(k, h // 4) if self.spec.prefix_masks else k
        known = random_prefix_mask(batch, h, self.x_dim, dims=slice(0, self.obs_dim),
                                   min_prefix=k, max_prefix=hi, generator=generator,
                                   device=self.device)
        fixed = self.fixed_features()
        return known if fixed is None else known | fixed

    def _loss_weight(self, shape: tuple[int, int, int]) -> Tensor | None:
        """Per-entry weights of the denoising loss (None: every entry alike)."""
        return None

    def _diffusion_loss(self, x0: Tensor, generator: torch.Generator | None) -> dict[str, Tensor]:
        known = self._known(x0.shape[0], generator)
        return self.process.loss(self.net, x0, cond=self._state_cond(x0), known=known,
                                 weight=self._loss_weight(tuple(x0.shape)),
                                 generator=generator)

    def condition(self, obs_hist: Tensor) -> Cond:
        hist = self.norm("observations", self._check_hist(obs_hist))
        ip = prefix_inpaint(hist, self.spec.horizon, self.x_dim, slice(0, self.obs_dim))
        fixed = self.fixed_features()
        if fixed is not None:  # 0, their normalised constant, whatever the observation says
            ip = Inpaint(value=ip.value.masked_fill(fixed, 0.0), mask=ip.mask | fixed)
        return Cond(cond=self._state_cond(ip.value), inpaint=ip,
                    shape=(self.spec.horizon, self.x_dim))

    def plan_states(self, x: Tensor) -> Tensor:
        """RAW plan states ``(B, H, obs_dim)``."""
        return self.unnorm("observations", x[..., : self.obs_dim])

    def reward(self, x: Tensor, obs_hist: Tensor, critic) -> Tensor:
        """R(x0) = mean (or discounted sum) of Q(ŝ_t, â_t) from the current step on, ``(B,)``;
        the plan and its actions clamped to the data's range (:meth:`in_data_range`), before
        any actions are inferred from the plan's states."""
        if all(self.normalizers[f].bounds() is not None for f in self.x_fields):
            x = x.clamp(-1.0, 1.0)  # min-max normalised: the data spans [-1, 1] per feature
        states, actions = self.plan_states_actions(x)
        actions = self.in_data_range("actions", actions)
        k = self.spec.obs_history - 1
        states, actions = states[:, k:], actions[:, k:]
        if self.spec.reward_mode == "first":
            states, actions = states[:, :1], actions[:, :1]
        b, h = states.shape[:2]
        q = critic.q(states.reshape(b * h, -1), actions.reshape(b * h, -1)).reshape(b, h)
        if self.spec.reward_mode == "mean":
            return q.mean(1)
        w = self.spec.discount ** torch.arange(h, device=q.device, dtype=q.dtype)
        return (q * w).sum(1)


class Diffuser(Planner):
    """State-action trajectory diffusion with in-painted current state (see module doc)."""

    kind = "diffuser"
    x_fields = ("observations", "actions")

    @property
    def x_dim(self) -> int:
        return self.obs_dim + self.act_dim

    def _loss_weight(self, shape: tuple[int, int, int]) -> Tensor | None:
        """``spec.action_weight`` on the executed action's entries, 1 elsewhere."""
        if self.spec.action_weight == 1:
            return None
        w = torch.ones(1, *shape[1:], device=self.device)
        return w.masked_fill(self.executed_mask((1, *shape[1:])), self.spec.action_weight)

    def loss(self, batch: dict[str, Tensor], generator: torch.Generator | None = None
             ) -> dict[str, Tensor]:
        batch = self._batch_to_device(batch)
        out = self._diffusion_loss(batch["x"], generator)
        return {"loss": out["loss"]}

    def actions_from_x(self, x: Tensor, obs_hist: Tensor | None = None) -> Tensor:
        """RAW actions ``(B, T_a, act_dim)`` at positions ``K-1 .. K-2+T_a``."""
        k = self.spec.obs_history - 1
        a = x[:, k : k + self.spec.action_horizon, self.obs_dim :]
        return self.unnorm("actions", a)

    def plan_states_actions(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.plan_states(x), self.unnorm("actions", x[..., self.obs_dim :])

    def executed_mask(self, shape: tuple[int, int, int]) -> Tensor:
        """The executed actions' entries: rows ``K-1 .. K-2+T_a``, action dims."""
        k = self.spec.obs_history - 1
        return self._entry_mask(shape, slice(k, k + self.spec.action_horizon),
                                slice(self.obs_dim, None))

    def first_action_mask(self, shape: tuple[int, int, int]) -> Tensor:
        """The action dims of row ``K-1`` (the current step)."""
        k = self.spec.obs_history - 1
        return self._entry_mask(shape, slice(k, k + 1), slice(self.obs_dim, None))


def _backbone(spec, x_dim: int, horizon: int, cond_dim: int = 0) -> nn.Module:
    """Build the spec's backbone; bad size arguments become a ValueError naming them."""
    try:
        return build_backbone(spec.backbone, x_dim=x_dim, horizon=horizon, cond_dim=cond_dim,
                              **spec.backbone_kwargs)
    except TypeError as e:
        raise ValueError(f"bad backbone_kwargs {spec.backbone_kwargs} for backbone "
                         f"{spec.backbone!r}: {e}") from e
