"""Per-dimension normalisers for dataset fields, saved as plain tensors beside a model.

``normalize``/``unnormalize`` accept numpy arrays or torch tensors of shape ``(..., D)`` and
return the same kind (numpy keeps its float dtype; torch keeps dtype and device). A
normaliser fitted on a 1-D field (D = 1, e.g. rewards) applies elementwise to any shape.
Parameters are float32 tensors, so ``state_dict()`` goes straight into safetensors.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

__all__ = [
    "GaussianNormalizer",
    "MinMaxNormalizer",
    "Normalizer",
    "NormalizerSet",
    "make_normalizer",
]

ArrayLike = np.ndarray | torch.Tensor


def _to_2d_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 0:
        raise ValueError("cannot fit a normaliser to a scalar")
    if x.ndim == 1:
        x = x[:, None]
    x = x.reshape(-1, x.shape[-1])
    if x.shape[0] == 0:
        raise ValueError("cannot fit a normaliser to an empty array")
    if not np.isfinite(x).all():
        raise ValueError("cannot fit a normaliser to data containing NaN or inf")
    return x


class Normalizer:
    """Base class: an affine map per dimension, ``y = (x - shift) / scale``."""

    param_names: tuple[str, str] = ("", "")
    kind: str = ""
    _constant_scale: float = 1.0

    def __init__(self, eps: float = 1e-6) -> None:
        self.eps = float(eps)
        self.params: dict[str, torch.Tensor] | None = None

    # -- subclasses define how to fit and how params map to shift/scale
    def _fit_params(self, x: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _shift_scale(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(shift, scale): y = (x - shift) / scale."""
        raise NotImplementedError

    # -- public API
    @property
    def fitted(self) -> bool:
        return self.params is not None

    @property
    def dim(self) -> int:
        self._check()
        return int(next(iter(self.params.values())).shape[0])

    def constant(self) -> torch.Tensor:
        """``(dim,)`` bool: the dimensions that were constant in the fitted data (their
        scale sits at the ``eps`` floor). They normalise to 0."""
        self._check()
        return self._shift_scale()[1] <= self._constant_scale * self.eps

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The data's per-dimension ``(min, max)`` where the normaliser keeps them, else None."""
        return None

    def fit(self, x: ArrayLike) -> Normalizer:
        """Fit per-dimension statistics over all leading axes of ``x`` (shape (..., D))."""
        params = self._fit_params(_to_2d_numpy(x))
        self.params = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in params.items()}
        return self

    def _check(self) -> None:
        if self.params is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit() first")

    def _apply(self, x: ArrayLike, inverse: bool) -> ArrayLike:
        self._check()
        shift, scale = self._shift_scale()
        if isinstance(x, torch.Tensor):
            dtype = x.dtype if x.is_floating_point() else torch.float32
            shift = shift.to(device=x.device, dtype=dtype)
            scale = scale.to(device=x.device, dtype=dtype)
            xf = x.to(dtype)
        else:
            arr = np.asarray(x)
            dtype = arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.float32
            shift = shift.numpy().astype(np.float64)
            scale = scale.numpy().astype(np.float64)
            xf = arr.astype(np.float64)
        if shift.shape[-1] != 1 and (xf.ndim == 0 or xf.shape[-1] != shift.shape[-1]):
            raise ValueError(
                f"{type(self).__name__} was fitted on dim {shift.shape[-1]}, "
                f"got input of shape {tuple(xf.shape)}"
            )
        y = xf * scale + shift if inverse else (xf - shift) / scale
        return y if isinstance(y, torch.Tensor) else y.astype(dtype)

    def normalize(self, x: ArrayLike) -> ArrayLike:
        return self._apply(x, inverse=False)

    def unnormalize(self, x: ArrayLike) -> ArrayLike:
        return self._apply(x, inverse=True)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain float32 tensors (``mean``/``std`` or ``min``/``max``)."""
        self._check()
        return {k: v.detach().clone().contiguous() for k, v in self.params.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> Normalizer:
        missing = [k for k in self.param_names if k not in state]
        if missing:
            raise KeyError(f"{type(self).__name__}.load_state_dict: missing {missing}")
        self.params = {
            k: torch.as_tensor(state[k], dtype=torch.float32).detach().clone()
            for k in self.param_names
        }
        return self

    def __repr__(self) -> str:
        dim = self.dim if self.fitted else None
        return f"{type(self).__name__}(dim={dim}, eps={self.eps})"


class GaussianNormalizer(Normalizer):
    """``(x - mean) / max(std, eps)``: zero mean, unit variance per dimension."""

    param_names = ("mean", "std")
    kind = "gaussian"
    _constant_scale = 1.5  # std clamped to eps, float32 rounding aside

    def _fit_params(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return {"mean": x.mean(0), "std": np.maximum(x.std(0), self.eps)}

    def _shift_scale(self):
        return self.params["mean"], self.params["std"].clamp_min(self.eps)


class MinMaxNormalizer(Normalizer):
    """Maps ``[min, max]`` to ``[-1, 1]`` per dimension (Diffuser's limits normaliser).

    A dimension whose range is below ``eps`` is widened to ``eps`` around its value, so a
    constant dimension maps to 0 rather than dividing by zero.
    """

    param_names = ("min", "max")
    kind = "minmax"
    _constant_scale = 1.0  # half the range: eps / 2 when widened, float32 rounding aside

    def _fit_params(self, x: np.ndarray) -> dict[str, np.ndarray]:
        lo, hi = x.min(0), x.max(0)
        narrow = (hi - lo) < self.eps
        mid = (lo + hi) / 2
        lo = np.where(narrow, mid - self.eps / 2, lo)
        hi = np.where(narrow, mid + self.eps / 2, hi)
        return {"min": lo, "max": hi}

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._check()
        return self.params["min"], self.params["max"]

    def _shift_scale(self):
        lo, hi = self.params["min"], self.params["max"]
        half = ((hi - lo) / 2).clamp_min(self.eps / 2)
        return (lo + hi) / 2, half


_KINDS: dict[str, type[Normalizer]] = {
    "gaussian": GaussianNormalizer,
    "minmax": MinMaxNormalizer,
}
_PARAM_TO_KIND = {p: k for k, cls in _KINDS.items() for p in cls.param_names}


def make_normalizer(kind: str, eps: float = 1e-6) -> Normalizer:
    try:
        return _KINDS[kind](eps=eps)
    except KeyError:
        known = sorted(_KINDS)
        raise ValueError(f"unknown normaliser kind {kind!r}; choose from {known}") from None


class NormalizerSet:
    """Normalisers keyed by field name (``"observations"``, ``"actions"``, ...).

    Save beside a model: ``tensors.update(ns.to_tensors("normalizer."))`` then
    ``safetensors.torch.save_file(tensors, path)``; load with
    ``NormalizerSet.from_tensors(load_file(path), "normalizer.")`` (other keys are ignored).
    Keys are ``<prefix><field>.<param>``; the param names (mean/std or min/max) say the kind.
    """

    def __init__(self, normalizers: Mapping[str, Normalizer] | None = None) -> None:
        self.normalizers: dict[str, Normalizer] = dict(normalizers or {})

    @classmethod
    def fit_arrays(
        cls,
        arrays: Mapping[str, ArrayLike],
        kind: str | Mapping[str, str] = "gaussian",
        eps: float = 1e-6,
    ) -> NormalizerSet:
        """Fit one normaliser per entry of ``arrays``; ``kind`` is one kind or a field->kind map."""
        out = {}
        for name, arr in arrays.items():
            k = kind if isinstance(kind, str) else kind.get(name, "gaussian")
            out[name] = make_normalizer(k, eps).fit(arr)
        return cls(out)

    @classmethod
    def fit_episodes(
        cls,
        episodes: Any,
        fields: Iterable[str] = ("observations", "actions"),
        kind: str | Mapping[str, str] = "gaussian",
        eps: float = 1e-6,
    ) -> NormalizerSet:
        """Fit on fields of an :class:`~diffalign.data.episodes.Episodes` (1-D fields such
        as ``rewards`` are treated as one dimension)."""
        return cls.fit_arrays({f: getattr(episodes, f) for f in fields}, kind=kind, eps=eps)

    def __getitem__(self, name: str) -> Normalizer:
        return self.normalizers[name]

    def __setitem__(self, name: str, value: Normalizer) -> None:
        self.normalizers[name] = value

    def __contains__(self, name: object) -> bool:
        return name in self.normalizers

    def __iter__(self):
        return iter(self.normalizers)

    def __len__(self) -> int:
        return len(self.normalizers)

    def keys(self):
        return self.normalizers.keys()

    def normalize(self, name: str, x: ArrayLike) -> ArrayLike:
        return self.normalizers[name].normalize(x)

    def unnormalize(self, name: str, x: ArrayLike) -> ArrayLike:
        return self.normalizers[name].unnormalize(x)

    def to_tensors(self, prefix: str = "normalizer.") -> dict[str, torch.Tensor]:
        """Flat ``{"<prefix><field>.<param>": tensor}`` for safetensors."""
        out = {}
        for name, norm in self.normalizers.items():
            for p, t in norm.state_dict().items():
                out[f"{prefix}{name}.{p}"] = t
        return out

    @classmethod
    def from_tensors(
        cls, tensors: Mapping[str, torch.Tensor], prefix: str = "normalizer.", eps: float = 1e-6
    ) -> NormalizerSet:
        """Inverse of :meth:`to_tensors`; keys without ``prefix`` are ignored."""
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            if not key.startswith(prefix):
                continue
            field_name, _, param = key[len(prefix) :].rpartition(".")
            if not field_name or param not in _PARAM_TO_KIND:
                raise ValueError(f"unrecognised normaliser tensor key {key!r}")
            grouped.setdefault(field_name, {})[param] = t
        out = {}
        for name, params in grouped.items():
            kinds = {_PARAM_TO_KIND[p] for p in params}
            if len(kinds) != 1:
                raise ValueError(f"normaliser {name!r} mixes parameters {sorted(params)}")
            out[name] = make_normalizer(kinds.pop(), eps).load_state_dict(params)
        return cls(out)

    def __repr__(self) -> str:
        return f"NormalizerSet({self.normalizers!r})"
