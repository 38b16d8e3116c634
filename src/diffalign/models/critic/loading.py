"""Rebuilding critics (and the other models that share the layout) from ``config.json`` +
``model.safetensors``: :func:`build_from_files` and :func:`load_critic`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ...data.normalizer import NormalizerSet
from ...train.checkpoint import CONFIG, CheckpointError, read_json
from .config import CRITIC_KIND, ENSEMBLE_KIND, _config_from_dict
from .networks import CriticEnsemble, IQLCritic

__all__ = ["CRITIC_CLASSES", "build_from_files", "load_critic"]

CRITIC_CLASSES: dict[str, type] = {CRITIC_KIND: IQLCritic, ENSEMBLE_KIND: CriticEnsemble}
"""``config.json`` kind -> critic class."""


def load_critic(directory: str | Path, device: str | torch.device = "cpu"
                ) -> IQLCritic | CriticEnsemble:
    """The critic saved in ``directory``, one :class:`IQLCritic` or a :class:`CriticEnsemble`
    (by the ``kind`` of its ``config.json``), in eval mode on ``device``."""
    # only config.json here: the class's load reads the weights, once
    if not Path(directory).is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    config = read_json(Path(directory) / CONFIG,
                       f"{directory} has no {CONFIG}: not a diffalign checkpoint")
    kind = config.get("kind") if isinstance(config, dict) else None
    if kind not in CRITIC_CLASSES:
        raise CheckpointError(f"{directory}: config.json has kind {kind!r}, expected one of "
                              f"{sorted(CRITIC_CLASSES)} (a critic)")
    return CRITIC_CLASSES[kind].load(directory, device=device)


def _normalizers_from_tensors(tensors: dict[str, Tensor], where: str,
                              prefix: str = "normalizer.") -> NormalizerSet:
    try:
        return NormalizerSet.from_tensors(tensors, prefix)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{where}: bad normaliser tensors: {e}") from e


def build_from_files(cls: type, cfg_cls: type, directory: str | Path, config: dict,
                     tensors: dict[str, Tensor], kind: str, norm_prefix: str = "normalizer."
                     ) -> Any:
    """``cls(obs_dim, act_dim, cfg_cls(**config["config"]), normalizers)`` with the weights of
    ``tensors`` loaded strictly; any mismatch is a :class:`CheckpointError` naming the path."""
    where = str(directory)
    if not isinstance(config, dict) or config.get("kind") != kind:
        got = config.get("kind") if isinstance(config, dict) else type(config).__name__
        raise CheckpointError(f"{where}: config.json has kind {got!r}, expected {kind!r}")
    try:
        obs_dim, act_dim, cfg_d = int(config["obs_dim"]), int(config["act_dim"]), config["config"]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: config.json lacks or mangles {e}") from e
    cfg = _config_from_dict(cfg_cls, dict(cfg_d), where)
    norms = _normalizers_from_tensors(tensors, where, norm_prefix)
    try:
        model = cls(obs_dim, act_dim, cfg, norms)
        model.load_state_dict(tensors, strict=True)
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{where}: weights do not match config.json: {e}") from e
    return model
