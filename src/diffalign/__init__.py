"""diffalign: reward alignment of diffusion-based control.

``import diffalign`` registers the ``diffalign/Nav1D-v0`` gymnasium environment (when
gymnasium is installed).
"""

__version__ = "0.1.0"

from . import envs  # noqa: E402,F401  (registers diffalign/Nav1D-v0)
