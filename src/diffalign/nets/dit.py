"""DiT-1D: a diffusion transformer with adaLN-Zero over 1-D sequences (Peebles & Xie 2023).

Each of the H positions is a token: a per-position Linear embeds D -> hidden, a fixed sinusoidal
positional embedding over H is added, and the conditioning vector ``c`` (time embedding plus
optional condition embedding) modulates every block through adaptive LayerNorm. The modulation
Linears and the output Linear are zero-initialised, so every block starts as the identity and the
whole net starts by predicting zeros.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .embeddings import ConditionEmbedding, check_inputs, sinusoidal_embedding, zero_init_


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation ``x * (1 + scale) + shift`` with per-sample ``(B, C)`` shift/scale."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class SelfAttention(nn.Module):
    """Multi-head self-attention using ``F.scaled_dot_product_attention``."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        """Number of attention heads."""
        self.qkv = nn.Linear(hidden, 3 * hidden)
        """Joint query/key/value projection."""
        self.proj = nn.Linear(hidden, hidden)
        """Output projection."""

    def forward(self, x: Tensor) -> Tensor:
        """``(B, H, hidden) -> (B, H, hidden)``."""
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero: gated attention and MLP residuals modulated by ``c``."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        mlp_hidden = int(hidden * mlp_ratio)
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        """Pre-attention LayerNorm (no affine; adaLN supplies it)."""
        self.attn = SelfAttention(hidden, heads)
        """Self-attention over the H positions."""
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        """Pre-MLP LayerNorm (no affine)."""
        self.mlp = nn.Sequential(
            nn.Linear(hidden, mlp_hidden),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_hidden, hidden),
        )
        """Position-wise feed-forward network."""
        self.ada = nn.Sequential(nn.SiLU(), zero_init_(nn.Linear(hidden, 6 * hidden)))
        """c -> (shift, scale, gate) for attention and MLP; zero-init so the block is identity."""

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """``x: (B, H, hidden)``, ``c: (B, hidden)`` -> ``(B, H, hidden)``."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.ada(c).chunk(6, dim=-1)
        x = x + gate_a.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        x = x + gate_m.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_m, scale_m))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm then a zero-initialised Linear to D."""

    def __init__(self, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        """LayerNorm without affine."""
        self.ada = nn.Sequential(nn.SiLU(), zero_init_(nn.Linear(hidden, 2 * hidden)))
        """c -> (shift, scale), zero-init."""
        self.linear = zero_init_(nn.Linear(hidden, out_dim))
        """Output projection, zero-init."""

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """``(B, H, hidden) -> (B, H, out_dim)``."""
        shift, scale = self.ada(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT1D(nn.Module):
    """1-D diffusion transformer denoiser: ``net(x, t, cond=None, extra=None) -> (B, H, D)``.

    Args:
        x_dim: feature dimension D.
        horizon: sequence length H (number of tokens).
        cond_dim: width of the optional global condition vector (0: none).
        extra_dim: width of the optional per-position extra input (0: none); its token
            projection is zero-initialised so the net initially ignores it.
        hidden: token width; must be divisible by ``heads``.
        depth: number of transformer blocks.
        heads: attention heads.
        mlp_ratio: MLP hidden width as a multiple of ``hidden``.
    """

    def __init__(
        self,
        x_dim: int,
        horizon: int,
        cond_dim: int = 0,
        extra_dim: int = 0,
        hidden: int = 128,
        depth: int = 6,
        heads: int = 4,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if x_dim <= 0 or horizon <= 0:
            raise ValueError(f"x_dim and horizon must be positive, got x_dim={x_dim}, "
                             f"horizon={horizon}")
        if cond_dim < 0 or extra_dim < 0:
            raise ValueError(f"cond_dim and extra_dim must be >= 0, got cond_dim={cond_dim}, "
                             f"extra_dim={extra_dim}")
        if hidden <= 0 or heads <= 0 or hidden % heads != 0:
            raise ValueError(f"hidden must be a positive multiple of heads, got hidden={hidden}, "
                             f"heads={heads}")
        if depth < 1 or mlp_ratio <= 0:
            raise ValueError(f"need depth >= 1 and mlp_ratio > 0, got depth={depth}, "
                             f"mlp_ratio={mlp_ratio}")
        self.x_dim = x_dim
        """Feature dimension D."""
        self.horizon = horizon
        """Sequence length H."""
        self.cond_dim = cond_dim
        """Global condition width (0: none)."""
        self.extra_dim = extra_dim
        """Per-position extra input width (0: none)."""
        self.hidden = hidden
        """Token width."""
        self.depth = depth
        """Number of blocks."""
        self.heads = heads
        """Attention heads."""
        self.mlp_ratio = mlp_ratio
        """MLP expansion ratio."""

        self.x_embed = nn.Linear(x_dim, hidden)
        """Per-position patch embedding D -> hidden."""
        self.register_buffer(
            "pos_embed",
            sinusoidal_embedding(torch.arange(horizon, dtype=torch.float32), hidden),
            persistent=False,
        )
        self.pos_embed: Tensor
        """Fixed sinusoidal positional embedding ``(H, hidden)`` (not saved; recomputed)."""
        self.extra_embed: nn.Linear | None = None
        """Zero-initialised per-position projection of ``extra`` added to the tokens."""
        if extra_dim > 0:
            self.extra_embed = zero_init_(nn.Linear(extra_dim, hidden))
        self.embed = ConditionEmbedding(
            hidden, cond_dim=cond_dim, freq_dim=256, hidden_dim=hidden, act="silu"
        )
        """Time (+ condition) embedding ``c``."""
        self.blocks = nn.ModuleList(DiTBlock(hidden, heads, mlp_ratio) for _ in range(depth))
        """adaLN-Zero transformer blocks."""
        self.final = FinalLayer(hidden, x_dim)
        """adaLN output layer (zero-init)."""
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT init: Xavier-uniform Linears with zero bias, then zero the adaLN/output layers."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for block in self.blocks:
            zero_init_(block.ada)
        zero_init_(self.final.ada)
        zero_init_(self.final.linear)
        if self.extra_embed is not None:
            zero_init_(self.extra_embed)

    def forward(
        self, x: Tensor, t: Tensor, cond: Tensor | None = None, extra: Tensor | None = None
    ) -> Tensor:
        """Denoiser output ``(B, H, D)`` for ``x: (B, H, D)`` and ``t: (B,)`` in [0, 1]."""
        check_inputs(x, t, cond, extra, x_dim=self.x_dim, horizon=self.horizon,
                     cond_dim=self.cond_dim, extra_dim=self.extra_dim, name="DiT1D")
        h = self.x_embed(x) + self.pos_embed.to(x.dtype)
        if self.extra_embed is not None:
            h = h + self.extra_embed(extra)
        c = self.embed(t, cond)
        for block in self.blocks:
            h = block(h, c)
        return self.final(h, c)
