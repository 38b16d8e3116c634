"""Nav1D offline datasets: behaviour policies with known densities, generation, writers, plot.

Three datasets (docs/design.md §5):

* ``partial`` — the temporally-correlated random policy, starts ``x_0 ~ U(-1, -0.2)``;
* ``full`` — the same random policy, starts ``x_0 ~ U(-1, 1)``;
* ``expert`` — the DP-optimal policy plus truncated-Gaussian action noise, ``x_0 ~ U(-1, 1)``.

**Correlated random policy.** A latent Gaussian AR(1) process, squashed by ``tanh``::

    z_0 ~ N(0, s²),   z_t = ρ z_{t-1} + sqrt(1 - ρ²) · s · ξ_t,   ξ_t ~ N(0, 1),   a_t = tanh(z_t)

``z_t`` is stationary, so every ``a_t`` has the same marginal law, that of ``tanh(N(0, s²))``,
whatever ``t`` and ``x_t``. Its density is what :meth:`CorrelatedRandomPolicy.log_prob` returns
(the policy's action distribution given the observation alone, marginalising the previous
action)::

    p(a) = N(atanh(a); 0, s²) / (1 - a²),   a ∈ (-1, 1)

For ``2 s² <= 1`` (default ``s = 0.7``) it is unimodal with its maximum at ``a = 0``; otherwise
its two modes solve ``atanh(a) = 2 s² a`` (found by bisection). ``tanh`` rather than ``clip``
keeps the density free of point masses at ``±1``.

**Expert policy.** ``a ~ N(π*(s), std²)`` truncated to ``[-1, 1]`` (sampled exactly by the
inverse CDF), ``π*`` the DP-optimal policy of :mod:`diffalign.envs.nav1d_optimum`. Its density is
the truncated normal's, maximal at ``a = π*(s)``.

Datasets are dicts of numpy arrays in D4RL layout (episodes concatenated, each exactly ``T``
steps): ``observations (N, 2)``, ``actions (N, 1)``, ``rewards (N,)``, ``next_observations
(N, 2)`` (float32), ``terminals (N,)`` (always False) and ``timeouts (N,)`` (True at each
episode's last step) (bool).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from diffalign.atomic import atomic_path
from diffalign.data.episodes import Episodes
from diffalign.data.readers import read_d4rl_hdf5, write_d4rl_hdf5
from diffalign.envs import NAV1D_ID
from diffalign.envs.nav1d import nav1d_layout, render_reward_field, simulate

DATASET_KINDS = ("partial", "full", "expert")
START_RANGES: dict[str, tuple[float, float]] = {
    "partial": (-1.0, -0.2),
    "full": (-1.0, 1.0),
    "expert": (-1.0, 1.0),
}
D4RL_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations")

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def _ndtr(x: np.ndarray) -> np.ndarray:
    import torch

    return torch.special.ndtr(torch.as_tensor(x, dtype=torch.float64)).numpy()


def _ndtri(p: np.ndarray) -> np.ndarray:
    import torch

    return torch.special.ndtri(torch.as_tensor(p, dtype=torch.float64)).numpy()


def _split_action(obs: Any, action: Any) -> tuple[np.ndarray, np.ndarray]:
    """Observations ``(..., 2)`` and actions ``(..., 1)`` or ``(...)`` as float64 arrays."""
    obs = np.asarray(obs, dtype=np.float64)
    a = np.asarray(action, dtype=np.float64)
    if a.ndim == obs.ndim and a.shape[-1:] == (1,):
        a = a[..., 0]
    if obs.shape[-1] != 2:
        raise ValueError(f"Nav1D observations have 2 entries, got shape {obs.shape}")
    a = np.broadcast_to(a, np.broadcast_shapes(a.shape, obs.shape[:-1]))
    return obs, a


class CorrelatedRandomPolicy:
    """``a_t = tanh(z_t)`` with a stationary Gaussian AR(1) latent ``z`` (module docstring).

    The latent state is kept between calls of :meth:`act`; it restarts (drawn from the
    stationary law) for every row whose observation has ``t = 0``, and on :meth:`reset`.
    """

    name = "correlated_random"

    def __init__(self, rho: float = 0.9, scale: float = 0.7) -> None:
        if not 0.0 <= rho < 1.0:
            raise ValueError(f"rho must be in [0, 1), got rho={rho!r}")
        if not scale > 0.0:
            raise ValueError(f"scale must be > 0, got scale={scale!r}")
        self.rho = float(rho)
        self.scale = float(scale)
        self._z: np.ndarray | None = None

    def params(self) -> dict[str, Any]:
        return {"rho": self.rho, "scale": self.scale, "squash": "tanh"}

    def reset(self) -> None:
        self._z = None

    def act(self, obs: Any, rng: np.random.Generator) -> np.ndarray:
        """Actions of shape ``obs.shape[:-1] + (1,)`` for observations ``(..., 2)``."""
        obs = np.asarray(obs, dtype=np.float64)
        shape = obs.shape[:-1]
        fresh = rng.normal(0.0, self.scale, size=shape)
        if self._z is None or self._z.shape != shape:
            z = fresh
        else:
            innov = rng.normal(0.0, self.scale, size=shape)
            z = self.rho * self._z + math.sqrt(1.0 - self.rho**2) * innov
            z = np.where(obs[..., 1] <= 0.0, fresh, z)
        self._z = z
        return np.tanh(z)[..., None]

    def log_prob(self, obs: Any, action: Any) -> np.ndarray:
        """Log of the marginal density ``p(a)`` (independent of ``obs``; ``-inf`` at ``|a|>=1``).

        ``obs (..., 2)`` and ``action (..., 1)`` or ``(...)`` broadcast.
        """
        _, a = _split_action(obs, action)
        inside = np.abs(a) < 1.0
        a_in = np.where(inside, a, 0.0)
        z = np.arctanh(a_in)
        lp = -0.5 * (z / self.scale) ** 2 - math.log(self.scale) - _LOG_SQRT_2PI
        lp = lp - np.log1p(-(a_in**2))
        return np.where(inside, lp, -np.inf)

    def density(self, obs: Any, action: Any) -> np.ndarray:
        return np.exp(self.log_prob(obs, action))

    def mode(self) -> float:
        """The (non-negative) action of maximal density."""
        c = 2.0 * self.scale**2
        if c <= 1.0:
            return 0.0
        lo, hi = 1e-12, 1.0 - 1e-15  # atanh(a) - c a: < 0 at lo, > 0 near 1
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if math.atanh(mid) - c * mid < 0.0:
                lo = mid
            else:
                hi = mid
        return 0.5 * (lo + hi)

    def max_density(self, obs: Any) -> np.ndarray:
        """``max_a p(a | obs)``, shape ``obs.shape[:-1]``."""
        obs = np.asarray(obs, dtype=np.float64)
        peak = float(self.density(np.zeros(2), np.array([self.mode()])))
        return np.full(obs.shape[:-1], peak)


class ExpertPolicy:
    """DP-optimal action plus Gaussian noise, truncated to ``[-1, 1]`` (module docstring)."""

    name = "dp_optimal_truncnorm"

    def __init__(
        self,
        layout_seed: int = 0,
        horizon: int = 32,
        step_size: float = 0.1,
        noise_std: float = 0.1,
    ) -> None:
        from diffalign.envs.nav1d_optimum import Nav1DOptimalPolicy, solve_nav1d

        if not noise_std > 0.0:
            raise ValueError(f"noise_std must be > 0, got noise_std={noise_std!r}")
        self.layout_seed = int(layout_seed)
        self.horizon = int(horizon)
        self.step_size = float(step_size)
        self.noise_std = float(noise_std)
        self.optimal = Nav1DOptimalPolicy(solve_nav1d(layout_seed, horizon, float(step_size)))

    def params(self) -> dict[str, Any]:
        return {"noise_std": self.noise_std, "noise": "gaussian truncated to [-1, 1]"}

    def reset(self) -> None:
        pass

    def mean(self, obs: Any) -> np.ndarray:
        """``π*(obs)`` as float64 of shape ``obs.shape[:-1]``."""
        return np.asarray(self.optimal(obs), dtype=np.float64)[..., 0]

    def _bounds(self, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return _ndtr((-1.0 - m) / self.noise_std), _ndtr((1.0 - m) / self.noise_std)

    def act(self, obs: Any, rng: np.random.Generator) -> np.ndarray:
        m = self.mean(obs)
        lo, hi = self._bounds(m)
        u = lo + (hi - lo) * rng.uniform(size=m.shape)
        a = np.clip(m + self.noise_std * _ndtri(u), -1.0, 1.0)
        return a[..., None]

    def log_prob(self, obs: Any, action: Any) -> np.ndarray:
        """Log truncated-normal density of ``action`` given ``obs`` (``-inf`` outside ``[-1, 1]``).

        ``obs (..., 2)`` and ``action (..., 1)`` or ``(...)`` broadcast (e.g. one observation
        ``(1, 2)`` against ``N`` actions ``(N,)``).
        """
        obs, a = _split_action(obs, action)
        m = self.mean(obs)
        lo, hi = self._bounds(m)
        zed = (a - m) / self.noise_std
        lp = -0.5 * zed**2 - _LOG_SQRT_2PI - math.log(self.noise_std) - np.log(hi - lo)
        return np.where(np.abs(a) <= 1.0, lp, -np.inf)

    def density(self, obs: Any, action: Any) -> np.ndarray:
        return np.exp(self.log_prob(obs, action))

    def max_density(self, obs: Any) -> np.ndarray:
        obs = np.asarray(obs, dtype=np.float64)
        m = self.mean(obs)
        return self.density(obs, m)


def behaviour_policy(
    kind: str, layout_seed: int = 0, horizon: int = 32, step_size: float = 0.1
) -> CorrelatedRandomPolicy | ExpertPolicy:
    """The behaviour policy of dataset ``kind`` (default parameters)."""
    _check_kind(kind)
    if kind == "expert":
        return ExpertPolicy(layout_seed, horizon, step_size)
    return CorrelatedRandomPolicy()


def _check_kind(kind: str) -> None:
    if kind not in DATASET_KINDS:
        raise ValueError(f"dataset kind must be one of {DATASET_KINDS}, got kind={kind!r}")


def generate_nav1d_dataset(
    kind: str,
    episodes: int = 1000,
    layout_seed: int = 0,
    seed: int = 0,
    horizon: int = 32,
    step_size: float = 0.1,
    policy: CorrelatedRandomPolicy | ExpertPolicy | None = None,
) -> dict[str, np.ndarray]:
    """Roll out ``episodes`` episodes of the ``kind`` behaviour policy (D4RL layout)."""
    _check_kind(kind)
    if isinstance(episodes, bool) or not isinstance(episodes, (int, np.integer)) or episodes < 1:
        raise ValueError(f"episodes must be an integer >= 1, got episodes={episodes!r}")
    mu, sigma = nav1d_layout(layout_seed, horizon)
    pol = policy if policy is not None else behaviour_policy(kind, layout_seed, horizon, step_size)
    pol.reset()
    rng = np.random.default_rng(seed)
    low, high = START_RANGES[kind]
    x0 = rng.uniform(low, high, size=episodes)
    out = simulate(lambda obs, t: pol.act(obs, rng), x0, mu, sigma, step_size)
    n = episodes * horizon
    timeouts = np.zeros((episodes, horizon), dtype=bool)
    timeouts[:, -1] = True
    return {
        "observations": out["observations"].reshape(n, 2),
        "actions": out["actions"].reshape(n, 1),
        "rewards": out["rewards"].reshape(n).astype(np.float32),
        "terminals": np.zeros(n, dtype=bool),
        "timeouts": timeouts.reshape(n),
        "next_observations": out["next_observations"].reshape(n, 2),
    }


def episode_returns(data: dict[str, np.ndarray]) -> np.ndarray:
    """Undiscounted return of every episode (episodes end at ``terminals | timeouts``)."""
    ends = np.flatnonzero(np.asarray(data["terminals"]) | np.asarray(data["timeouts"]))
    starts = np.concatenate([[0], ends[:-1] + 1])
    rewards = np.asarray(data["rewards"], dtype=np.float64)
    return np.add.reduceat(rewards, starts) if len(starts) else np.zeros(0)


def nav1d_dataset_attrs(
    kind: str,
    layout_seed: int = 0,
    seed: int = 0,
    episodes: int | None = None,
    horizon: int = 32,
    step_size: float = 0.1,
    policy: CorrelatedRandomPolicy | ExpertPolicy | None = None,
) -> dict[str, Any]:
    """File attributes of a Nav1D dataset: env, layout, behaviour policy, reference scores."""
    from diffalign.envs.nav1d_optimum import nav1d_optimum

    _check_kind(kind)
    pol = policy if policy is not None else behaviour_policy(kind, layout_seed, horizon, step_size)
    low, high = START_RANGES[kind]
    opt = nav1d_optimum(layout_seed=layout_seed, horizon=horizon, step_size=step_size)
    attrs: dict[str, Any] = {
        "env_id": NAV1D_ID,
        "dataset_kind": kind,
        "layout_seed": int(layout_seed),
        "horizon": int(horizon),
        "step_size": float(step_size),
        "start_low": low,
        "start_high": high,
        "seed": int(seed),
        "behaviour_policy": pol.name,
        "behaviour_params": json.dumps(pol.params(), sort_keys=True),
        "ref_min_score": 0.0,
        "ref_max_score": float(opt["optimal_return"]),
    }
    if episodes is not None:
        attrs["episodes"] = int(episodes)
    return attrs


def to_episodes(data: dict[str, np.ndarray], attrs: dict[str, Any] | None = None) -> Episodes:
    """The shared :class:`~diffalign.data.episodes.Episodes` view of a generated dataset."""
    return Episodes.from_arrays(**{k: data[k] for k in D4RL_KEYS}, meta=dict(attrs or {}),
                                source="nav1d")


def write_nav1d_hdf5(
    path: str | os.PathLike, data: dict[str, np.ndarray], attrs: dict[str, Any] | None = None
) -> Path:
    """Write the D4RL datasets and file attributes to ``path`` atomically (temp + rename).

    Goes through the shared D4RL writer; attribute dicts/lists become JSON strings.
    """
    missing = [k for k in D4RL_KEYS if k not in data]
    if missing:
        raise ValueError(f"data lacks the D4RL keys {missing}")
    return write_d4rl_hdf5(path, to_episodes(data, attrs), compression="gzip")


def read_nav1d_hdf5(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read back what :func:`write_nav1d_hdf5` wrote: ``(data, attrs)``."""
    ep = read_d4rl_hdf5(path)
    data = {k: getattr(ep, k) for k in D4RL_KEYS}
    attrs = {k: v for k, v in ep.meta.items() if k not in ("source", "format")}
    return data, attrs


