"""diffalign: reward alignment of diffusion-based control.

``import diffalign`` registers the ``diffalign/Nav1D-v0`` gymnasium environment (when
gymnasium is installed). ``diffalign.load_policy(DIR)`` loads a trained or aligned model as
a policy (:mod:`diffalign.policy`).
"""

__version__ = "0.1.0"

from . import envs  # noqa: E402,F401  (registers diffalign/Nav1D-v0)


def __getattr__(name: str):
    if name == "load_policy":  # lazily: torch is not imported by `import diffalign`
        from .policy import load_policy

        return load_policy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
