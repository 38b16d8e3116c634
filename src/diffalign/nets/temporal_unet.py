"""Temporal U-Net over trajectories (Janner et al. 2022, "Diffuser").

Conv1d over the time axis with features as channels. Residual temporal blocks of two
``Conv1d -> GroupNorm(8) -> Mish`` blocks; the time (+ condition) embedding enters every block by
FiLM. Downsampling is a stride-2 Conv1d, upsampling is nearest-neighbour ``nn.Upsample`` followed
by a Conv1d (no ConvTranspose1d, so peft LoRA can wrap every layer).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .embeddings import ConditionEmbedding, Mish, check_inputs, zero_init_

GROUPS = 8
"""Number of GroupNorm groups; every hidden channel count must be divisible by it."""


class Conv1dBlock(nn.Module):
    """``Conv1d(k, same padding) -> GroupNorm(8) -> Mish``."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_ch, out_ch, kernel_size, padding=kernel_size // 2)
        """Temporal convolution."""
        self.norm = nn.GroupNorm(GROUPS, out_ch)
        """Group normalisation over channels."""
        self.act = Mish()
        """Activation."""

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_ch, H) -> (B, out_ch, H)``."""
        return self.act(self.norm(self.conv(x)))


class ResidualTemporalBlock(nn.Module):
    """Two :class:`Conv1dBlock` with FiLM conditioning in between and a residual connection.

    ``h = block0(x); h = h * (1 + scale) + shift; out = block1(h) + res(x)`` where
    ``(scale, shift) = Linear(Mish(emb))`` and ``res`` is a 1x1 conv when channels change.
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, kernel_size: int) -> None:
        super().__init__()
        self.block0 = Conv1dBlock(in_ch, out_ch, kernel_size)
        """First conv block."""
        self.block1 = Conv1dBlock(out_ch, out_ch, kernel_size)
        """Second conv block."""
        self.film = nn.Sequential(Mish(), nn.Linear(emb_dim, 2 * out_ch))
        """Embedding -> per-channel (scale, shift)."""
        self.residual = nn.Conv1d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        """Skip path (1x1 conv when the channel count changes)."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """``x: (B, in_ch, H)``, ``emb: (B, emb_dim)`` -> ``(B, out_ch, H)``."""
        scale, shift = self.film(emb).unsqueeze(-1).chunk(2, dim=1)
        h = self.block0(x)
        h = h * (1 + scale) + shift
        h = self.block1(h)
        return h + self.residual(x)


class Downsample1d(nn.Module):
    """Halve the temporal length with a stride-2 Conv1d (kernel 3)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(ch, ch, 3, stride=2, padding=1)
        """Strided convolution."""

    def forward(self, x: Tensor) -> Tensor:
        """``(B, ch, H) -> (B, ch, H // 2)``."""
        return self.conv(x)


