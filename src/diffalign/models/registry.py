"""Build control models by name, with defaults sized for Nav1D on a 2-core CPU.

``build_model(kind, process, backbone, obs_dim, act_dim, **overrides)``: ``process`` and
``backbone`` may be None (the kind's default). ``overrides`` are :class:`ModelSpec` fields;
``backbone_kwargs``/``process_kwargs`` are merged over the defaults of that backbone/process.
"""

from __future__ import annotations

import copy
from typing import Any

from .base import KINDS, ControlModel, ModelSpec

__all__ = ["BACKBONE_DEFAULTS", "DEFAULTS", "PROCESS_DEFAULTS", "build_model", "default_spec",
           "model_class"]

DEFAULTS: dict[str, dict[str, Any]] = {
    "diffuser": {"process": "ddpm", "backbone": "unet", "horizon": 16, "obs_history": 1,
                 "action_horizon": 1, "fixed_known": True},
    "dd": {"process": "ddpm", "backbone": "unet", "horizon": 16, "obs_history": 1,
           "action_horizon": 1, "fixed_known": True},
    "dp": {"process": "ddim", "backbone": "dit", "horizon": 8, "obs_history": 2,
           "action_horizon": 4},
}
"""Per kind: default process, backbone, horizon, obs_history and action_horizon."""

BACKBONE_DEFAULTS: dict[str, dict[str, Any]] = {
    "unet": {"dim": 16, "dim_mults": [1, 2, 4], "kernel_size": 5},  # horizon % 4 == 0
    "dit": {"hidden": 64, "depth": 3, "heads": 4, "mlp_ratio": 4.0},
    "mlp": {"width": 256, "depth": 3},
}
"""Backbone size arguments (small: a Nav1D model trains in about two minutes on 2 cores)."""

PROCESS_DEFAULTS: dict[str, dict[str, Any]] = {
    "ddpm": {"num_train_steps": 100, "schedule": "cosine", "prediction": "eps",
             "clip_x0": 1.0, "default_steps": 20},
    "ddim": {"num_train_steps": 100, "schedule": "cosine", "prediction": "eps",
             "clip_x0": 1.0, "default_steps": 10, "eta": 0.0},
    "sm": {"default_steps": 50},
    "fm": {"default_steps": 20},
}
"""Process arguments; ``clip_x0 = 1`` suits min-max normalised data (dropped for gaussian)."""


def model_class(kind: str) -> type[ControlModel]:
    """The class of model ``kind``."""
    from .decision_diffuser import DecisionDiffuser
    from .diffuser import Diffuser
    from .diffusion_policy import DiffusionPolicy

    classes = {"diffuser": Diffuser, "dd": DecisionDiffuser, "dp": DiffusionPolicy}
    if kind not in classes:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {KINDS}")
    return classes[kind]


def default_spec(kind: str, process: str | None = None, backbone: str | None = None,
                 **overrides: Any) -> ModelSpec:
    """The default :class:`ModelSpec` of ``kind`` with ``overrides`` applied."""
    if kind not in DEFAULTS:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {KINDS}")
    d = copy.deepcopy(DEFAULTS[kind])
    process = process or d.pop("process")
    backbone = backbone or d.pop("backbone")
    d.pop("process", None)
    d.pop("backbone", None)
    if process not in PROCESS_DEFAULTS:
        raise ValueError(f"unknown process {process!r}; choose one of "
                         f"{tuple(PROCESS_DEFAULTS)}")
    if backbone not in BACKBONE_DEFAULTS:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of "
                         f"{tuple(BACKBONE_DEFAULTS)}")
    fields = set(ModelSpec.__dataclass_fields__) - {"kind", "process", "backbone"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown model option(s) {unknown}; valid: {sorted(fields)}")
    bkw = {**BACKBONE_DEFAULTS[backbone], **(overrides.pop("backbone_kwargs", None) or {})}
    pkw = {**PROCESS_DEFAULTS[process], **(overrides.pop("process_kwargs", None) or {})}
    if overrides.get("normalizer", "minmax") != "minmax":
        pkw.pop("clip_x0", None)
    d.update({k: v for k, v in overrides.items() if v is not None})
    return ModelSpec(kind=kind, process=process, backbone=backbone, backbone_kwargs=bkw,
                     process_kwargs=pkw, **d)


def build_model(kind: str, process: str | None = None, backbone: str | None = None,
                obs_dim: int = 2, act_dim: int = 1, meta: dict | None = None,
                **overrides: Any) -> ControlModel:
    """A fresh model; raises ValueError naming any unknown or incompatible value."""
    spec = default_spec(kind, process, backbone, **overrides)
    try:
        return model_class(kind)(spec, obs_dim, act_dim, meta=meta)
    except TypeError as e:  # bad process kwargs
        raise ValueError(f"bad options for process {spec.process!r} "
                         f"({spec.process_kwargs}): {e}") from e
