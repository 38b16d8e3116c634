"""IQL agent: an advantage-weighted-regression Gaussian actor on top of an IQL critic.

The actor is extracted from the (fixed) critic by weighted maximum likelihood on the
dataset's own actions (Kostrikov et al. 2021, Eq. 7)::

    L_π = −E_{(s,a)~D}[ min(exp(β (Q̄(s, a) − V(s))), w_max) · log π(a | s) ]

Because IQL's critic never queries the actor, training the critic first and the actor after
it is the same algorithm as training them side by side. The policy is
``N(tanh(f(s)), diag(exp(log_std))²)`` in a min-max-normalised action space (the data's
action range mapped to ``[−1, 1]``), with a state-independent ``log_std``; actions are
``tanh(f(s))`` (deterministic) or a sample clipped to the range, mapped back to env units.
Like the critic, the agent takes RAW observations and returns RAW actions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..data.episodes import Episodes
from ..data.normalizer import NormalizerSet
from ..train.checkpoint import load_model_files, save_model
from .critic import (
    CriticConfig,
    DeviceData,
    FieldNormalizer,
    IQLCritic,
    as_tensor,
    awr_weights,
    build_from_files,
    make_field_normalizers,
    mlp,
    module_device,
    resolve_timeouts_as_terminals,
    sample_batch,
    train_critic,
    trainer_config,
    transitions_from_episodes,
)

__all__ = ["AGENT_KIND", "AgentEpisodes", "IQLAgent", "IQLAgentConfig", "awr_actor_loss",
           "run_agent_episodes", "train_iql_agent"]

AGENT_KIND = "iql_agent"
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


def awr_actor_loss(log_prob: Tensor, weights: Tensor) -> Tensor:
    """``−mean(weights · log_prob)`` (``weights`` detached)."""
    return -(weights.detach() * log_prob).mean()


@dataclass
class IQLAgentConfig:
    """Hyper-parameters of the IQL agent (actor) and of the critic trained for it."""

    critic: CriticConfig = field(default_factory=CriticConfig)
    """The critic's configuration (used when no trained critic is passed in)."""
    hidden: int = 256
    """Width of the actor's hidden layers."""
    depth: int = 2
    """Number of hidden layers of the actor."""
    beta: float = 3.0
    """Inverse temperature of the advantage weights exp(beta * A)."""
    max_weight: float = 100.0
    """Upper clip of the advantage weights."""
    steps: int = 3000
    """Actor optimiser steps."""
    batch_size: int = 256
    """Transitions per actor step."""
    lr: float = 3e-4
    """Actor Adam learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay of the actor."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up steps."""
    schedule: str = "cosine"
    """Learning-rate schedule after warm-up (IQL decays the actor's rate with a cosine)."""
    grad_clip: float = 10.0
    """Global gradient-norm clip (0 = none)."""
    seed: int = 0
    """Seed of the actor's initialisation and batch sampling."""
    device: str = "auto"
    """'auto', 'cpu', 'cuda', ..."""
    log_every: int = 100
    """Log metrics every this many steps."""
    ckpt_every: int = 1000
    """Save a resumable training state every this many steps (with an out_dir; 0 = only at
    the end)."""

    def __post_init__(self) -> None:
        if isinstance(self.critic, dict):  # from config.json
            self.critic = CriticConfig(**self.critic)
        if not isinstance(self.critic, CriticConfig):
            raise ValueError(f"IQLAgentConfig.critic must be a CriticConfig, got "
                             f"critic={self.critic!r}")
        for name in ("hidden", "depth", "steps", "batch_size", "log_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"IQLAgentConfig.{name} must be an integer >= 1, got "
                                 f"{name}={v!r}")
        for name in ("warmup_steps", "seed", "ckpt_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"IQLAgentConfig.{name} must be an integer >= 0, got "
                                 f"{name}={v!r}")
        checks = {
            "beta": self.beta >= 0.0 and math.isfinite(self.beta),
            "max_weight": self.max_weight > 0.0 and math.isfinite(self.max_weight),
            "lr": self.lr > 0.0 and math.isfinite(self.lr),
            "weight_decay": self.weight_decay >= 0.0,
            "grad_clip": self.grad_clip >= 0.0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"IQLAgentConfig.{name} is out of range: "
                                 f"{name}={getattr(self, name)!r}")