def _layout_of(env_or_layout: Any) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(env_or_layout, (int, np.integer)) and not isinstance(env_or_layout, bool):
        return nav1d_layout(int(env_or_layout))
    if isinstance(env_or_layout, tuple) and len(env_or_layout) == 2:
        return np.asarray(env_or_layout[0]), np.asarray(env_or_layout[1])
    env = getattr(env_or_layout, "unwrapped", env_or_layout)
    if hasattr(env, "mu") and hasattr(env, "sigma"):
        return np.asarray(env.mu), np.asarray(env.sigma)
    raise ValueError(
        "env_or_layout must be a Nav1D env, a (mu, sigma) pair or a layout seed, got "
        f"{env_or_layout!r}"
    )


def plot_nav1d_dataset(
    data: dict[str, np.ndarray],
    env_or_layout: Any,
    path: str | os.PathLike,
    n_trajectories: int = 50,
    seed: int = 0,
    title: str | None = None,
) -> Path:
    """PNG of up to ``n_trajectories`` random episodes over the reward field ``r(t, x)``."""
    mu, sigma = _layout_of(env_or_layout)
    ends = np.flatnonzero(np.asarray(data["terminals"]) | np.asarray(data["timeouts"]))
    starts = np.concatenate([[0], ends[:-1] + 1])
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(ends), size=min(n_trajectories, len(ends)), replace=False)
    paths = []
    for i in np.sort(pick):
        x = np.asarray(data["observations"][starts[i] : ends[i] + 1, 0], dtype=np.float64)
        paths.append(np.append(x, float(data["next_observations"][ends[i], 0])))
    path = Path(path)
    with atomic_path(path) as tmp:
        render_reward_field(
            mu,
            sigma,
            paths=paths,
            title=title or f"Nav1D: {len(paths)} episodes",
            path=tmp,
            figsize=(8.0, 5.0),
            dpi=100,
        )
    return path


