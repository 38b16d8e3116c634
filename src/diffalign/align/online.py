"""Online fine-tuning (docs/design.md §4, optional): interleave environment rollouts with alignment.

Every ``every`` alignment updates, one *round*:

1. rolls the current (aligned) model out in the environment for ``episodes`` episodes,
   one candidate per decision;
2. adds every step to the critic's buffer (the offline transitions plus all earlier rounds);
3. keeps training the critic (IQL, the same losses and target updates as offline) for
   ``critic_steps`` steps on that buffer;
4. adds the visited states to the conditions the aligned model is optimised on, so that it
   is trained where it actually goes.

The critic then changes under the alignment methods: validation rewards before and after a
round are in different units, so the sequence re-bases its guard after every round
(:meth:`~diffalign.align.guards.Guard.rebase`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ..train.trainer import adam
from .common import AlignSetup, freeze

__all__ = ["OnlineConfig", "OnlineTuner", "history_states"]


@dataclass
class OnlineConfig:
    """Online rounds during alignment."""

    every: int = 8
    """Alignment updates between rounds (counted over all methods and passes)."""
    episodes: int = 16
    """Environment episodes per round, with the current model (one candidate)."""
    critic_steps: int = 200
    """Critic updates per round on the grown buffer."""
    critic_lr: float = 3e-4
    """Adam learning rate of the critic while fine-tuning."""
    max_rounds: int = 1000
    """Upper bound on rounds in one alignment run."""
    seed: int = 10_000
    """Round ``i`` resets its episodes with seeds ``seed + i·episodes + j``."""

    def __post_init__(self):
        for name in ("every", "episodes", "max_rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"OnlineConfig.{name} must be >= 1, got "
                                 f"{name}={getattr(self, name)}")
        if self.critic_steps < 0 or not self.critic_lr > 0:
            raise ValueError(f"need critic_steps >= 0 and critic_lr > 0, got critic_steps="
                             f"{self.critic_steps}, critic_lr={self.critic_lr}")


def history_states(trajectories: list[np.ndarray], obs_history: int) -> Tensor:
    """Every non-final observation of each episode with its history, ``(N, T_o, obs_dim)``
    (the history before the start repeats the first observation)."""
    rows = []
    for traj in trajectories:
        obs = np.asarray(traj[:-1], dtype=np.float32)
        idx = np.arange(len(obs))[:, None] + np.arange(-obs_history + 1, 1)[None, :]
        rows.append(obs[np.maximum(idx, 0)])
    return torch.as_tensor(np.concatenate(rows), dtype=torch.float32)


class OnlineTuner:
    """Holds the growing buffer and runs the online rounds for one alignment run."""

    def __init__(self, setup: AlignSetup, episodes, make_env, cfg: OnlineConfig):
        from ..models.critic import resolve_timeouts_as_terminals, transitions_from_episodes

        self.setup, self.make_env, self.cfg = setup, make_env, cfg
        critic = setup.critic
        self.timeouts_as_terminals = resolve_timeouts_as_terminals(critic.cfg, episodes)
        self.buffer = transitions_from_episodes(episodes, self.timeouts_as_terminals)
        self.offline_size = len(self.buffer["rewards"])
        self.params = critic.trainable_parameters()
        self.optimizer = adam(self.params, lr=cfg.critic_lr)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.rounds = 0

    @property
    def done(self) -> bool:
        return self.rounds >= self.cfg.max_rounds

    def _add(self, tr: dict[str, np.ndarray]) -> int:
        done = tr["terminals"] | (tr["timeouts"] if self.timeouts_as_terminals else False)
        new = {"observations": tr["observations"], "actions": tr["actions"],
               "rewards": tr["rewards"], "next_observations": tr["next_observations"],
               "dones": np.asarray(done, dtype=np.float32)}
        for k in self.buffer:
            self.buffer[k] = np.concatenate([self.buffer[k], new[k].astype(np.float32)
                                             .reshape(-1, *self.buffer[k].shape[1:])])
        return len(new["rewards"])

    def _train_critic(self) -> float:
        from ..models.critic import module_device, sample_batch

        critic = self.setup.critic
        if self.cfg.critic_steps == 0:
            return float("nan")
        dev = module_device(critic)
        data = {k: torch.from_numpy(v).to(dev) for k, v in self.buffer.items()}
        for p in self.params:
            p.requires_grad_(True)
        critic.train()
        total = 0.0
        try:
            for _ in range(self.cfg.critic_steps):
                loss = critic.loss(sample_batch(data, critic.cfg.batch_size, self.gen))["loss"]
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if critic.cfg.grad_clip > 0:
                    nn.utils.clip_grad_norm_(self.params, critic.cfg.grad_clip)
                self.optimizer.step()
                critic.update_target()
                total += float(loss.detach())
        finally:
            freeze(critic)
        return total / self.cfg.critic_steps

    def round(self, net: nn.Module) -> dict:
        """One round with the adapter in ``net`` as it is now; returns its record."""
        from ..eval.rollout import rollout

        setup, cfg = self.setup, self.cfg
        res = rollout(setup.model, self.make_env, episodes=cfg.episodes, candidates=1,
                      steps=setup.steps, seed=cfg.seed + self.rounds * cfg.episodes, net=net,
                      record_transitions=True, entropy_states=0)
        added = self._add(res.extra["transitions"])
        loss = self._train_critic()
        visited = history_states(res.trajectories, setup.model.spec.obs_history)
        setup.states = torch.cat([setup.states, visited.to(setup.states.device)])
        self.rounds += 1
        return {"kind": "online_round", "round": self.rounds,
                "return_mean": float(res.returns.mean()),
                "transitions_added": added, "buffer": len(self.buffer["rewards"]),
                "critic_loss": loss, "conditions": len(setup.states)}
