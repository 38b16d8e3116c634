"""The paper's 2-D toy, alignment part (its Figure 2): steer the trained foundation toward a
reward with QV-PG on one LoRA adapter, and measure what it gains and what it keeps.

For each reward function R(x) on 2-D points (:data:`REWARDS`) a copy of the foundation net is
wrapped with one peft LoRA adapter (:func:`~diffalign.align.lora.add_lora`) and trained by
QV-PG (docs/design.md §4; Clark 2023 / Prabhudesai 2023), sampled by the library's
:func:`~diffalign.align.rl.qvpg_rollout`:

* sample a batch with the process's own sampler, the first ``S − K`` steps without gradients
  and the last ``K`` with them (stop-gradient before; by default K = S);
* loss ``L = −mean R(x_0) + β · mean Σ_k KL_k``, where ``KL_k = ‖μ_θ − μ_ref‖² / (2σ_k²)``
  (:func:`~diffalign.align.rl.gaussian_kl_equal_var`) is the KL between the transitions of
  the aligned net and the reference (the same net with the adapter disabled) at the visited
  state of step k, summed over the whole chain (estimated from a few random steps per
  update). Deterministic samplers (DDIM η = 0, FM Euler, SM ODE) have no transition
  variance, so the KL is taken between the transitions of the process's
  :meth:`~diffalign.processes.base.DiffusionProcess.stochastic_variant` (same network, noisy
  sampler); the last step to t = 0 (σ = 0) is weighted with the chain's smallest σ.

Reported per reward (``toy.json["align"]``): the mean reward of foundation and aligned samples
drawn from the same noise (same seed), the gain in % (:func:`gain_pct`), the foundation's
likelihood proxy of both sample sets, and the fraction of aligned samples within 3σ of a
data mode (the alignment stays on the data manifold).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .align.lora import add_lora, lora_parameters, merged_copy, reference_copy, refresh_merged
from .align.rl import qvpg_rollout, smallest_noisy_std
from .atomic import atomic_path
from .processes import DiffusionProcess

__all__ = ["DEFINITIONS", "REWARDS", "RING_MODES", "RING_RADIUS", "RING_STD", "Reward",
           "align_toy", "best_mode_reward", "data_log_density", "gain_pct", "mode_centres",
           "on_manifold", "plot_alignment", "qvpg_align", "reward_diagonal", "reward_right",
           "reward_top"]

#: The toy's ring (must match :func:`diffalign.toy.toy_data`'s defaults).
RING_MODES, RING_RADIUS, RING_STD = 8, 1.5, 0.15


# ------------------------------------------------------------------------------ rewards


def reward_right(x: Tensor, eps: float = 0.1) -> Tensor:
    """``R(x) = x₀ / √(‖x‖² + 0.1)`` (≈ cos θ): prefer the modes on the right (0° best, then
    ±45°); bounded in [−1, 1], smooth at the origin, and almost flat along the radius.

    (The linear ``R = x₀`` has no maximum: QV-PG then pushes the samples ever further right,
    off the data, unless the KL weight is large.)
    """
    return x[..., 0] / torch.sqrt(x[..., 0] ** 2 + x[..., 1] ** 2 + eps)


#: The mode that :func:`reward_top` selects: the ring's top mode (90°).
TOP = (0.0, RING_RADIUS)


def reward_top(x: Tensor) -> Tensor:
    """``R(x) = −‖x − (0, 1.5)‖²``: prefer the single top mode of the ring."""
    return -((x[..., 0] - TOP[0]) ** 2 + (x[..., 1] - TOP[1]) ** 2)


def reward_diagonal(x: Tensor, eps: float = 0.1) -> Tensor:
    """``R(x) = 2 x₀ x₁ / (‖x‖² + 0.1)`` (≈ sin 2θ): prefer the two opposite modes at 45° and
    225°; bounded in [−1, 1] and smooth at the origin."""
    return 2 * x[..., 0] * x[..., 1] / (x[..., 0] ** 2 + x[..., 1] ** 2 + eps)


@dataclass(frozen=True)
class Reward:
    """A named reward on 2-D points: ``fn(x (..., 2)) -> (...)``, smooth (it is differentiated)."""

    name: str
    description: str
    fn: Callable[[Tensor], Tensor]


REWARDS: dict[str, Reward] = {r.name: r for r in (
    Reward("right", "R = x0 / sqrt(||x||^2 + 0.1) ~ cos(theta): prefer the modes on the "
           "right (0 degrees best, then +-45)", reward_right),
    Reward("top", "R = -||x - (0, 1.5)||^2: prefer the single top mode (90 degrees)",
           reward_top),
    Reward("diagonal", "R = 2 x0 x1 / (||x||^2 + 0.1) ~ sin(2 theta): prefer the two opposite "
           "modes at 45 and 225 degrees", reward_diagonal),
)}


# ------------------------------------------------------------------------------ measures


def mode_centres(modes: int = RING_MODES, radius: float = RING_RADIUS) -> np.ndarray:
    """The ring's mode centres, ``(modes, 2)``."""
    ang = 2 * math.pi * np.arange(modes) / modes
    return radius * np.stack([np.cos(ang), np.sin(ang)], 1)


