"""Nav1D: the paper's one-dimensional navigation task (docs/design.md §5).

A point moves on the line ``x ∈ [-1, 1]`` for a fixed horizon ``T``. At step ``t`` the action
``a_t ∈ [-1, 1]`` (clipped) moves it to ``x_{t+1} = clip(x_t + δ·a_t, -1, 1)`` and the reward is a
Gaussian bump around a moving target, ``r_t = exp(-(x_{t+1} - μ_t)² / (2 σ_t²))``. The targets
``μ_t ~ U(-0.9, 0.9)`` and widths ``σ_t ~ U(0.05, 0.3)`` are drawn once from
``np.random.default_rng(layout_seed)`` (first all ``μ``, then all ``σ``) and are the same in
every episode. The observation is ``[x_t, t/T]``.

The position is kept in float32 (the precision of the observation), so that a transition read
back from a dataset, ``(obs, action, next_obs)``, satisfies
``next_obs[0] == float32(dynamics(obs[0], action))`` exactly, and the reward equals
``reward(next_obs[0], t)`` exactly.

The pure functions :func:`nav1d_layout`, :func:`dynamics` and :func:`reward` are vectorised
numpy and are shared by the environment, the dynamic-programming optimum and the dataset
generators.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

MU_RANGE = (-0.9, 0.9)
SIGMA_RANGE = (0.05, 0.3)


def nav1d_layout(layout_seed: int = 0, horizon: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """The reward layout ``(mu, sigma)``, each of shape ``(horizon,)`` (float64).

    ``rng = np.random.default_rng(layout_seed)``; ``mu = rng.uniform(-0.9, 0.9, horizon)``, then
    ``sigma = rng.uniform(0.05, 0.3, horizon)``.
    """
    _check_int("layout_seed", layout_seed, minimum=0)
    _check_int("horizon", horizon, minimum=1)
    rng = np.random.default_rng(layout_seed)
    mu = rng.uniform(*MU_RANGE, size=horizon)
    sigma = rng.uniform(*SIGMA_RANGE, size=horizon)
    return mu, sigma


def dynamics(x: Any, a: Any, step_size: float = 0.1) -> np.ndarray:
    """``clip(x + step_size · clip(a, -1, 1), -1, 1)``, broadcast over ``x`` and ``a`` (float64)."""
    x = np.asarray(x, dtype=np.float64)
    a = np.clip(np.asarray(a, dtype=np.float64), -1.0, 1.0)
    return np.clip(x + step_size * a, -1.0, 1.0)


def reward(x_next: Any, t: Any, mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """``exp(-(x_next - mu[t])² / (2 sigma[t]²))``, broadcast over ``x_next`` and integer ``t``."""
    x_next = np.asarray(x_next, dtype=np.float64)
    t = np.asarray(t, dtype=np.int64)
    m = np.asarray(mu, dtype=np.float64)[t]
    s = np.asarray(sigma, dtype=np.float64)[t]
    return np.exp(-((x_next - m) ** 2) / (2.0 * s**2))


def time_index(obs: Any, horizon: int) -> np.ndarray:
    """The integer step ``t`` encoded in observations ``[..., 2]`` as ``t / horizon``."""
    obs = np.asarray(obs, dtype=np.float64)
    return np.rint(obs[..., 1] * horizon).astype(np.int64)


def simulate(
    policy: Any,
    x0: Any,
    mu: np.ndarray,
    sigma: np.ndarray,
    step_size: float = 0.1,
) -> dict[str, np.ndarray]:
    """Roll out ``len(x0)`` episodes in lock-step, exactly as :class:`Nav1DEnv` would.

    ``policy(obs, t)`` gets the float32 observations ``(B, 2)`` and the integer step ``t`` and
    returns actions of shape ``(B,)`` or ``(B, 1)``; they are clipped to ``[-1, 1]`` and cast to
    float32 (the stored action is the applied action). Returns ``observations (B, T, 2)``,
    ``actions (B, T, 1)``, ``next_observations (B, T, 2)`` (float32) and ``rewards (B, T)``
    (float64).
    """
    horizon = len(mu)
    x = np.asarray(x0, dtype=np.float32).reshape(-1)
    b = x.shape[0]
    obs = np.empty((b, horizon, 2), dtype=np.float32)
    next_obs = np.empty((b, horizon, 2), dtype=np.float32)
    actions = np.empty((b, horizon, 1), dtype=np.float32)
    rewards = np.empty((b, horizon), dtype=np.float64)
    for t in range(horizon):
        o = np.stack([x, np.full(b, t / horizon, dtype=np.float32)], axis=-1)
        a = np.asarray(policy(o, t), dtype=np.float64).reshape(b)
        if not np.all(np.isfinite(a)):
            raise ValueError(f"policy returned non-finite actions at t={t}")
        a = np.clip(a, -1.0, 1.0).astype(np.float32)
        x_next = dynamics(x, a, step_size).astype(np.float32)
        obs[:, t] = o
        actions[:, t, 0] = a
        rewards[:, t] = reward(x_next, t, mu, sigma)
        next_obs[:, t, 0] = x_next
        next_obs[:, t, 1] = np.float32((t + 1) / horizon)
        x = x_next
    return {
        "observations": obs,
        "actions": actions,
        "next_observations": next_obs,
        "rewards": rewards,
    }


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {name}={value!r}")


class Nav1DEnv(gym.Env):
    """One-dimensional navigation towards a moving Gaussian reward (docs/design.md §5).

    Args:
        horizon: episode length ``T``; the episode is truncated after exactly ``T`` steps and
            never terminates.
        step_size: ``δ`` in ``x_{t+1} = clip(x_t + δ·a_t, -1, 1)``.
        layout_seed: seed of the reward layout ``(mu, sigma)``.
        start_low, start_high: the start position is drawn from ``U(start_low, start_high)``.
        render_mode: ``None`` or ``"rgb_array"`` (heatmap of the reward field over ``(t, x)``
            with the path so far).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 8}

    def __init__(
        self,
        horizon: int = 32,
        step_size: float = 0.1,
        layout_seed: int = 0,
        start_low: float = -1.0,
        start_high: float = 1.0,
        render_mode: str | None = None,
    ) -> None:
        _check_int("horizon", horizon, minimum=1)
        _check_int("layout_seed", layout_seed, minimum=0)
        if not (np.isfinite(step_size) and 0.0 < step_size <= 2.0):
            raise ValueError(f"step_size must be in (0, 2], got step_size={step_size!r}")
        if not (-1.0 <= start_low <= start_high <= 1.0):
            raise ValueError(
                "need -1 <= start_low <= start_high <= 1, got "
                f"start_low={start_low!r} start_high={start_high!r}"
            )
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(
                f"render_mode must be None or 'rgb_array', got render_mode={render_mode!r}"
            )
        self.horizon = int(horizon)
        self.step_size = float(step_size)
        self.layout_seed = int(layout_seed)
        self.start_low = float(start_low)
        self.start_high = float(start_high)
        self.render_mode = render_mode
        self.mu, self.sigma = nav1d_layout(self.layout_seed, self.horizon)

        self.observation_space = spaces.Box(
            low=np.array([-1.0, 0.0], dtype=np.float32),
            high=np.array([1.0, 1.0], dtype=np.float32),
            dtype=np.float32,
        )
        self.action_space = spaces.Box(low=-1.0, high=1.0, shape=(1,), dtype=np.float32)

        self._x = np.float32(0.0)
        self._t = 0
        self._path: list[float] = []
        self._needs_reset = True

    # -- helpers usable by others ------------------------------------------------------------
    def dynamics(self, x: Any, a: Any) -> np.ndarray:
        """Vectorised ``clip(x + δ·clip(a), -1, 1)`` with this env's step size (float64)."""
        return dynamics(x, a, self.step_size)

    def reward(self, x_next: Any, t: Any) -> np.ndarray:
        """Vectorised reward of landing at ``x_next`` on step ``t`` for this layout."""
        return reward(x_next, t, self.mu, self.sigma)

    def _obs(self) -> np.ndarray:
        return np.array([self._x, self._t / self.horizon], dtype=np.float32)

    # -- gymnasium API -------------------------------------------------------------------------
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        x0 = None if options is None else options.get("x0")
        if x0 is None:
            x0 = self.np_random.uniform(self.start_low, self.start_high)
        elif not -1.0 <= float(x0) <= 1.0:
            raise ValueError(f"options['x0'] must be in [-1, 1], got x0={x0!r}")
        self._x = np.float32(x0)
        self._t = 0
        self._path = [float(self._x)]
        self._needs_reset = False
        return self._obs(), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self._needs_reset:
            raise RuntimeError("Nav1DEnv.step called before reset() or after the episode ended")
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.size != 1 or not np.isfinite(a[0]):
            raise ValueError(f"action must be one finite number, got action={action!r}")
        a_clipped = float(np.clip(a[0], -1.0, 1.0))
        t = self._t
        self._x = np.float32(self.dynamics(float(self._x), a_clipped))
        r = float(self.reward(float(self._x), t))
        self._t = t + 1
        self._path.append(float(self._x))
        truncated = self._t >= self.horizon
        if truncated:
            self._needs_reset = True
        info = {"t": t, "mu": float(self.mu[t]), "sigma": float(self.sigma[t])}
        return self._obs(), r, False, truncated, info

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array":
            return None
        return render_reward_field(
            self.mu, self.sigma, paths=[np.asarray(self._path)], title="Nav1D"
        )


