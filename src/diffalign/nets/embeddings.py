"""Time / condition embeddings and the input checks every backbone shares.

All backbones use the calling convention ``net(x, t, cond=None, extra=None)`` with
``x: (B, H, D)``, ``t: (B,)`` continuous diffusion time in ``[0, 1]``, ``cond: (B, cond_dim)``
and ``extra: (B, H, extra_dim)``. Time is embedded as a sinusoidal embedding of ``t * 1000``
followed by an MLP; a global condition vector gets its own MLP and is added to it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

TIME_SCALE = 1000.0
"""Continuous time ``t`` in [0, 1] is multiplied by this before the sinusoidal embedding."""


def sinusoidal_embedding(positions: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Transformer-style sin/cos embedding of a 1-D tensor of (real-valued) positions.

    Returns ``(N, dim)`` with the sines in the first half and the cosines in the second half
    (a zero column is appended when ``dim`` is odd).
    """
    if positions.dim() != 1:
        raise ValueError(f"positions must be 1-D, got shape {tuple(positions.shape)}")
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period)
        * torch.arange(half, dtype=torch.float32, device=positions.device)
        / max(half, 1)
    )
    args = positions.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if dim % 2 == 1:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class SinusoidalEmbedding(nn.Module):
    """Parameter-free module wrapper around :func:`sinusoidal_embedding`."""

    def __init__(self, dim: int, max_period: float = 10000.0) -> None:
        super().__init__()
        self.dim = dim
        """Output width."""
        self.max_period = max_period
        """Longest wavelength of the embedding."""

    def forward(self, positions: Tensor) -> Tensor:
        """Embed ``(N,)`` positions into ``(N, dim)``."""
        return sinusoidal_embedding(positions, self.dim, self.max_period)


class Mish(nn.Module):
    """Mish, ``x * tanh(softplus(x))``: torch's kernel when run eagerly, so eager results
    are torch's to the bit. Under ``torch.compile`` it is the same function with one
    exponential, ``x * n / (n + 2)`` with ``n = e^x (e^x + 2)`` (design.md §10): TorchInductor
    lowers torch's mish to an exp, a log1p and a tanh per element, which made the compiled
    U-Net's element-wise kernels slower than eager ones on a CPU. The two agree to float32
    rounding (tests/test_fast_paths.py); above x = 20 the factor is 1 in float32."""

    def forward(self, x: Tensor) -> Tensor:
        """Element-wise Mish of ``x``."""
        if torch.compiler.is_compiling():
            e = torch.exp(torch.clamp(x, max=20.0))
            n = e * (e + 2)
            return x * n / (n + 2)
        return nn.functional.mish(x)


def _activation(name: str) -> nn.Module:
    acts = {"mish": Mish, "silu": nn.SiLU, "gelu": nn.GELU}
    if name not in acts:
        raise ValueError(f"unknown activation {name!r}; valid: {sorted(acts)}")
    return acts[name]()


def fourier_features(x: Tensor, n: int) -> Tensor:
    """``[x, sin(kπx), cos(kπx)]`` for ``k = 1..n`` per column: ``(B, d) -> (B, d·(1 + 2n))``.

    For inputs normalised to about [-1, 1]. A plain MLP of a scalar input is smooth in it
    (spectral bias); these features let the condition MLP tell nearby values apart, e.g. the
    32 time steps of Nav1D, whose rewards are independent from one step to the next.
    ``n = 0`` returns ``x`` unchanged.
    """
    if n < 0:
        raise ValueError(f"the number of Fourier frequencies must be >= 0, got n={n}")
    if n == 0:
        return x
    k = torch.arange(1, n + 1, device=x.device, dtype=x.dtype) * math.pi
    a = (x.unsqueeze(-1) * k).flatten(1)
    return torch.cat([x, torch.sin(a), torch.cos(a)], 1)


