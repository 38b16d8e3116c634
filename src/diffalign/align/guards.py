"""Collapse guards: keep the last good adapter, restore it on a collapse, lower the LR.

A collapse is a non-finite loss or validation reward, a loss spike (loss above
``spike_factor`` × the larger of the median of recent losses and the stage's first loss), or a
sudden validation drop (below the best by more than ``drop_frac`` × the larger of the best's
gain over the reference and the reward ``scale`` — the spread of R across samples of one
state), or — the critic cannot see this one — the model leaving the reference's support:
more than ``support_frac`` of its validation samples less likely under the reference than
the reference's own 10% quantile. Every restore is recorded as an event; nothing is hidden.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import torch

__all__ = ["Guard", "GuardConfig"]


@dataclass
class GuardConfig:
    """Thresholds of the collapse guard."""

    drop_frac: float = 0.5
    """Collapse when validation reward falls below best − drop_frac·max(best − reference,
    scale)."""
    spike_factor: float = 20.0
    """Collapse when a loss exceeds this multiple of the recent median |loss|."""
    lr_decay: float = 0.5
    """Learning-rate factor applied after each restore."""
    window: int = 20
    """Recent losses kept for the spike test."""
    support_frac: float = 0.35
    """Collapse when more than this fraction of the aligned model's validation samples are
    less likely under the reference than the 10% quantile of the reference's own samples
    (the reference itself: about 0.1). A critic rates such samples without data behind them.
    Measured: aligned models that helped 0.16–0.29 (Nav1D, MetaWorld button-press); ones
    that collapsed 0.40–0.98 (MuJoCo Hopper and HalfCheetah, MetaWorld drawer-open).
    1 disables the check."""


@dataclass
class Guard:
    """Tracks the best adapter of one alignment run and restores it on collapse."""

    params: list[torch.nn.Parameter]
    reference_reward: float
    cfg: GuardConfig = field(default_factory=GuardConfig)
    scale: float = 0.0
    """Unit of reward changes (see :func:`~diffalign.align.common.reward_spread`)."""
    best_reward: float = -math.inf
    best_state: list[torch.Tensor] | None = None
    events: list[dict] = field(default_factory=list)
    _losses: list[float] = field(default_factory=list)

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    def restore(self, state: list[torch.Tensor] | None = None) -> None:
        state = state if state is not None else self.best_state
        if state is None:
            return
        with torch.no_grad():
            for p, s in zip(self.params, state):
                p.copy_(s)

    def loss_spiked(self, loss: float) -> str | None:
        """Reason string when ``loss`` is non-finite or a spike, else None (and record it)."""
        if not math.isfinite(loss):
            return f"non-finite loss {loss}"
        recent = self._losses[-self.cfg.window:]
        self._losses.append(loss)
        if len(recent) >= 5:
            med = statistics.median(abs(v) for v in recent)
            ref = max(med, abs(self._losses[0]), 1e-6)
            if abs(loss) > self.cfg.spike_factor * ref:
                return (f"loss spike {loss:.4g} > {self.cfg.spike_factor}x max(median "
                        f"{med:.4g}, first loss {abs(self._losses[0]):.4g})")
        return None

    def new_stage(self) -> None:
        """Forget the loss history (each method has its own loss scale)."""
        self._losses.clear()

    def reward_collapsed(self, reward: float) -> str | None:
        if not math.isfinite(reward):
            return f"non-finite validation reward {reward}"
        if self.best_state is None:
            return None
        gain = self.best_reward - self.reference_reward
        floor = self.best_reward - self.cfg.drop_frac * max(gain, self.scale, 1e-6)
        if reward < floor:
            return (f"validation reward dropped to {reward:.4g} from best "
                    f"{self.best_reward:.4g} (floor {floor:.4g})")
        return None

    def support_left(self, frac_outside: float) -> str | None:
        """Reason string when the model has left the reference's support, else None."""
        if frac_outside > self.cfg.support_frac:
            return (f"left the reference's support: {100 * frac_outside:.0f}% of samples below "
                    f"the reference's 10% likelihood quantile (limit "
                    f"{100 * self.cfg.support_frac:.0f}%)")
        return None

    def observe(self, reward: float) -> bool:
        """Record a healthy validation reward; True when it is a new best (snapshot taken)."""
        if reward > self.best_reward:
            self.best_reward = reward
            self.best_state = self.snapshot()
            return True
        return False

    def rebase(self, current: float, reference: float) -> None:
        """Start over in new reward units (the critic changed, e.g. after an online round):
        the adapter as it is now becomes the best, at ``current``; ``reference`` is the
        reference's reward under the new critic."""
        self.best_reward, self.reference_reward = current, reference
        self.best_state = self.snapshot()
        self._losses.clear()

    def handle_collapse(self, reason: str, optimizer: torch.optim.Optimizer, stage: str,
                        iteration: int) -> dict:
        """Restore the best adapter, lower the LR, and record the event."""
        self.restore()
        for group in optimizer.param_groups:
            group["lr"] *= self.cfg.lr_decay
        for state in optimizer.state.values():  # stale moments would re-apply the bad step
            state.clear()
        self._losses.clear()
        event = {"kind": "collapse", "stage": stage, "iteration": iteration, "reason": reason,
                 "restored_reward": self.best_reward,
                 "new_lr": optimizer.param_groups[0]["lr"]}
        self.events.append(event)
        return event