class IQLAgent(nn.Module):
    """Gaussian AWR actor on raw observations; ``act`` returns raw actions.

    ``normalizers``: ``observations`` (any kind, e.g. gaussian) and ``actions`` (min-max: the
    action range of the data, mapped to ``[−1, 1]``).
    """

    def __init__(self, obs_dim: int, act_dim: int, cfg: IQLAgentConfig | None = None,
                 normalizers: NormalizerSet | None = None) -> None:
        super().__init__()
        if obs_dim < 1 or act_dim < 1:
            raise ValueError(f"need obs_dim >= 1 and act_dim >= 1, got obs_dim={obs_dim} "
                             f"act_dim={act_dim}")
        if normalizers is not None and "actions" in normalizers \
                and normalizers["actions"].kind != "minmax":
            raise ValueError("IQLAgent needs a 'minmax' action normaliser (the action range), "
                             f"got {normalizers['actions'].kind!r}")
        self.cfg = cfg if cfg is not None else IQLAgentConfig()
        """Hyper-parameters."""
        self.obs_dim = int(obs_dim)
        """Observation size."""
        self.act_dim = int(act_dim)
        """Action size."""
        act_params = None
        if normalizers is None or "actions" not in normalizers:  # default range [-1, 1]
            act_params = {"min": -torch.ones(act_dim), "max": torch.ones(act_dim)}
        self.normalizer = make_field_normalizers(normalizers, {"observations": obs_dim})
        """Observation and action normalisers (buffers)."""
        if act_params is not None:
            self.normalizer["actions"] = FieldNormalizer(act_dim, act_params)
        else:
            self.normalizer.update(make_field_normalizers(normalizers, {"actions": act_dim}))
        self.net = mlp(obs_dim, self.cfg.hidden, self.cfg.depth, act_dim)
        """Observation -> pre-tanh mean."""
        self.log_std = nn.Parameter(torch.zeros(act_dim))
        """State-independent log standard deviation (normalised action units)."""

    def mean_normalized(self, obs: Any) -> Tensor:
        """``tanh(f(s))`` in the normalised action space ``[−1, 1]``."""
        x = as_tensor(obs, module_device(self))
        if x.shape[-1] != self.obs_dim:
            raise ValueError(f"observations must end in dim {self.obs_dim}, got {tuple(x.shape)}")
        return torch.tanh(self.net(self.normalizer["observations"].normalize(x)))

    def std(self) -> Tensor:
        return self.log_std.clamp(LOG_STD_MIN, LOG_STD_MAX).exp()

    def log_prob(self, obs: Any, act: Any) -> Tensor:
        """``log π(a | s)`` of raw actions (density in normalised units), shape ``(...)``."""
        a = self.normalizer["actions"].normalize(as_tensor(act, module_device(self)))
        dist = torch.distributions.Normal(self.mean_normalized(obs), self.std())
        return dist.log_prob(a).sum(-1)

    def forward(self, obs: Any) -> Tensor:
        """Deterministic raw actions ``(..., act_dim)`` (tensor, differentiable)."""
        return self.normalizer["actions"].unnormalize(self.mean_normalized(obs))

    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool = True,
            generator: torch.Generator | None = None) -> np.ndarray:
        """Raw float32 actions for ``obs`` of shape ``(obs_dim,)`` or ``(B, obs_dim)``.

        Stochastic actions draw ``N(mean, std²)`` noise from ``generator`` (CPU) and are
        clipped to the data's action range.
        """
        mean = self.mean_normalized(obs)
        if not deterministic:
            noise = torch.randn(mean.shape, generator=generator).to(mean.device)
            mean = (mean + self.std() * noise).clamp(-1.0, 1.0)
        return self.normalizer["actions"].unnormalize(mean).cpu().numpy().astype(np.float32)

    def loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """AWR loss on ``observations``, ``actions`` and precomputed ``weights``."""
        logp = self.log_prob(batch["observations"], batch["actions"])
        loss = awr_actor_loss(logp, batch["weights"])
        return {"loss": loss, "loss_actor": loss, "weight_mean": batch["weights"].mean(),
                "std_mean": self.std().detach().mean()}

    # -- checkpoints
    def config_dict(self) -> dict[str, Any]:
        return {"kind": AGENT_KIND, "obs_dim": self.obs_dim, "act_dim": self.act_dim,
                "config": asdict(self.cfg)}

    def save(self, directory: str | Path) -> Path:
        return save_model(directory, self, self.config_dict())

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> IQLAgent:
        """Rebuild an agent saved by :meth:`save` (CheckpointError names the path)."""
        config, tensors = load_model_files(directory, device="cpu")
        agent = build_from_files(cls, IQLAgentConfig, directory, config, tensors, AGENT_KIND)
        return agent.to(device).eval()


