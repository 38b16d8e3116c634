"""The paper's 2-D toy (its Figure 2): a small MLP learns a multimodal 2-D distribution with
any of the four processes; samples, diffusion paths and distances are saved.

``diffalign toy --process {ddpm,ddim,sm,fm} --out DIR`` writes ``DIR/data.npy`` (held-out
data), ``DIR/samples.npy``, ``DIR/paths.png`` and ``DIR/toy.json``. With ``--align`` the
trained model is then aligned to three rewards by QV-PG on a LoRA adapter
(:mod:`diffalign.toy_align`): ``DIR/align.png``, ``DIR/aligned_<reward>.npy`` and
``toy.json["align"]``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from .atomic import atomic_path, write_json
from .eval.distances import energy_distance, gaussian_moment_match
from .processes import DiffusionProcess, build_process
from .train.trainer import resolve_device

__all__ = ["ToyConfig", "make_process", "run_toy", "toy_data", "train_toy_model"]

#: Sampling steps per process when ``--steps`` is not given (SM's Euler–Maruyama needs more).
DEFAULT_STEPS = {"ddpm": 50, "ddim": 50, "sm": 100, "fm": 50}


@dataclass
class ToyConfig:
    """Train a 2-D toy diffusion model and draw its samples and diffusion paths."""

    process: Literal["ddpm", "ddim", "sm", "fm"] = "ddpm"
    """Diffusion process: DDPM, DDIM (η = 0), score matching (VP-SDE, Euler–Maruyama) or flow
    matching (Euler)."""
    out: Path = Path("runs/toy")
    """Output directory."""
    train_steps: int = 3000
    """Optimiser steps."""
    batch_size: int = 512
    """Training batch size."""
    lr: float = 2e-3
    """Peak learning rate (cosine decay to 0)."""
    width: int = 128
    """Width of the residual MLP."""
    depth: int = 3
    """Residual blocks of the MLP."""
    steps: int | None = None
    """Sampling steps (default: 50, or 100 for score matching)."""
    n_samples: int = 2000
    """Samples drawn for samples.npy and the energy distance."""
    n_paths: int = 50
    """Diffusion paths drawn in paths.png."""
    n_data: int = 20000
    """Training set size (held-out set: n_samples)."""
    seed: int = 0
    """Seed of data, initialisation and sampling."""
    device: str = "cpu"
    """Torch device ("cpu", "cuda", "auto")."""
    align: bool = False
    """Then align the trained model to each of ``rewards`` by QV-PG on one LoRA adapter; writes
    align.png, aligned_<reward>.npy and toy.json["align"] (the paper's Figure 2)."""
    rewards: tuple[Literal["right", "top", "diagonal"], ...] = ("right", "top", "diagonal")
    """Rewards to align to (see diffalign.toy_align.REWARDS)."""
    align_iters: int = 200
    """QV-PG updates per reward."""
    align_batch: int = 64
    """Chains sampled per QV-PG update."""
    align_lr: float = 3e-3
    """Adam learning rate of the LoRA adapter."""
    kl_coef: float = 0.05
    """Weight of the KL to the reference (Σ over the chain of ‖μ_θ − μ_ref‖²/(2σ²))."""
    grad_last_k: int | None = None
    """Backpropagate the reward through the last K sampling steps only (default: all)."""
    align_kl_steps: int = 10
    """Random steps per update on which the chain's KL is estimated."""
    lora_rank: int = 4
    """Rank of the LoRA adapter."""

    def __post_init__(self):
        for name in ("train_steps", "batch_size", "width", "depth", "n_samples", "n_data"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {name}={getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got steps={self.steps}")
        if self.n_paths < 0 or self.n_paths > self.n_samples:
            raise ValueError(f"n_paths must be in [0, n_samples={self.n_samples}], "
                             f"got n_paths={self.n_paths}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got lr={self.lr}")
        for name in ("align_iters", "align_batch", "align_kl_steps", "lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {name}={getattr(self, name)}")
        if self.grad_last_k is not None and self.grad_last_k < 1:
            raise ValueError(f"grad_last_k must be >= 1 (or unset: all steps), "
                             f"got grad_last_k={self.grad_last_k}")
        if self.align_lr <= 0 or self.kl_coef < 0:
            raise ValueError(f"need align_lr > 0 and kl_coef >= 0, got align_lr="
                             f"{self.align_lr}, kl_coef={self.kl_coef}")
        if self.align and not self.rewards:
            raise ValueError("align needs at least one reward, got rewards=()")
        from .toy_align import REWARDS

        unknown = [r for r in self.rewards if r not in REWARDS]
        if unknown:
            raise ValueError(f"unknown rewards {unknown}; known: {sorted(REWARDS)}")


def toy_data(n: int, seed: int = 0, modes: int = 8, radius: float = 1.5,
             std: float = 0.15) -> np.ndarray:
    """``n`` points of a ring of ``modes`` Gaussians, ``(n, 2)`` float32."""
    rng = np.random.default_rng(seed)
    k = rng.integers(0, modes, size=n)
    ang = 2 * math.pi * k / modes
    centers = radius * np.stack([np.cos(ang), np.sin(ang)], 1)
    return (centers + std * rng.standard_normal((n, 2))).astype(np.float32)


def make_process(name: str) -> DiffusionProcess:
    """The toy's process settings (100 DDPM levels; DDIM deterministic; SM with EM).

    DDPM/DDIM use v-prediction: with ε-prediction on the cosine schedule (and no x0 clipping,
    the toy's data is not confined to [-1, 1]) the first DDIM step from ᾱ ≈ 0 amplifies the
    ε error ~60×; v-prediction is well conditioned at both ends.
    """
    if name in ("ddpm", "ddim"):
        return build_process(name, num_train_steps=100, schedule="cosine", prediction="v",
                             default_steps=DEFAULT_STEPS[name])
    return build_process(name, default_steps=DEFAULT_STEPS[name])


def train_toy_model(cfg: ToyConfig, process: DiffusionProcess, data: np.ndarray,
                    device: torch.device, progress: bool = True) -> torch.nn.Module:
    """Fit a residual MLP to ``data`` ``(N, 2)`` with ``process``'s loss."""
    from .nets import build_backbone

    torch.manual_seed(cfg.seed)
    net = build_backbone("mlp", x_dim=2, horizon=1, width=cfg.width, depth=cfg.depth).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.0)
    def lr_factor(s: int) -> float:  # 100-step warm-up, then cosine decay to 0
        return min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / cfg.train_steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    x = torch.as_tensor(data, device=device).view(-1, 1, 2)
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    for _ in tqdm(range(cfg.train_steps), desc=f"toy/{cfg.process}", disable=not progress,
                  leave=False):
        idx = torch.randint(0, len(x), (cfg.batch_size,), generator=g, device=device)
        loss = process.loss(net, x[idx], generator=g)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
    return net.eval()


def plot_paths(path: Path, data: np.ndarray, chain: np.ndarray, title: str) -> None:
    """Diffusion paths ``chain (S+1, n, 2)`` over a 2-D histogram of ``data``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5.5), dpi=110)
    lim = 3.2
    ax.hist2d(data[:, 0], data[:, 1], bins=120, range=[[-lim, lim], [-lim, lim]],
              cmap="Greys", density=True)
    cmap = plt.get_cmap("viridis")
    for i in range(chain.shape[1]):
        ax.plot(chain[:, i, 0], chain[:, i, 1], color=cmap(i / max(1, chain.shape[1] - 1)),
                lw=0.8, alpha=0.8)
        ax.scatter(chain[-1, i, 0], chain[-1, i, 1], s=10, color="crimson", zorder=3)
    ax.scatter(chain[0, :, 0], chain[0, :, 1], s=6, color="steelblue", alpha=0.6,
               label="noise (t=1)")
    ax.scatter([], [], s=10, color="crimson", label="sample (t=0)")
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def run_toy(cfg: ToyConfig, progress: bool = True) -> dict:
    """Train, sample and write the toy outputs; returns the content of ``toy.json``."""
    device = resolve_device(cfg.device)
    process = make_process(cfg.process)
    steps = cfg.steps or process.default_steps
    train = toy_data(cfg.n_data, seed=cfg.seed)
    held_out = toy_data(cfg.n_samples, seed=cfg.seed + 10_000)

    t0 = time.perf_counter()
    net = train_toy_model(cfg, process, train, device, progress)
    train_s = time.perf_counter() - t0

    g = torch.Generator(device=device).manual_seed(cfg.seed + 1)  # toy_align reuses this seed
    t0 = time.perf_counter()
    with torch.no_grad():
        out = process.sample(net, (cfg.n_samples, 1, 2), steps=steps, generator=g,
                             return_chain=cfg.n_paths > 0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    sample_ms = 1000 * (time.perf_counter() - t0)
    samples = out.x0.view(-1, 2).cpu().numpy()

    ed = energy_distance(samples, held_out)
    ed_gauss = energy_distance(gaussian_moment_match(train, cfg.n_samples, cfg.seed), held_out)
    result = {
        "process": cfg.process,
        "energy_distance": ed,
        "gaussian_energy_distance": ed_gauss,
        "ratio_to_gaussian": ed / ed_gauss,
        "train_seconds": train_s,
        "sampling_ms": sample_ms,
        "sampling_steps": steps,
        "n_samples": cfg.n_samples,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
    }
    cfg.out.mkdir(parents=True, exist_ok=True)
    for name, arr in (("data.npy", held_out), ("samples.npy", samples)):
        with atomic_path(cfg.out / name) as tmp:
            np.save(tmp, arr)
    if cfg.n_paths > 0:
        chain = out.chain[:, : cfg.n_paths, 0, :].cpu().numpy()
        plot_paths(cfg.out / "paths.png", held_out, chain,
                   f"{cfg.process}: {cfg.n_paths} diffusion paths ({steps} steps)")
    if cfg.align:
        from .toy_align import align_toy

        result["align"] = align_toy(cfg, net, process, held_out, out, device, progress)
    write_json(cfg.out / "toy.json", result)
    return result