def _nearest_mode(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = np.linalg.norm(x[:, None, :] - mode_centres()[None], axis=-1)
    return d.argmin(1), d.min(1)


def on_manifold(x: np.ndarray, n_std: float = 3.0) -> np.ndarray:
    """Whether each point ``(N, 2)`` lies within ``n_std``·σ of a ring centre."""
    return _nearest_mode(x)[1] < n_std * RING_STD


def data_log_density(x: np.ndarray) -> np.ndarray:
    """Log-density of the true data distribution (the Gaussian ring) at ``x (N, 2)``."""
    d2 = ((x[:, None, :] - mode_centres()[None]) ** 2).sum(-1)
    logp = -d2 / (2 * RING_STD**2) - math.log(2 * math.pi * RING_STD**2) - math.log(RING_MODES)
    m = logp.max(1, keepdims=True)
    return (m + np.log(np.exp(logp - m).sum(1, keepdims=True)))[:, 0]


def best_mode_reward(reward: Reward, data: np.ndarray) -> float:
    """The mean reward of the data's best mode: what a model that puts all its samples into the
    best-rewarded mode of the data would score."""
    mode, _ = _nearest_mode(data)
    r = reward.fn(torch.as_tensor(data, dtype=torch.float64)).numpy()
    return float(max(r[mode == k].mean() for k in np.unique(mode)))


def gain_pct(r_found: float, r_aligned: float, r_best: float) -> float | None:
    """Reward gain in %: ``100 · (R_aligned − R_found) / (R_best − R_found)``.

    ``R_best`` is :func:`best_mode_reward`: 0 % = no change, 100 % = as good as putting every
    sample into the best mode of the data (above 100 % = beyond the data's best mode, e.g.
    off the manifold). ``None`` when the foundation already reaches ``R_best``.
    """
    den = r_best - r_found
    return None if den <= 1e-12 else 100.0 * (r_aligned - r_found) / den


# ------------------------------------------------------------------------------ QV-PG


@contextlib.contextmanager
def _one_thread(device: torch.device):
    """One intra-op thread on CPU: the toy's tiny matrices gain nothing from more, and with
    busy cores the threads' synchronisation made QV-PG ~7× slower (measured on 2 cores)."""
    if device.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def qvpg_align(net: torch.nn.Module, process: DiffusionProcess, reward: Callable[[Tensor], Tensor],
               *, iters: int = 300, batch: int = 64, lr: float = 3e-3, kl_coef: float = 0.05,
               grad_last_k: int | None = None, kl_steps: int = 10, steps: int | None = None,
               rank: int = 4, seed: int = 0, progress: bool = False, desc: str = "align"
               ) -> tuple[torch.nn.Module, list[dict[str, float]]]:
    """Align a copy of ``net`` to ``reward`` by QV-PG on one LoRA adapter (``net`` untouched).

    ``loss = −mean R(x_0) + kl_coef · mean KL_chain``, with the chain sampled by
    :func:`~diffalign.align.rl.qvpg_rollout` (the QV-PG of
    :class:`~diffalign.align.rl.RLMethod`). The reward gradient flows through the last
    ``grad_last_k`` sampling steps only (``None``: the whole chain; stop-gradient before
    them). ``KL_chain = Σ_k KL_k`` over all S steps of the chain, estimated each iteration
    from ``kl_steps`` random steps rescaled by ``S / kl_steps`` (unbiased); the last step to
    t = 0 is weighted with the chain's smallest std. The adapter is shared by every step, so
    a KL on the last K steps alone (as in ``RLMethod``) would leave the earlier steps free to
    drift off the data, and without the final step's term that step could move the samples
    anywhere at no cost. Each KL term is taken at the detached state: its pathwise gradient
    through the earlier steps cut the reward gain from 93-99% to between −5% and 63% in the
    tests' setting (docs/design.md §4).

    Returns the adapter-wrapped copy (its reference = adapter disabled) and the per-iteration
    history ``{"reward", "kl", "loss"}``.
    """
    if (iters < 0 or batch < 1 or (grad_last_k is not None and grad_last_k < 1) or lr <= 0
            or kl_coef < 0 or kl_steps < 1):
        raise ValueError(f"need iters >= 0, batch >= 1, grad_last_k >= 1 (or None), lr > 0, "
                         f"kl_coef >= 0, kl_steps >= 1; got iters={iters}, batch={batch}, "
                         f"grad_last_k={grad_last_k}, lr={lr}, kl_coef={kl_coef}, "
                         f"kl_steps={kl_steps}")
    device = next(net.parameters()).device
    model = add_lora(copy.deepcopy(net), r=rank, alpha=2.0 * rank)
    params = lora_parameters(model)
    opt = torch.optim.Adam(params, lr=lr)
    steps = steps or process.default_steps
    k = min(steps, grad_last_k or steps)
    kl_proc = process.stochastic_variant() if kl_coef > 0 else None
    floor = None
    if kl_proc is not None:
        floor = smallest_noisy_std(kl_proc, steps, torch.zeros(1, 1, 2, device=device))
        if floor is None:
            raise ValueError(f"{type(kl_proc).__name__} has no noisy transition to take a KL on")
    fast = merged_copy(model) if k < steps else None  # the no-gradient steps
    ref = reference_copy(model) if kl_proc is not None else None  # the base never changes
    g = torch.Generator(device="cpu").manual_seed(seed)
    history: list[dict[str, float]] = []
    with _one_thread(device):
        for _ in tqdm(range(iters), desc=desc, disable=not progress, leave=False):
            if fast is not None:
                refresh_merged(fast, model)
            x = torch.randn((batch, 1, 2), generator=g).to(device)
            x, kl = qvpg_rollout(process, model, x, steps, k, g, fast=fast,
                                 kl_process=kl_proc, kl_chain_steps=kl_steps,
                                 kl_std_floor=floor, kl_through_state=False, ref_net=ref)
            r = reward(x.view(batch, 2))
            loss = -r.mean() + kl_coef * kl.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            history.append({"reward": float(r.detach().mean()), "kl": float(kl.detach().mean()),
                            "loss": float(loss.detach())})
    return model.eval(), history


# ------------------------------------------------------------------------------ the toy run

#: How ``toy.json["align"]`` defines its measures.
DEFINITIONS = {
    "gain_pct": "100 * (reward_aligned - reward_foundation) / (reward_best_mode - "
                "reward_foundation); reward_best_mode = the mean reward of the held-out data's "
                "best mode (points assigned to their nearest ring centre): 0 % = no change, "
                "100 % = as good as putting every sample into the data's best mode",
    "foundation_loglik": "the foundation's likelihood proxy (process.likelihood: minus the "
                         "denoising error averaged over 16 random times and noises, the same "
                         "ones for both sample sets; higher = more likely), mean over samples",
    "foundation_loglik_reference": "the same proxy for the held-out data and for the "
                                   "held-out data rotated by half a mode (22.5 degrees: "
                                   "points between the modes, off the data)",
    "data_logdensity": "log-density of the true data distribution (the Gaussian ring), mean "
                       "over samples",
    "on_manifold_fraction": "fraction of samples within 3 sigma (0.45) of a ring centre "
                            "(0.989 for the data itself)",
    "samples": "foundation and aligned samples are drawn from the same seed (same noise)",
}


def _likelihood(process: DiffusionProcess, net, x: Tensor, seed: int) -> float:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return float(process.likelihood(net, x, n_samples=16, generator=g).mean())


def align_toy(cfg, net: torch.nn.Module, process: DiffusionProcess, data: np.ndarray,
              foundation, device: torch.device, progress: bool = True) -> dict:
    """Align the trained toy ``net`` to each reward of ``cfg.rewards``; write the aligned
    samples (``DIR/aligned_<name>.npy``) and ``DIR/align.png``; return ``toy.json["align"]``.

    ``cfg`` is a :class:`~diffalign.toy.ToyConfig`; ``foundation`` the
    :class:`~diffalign.processes.base.SampleOutput` of the foundation drawn with the seed
    ``cfg.seed + 1`` (the aligned models sample with the same seed); ``data`` the held-out
    data ``(N, 2)``.
    """
    steps = cfg.steps or process.default_steps
    found = foundation.x0.detach()
    found_np = found.view(-1, 2).cpu().numpy()
    ll_seed = cfg.seed + 3
    ll_found = _likelihood(process, net, found, ll_seed)
    c, s_ = math.cos(math.pi / RING_MODES), math.sin(math.pi / RING_MODES)
    between = data @ np.array([[c, s_], [-s_, c]], dtype=data.dtype)  # rotated half a mode

    def ll_of(x: np.ndarray) -> float:
        return _likelihood(process, net, torch.as_tensor(x, device=device).view(-1, 1, 2),
                           ll_seed)

    ll_reference = {"held_out_data": ll_of(data), "between_modes": ll_of(between)}
    entries, panels = [], []
    for j, name in enumerate(cfg.rewards):
        rw = REWARDS[name]
        t0 = time.perf_counter()
        model, hist = qvpg_align(
            net, process, rw.fn, iters=cfg.align_iters, batch=cfg.align_batch, lr=cfg.align_lr,
            kl_coef=cfg.kl_coef, grad_last_k=cfg.grad_last_k, kl_steps=cfg.align_kl_steps,
            steps=steps, rank=cfg.lora_rank, seed=cfg.seed + 100 + j, progress=progress,
            desc=f"align/{cfg.process}/{name}")
        align_s = time.perf_counter() - t0
        g = torch.Generator(device=device).manual_seed(cfg.seed + 1)
        with torch.no_grad():
            out = process.sample(model, tuple(found.shape), steps=steps, generator=g,
                                 return_chain=cfg.n_paths > 0)
        aligned = out.x0.view(-1, 2).cpu().numpy()
        r_found = float(rw.fn(torch.as_tensor(found_np, dtype=torch.float64)).mean())
        r_aligned = float(rw.fn(torch.as_tensor(aligned, dtype=torch.float64)).mean())
        r_best = best_mode_reward(rw, data)
        tail = hist[-10:]
        entries.append({
            "name": rw.name,
            "description": rw.description,
            "reward_foundation": r_found,
            "reward_aligned": r_aligned,
            "reward_best_mode": r_best,
            "gain_pct": gain_pct(r_found, r_aligned, r_best),
            "foundation_loglik_foundation_samples": ll_found,
            "foundation_loglik_aligned_samples": _likelihood(process, net, out.x0, ll_seed),
            "data_logdensity_foundation_samples": float(data_log_density(found_np).mean()),
            "data_logdensity_aligned_samples": float(data_log_density(aligned).mean()),
            "on_manifold_fraction": float(on_manifold(aligned).mean()),
            "on_manifold_fraction_foundation": float(on_manifold(found_np).mean()),
            "kl_to_reference": float(np.mean([h["kl"] for h in tail])) if tail else 0.0,
            "align_seconds": align_s,
        })
        with atomic_path(cfg.out / f"aligned_{name}.npy") as tmp:
            np.save(tmp, aligned)
        panels.append((rw, entries[-1], *_figure_data(out, cfg.n_paths)))
    plot_alignment(cfg.out / "align.png", data, _figure_data(foundation, cfg.n_paths), panels,
                   f"{cfg.process}: foundation ({steps} steps)")
    return {
        "method": "QV-PG on one LoRA adapter, KL to the reference (adapter disabled)",
        "settings": {"iters": cfg.align_iters, "batch": cfg.align_batch, "lr": cfg.align_lr,
                     "kl_coef": cfg.kl_coef, "grad_last_k": cfg.grad_last_k or steps,
                     "kl_steps": cfg.align_kl_steps, "lora_rank": cfg.lora_rank,
                     "sampling_steps": steps, "kl_process": type(
                         process.stochastic_variant()).__name__},
        "definitions": DEFINITIONS,
        "foundation_loglik_reference": ll_reference,
        "rewards": entries,
    }


#: At most this many diffusion paths and samples are drawn per panel of align.png.
FIG_PATHS, FIG_SAMPLES = 25, 1000


def _figure_data(out, n_paths: int) -> tuple[np.ndarray, np.ndarray]:
    """``(paths (S + 1, n, 2), samples (N, 2))`` for one panel; without a chain, the paths
    are the samples themselves (no lines)."""
    x0 = out.x0[:FIG_SAMPLES, 0, :].detach().cpu().numpy()
    n = min(n_paths, FIG_PATHS)
    if out.chain is not None and n > 0:
        return out.chain[:, :n, 0, :].cpu().numpy(), x0
    return x0[None, :0], x0


def plot_alignment(path: Path, data: np.ndarray, foundation: tuple[np.ndarray, np.ndarray],
                   panels: list[tuple[Reward, dict, np.ndarray, np.ndarray]], title: str
                   ) -> None:
    """The foundation's paths and samples, then per reward the aligned model's paths and
    samples over the reward's heat map and the data histogram.

    ``foundation = (paths (S + 1, n, 2), samples (N, 2))``; ``panels`` holds
    ``(reward, its toy.json entry, paths, samples)``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap

    lim = 3.2
    n = 1 + len(panels)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 4.8), dpi=100, squeeze=False)
    grid = np.linspace(-lim, lim, 241)
    xx, yy = np.meshgrid(grid, grid)
    pts = torch.as_tensor(np.stack([xx, yy], -1), dtype=torch.float64)

    greys = LinearSegmentedColormap.from_list("data", ["#b0b0b0", "#000000"])

    def draw(ax, chain, samples, title, reward=None):
        if reward is not None:
            z = reward.fn(pts).numpy()
            on_data = reward.fn(torch.as_tensor(data, dtype=torch.float64)).numpy()
            lo, hi = np.quantile(on_data, 0.005), max(np.quantile(on_data, 0.995), z.max())
            im = ax.imshow(np.clip(z, lo, hi), extent=(-lim, lim, -lim, lim), origin="lower",
                           cmap="coolwarm", alpha=0.6, vmin=lo, vmax=hi)
            ax.contour(xx, yy, z, levels=np.linspace(lo, hi, 9), colors="k",
                       linewidths=0.3, alpha=0.4)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="reward R(x)")
        *_, img = ax.hist2d(data[:, 0], data[:, 1], bins=70, range=[[-lim, lim], [-lim, lim]],
                            cmap=greys, cmin=1e-3, density=True, alpha=0.55)
        if reward is None:
            fig.colorbar(img, ax=ax, fraction=0.046, pad=0.02, label="data density")
        cmap = plt.get_cmap("viridis")
        for i in range(chain.shape[1]):
            ax.plot(chain[:, i, 0], chain[:, i, 1], lw=0.5, alpha=0.45,
                    color=cmap(i / max(1, chain.shape[1] - 1)))
        ax.scatter(chain[0, :, 0], chain[0, :, 1], s=6, color="steelblue", alpha=0.7,
                   label="noise (t=1)")
        ax.scatter(samples[:, 0], samples[:, 1], s=3, color="#1f9e1f", alpha=0.45, lw=0,
                   label=f"{len(samples)} samples")
        ax.scatter(chain[-1, :, 0], chain[-1, :, 1], s=14, color="crimson", edgecolor="k",
                   lw=0.4, zorder=3, label="path ends (t=0)")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_title(title, fontsize=9)

    chain, samples = foundation
    draw(axes[0, 0], chain, samples, title)
    axes[0, 0].legend(loc="lower left", fontsize=7, markerscale=1.5)
    for ax, (rw, e, chain, samples) in zip(axes[0, 1:], panels, strict=True):
        gain = "n/a" if e["gain_pct"] is None else f"{e['gain_pct']:+.0f}%"
        draw(ax, chain, samples, f"{rw.name}: reward gain {gain}, on data "
                                 f"{100 * e['on_manifold_fraction']:.0f}%", rw)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
