"""Recipes: the sizes and settings of a run, one frozen dataclass per task family.

:class:`Nav1DRecipe` for ``nav1d/*`` tasks, :class:`SimRecipe` for every other task
(simulators, dataset files, Minari ids); presets (``quick``, ``default``, ``paper``) are
derived from each family's default with :func:`dataclasses.replace`. :func:`recipe_for`
picks the recipe of a task string.
"""

from __future__ import annotations

from .base import Recipe, with_overrides
from .nav1d import NAV1D_PRESETS, Nav1DRecipe
from .sim import SIM_PRESETS, SimRecipe

__all__ = ["NAV1D_PRESETS", "PRESETS", "SIM_PRESETS", "Nav1DRecipe", "Recipe", "SimRecipe",
           "family_of", "recipe_for", "with_overrides"]

PRESETS = ("quick", "default", "paper")
"""Preset names, smallest first."""


def family_of(task: str) -> str:
    """``"nav1d"`` for ``nav1d/*`` task strings, else ``"sim"``."""
    return "nav1d" if task.startswith("nav1d/") else "sim"


def recipe_for(task: str, preset: str = "default") -> Recipe:
    """The recipe of ``task`` at ``preset``."""
    from ..errors import UserError

    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return (NAV1D_PRESETS if family_of(task) == "nav1d" else SIM_PRESETS)[preset]