@torch.no_grad()
def _advantages(critic: IQLCritic, obs: np.ndarray, act: np.ndarray, chunk: int = 16384
                ) -> np.ndarray:
    dev = module_device(critic)
    out = [critic.advantage(torch.as_tensor(obs[s:s + chunk], device=dev),
                            torch.as_tensor(act[s:s + chunk], device=dev)).cpu().numpy()
           for s in range(0, len(obs), chunk)]
    return np.concatenate(out).astype(np.float32)


def train_iql_agent(episodes: Episodes, cfg: IQLAgentConfig | None = None,
                    out_dir: str | Path | None = None, critic: IQLCritic | None = None,
                    progress: bool = True) -> IQLAgent:
    """Train the IQL critic (unless ``critic`` is given), then the AWR actor, on ``episodes``.

    With ``out_dir`` the agent goes to ``out_dir`` (``config.json`` kind ``"iql_agent"``) and a
    critic trained here to ``out_dir/critic``. Returns the agent in eval mode (on CPU or the
    configured device).
    """
    from ..train.trainer import fit

    cfg = cfg if cfg is not None else IQLAgentConfig()
    out = None if out_dir is None else Path(out_dir)
    if critic is None:
        critic = train_critic(episodes, cfg.critic, None if out is None else out / "critic",
                              progress=progress)
    critic.eval()
    tat = resolve_timeouts_as_terminals(critic.cfg, episodes)
    data = transitions_from_episodes(episodes, tat)
    obs, act = data["observations"], data["actions"]
    weights = awr_weights(torch.from_numpy(_advantages(critic, obs, act)), cfg.beta,
                          cfg.max_weight).numpy()
    norms = NormalizerSet.fit_arrays({"observations": obs, "actions": act},
                                     kind={"observations": "gaussian", "actions": "minmax"})
    torch.manual_seed(cfg.seed)
    agent = IQLAgent(episodes.obs_dim, episodes.act_dim, cfg, norms)
    tensors = DeviceData({"observations": obs, "actions": act, "weights": weights})

    def loss_fn(model: nn.Module, batch_size: int, gen: torch.Generator) -> dict[str, Tensor]:
        return model.loss(sample_batch(tensors.on(module_device(model)), batch_size, gen))

    result = fit(agent, loss_fn, trainer_config(cfg, progress), out_dir=out,
                 save_fn=lambda d, m: m.save(d), params=list(agent.parameters()),
                 log_prefix="agent")
    return result.model.eval()


# ---------------------------------------------------------------------------- evaluation
@dataclass
class AgentEpisodes:
    """What :func:`run_agent_episodes` measured, one entry per episode."""

    returns: np.ndarray
    """(E,) undiscounted returns."""
    lengths: np.ndarray
    """(E,) episode lengths in steps."""
    success: np.ndarray | None
    """(E,) bool, or None when the environment never reported success."""
    seeds: list[int]
    """The reset seed of each episode."""


def run_agent_episodes(agent: Any, make_env: Callable[[], Any], episodes: int = 10,
                       seed: int = 0, deterministic: bool = True,
                       generator: torch.Generator | None = None, progress: bool = False
                       ) -> AgentEpisodes:
    """Play ``episodes`` episodes of ``agent.act(obs, deterministic)`` in envs of ``make_env()``.

    Episode ``i`` runs in its own environment reset with ``seed + i`` and an episode succeeds
    when any step's ``info`` reports success: the seeds and the success rule of
    :func:`diffalign.eval.rollout.rollout`, so the numbers compare with the pipeline's
    evaluations. ``generator`` draws the noise of stochastic actions.
    """
    from ..eval.rollout import _success_flag

    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
        raise ValueError(f"episodes must be an integer >= 1, got episodes={episodes!r}")
    returns = np.zeros(episodes)
    lengths = np.zeros(episodes, dtype=np.int64)
    success: list[bool | None] = [None] * episodes
    seeds = [int(seed) + i for i in range(episodes)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=episodes, desc="eval", dynamic_ncols=True)
    try:
        for i, s in enumerate(seeds):
            env = make_env()
            try:
                obs, _ = env.reset(seed=s)
                done = False
                while not done:
                    a = agent.act(np.asarray(obs, np.float32), deterministic=deterministic,
                                  generator=generator)
                    obs, r, term, trunc, info = env.step(
                        np.asarray(a).reshape(env.action_space.shape))
                    returns[i] += float(r)
                    lengths[i] += 1
                    flag = _success_flag(info) if isinstance(info, dict) else None
                    if flag is not None:
                        success[i] = bool(success[i]) or flag
                    done = bool(term or trunc)
            finally:
                env.close()
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    succ = None if all(v is None for v in success) else np.array([bool(v) for v in success])
    return AgentEpisodes(returns=returns, lengths=lengths, success=succ, seeds=seeds)
