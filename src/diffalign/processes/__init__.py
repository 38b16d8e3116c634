"""Diffusion processes behind one stateless interface (see :mod:`.base`)."""

from .base import DiffusionProcess, Inpaint, SampleOutput, StepOutput, gaussian_log_prob
from .ddim import DDIM
from .ddpm import DDPM
from .flow_matching import FlowMatching
from .inpainting import random_prefix_mask
from .score_matching import ScoreMatching

PROCESSES = {"ddpm": DDPM, "ddim": DDIM, "sm": ScoreMatching, "fm": FlowMatching}


def build_process(name: str, **kwargs) -> DiffusionProcess:
    """Build a process by its short name: "ddpm", "ddim", "sm" or "fm"."""
    if name not in PROCESSES:
        raise ValueError(f"unknown process {name!r}; choose one of {sorted(PROCESSES)}")
    return PROCESSES[name](**kwargs)


__all__ = ["DDIM", "DDPM", "PROCESSES", "DiffusionProcess", "FlowMatching", "Inpaint",
           "SampleOutput", "ScoreMatching", "StepOutput", "build_process", "gaussian_log_prob",
           "random_prefix_mask"]
