"""Checkpoints: ``config.json`` + ``model.safetensors`` (weights and buffers, e.g. normalisers).

Nothing is ever unpickled: configs are JSON and tensors are safetensors. Every file is
written atomically (temp file + rename), so a killed run never leaves a torn checkpoint.

Loading checks what it can before the weights reach a model: the config's ``kind`` against
the one the loader expects, the SHA-256 of ``model.safetensors`` against the one its config
recorded at save time (a flipped bit on disk or a bad copy is refused; checkpoints written
before checksums were recorded load without the check), and the dtype of floating-point
tensors (float32: every model saves float32, and a half- or double-precision file would be
cast silently by ``load_state_dict``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..atomic import atomic_path, clean_stale_temps, write_json
from ..errors import UserError

__all__ = ["CHECKSUMS", "CheckpointError", "load_model_files", "load_tensors", "read_json",
           "save_model", "save_tensors", "sha256_file"]

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
CHECKSUMS = "sha256"
"""Key of ``config.json`` that maps the weights file's name to its SHA-256 (hex)."""


class CheckpointError(UserError):
    """A checkpoint directory is missing, incomplete or corrupted (the message says which)."""


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> str:
    """Save a flat dict of tensors as safetensors, atomically (contiguous CPU copies);
    return the file's SHA-256 (hex)."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata=metadata)
        return sha256_file(tmp)


def load_tensors(path: str | Path, device: str | torch.device = "cpu", *,
                 sha256: str | None = None, float_dtype: torch.dtype | None = None
                 ) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing or corrupted file raises :class:`CheckpointError`.

    ``sha256``: the digest the file must have. ``float_dtype``: the dtype every
    floating-point tensor must have.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint file {path}")
    if sha256 is not None:
        actual = sha256_file(path)
        if actual != sha256:
            raise CheckpointError(f"corrupted checkpoint file {path}: its SHA-256 is "
                                  f"{actual[:16]}..., not the {str(sha256)[:16]}... recorded "
                                  f"when it was saved (copy or train it again)")
    try:
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"corrupted checkpoint file {path}: {e}") from e
    if float_dtype is not None:
        bad = [(k, v.dtype) for k, v in tensors.items()
               if v.is_floating_point() and v.dtype != float_dtype]
        if bad:
            name = str(float_dtype).removeprefix("torch.")
            raise CheckpointError(f"{path}: {len(bad)} of {len(tensors)} tensors are not "
                                  f"{name} (e.g. {bad[0][0]!r} is "
                                  f"{str(bad[0][1]).removeprefix('torch.')}); diffalign "
                                  f"loads {name} weights only: convert the file to {name}")
    return tensors


def read_json(path: str | Path, missing: str) -> dict:
    """Parse a checkpoint's JSON file; ``missing`` explains an absent file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(missing)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupted {path}: {e}") from e


def save_model(directory: str | Path, module: torch.nn.Module, config: dict,
               extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (``module.state_dict()`` + extras).

    The weights are written first and the config last, so a directory with a config always
    has complete weights beside it. The config records the weights' SHA-256 under
    :data:`CHECKSUMS`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(directory)
    tensors = dict(module.state_dict())
    for k, v in (extra_tensors or {}).items():
        if k in tensors:
            raise ValueError(f"extra tensor {k!r} collides with a model parameter name")
        tensors[k] = v
    digest = save_tensors(directory / WEIGHTS, tensors)
    write_json(directory / CONFIG, {**config, CHECKSUMS: {WEIGHTS: digest}})
    return directory


def load_model_files(directory: str | Path, device: str | torch.device = "cpu", *,
                     kind: str | Collection[str] | None = None,
                     float_dtype: torch.dtype | None = torch.float32
                     ) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read ``(config, tensors)`` from a directory written by :func:`save_model`.

    ``kind``: the ``config.json`` kind (or kinds) the caller can load; another is refused
    naming both. The weights must match the SHA-256 the config recorded (if it did; the
    entry is not part of the returned config) and their floating-point tensors must be
    ``float_dtype`` (None: any).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    config = read_json(directory / CONFIG,
                       f"{directory} has no {CONFIG}: not a diffalign checkpoint")
    if not isinstance(config, dict):
        raise CheckpointError(f"{directory / CONFIG} is not a JSON object: not a diffalign "
                              f"checkpoint")
    if kind is not None:
        kinds = [kind] if isinstance(kind, str) else sorted(kind)
        if config.get("kind") not in kinds:
            want = " or ".join(repr(k) for k in kinds)
            raise CheckpointError(f"{directory} holds a {config.get('kind')!r} checkpoint, "
                                  f"not a {want} one (kind in its {CONFIG})")
    sums = config.pop(CHECKSUMS, None)
    expected = sums.get(WEIGHTS) if isinstance(sums, dict) else None
    return config, load_tensors(directory / WEIGHTS, device, sha256=expected,
                                float_dtype=float_dtype)