class Upsample1d(nn.Module):
    """Double the temporal length: nearest-neighbour upsampling then Conv1d (kernel 3)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        """Parameter-free nearest-neighbour upsampling."""
        self.conv = nn.Conv1d(ch, ch, 3, padding=1)
        """Smoothing convolution."""

    def forward(self, x: Tensor) -> Tensor:
        """``(B, ch, H) -> (B, ch, 2H)``."""
        return self.conv(self.up(x))


class TemporalUNet(nn.Module):
    """Diffuser-style 1-D U-Net denoiser: ``net(x, t, cond=None, extra=None) -> (B, H, D)``.

    Args:
        x_dim: feature dimension D.
        horizon: sequence length H; must be divisible by ``2 ** (len(dim_mults) - 1)``.
        cond_dim: width of the optional global condition vector (0: none).
        extra_dim: width of the optional per-position extra input (0: none). Its projection is
            zero-initialised, so the net initially ignores it.
        dim: base channel count (also the time-embedding width); must be divisible by 8.
        dim_mults: channel multiplier per resolution level.
        kernel_size: temporal kernel size of the conv blocks (odd).
    """

    def __init__(
        self,
        x_dim: int,
        horizon: int,
        cond_dim: int = 0,
        extra_dim: int = 0,
        dim: int = 32,
        dim_mults: Sequence[int] = (1, 2, 4, 8),
        kernel_size: int = 5,
    ) -> None:
        super().__init__()
        dim_mults = tuple(int(m) for m in dim_mults)
        if x_dim <= 0 or horizon <= 0:
            raise ValueError(f"x_dim and horizon must be positive, got x_dim={x_dim}, "
                             f"horizon={horizon}")
        if cond_dim < 0 or extra_dim < 0:
            raise ValueError(f"cond_dim and extra_dim must be >= 0, got cond_dim={cond_dim}, "
                             f"extra_dim={extra_dim}")
        if not dim_mults or any(m <= 0 for m in dim_mults):
            raise ValueError(f"dim_mults must be non-empty positive ints, got {dim_mults}")
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd to keep the length, got {kernel_size}")
        n_down = len(dim_mults) - 1
        factor = 2**n_down
        if horizon % factor != 0:
            raise ValueError(
                f"horizon={horizon} must be divisible by 2**{n_down}={factor} for "
                f"dim_mults={dim_mults} ({n_down} downsamplings)"
            )
        channels = [dim * m for m in dim_mults]
        if any(c % GROUPS for c in channels):
            raise ValueError(
                f"GroupNorm({GROUPS}) needs every channel count divisible by {GROUPS}; "
                f"dim={dim}, dim_mults={dim_mults} give channels {channels}"
            )

        self.x_dim = x_dim
        """Feature dimension D."""
        self.horizon = horizon
        """Sequence length H."""
        self.cond_dim = cond_dim
        """Global condition width (0: none)."""
        self.extra_dim = extra_dim
        """Per-position extra input width (0: none)."""
        self.dim = dim
        """Base channel count."""
        self.dim_mults = dim_mults
        """Channel multipliers per level."""
        self.kernel_size = kernel_size
        """Temporal kernel size."""

        emb_dim = dim
        self.embed = ConditionEmbedding(emb_dim, cond_dim=cond_dim, act="mish")
        """Time (+ condition) embedding."""

        in_out = list(zip([x_dim] + channels[:-1], channels))
        self.downs = nn.ModuleList()
        """Down path: per level (resblock, resblock, downsample-or-identity)."""
        for i, (c_in, c_out) in enumerate(in_out):
            last = i == len(in_out) - 1
            self.downs.append(nn.ModuleList([
                ResidualTemporalBlock(c_in, c_out, emb_dim, kernel_size),
                ResidualTemporalBlock(c_out, c_out, emb_dim, kernel_size),
                Downsample1d(c_out) if not last else nn.Identity(),
            ]))
        mid = channels[-1]
        self.mid1 = ResidualTemporalBlock(mid, mid, emb_dim, kernel_size)
        """First bottleneck block."""
        self.mid2 = ResidualTemporalBlock(mid, mid, emb_dim, kernel_size)
        """Second bottleneck block."""
        self.ups = nn.ModuleList()
        """Up path: per level (resblock on skip-concat, resblock, upsample)."""
        for c_in, c_out in reversed(in_out[1:]):
            self.ups.append(nn.ModuleList([
                ResidualTemporalBlock(2 * c_out, c_in, emb_dim, kernel_size),
                ResidualTemporalBlock(c_in, c_in, emb_dim, kernel_size),
                Upsample1d(c_in),
            ]))
        self.final_block = Conv1dBlock(dim, dim, kernel_size)
        """Last conv block at full resolution."""
        self.final_conv = nn.Conv1d(dim, x_dim, 1)
        """1x1 projection back to D features."""
        self.extra_proj: nn.Conv1d | None = None
        """Zero-initialised 1x1 projection of ``extra`` added after the first resblock."""
        if extra_dim > 0:
            self.extra_proj = zero_init_(nn.Conv1d(extra_dim, channels[0], 1))

    def forward(
        self, x: Tensor, t: Tensor, cond: Tensor | None = None, extra: Tensor | None = None
    ) -> Tensor:
        """Denoiser output ``(B, H, D)`` for ``x: (B, H, D)`` and ``t: (B,)`` in [0, 1]."""
        check_inputs(x, t, cond, extra, x_dim=self.x_dim, horizon=self.horizon,
                     cond_dim=self.cond_dim, extra_dim=self.extra_dim, name="TemporalUNet")
        emb = self.embed(t, cond)
        h = x.transpose(1, 2)  # (B, D, H)
        skips = []
        for i, (res0, res1, down) in enumerate(self.downs):
            h = res0(h, emb)
            if i == 0 and self.extra_proj is not None:
                h = h + self.extra_proj(extra.transpose(1, 2))
            h = res1(h, emb)
            skips.append(h)
            h = down(h)
        h = self.mid1(h, emb)
        h = self.mid2(h, emb)
        for res0, res1, up in self.ups:
            h = torch.cat([h, skips.pop()], dim=1)
            h = res0(h, emb)
            h = res1(h, emb)
            h = up(h)
        h = self.final_block(h)
        return self.final_conv(h).transpose(1, 2)