def render_reward_field(
    mu: np.ndarray,
    sigma: np.ndarray,
    paths: list[np.ndarray] | None = None,
    title: str = "",
    path: Any = None,
    figsize: tuple[float, float] = (6.0, 4.0),
    dpi: int = 80,
) -> np.ndarray:
    """Heatmap of the reward field ``r(x, t)`` with optional position paths over it.

    ``paths`` are arrays of positions ``x_0, x_1, …`` (``x_k`` is plotted at ``t = k``; the
    reward of step ``t`` is earned at ``x_{t+1}``, drawn at column ``t + 1``). Returns an
    ``H×W×3`` uint8 image; when ``path`` is given the figure is also saved there (PNG).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    horizon = len(mu)
    xs = np.linspace(-1.0, 1.0, 201)
    field = reward(xs[:, None], np.arange(horizon)[None, :], mu, sigma)
    fig = Figure(figsize=figsize, dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    # column t of the field is the reward for arriving at x at time t + 1
    im = ax.imshow(
        field,
        origin="lower",
        aspect="auto",
        extent=(0.5, horizon + 0.5, -1.0, 1.0),
        cmap="viridis",
        vmin=0.0,
        vmax=1.0,
    )
    fig.colorbar(im, ax=ax, label="reward")
    for p in paths or []:
        p = np.asarray(p, dtype=np.float64)
        ax.plot(np.arange(len(p)), p, color="white", lw=0.8, alpha=0.7)
        if len(p):
            ax.plot([0], [p[0]], "o", color="red", ms=2)
    ax.set_xlim(0, horizon + 0.5)
    ax.set_ylim(-1.0, 1.0)
    ax.set_xlabel("t")
    ax.set_ylabel("x")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    canvas.draw()
    image = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    if path is not None:
        fig.savefig(path, format="png")
    return image
