"""Diffusion models for control (Diffuser, Decision Diffuser, Diffusion Policy), their
registry and action selection. SynthER and the IQL critic live beside them."""

from .base import KINDS, Cond, ControlModel, ModelSpec
from .decision_diffuser import DecisionDiffuser, InverseDynamics
from .diffuser import Diffuser
from .diffusion_policy import DiffusionPolicy
from .registry import BACKBONE_DEFAULTS, DEFAULTS, PROCESS_DEFAULTS, build_model, default_spec
from .selection import SELECTIONS, expectation, greedy_index, select_actions, softmax_index

__all__ = [
    "BACKBONE_DEFAULTS",
    "DEFAULTS",
    "KINDS",
    "PROCESS_DEFAULTS",
    "SELECTIONS",
    "Cond",
    "ControlModel",
    "DecisionDiffuser",
    "Diffuser",
    "DiffusionPolicy",
    "InverseDynamics",
    "ModelSpec",
    "build_model",
    "default_spec",
    "expectation",
    "greedy_index",
    "select_actions",
    "softmax_index",
]