class ConditionEmbedding(nn.Module):
    """Embeds diffusion time ``t`` (and an optional global condition) into one vector.

    ``c = MLP_t(sin(t * 1000)) + MLP_c(cond)``. The condition MLP only exists when
    ``cond_dim > 0``; passing ``cond`` to an embedding built without one (or omitting it when
    one was built) raises ``ValueError``.
    """

    def __init__(
        self,
        out_dim: int,
        cond_dim: int = 0,
        freq_dim: int | None = None,
        hidden_dim: int | None = None,
        act: str = "mish",
    ) -> None:
        super().__init__()
        if out_dim <= 0:
            raise ValueError(f"out_dim must be positive, got out_dim={out_dim}")
        if cond_dim < 0:
            raise ValueError(f"cond_dim must be >= 0, got cond_dim={cond_dim}")
        freq_dim = freq_dim or out_dim
        hidden_dim = hidden_dim or 4 * out_dim
        self.out_dim = out_dim
        """Width of the produced embedding."""
        self.cond_dim = cond_dim
        """Width of the global condition vector (0: no condition)."""
        self.time_mlp = nn.Sequential(
            SinusoidalEmbedding(freq_dim),
            nn.Linear(freq_dim, hidden_dim),
            _activation(act),
            nn.Linear(hidden_dim, out_dim),
        )
        """sin(t * 1000) -> MLP."""
        self.cond_mlp: nn.Module | None = None
        """cond -> MLP (None when ``cond_dim == 0``)."""
        if cond_dim > 0:
            self.cond_mlp = nn.Sequential(
                nn.Linear(cond_dim, hidden_dim),
                _activation(act),
                nn.Linear(hidden_dim, out_dim),
            )

    def forward(self, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """Return ``(B, out_dim)`` for ``t: (B,)`` and optional ``cond: (B, cond_dim)``."""
        emb = self.time_mlp(t * TIME_SCALE)
        if self.cond_mlp is not None:
            emb = emb + self.cond_mlp(cond)
        return emb


def check_inputs(
    x: Tensor,
    t: Tensor,
    cond: Tensor | None,
    extra: Tensor | None,
    *,
    x_dim: int,
    horizon: int,
    cond_dim: int,
    extra_dim: int,
    name: str = "net",
) -> None:
    """Validate the common backbone inputs; raise ``ValueError`` naming expected vs got."""
    if x.dim() != 3 or tuple(x.shape[1:]) != (horizon, x_dim):
        raise ValueError(
            f"{name}: x must have shape (B, {horizon}, {x_dim}) (B, horizon, x_dim), "
            f"got {tuple(x.shape)}"
        )
    b = x.shape[0]
    if tuple(t.shape) != (b,):
        raise ValueError(f"{name}: t must have shape ({b},) (B,), got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(
            f"{name}: t must be a float tensor of continuous time in [0, 1], got dtype {t.dtype}"
        )
    if cond_dim > 0:
        if cond is None:
            raise ValueError(f"{name}: built with cond_dim={cond_dim} but cond is None")
        if tuple(cond.shape) != (b, cond_dim):
            raise ValueError(
                f"{name}: cond must have shape ({b}, {cond_dim}), got {tuple(cond.shape)}"
            )
    elif cond is not None:
        raise ValueError(
            f"{name}: cond given (shape {tuple(cond.shape)}) but the net was built with "
            "cond_dim=0"
        )
    if extra_dim > 0:
        if extra is None:
            raise ValueError(f"{name}: built with extra_dim={extra_dim} but extra is None")
        if tuple(extra.shape) != (b, horizon, extra_dim):
            raise ValueError(
                f"{name}: extra must have shape ({b}, {horizon}, {extra_dim}), "
                f"got {tuple(extra.shape)}"
            )
    elif extra is not None:
        raise ValueError(
            f"{name}: extra given (shape {tuple(extra.shape)}) but the net was built with "
            "extra_dim=0"
        )


def zero_init_(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to zero in place and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module
