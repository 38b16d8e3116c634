"""Environments. Importing this package registers ``diffalign/Nav1D-v0`` with gymnasium, and
the simulator adapters (:mod:`diffalign.envs.adapters`) as ``diffalign/FAMILY.NAME-v0``
(their simulators are imported only when one is made).

Registration is skipped silently when gymnasium (the ``envs`` extra) is not installed, and is
idempotent, so re-importing (or calling :func:`register_envs` again) never errors.
"""

from __future__ import annotations

NAV1D_ID = "diffalign/Nav1D-v0"


def register_envs() -> bool:
    """Register the diffalign environments; returns False when gymnasium is unavailable."""
    try:
        from gymnasium.envs.registration import register, registry
    except ImportError:
        return False
    if NAV1D_ID not in registry:
        register(id=NAV1D_ID, entry_point="diffalign.envs.nav1d:Nav1DEnv")
    from .adapters import register_sim_envs

    register_sim_envs()
    return True


register_envs()

__all__ = ["NAV1D_ID", "register_envs"]
