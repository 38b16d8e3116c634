"""Checkpoints: ``config.json`` + ``model.safetensors`` (weights and buffers, e.g. normalisers).

Nothing is ever unpickled: configs are JSON and tensors are safetensors. Every file is
written atomically (temp file + rename), so a killed run never leaves a torn checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..atomic import atomic_path, write_json

__all__ = ["CheckpointError", "load_model_files", "load_tensors", "read_json", "save_model",
           "save_tensors"]

CONFIG = "config.json"
WEIGHTS = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or corrupted (the message says which)."""


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> None:
    """Save a flat dict of tensors as safetensors, atomically (contiguous CPU copies)."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata=metadata)


def load_tensors(path: str | Path, device: str | torch.device = "cpu"
                 ) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing or corrupted file raises :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint file {path}")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"corrupted checkpoint file {path}: {e}") from e


def read_json(path: str | Path, missing: str) -> dict:
    """Parse a checkpoint's JSON file; ``missing`` explains an absent file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(missing)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"corrupted {path}: {e}") from e


def save_model(directory: str | Path, module: torch.nn.Module, config: dict,
               extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (``module.state_dict()`` + extras).

    The weights are written first and the config last, so a directory with a config always
    has complete weights beside it.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = dict(module.state_dict())
    for k, v in (extra_tensors or {}).items():
        if k in tensors:
            raise ValueError(f"extra tensor {k!r} collides with a model parameter name")
        tensors[k] = v
    save_tensors(directory / WEIGHTS, tensors)
    write_json(directory / CONFIG, config)
    return directory


def load_model_files(directory: str | Path, device: str | torch.device = "cpu"
                     ) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read ``(config, tensors)`` from a directory written by :func:`save_model`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    config = read_json(directory / CONFIG,
                       f"{directory} has no {CONFIG}: not a diffalign checkpoint")
    return config, load_tensors(directory / WEIGHTS, device)