def write_nav1d_minari(
    data: dict[str, np.ndarray],
    dataset_id: str,
    kind: str = "full",
    layout_seed: int = 0,
    horizon: int = 32,
    step_size: float = 0.1,
    description: str | None = None,
    policy: CorrelatedRandomPolicy | ExpertPolicy | None = None,
) -> Any:
    """Create a local Minari dataset ``dataset_id`` from D4RL-layout ``data``.

    Needs ``minari`` (tested with 0.5.4; the plain package suffices, no ``[create]`` extra, as
    episodes are handed over as whole buffers). The dataset lands in Minari's root
    (``MINARI_DATASETS_PATH``, default ``~/.minari/datasets``). Returns the ``MinariDataset``.
    """
    import gymnasium as gym
    import minari
    from minari.data_collector.episode_buffer import EpisodeBuffer

    from diffalign.envs.nav1d_optimum import nav1d_optimum

    _check_kind(kind)
    pol = policy if policy is not None else behaviour_policy(kind, layout_seed, horizon, step_size)
    ends = np.flatnonzero(np.asarray(data["terminals"]) | np.asarray(data["timeouts"]))
    starts = np.concatenate([[0], ends[:-1] + 1])
    buffers = []
    for i, (s, e) in enumerate(zip(starts, ends + 1)):
        obs = np.concatenate([data["observations"][s:e], data["next_observations"][e - 1 : e]])
        buffers.append(
            EpisodeBuffer(
                id=i,
                observations=np.asarray(obs, dtype=np.float32),
                actions=np.asarray(data["actions"][s:e], dtype=np.float32),
                rewards=list(np.asarray(data["rewards"][s:e], dtype=np.float64)),
                terminations=list(np.asarray(data["terminals"][s:e], dtype=bool)),
                truncations=list(np.asarray(data["timeouts"][s:e], dtype=bool)),
                infos={},
            )
        )
    low, high = START_RANGES[kind]
    common = {"horizon": horizon, "step_size": step_size, "layout_seed": layout_seed}
    env = gym.make(NAV1D_ID, start_low=low, start_high=high, **common)
    eval_env = gym.make(NAV1D_ID, **common)
    opt = nav1d_optimum(layout_seed=layout_seed, horizon=horizon, step_size=step_size)
    try:
        with warnings.catch_warnings():
            # minari nags about unset author / email / permalink: nothing to act on here
            warnings.filterwarnings("ignore", message=r"`(code_permalink|author|author_email)`")
            return minari.create_dataset_from_buffers(
                dataset_id=dataset_id,
                buffer=buffers,
                env=env,
                eval_env=eval_env,
                algorithm_name=f"{pol.name} {json.dumps(pol.params(), sort_keys=True)}",
                ref_min_score=0.0,
                ref_max_score=float(opt["optimal_return"]),
                description=description
                or f"Nav1D {kind} dataset (layout seed {layout_seed}), behaviour policy {pol.name}",
                requirements=["diffalign"],
            )
    finally:
        env.close()
        eval_env.close()
