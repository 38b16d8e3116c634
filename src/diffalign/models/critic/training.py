"""Training the IQL critic: transitions from episodes (:func:`transitions_from_episodes`,
time-outs resolved by :func:`resolve_timeouts_as_terminals`), batches
(:func:`sample_batch`, :class:`DeviceData`), :func:`train_critic` and
:func:`evaluate_critic`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ...data.episodes import Episodes
from ...data.normalizer import NormalizerSet
from .config import CriticConfig
from .networks import CriticEnsemble, IQLCritic, module_device

__all__ = [
    "DeviceData",
    "evaluate_critic",
    "resolve_timeouts_as_terminals",
    "sample_batch",
    "train_critic",
    "trainer_config",
    "transitions_from_episodes",
]


# ----------------------------------------------------------------------------- data
def transitions_from_episodes(episodes: Episodes, timeouts_as_terminals: bool = False
                              ) -> dict[str, np.ndarray]:
    """Flat ``(s, a, r, s', done)`` arrays from an :class:`Episodes`.

    With ``next_observations`` every step is kept. Without them ``s'`` is the next row of the
    same episode; an episode's last step is kept only when it is terminal (its ``s'`` is then
    never used and is set to ``s``) and dropped otherwise (time-out or unterminated tail).
    ``done = terminals`` (``| timeouts`` when ``timeouts_as_terminals``).
    """
    obs = episodes.observations
    done = episodes.terminals.copy()
    if timeouts_as_terminals:
        done |= episodes.timeouts
    if episodes.next_observations is not None:
        keep = np.ones(len(obs), dtype=bool)
        nxt = episodes.next_observations
    else:
        last = np.zeros(len(obs), dtype=bool)
        last[episodes.ends - 1] = True
        keep = ~last | episodes.terminals
        nxt = np.empty_like(obs)
        nxt[:-1] = obs[1:]
        nxt[last] = obs[last]
    if not keep.any():
        raise ValueError(f"{episodes.source or 'dataset'}: no transitions with a next "
                         "observation (every episode has one step and no next_observations)")
    return {
        "observations": obs[keep].astype(np.float32),
        "actions": episodes.actions[keep].astype(np.float32),
        "rewards": episodes.rewards[keep].astype(np.float32),
        "next_observations": nxt[keep].astype(np.float32),
        "dones": done[keep].astype(np.float32),
    }


def _is_nav1d(episodes: Episodes) -> bool:
    from ...envs import NAV1D_ID

    return episodes.meta.get("env_id") == NAV1D_ID


def resolve_timeouts_as_terminals(cfg: CriticConfig, episodes: Episodes) -> bool:
    """``cfg.timeouts_as_terminals``, with None resolved (True for Nav1D data)."""
    if cfg.timeouts_as_terminals is not None:
        return bool(cfg.timeouts_as_terminals)
    return _is_nav1d(episodes)


def sample_batch(data: dict[str, Tensor], batch_size: int, generator: torch.Generator
                 ) -> dict[str, Tensor]:
    """``batch_size`` rows drawn uniformly with replacement (indices from ``generator``)."""
    n = next(iter(data.values())).shape[0]
    idx = torch.randint(n, (batch_size,), generator=generator)
    dev = next(iter(data.values())).device
    idx = idx.to(dev)
    return {k: v.index_select(0, idx) for k, v in data.items()}


class DeviceData:
    """Transition arrays as tensors, moved lazily to whichever device the model is on."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.cpu = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
        self._cache: dict[str, dict[str, Tensor]] = {}

    def on(self, device: torch.device) -> dict[str, Tensor]:
        key = str(device)
        if key not in self._cache:
            self._cache[key] = {k: v.to(device) for k, v in self.cpu.items()}
        return self._cache[key]


def trainer_config(cfg: Any, progress: bool):
    """The trainer's ``TrainConfig`` for a critic/agent config (EMA off)."""
    from ...train.trainer import TrainConfig

    return TrainConfig(
        steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps, schedule=cfg.schedule, grad_clip=cfg.grad_clip,
        ema_decay=0.0, log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, seed=cfg.seed,
        device=cfg.device, bf16=False, progress=progress,
    )


def train_critic(episodes: Episodes, cfg: CriticConfig | None = None,
                 out_dir: str | Path | None = None, progress: bool = True
                 ) -> IQLCritic | CriticEnsemble:
    """Fit an :class:`IQLCritic` on the transitions of ``episodes`` with the generic trainer.

    Polyak updates run after every optimiser step; no EMA. With ``cfg.ensemble > 1`` the
    members train side by side in one loop (one optimiser step over the sum of their
    losses, each member on its own batch) and a :class:`CriticEnsemble` is returned. With
    ``out_dir`` the critic is saved there (``config.json`` + ``model.safetensors``) and a
    killed run resumes from the trainer's state in it. Returns the critic in eval mode.
    """
    from ...train.trainer import fit

    cfg = cfg if cfg is not None else CriticConfig()
    data = transitions_from_episodes(episodes, resolve_timeouts_as_terminals(cfg, episodes))
    norms = NormalizerSet.fit_arrays(
        {"observations": data["observations"], "actions": data["actions"]}, kind="gaussian")
    torch.manual_seed(cfg.seed)  # the initial weights
    cls = CriticEnsemble if cfg.ensemble > 1 else IQLCritic
    critic = cls(episodes.obs_dim, episodes.act_dim, cfg, norms)
    tensors = DeviceData(data)

    def loss_fn(model: nn.Module, batch_size: int, gen: torch.Generator) -> dict[str, Tensor]:
        on = tensors.on(module_device(model))
        if isinstance(model, CriticEnsemble):
            return model.loss([sample_batch(on, batch_size, gen) for _ in range(len(model))])
        return model.loss(sample_batch(on, batch_size, gen))

    result = fit(
        critic, loss_fn, trainer_config(cfg, progress),
        out_dir=None if out_dir is None else Path(out_dir),
        save_fn=lambda d, m: m.save(d),
        params=critic.trainable_parameters(),
        after_step=lambda m, step: m.update_target(),
        log_prefix="critic",
    )
    return result.model.eval()


@torch.no_grad()
def evaluate_critic(critic: IQLCritic | CriticEnsemble, data: dict[str, np.ndarray],
                    chunk: int = 8192) -> dict[str, float]:
    """Mean losses and values of ``critic`` over ALL transitions in ``data`` (deterministic).

    Returns ``loss_q``, ``loss_v``, ``loss``, ``q_mean``, ``v_mean``, ``adv_mean`` as floats.
    """
    n = len(data["observations"])
    sums: dict[str, float] = {}
    dev = module_device(critic)
    for s in range(0, n, chunk):
        batch = {k: torch.as_tensor(v[s:s + chunk], device=dev) for k, v in data.items()}
        out = critic.loss(batch)
        m = len(batch["observations"])
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v) * m
    return {k: v / n for k, v in sums.items()}
