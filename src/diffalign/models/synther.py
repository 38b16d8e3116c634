"""SynthER (Lu et al. 2024): a diffusion model of flat transitions that up-samples a dataset.

A transition is the flat vector ``x = [s, a, r, s', done]`` of width
``D = 2·obs_dim + act_dim + 2``, diffused as data of shape ``(B, 1, D)`` with the residual MLP
backbone and any of the four processes (DDPM, DDIM, SM, FM). The generated transitions are
appended to the real ones and a downstream agent (here IQL) is trained on the union.

Encoding (fitted on the real data, stored as buffers in ``model.safetensors``):

* ``s`` and ``s'`` share one per-dimension Gaussian normaliser fitted on both, so the
  displacement ``s' - s`` keeps one scale and the dynamics stay easy to learn;
* ``a`` and ``r`` get their own per-dimension Gaussian normalisers (rewards are not clipped
  or shaped; only standardised);
* ``done`` is kept as a 0/1 flag mapped to ``{-1, +1}`` (``2·done - 1``, not fitted), and
  decoded by thresholding at 0.5. It is ``terminals``, or ``terminals | timeouts`` when
  ``SynthERConfig.timeouts_as_terminals`` (automatic for Nav1D, whose observation holds the
  time so its time-out is the true end of the task — the IQL critic's rule too);
* a dimension whose std is below ``1e-3`` (e.g. a constant coordinate) is shifted but not
  scaled, so it cannot blow up noise.

Generated actions are clipped to the per-dimension range of the dataset's actions.

:meth:`SynthER.upsample` returns real + synthetic transitions as one :class:`Episodes`: the
real steps first (unchanged), then **each synthetic transition as its own one-step episode**
with ``terminals = done`` and ``timeouts = not done``. The agent trained on the union must
therefore bootstrap through time-outs (``CriticConfig.timeouts_as_terminals=False``, the D4RL
convention) and read ``next_observations``; :func:`train_synther_main` sets that. When the
generator's ``done`` includes time-outs (Nav1D), :meth:`SynthER.upsample` also sets
``terminals |= timeouts`` on the real steps, so the real part keeps the meaning it has for a
critic that treats time-outs as terminal. Code that chains consecutive steps (trajectory
windows for a planner) must not be fed the synthetic part.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..data.episodes import Episodes
from ..nets import build_backbone
from ..processes import PROCESSES, build_process
from ..train.checkpoint import CheckpointError, load_model_files, save_model

__all__ = [
    "SynthER",
    "SynthERConfig",
    "SynthERTrainConfig",
    "TransitionSampler",
    "evaluate_agent",
    "nav1d_fidelity",
    "train_synther",
    "train_synther_main",
    "transitions_from_episodes",
]

KIND = "synther"
_MIN_STD = 1e-3


# ---------------------------------------------------------------------------- configuration
@dataclass
class SynthERConfig:
    """Architecture of a SynthER generator (everything needed to rebuild it from config.json)."""

    obs_dim: int
    """Observation width."""
    act_dim: int
    """Action width."""
    process: str = "ddpm"
    """Diffusion process: "ddpm", "ddim", "sm" or "fm"."""
    process_kwargs: dict = field(default_factory=dict)
    """Keyword arguments of the process constructor (e.g. ``{"num_train_steps": 100}``).
    DDPM/DDIM default to ``prediction="v"`` here: with ε-prediction the first strided step
    from ᾱ_K ≈ 2e-7 (cosine schedule) divides the ε error by √ᾱ_K, and unbounded
    (standardised) transitions blow up unless ``clip_x0`` is set."""
    width: int = 256
    """Hidden width of the residual MLP (the paper uses 1024 on D4RL)."""
    depth: int = 4
    """Number of residual blocks (the paper uses 6)."""
    sample_steps: int | None = None
    """Denoising steps used by :meth:`SynthER.generate` (None: the process's default)."""
    timeouts_as_terminals: bool = False
    """The generated ``done`` flag stands for ``terminals | timeouts`` (data whose time-out is
    the true end, e.g. Nav1D) instead of ``terminals`` alone."""

    def __post_init__(self) -> None:
        if self.obs_dim < 1 or self.act_dim < 1:
            raise ValueError(f"obs_dim and act_dim must be >= 1, got obs_dim={self.obs_dim} "
                             f"act_dim={self.act_dim}")
        if self.process not in PROCESSES:
            raise ValueError(f"unknown process {self.process!r}; choose one of "
                             f"{sorted(PROCESSES)}")
        if self.width < 1 or self.depth < 1:
            raise ValueError(f"need width >= 1 and depth >= 1, got width={self.width} "
                             f"depth={self.depth}")
        if self.sample_steps is not None and self.sample_steps < 1:
            raise ValueError(f"sample_steps must be >= 1 or None, got {self.sample_steps}")
        self.process_kwargs = dict(self.process_kwargs)
        if self.process in ("ddpm", "ddim"):
            self.process_kwargs.setdefault("prediction", "v")

    @property
    def x_dim(self) -> int:
        """Width of a flat transition, ``2·obs_dim + act_dim + 2``."""
        return 2 * self.obs_dim + self.act_dim + 2


# ---------------------------------------------------------------------------- transitions
def transitions_from_episodes(episodes: Episodes, timeouts_as_terminals: bool = False
                              ) -> dict[str, np.ndarray]:
    """The dataset's transitions ``(s, a, r, s', done)`` as float32 arrays.

    ``terminals`` (the done flag, 0/1 floats) is ``terminals | timeouts`` when
    ``timeouts_as_terminals``.

    Uses ``next_observations`` when the dataset has them. Otherwise ``s'`` is the next step's
    observation within the episode, and the last step of an episode that is not terminal
    (no successor known) is dropped; a terminal last step keeps ``s' = s`` (never used by a
    bootstrapping agent since ``done = 1``).
    """
    obs = episodes.observations
    flags = episodes.terminals | episodes.timeouts if timeouts_as_terminals \
        else episodes.terminals
    done = flags.astype(np.float32)
    if episodes.next_observations is not None:
        keep = np.arange(episodes.num_steps)
        nxt = episodes.next_observations
    else:
        nxt = np.empty_like(obs)
        nxt[:-1] = obs[1:]
        last = episodes.ends - 1
        nxt[last] = obs[last]
        drop = np.zeros(episodes.num_steps, bool)
        drop[last] = ~flags[last]
        keep = np.flatnonzero(~drop)
        if len(keep) == 0:
            raise ValueError("no transition with a known next observation: every episode has "
                             "one step and none is terminal")
    return {
        "observations": obs[keep],
        "actions": episodes.actions[keep],
        "rewards": episodes.rewards[keep],
        "next_observations": nxt[keep],
        "terminals": done[keep],
    }


def _flatten(tr: Mapping[str, np.ndarray]) -> np.ndarray:
    """``(N, D)`` float32 from a transitions dict (see :func:`transitions_from_episodes`)."""
    return np.concatenate([
        np.asarray(tr["observations"], np.float32),
        np.asarray(tr["actions"], np.float32),
        np.asarray(tr["rewards"], np.float32).reshape(-1, 1),
        np.asarray(tr["next_observations"], np.float32),
        np.asarray(tr["terminals"], np.float32).reshape(-1, 1),
    ], axis=1)


class TransitionSampler:
    """Uniform minibatches of raw (unnormalised) flat transitions ``(B, D)``."""

    def __init__(self, flat: np.ndarray | Tensor) -> None:
        self.data = torch.as_tensor(np.asarray(flat), dtype=torch.float32)
        """``(N, D)`` flat transitions ``[s, a, r, s', done]``."""
        if self.data.dim() != 2 or len(self.data) == 0:
            raise ValueError(f"need a non-empty (N, D) array, got shape {tuple(self.data.shape)}")

    def __len__(self) -> int:
        return len(self.data)

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """``batch_size`` transitions drawn uniformly with replacement (CPU tensor)."""
        idx = torch.randint(len(self.data), (batch_size,), generator=generator)
        return self.data[idx]


# ---------------------------------------------------------------------------- the model
class SynthER(nn.Module):
    """Diffusion generator of flat transitions ``[s, a, r, s', done]`` (see module docs)."""

    def __init__(self, cfg: SynthERConfig) -> None:
        super().__init__()
        self.cfg = cfg
        """Architecture."""
        self.process = build_process(cfg.process, **cfg.process_kwargs)
        """The (stateless) diffusion process."""
        self.net = build_backbone("mlp", x_dim=cfg.x_dim, horizon=1, width=cfg.width,
                                  depth=cfg.depth)
        """Residual MLP denoiser on ``(B, 1, D)``."""
        d = cfg.x_dim
        self.register_buffer("x_mean", torch.zeros(d))
        self.register_buffer("x_std", torch.ones(d))
        self.register_buffer("act_low", -torch.ones(cfg.act_dim))
        self.register_buffer("act_high", torch.ones(cfg.act_dim))
        self.register_buffer("fitted", torch.zeros(()))

    # -- layout ---------------------------------------------------------------------------
    def _slices(self) -> dict[str, slice]:
        o, a = self.cfg.obs_dim, self.cfg.act_dim
        return {"observations": slice(0, o), "actions": slice(o, o + a),
                "rewards": slice(o + a, o + a + 1),
                "next_observations": slice(o + a + 1, 2 * o + a + 1),
                "terminals": slice(2 * o + a + 1, 2 * o + a + 2)}

    @classmethod
    def from_episodes(cls, episodes: Episodes, **cfg_kwargs: Any) -> SynthER:
        """A new model sized for ``episodes`` with its normaliser fitted on them.

        ``timeouts_as_terminals`` defaults to True for Nav1D data, False otherwise.
        """
        if cfg_kwargs.get("timeouts_as_terminals") is None:
            cfg_kwargs["timeouts_as_terminals"] = _timeouts_are_ends(episodes)
        model = cls(SynthERConfig(obs_dim=episodes.obs_dim, act_dim=episodes.act_dim,
                                  **cfg_kwargs))
        model.fit_normalizer(episodes)
        return model

    def fit_normalizer(self, episodes: Episodes | Mapping[str, np.ndarray]) -> SynthER:
        """Fit the encoding (see module docs) and the action range on real transitions."""
        tr = episodes if isinstance(episodes, Mapping) else self._transitions(episodes)
        sl = self._slices()
        flat = _flatten(tr).astype(np.float64)
        mean, std = flat.mean(0), flat.std(0)
        both = np.concatenate([flat[:, sl["observations"]], flat[:, sl["next_observations"]]])
        for name in ("observations", "next_observations"):
            mean[sl[name]], std[sl[name]] = both.mean(0), both.std(0)
        std = np.where(std < _MIN_STD, 1.0, std)
        # done: 0/1 -> -1/+1, a fixed map (not fitted, so rare or absent dones are safe)
        mean[sl["terminals"]], std[sl["terminals"]] = 0.5, 0.5
        acts = flat[:, sl["actions"]]
        with torch.no_grad():
            self.x_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
            self.x_std.copy_(torch.as_tensor(std, dtype=torch.float32))
            self.act_low.copy_(torch.as_tensor(acts.min(0), dtype=torch.float32))
            self.act_high.copy_(torch.as_tensor(acts.max(0), dtype=torch.float32))
            self.fitted.fill_(1.0)
        return self

    def _check_fitted(self) -> None:
        if float(self.fitted) != 1.0:
            raise RuntimeError("SynthER normaliser is not fitted: build with "
                               "SynthER.from_episodes or call fit_normalizer first")

    def encode(self, flat: Tensor) -> Tensor:
        """Raw ``(..., D)`` transitions -> normalised model space."""
        return (flat - self.x_mean) / self.x_std

    def decode(self, z: Tensor) -> Tensor:
        """Model space -> raw transitions (no rounding or clipping)."""
        return z * self.x_std + self.x_mean

    # -- training ---------------------------------------------------------------------------
    def _transitions(self, episodes: Episodes) -> dict[str, np.ndarray]:
        return transitions_from_episodes(episodes, self.cfg.timeouts_as_terminals)

    def make_dataset(self, episodes: Episodes) -> TransitionSampler:
        """A uniform sampler of ``episodes``' raw flat transitions (for :meth:`loss`)."""
        return TransitionSampler(_flatten(self._transitions(episodes)))

    def loss(self, batch: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Denoising loss of raw flat transitions ``(B, D)`` or ``(B, 1, D)``."""
        self._check_fitted()
        dev = self.x_mean.device
        x = batch.to(dev, torch.float32)
        if x.dim() == 2:
            x = x[:, None, :]
        if x.dim() != 3 or x.shape[1:] != (1, self.cfg.x_dim):
            raise ValueError(f"batch must have shape (B, {self.cfg.x_dim}) or "
                             f"(B, 1, {self.cfg.x_dim}), got {tuple(batch.shape)}")
        out = self.process.loss(self.net, self.encode(x), generator=generator)
        return {"loss": out["loss"]}

    # -- generation -------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, n: int, generator: torch.Generator | None = None,
                 steps: int | None = None, batch_size: int = 8192) -> dict[str, np.ndarray]:
        """``n`` synthetic transitions as numpy arrays (raw units).

        Keys: ``observations (n, obs)``, ``actions (n, act)`` (clipped to the dataset's
        range), ``rewards (n,)``, ``next_observations (n, obs)``, ``terminals (n,)`` bool
        (the generated flag thresholded at 0.5). Same generator state -> same samples.
        """
        self._check_fitted()
        if n < 0:
            raise ValueError(f"n must be >= 0, got n={n}")
        steps = steps if steps is not None else self.cfg.sample_steps
        was_training = self.training
        self.eval()
        chunks = []
        d = self.cfg.x_dim
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            z = self.process.sample(self.net, (b, 1, d), steps=steps, generator=generator).x0
            chunks.append(self.decode(z[:, 0]).float().cpu())
        self.train(was_training)
        flat = torch.cat(chunks) if chunks else torch.zeros(0, d)
        sl = self._slices()
        acts = torch.maximum(torch.minimum(flat[:, sl["actions"]], self.act_high.cpu()),
                             self.act_low.cpu())
        return {
            "observations": flat[:, sl["observations"]].numpy(),
            "actions": acts.numpy(),
            "rewards": flat[:, sl["rewards"]][:, 0].numpy(),
            "next_observations": flat[:, sl["next_observations"]].numpy(),
            "terminals": (flat[:, sl["terminals"]][:, 0] > 0.5).numpy(),
        }

    def upsample(self, episodes: Episodes, n_synthetic: int,
                 generator: torch.Generator | None = None, steps: int | None = None
                 ) -> Episodes:
        """Real steps (unchanged, first) + ``n_synthetic`` generated one-step episodes.

        Each synthetic transition is its own episode: ``terminals = done`` and
        ``timeouts = not done`` (see module docs). ``meta`` gains ``n_real_steps`` and
        ``n_synthetic``. With ``cfg.timeouts_as_terminals`` the real steps get
        ``terminals |= timeouts`` (see module docs). Real data without ``next_observations``
        gets them filled from the next step (the last step of a non-terminal episode then
        repeats its observation).
        """
        syn = self.generate(n_synthetic, generator=generator, steps=steps)
        real_next = episodes.next_observations
        if real_next is None:
            real_next = np.empty_like(episodes.observations)
            real_next[:-1] = episodes.observations[1:]
            last = episodes.ends - 1
            real_next[last] = episodes.observations[last]
        term = syn["terminals"].astype(bool)
        real_term = episodes.terminals | episodes.timeouts if self.cfg.timeouts_as_terminals \
            else episodes.terminals
        meta = dict(episodes.meta, n_real_steps=episodes.num_steps, n_synthetic=int(n_synthetic))
        return Episodes.from_arrays(
            observations=np.concatenate([episodes.observations, syn["observations"]]),
            actions=np.concatenate([episodes.actions, syn["actions"]]),
            rewards=np.concatenate([episodes.rewards, syn["rewards"]]),
            terminals=np.concatenate([real_term, term]),
            timeouts=np.concatenate([episodes.timeouts, ~term]),
            next_observations=np.concatenate([real_next, syn["next_observations"]]),
            meta=meta,
        )

    # -- checkpoints ------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        return {"kind": KIND, **asdict(self.cfg)}

    def save(self, directory: str | Path) -> Path:
        """Write ``config.json`` (kind "synther") and ``model.safetensors`` (weights+buffers)."""
        return save_model(directory, self, self.config_dict())

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> SynthER:
        """Inverse of :meth:`save`; raises :class:`CheckpointError` on a bad directory."""
        config, tensors = load_model_files(directory, device)
        if config.get("kind") != KIND:
            raise CheckpointError(f"{directory} holds a {config.get('kind')!r} checkpoint, "
                                  f"not {KIND!r}")
        cfg_fields = {k: v for k, v in config.items() if k != "kind"}
        try:
            model = cls(SynthERConfig(**cfg_fields))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"invalid SynthER config in {directory}: {e}") from e
        try:
            model.load_state_dict(tensors, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"weights in {directory} do not match its config: {e}") from e
        return model.to(device)


# ---------------------------------------------------------------------------- training
@dataclass
class SynthERTrainConfig:
    """Generator training and sizes (defaults sized for Nav1D on 2 CPU cores)."""

    steps: int = 3000
    """Optimiser steps."""
    batch_size: int = 256
    """Transitions per step."""
    lr: float = 1e-3
    """Peak learning rate."""
    width: int = 128
    """Residual MLP width."""
    depth: int = 3
    """Residual blocks."""
    sample_steps: int | None = None
    """Denoising steps at generation (None: the process's default)."""
    seed: int = 0
    """Seed of initialisation and minibatches."""
    device: str = "auto"
    """"auto", "cpu" or "cuda"."""
    ema_decay: float = 0.995
    """EMA of the weights (the EMA model is what gets saved and returned)."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got steps={self.steps} "
                             f"batch_size={self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got lr={self.lr}")


def _timeouts_are_ends(episodes: Episodes) -> bool:
    from ..envs import NAV1D_ID

    return episodes.meta.get("env_id") == NAV1D_ID


def _episodes_of(data: Any, layout_seed: int = 0) -> Episodes:
    if isinstance(data, Episodes):
        return data
    if isinstance(data, str):
        from ..tasks import resolve_task

        return resolve_task(data, layout_seed=layout_seed).episodes
    if hasattr(data, "episodes"):
        return data.episodes
    raise TypeError(f"expected a task string, a Task or Episodes, got {type(data).__name__}")


def train_synther(data: Any, process: str = "ddpm", cfg: SynthERTrainConfig | None = None,
                  out_dir: str | Path | None = None, layout_seed: int = 0,
                  process_kwargs: Mapping[str, Any] | None = None) -> SynthER:
    """Train a SynthER generator on a task string, a ``Task`` or ``Episodes``.

    Uses :func:`diffalign.train.trainer.fit`; with ``out_dir`` the checkpoints (and a
    resumable training state) go there. Returns the EMA model (CPU or the training device).
    """
    from ..train.trainer import TrainConfig, fit

    cfg = cfg or SynthERTrainConfig()
    episodes = _episodes_of(data, layout_seed)
    torch.manual_seed(cfg.seed)
    model = SynthER.from_episodes(episodes, process=process,
                                  process_kwargs=dict(process_kwargs or {}), width=cfg.width,
                                  depth=cfg.depth, sample_steps=cfg.sample_steps)
    sampler = model.make_dataset(episodes)
    bs = cfg.batch_size

    def loss_fn(m: nn.Module, batch_size: int, generator: torch.Generator
                ) -> dict[str, Tensor]:
        return m.loss(sampler.sample(batch_size, generator), generator=generator)

    tcfg = TrainConfig(steps=cfg.steps, batch_size=bs, lr=cfg.lr,
                       warmup_steps=min(100, cfg.steps // 10), ema_decay=cfg.ema_decay,
                       seed=cfg.seed, device=cfg.device, progress=cfg.progress,
                       log_every=max(1, min(200, cfg.steps // 10)),
                       ckpt_every=max(cfg.steps, 1))

    def save_fn(directory: Path, m: nn.Module) -> None:
        m.save(directory)

    res = fit(model, loss_fn, tcfg, out_dir=out_dir, save_fn=save_fn, log_prefix="synther")
    best = res.ema_model if res.ema_model is not None else res.model
    best.eval()
    return best


# ---------------------------------------------------------------------------- evaluation
def nav1d_fidelity(tr: Mapping[str, np.ndarray], layout_seed: int = 0, horizon: int = 32,
                   step_size: float = 0.1) -> dict[str, float]:
    """Physical consistency of Nav1D transitions (generated or real).

    ``dynamics_error``: mean ``|s'_pos - clip(s_pos + δ·a, -1, 1)|``; ``reward_error``: mean
    ``|r - reward(s'_pos, t)|`` with ``t = round(s_time·T)`` clipped to ``[0, T-1]``;
    ``time_error``: mean ``|s'_time - (s_time + 1/T)|``.
    """
    from ..envs.nav1d import dynamics, nav1d_layout, reward

    obs = np.asarray(tr["observations"], np.float64)
    nxt = np.asarray(tr["next_observations"], np.float64)
    act = np.asarray(tr["actions"], np.float64).reshape(len(obs), -1)[:, 0]
    rew = np.asarray(tr["rewards"], np.float64).reshape(-1)
    mu, sigma = nav1d_layout(layout_seed, horizon)
    t = np.clip(np.rint(obs[:, 1] * horizon), 0, horizon - 1).astype(np.int64)
    return {
        "dynamics_error": float(np.abs(nxt[:, 0] - dynamics(obs[:, 0], act, step_size)).mean()),
        "reward_error": float(np.abs(rew - reward(nxt[:, 0], t, mu, sigma)).mean()),
        "time_error": float(np.abs(nxt[:, 1] - (obs[:, 1] + 1.0 / horizon)).mean()),
    }


def evaluate_agent(agent: Any, make_env: Any, episodes: int = 50, seed: int = 0
                   ) -> np.ndarray:
    """Undiscounted returns of ``agent.act(obs, deterministic=True)`` over ``episodes`` runs."""
    env = make_env()
    returns = np.zeros(episodes)
    try:
        for i in range(episodes):
            obs, _ = env.reset(seed=seed + i)
            done = False
            while not done:
                a = np.asarray(agent.act(np.asarray(obs, np.float32), deterministic=True))
                obs, r, term, trunc, _ = env.step(a.reshape(env.action_space.shape))
                returns[i] += float(r)
                done = bool(term or trunc)
    finally:
        env.close()
    return returns


def _arg(args: Any, name: str, default: Any) -> Any:
    value = getattr(args, name, None)
    return default if value is None else value


def train_synther_main(args: Any) -> dict[str, Any]:
    """``diffalign train --model synther``: generator -> up-sampled data -> IQL vs IQL.

    Reads from ``args`` (missing or None fields take the default in brackets): task
    ["nav1d/full"], episodes [1000] (Nav1D size), process ["ddpm"], out, layout_seed [0],
    steps [3000] (generator steps), batch_size [256], lr [1e-3], seed [0], device ["auto"],
    synthetic_ratio [1.0] (synthetic = ratio × real steps), iql_steps [None: the IQL
    configs' default, 3000 critic + 3000 actor steps], eval_episodes [50], progress [True].
    Writes ``<out>/synther/`` (the generator), ``<out>/iql_real_only/``,
    ``<out>/iql_real_plus_synthetic/`` and ``<out>/eval_synther.json``; returns its content.
    """
    from ..eval.distances import energy_distance
    from ..eval.metrics import normalized_score, return_stats
    from ..tasks import resolve_task

    t0 = time.perf_counter()
    task_name = _arg(args, "task", "nav1d/full")
    layout_seed = int(_arg(args, "layout_seed", 0))
    seed = int(_arg(args, "seed", 0))
    out = Path(_arg(args, "out", "runs/synther"))
    out.mkdir(parents=True, exist_ok=True)
    task = resolve_task(task_name, layout_seed=layout_seed,
                        episodes=int(_arg(args, "episodes", 1000)))
    episodes = task.episodes
    cfg = SynthERTrainConfig(
        steps=int(_arg(args, "steps", 3000)), batch_size=int(_arg(args, "batch_size", 256)),
        lr=float(_arg(args, "lr", 1e-3)), seed=seed, device=str(_arg(args, "device", "auto")),
        progress=bool(_arg(args, "progress", True)))
    process = str(_arg(args, "process", "ddpm"))
    model = train_synther(episodes, process=process, cfg=cfg, out_dir=out / "synther")
    t_gen = time.perf_counter()

    ratio = float(_arg(args, "synthetic_ratio", 1.0))
    n_syn = int(round(ratio * episodes.num_steps))
    gen = torch.Generator().manual_seed(seed + 1)
    augmented = model.upsample(episodes, n_syn, generator=gen)
    real_tr = model._transitions(episodes)
    syn_tr = {k: getattr(augmented, k)[episodes.num_steps:] for k in
              ("observations", "actions", "rewards", "next_observations", "terminals")}
    fidelity: dict[str, Any] = {
        "energy_distance": energy_distance(_flatten(real_tr), _flatten(syn_tr), seed=seed)
        if n_syn >= 2 else None}
    is_nav1d = task_name.startswith("nav1d/")
    if is_nav1d and n_syn > 0:
        horizon = int(episodes.meta.get("horizon", 32))
        step = float(episodes.meta.get("step_size", 0.1))
        fidelity["synthetic"] = nav1d_fidelity(syn_tr, layout_seed, horizon, step)
        fidelity["real"] = nav1d_fidelity(real_tr, layout_seed, horizon, step)
        rng = np.random.default_rng(seed)
        shuffled = dict(real_tr, next_observations=real_tr["next_observations"][
            rng.permutation(len(real_tr["observations"]))])
        fidelity["shuffled_baseline"] = nav1d_fidelity(shuffled, layout_seed, horizon, step)
    t_iql = time.perf_counter()

    agents = _train_agents(episodes, augmented, out, args, seed)
    t_eval = time.perf_counter()
    n_eval = int(_arg(args, "eval_episodes", 50))
    results: dict[str, Any] = {}
    for name, agent in agents.items():
        entry: dict[str, Any] = {}
        if task.make_env is not None and n_eval > 0:
            rets = evaluate_agent(agent, task.make_env, n_eval, seed=10_000 + seed)
            entry.update(return_stats(rets))
            if task.ref_min is not None and task.ref_max is not None:
                scores = normalized_score(rets, task.ref_min, task.ref_max)
                entry["normalized_score_mean"] = float(np.mean(scores))
                entry["normalized_score_std"] = float(np.std(scores))
        results[name] = entry
    t_end = time.perf_counter()

    report = {
        "task": task_name,
        "process": process,
        "layout_seed": layout_seed,
        "seed": seed,
        "n_real": int(episodes.num_steps),
        "n_synthetic": n_syn,
        "synthetic_ratio": ratio,
        "eval_episodes": n_eval,
        "eval/real_only": results["real_only"],
        "eval/real_plus_synthetic": results["real_plus_synthetic"],
        "fidelity": fidelity,
        "timing_s": {"generator_training": t_gen - t0, "generation_and_fidelity": t_iql - t_gen,
                     "iql_training": t_eval - t_iql, "evaluation": t_end - t_eval,
                     "total": t_end - t0},
    }
    from ..atomic import write_json

    write_json(out / "eval_synther.json", _jsonable(report))
    rs, rr = results["real_plus_synthetic"], results["real_only"]
    if "return_mean" in rs:
        print(f"SynthER {task_name} ({process}): IQL real-only return "
              f"{rr['return_mean']:.3f} ± {rr['return_std']:.3f}, real+synthetic "
              f"{rs['return_mean']:.3f} ± {rs['return_std']:.3f}; energy distance "
              f"{fidelity['energy_distance']}; written to {out / 'eval_synther.json'}")
    return report


def _train_agents(real: Episodes, augmented: Episodes, out: Path, args: Any, seed: int
                  ) -> dict[str, Any]:
    """IQL agents on real data only and on real + synthetic data (same settings and seed).

    The agent on the union bootstraps through time-outs (the synthetic one-step episodes end
    in a time-out; see the module docs); the real-only agent keeps the critic's own rule.
    """
    from dataclasses import replace

    from .critic import CriticConfig
    from .iql_agent import IQLAgentConfig, train_iql_agent

    device = str(_arg(args, "device", "auto"))
    iql_steps = getattr(args, "iql_steps", None)
    steps = {} if iql_steps is None else {"steps": int(iql_steps)}
    critic = CriticConfig(seed=seed, device=device, **steps)
    progress = bool(_arg(args, "progress", True))
    agents = {}
    for name, data, tat in (("real_only", real, None), ("real_plus_synthetic", augmented, False)):
        cfg = IQLAgentConfig(critic=replace(critic, timeouts_as_terminals=tat), seed=seed,
                             device=device, **steps)
        agents[name] = train_iql_agent(data, cfg, out / f"iql_{name}", progress=progress)
    return agents


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
