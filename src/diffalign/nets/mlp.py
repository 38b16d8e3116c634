"""Residual MLP denoiser (SynthER style, Lu et al. 2024) over flattened ``(H * D)`` inputs.

Cheap enough for 2-D toy data (``H=1, D=2``) and for flat transitions. Each residual block is
``LayerNorm -> Linear -> (+ Linear(c)) -> SiLU -> Linear`` added to its input, where ``c`` is the
time (+ condition) embedding.
"""

from __future__ import annotations

from torch import Tensor, nn

from .embeddings import ConditionEmbedding, check_inputs, zero_init_


class ResidualMLPBlock(nn.Module):
    """Pre-norm residual block with the conditioning embedding added after the first Linear."""

    def __init__(self, width: int, emb_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        """Pre-norm."""
        self.fc1 = nn.Linear(width, width)
        """First Linear."""
        self.emb_proj = nn.Linear(emb_dim, width)
        """Conditioning embedding -> additive bias of the hidden layer."""
        self.act = nn.SiLU()
        """Activation."""
        self.fc2 = nn.Linear(width, width)
        """Second Linear."""

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        """``h: (B, width)``, ``c: (B, emb_dim)`` -> ``(B, width)``."""
        z = self.fc1(self.norm(h)) + self.emb_proj(c)
        return h + self.fc2(self.act(z))


class ResidualMLP(nn.Module):
    """Residual MLP denoiser: ``net(x, t, cond=None, extra=None) -> (B, H, D)``.

    Args:
        x_dim: feature dimension D.
        horizon: sequence length H (1 for single samples / transitions).
        cond_dim: width of the optional global condition vector (0: none).
        extra_dim: width of the optional per-position extra input (0: none); its projection
            is zero-initialised so the net initially ignores it.
        width: hidden width.
        depth: number of residual blocks.
        emb_dim: width of the time (+ condition) embedding (default: ``min(width, 128)``).
    """

    def __init__(
        self,
        x_dim: int,
        horizon: int,
        cond_dim: int = 0,
        extra_dim: int = 0,
        width: int = 256,
        depth: int = 4,
        emb_dim: int | None = None,
    ) -> None:
        super().__init__()
        if x_dim <= 0 or horizon <= 0:
            raise ValueError(f"x_dim and horizon must be positive, got x_dim={x_dim}, "
                             f"horizon={horizon}")
        if cond_dim < 0 or extra_dim < 0:
            raise ValueError(f"cond_dim and extra_dim must be >= 0, got cond_dim={cond_dim}, "
                             f"extra_dim={extra_dim}")
        if width <= 0 or depth < 1:
            raise ValueError(f"need width > 0 and depth >= 1, got width={width}, depth={depth}")
        emb_dim = emb_dim or min(width, 128)
        self.x_dim = x_dim
        """Feature dimension D."""
        self.horizon = horizon
        """Sequence length H."""
        self.cond_dim = cond_dim
        """Global condition width (0: none)."""
        self.extra_dim = extra_dim
        """Per-position extra input width (0: none)."""
        self.width = width
        """Hidden width."""
        self.depth = depth
        """Number of residual blocks."""
        self.emb_dim = emb_dim
        """Conditioning embedding width."""

        self.embed = ConditionEmbedding(emb_dim, cond_dim=cond_dim, act="silu")
        """Time (+ condition) embedding."""
        self.inp = nn.Linear(horizon * x_dim, width)
        """Flattened input -> width."""
        self.extra_in: nn.Linear | None = None
        """Zero-initialised projection of the flattened ``extra`` added to the input layer."""
        if extra_dim > 0:
            self.extra_in = zero_init_(nn.Linear(horizon * extra_dim, width))
        self.blocks = nn.ModuleList(ResidualMLPBlock(width, emb_dim) for _ in range(depth))
        """Residual blocks."""
        self.out_norm = nn.LayerNorm(width)
        """Final LayerNorm."""
        self.out = nn.Linear(width, horizon * x_dim)
        """width -> flattened output."""

    def forward(
        self, x: Tensor, t: Tensor, cond: Tensor | None = None, extra: Tensor | None = None
    ) -> Tensor:
        """Denoiser output ``(B, H, D)`` for ``x: (B, H, D)`` and ``t: (B,)`` in [0, 1]."""
        check_inputs(x, t, cond, extra, x_dim=self.x_dim, horizon=self.horizon,
                     cond_dim=self.cond_dim, extra_dim=self.extra_dim, name="ResidualMLP")
        b = x.shape[0]
        h = self.inp(x.reshape(b, -1))
        if self.extra_in is not None:
            h = h + self.extra_in(extra.reshape(b, -1))
        c = self.embed(t, cond)
        for block in self.blocks:
            h = block(h, c)
        return self.out(self.out_norm(h)).reshape(b, self.horizon, self.x_dim)
