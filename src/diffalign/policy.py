"""A trained model as a policy for one environment: raw observation in, raw action out.

``load_policy(DIR)`` takes an exported stage (``diffalign export``), a run directory of
``diffalign run nav1d`` (its final stage, or ``stage=``) or a plain model directory::

    policy = load_policy("runs/nav1d", seed=0)
    env = policy.make_env()
    obs, _ = env.reset(seed=0)
    policy.reset()
    done = False
    while not done:
        obs, reward, term, trunc, _ = env.step(policy.act(obs))
        done = term or trunc

Each decision is :func:`~diffalign.models.selection.select_actions` on the observation
history, as in the evaluation's rollouts, so one episode from env seed ``s`` with
``load_policy(DIR, seed=s)`` takes the actions of the evaluation's first episode with seed
``s``.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["Policy", "compile_denoisers", "load_policy"]


class _Bf16Denoiser(torch.nn.Module):
    """``net`` under bfloat16 autocast, returning float32: the convolutions and matmuls run
    in bfloat16, the sampler's chain around the net stays float32."""

    def __init__(self, net: torch.nn.Module, device_type: str) -> None:
        super().__init__()
        self.net = net
        """The wrapped denoiser."""
        self.device_type = device_type
        """Autocast device type ("cpu" or "cuda")."""

    def forward(self, *args, **kwargs):
        """The net's output, computed in bfloat16 and returned as float32."""
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.net(*args, **kwargs).float()


def compile_denoisers(model, bf16: bool = False):
    """Compile ``model``'s denoising networks with TorchInductor for inference, in place
    (also a cascade's aligned net and refiner); returns ``model``.

    On a CPU the graph is frozen (weights folded in as constants) and run from generated
    C++ (``cpp_wrapper``), which removes most of the per-operation overhead that dominates
    one-candidate decisions; shapes are fixed, so each new batch size compiles once more.
    Compilation happens at the first decision and takes tens of seconds. Decisions must run
    without gradients (as :meth:`Policy.act` does); the samples equal the eager model's to
    float rounding (tests/test_use.py).

    ``bf16``: the networks run under bfloat16 autocast (their output is float32 again), for
    many candidates per decision on a device with bfloat16 kernels (64 candidates × 20
    steps of a Hopper-sized U-Net: 1.5-1.6× the eager float32 decision on an AVX512-BF16
    CPU, docs/results.md); one-candidate decisions gain nothing from it. Where the device
    has no such kernels it falls back to float32 with a note on stderr. Samples stay within
    the bfloat16 bounds of tests/test_fast_paths.py."""
    from .align.cascade import CascadeModel
    from .train.trainer import bf16_if_fast

    device = model.device
    bf16 = bf16_if_fast(bf16, str(device), "compile_denoisers(bf16=True)")
    options = {"freezing": True, "cpp_wrapper": True} if device.type == "cpu" else {}

    def fast(net):
        if bf16:
            net = _Bf16Denoiser(net, device.type)
        return torch.compile(net, dynamic=False, options=options)

    if isinstance(model, CascadeModel):
        model._aligned = fast(model._aligned)
        if model._refiner is not None:
            model._refiner = fast(model._refiner)
    else:
        model.net = fast(model.net)
    return model


class Policy:
    """A control model acting in one environment; keeps the observation history and the
    queue of actions still to execute from the last sample (T_a > 1)."""

    def __init__(self, model, candidates: int = 1, critic=None, stage: str | None = None,
                 seed: int = 0, steps: int | None = None, selection: str = "auto",
                 temperature: float = 1.0, compile: bool = False) -> None:
        from .models.selection import resolve_selection

        if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
            raise ValueError(f"candidates must be an integer >= 1, got {candidates!r}")
        self.model = model
        """The model that samples (a ControlModel or a CascadeModel)."""
        self.critic = critic
        """The critic ranking the candidates (None: not ranked)."""
        self.candidates = candidates
        """Samples per decision."""
        self.stage = stage
        """The run's stage name (None for a plain model directory)."""
        self.steps = steps
        self.selection = resolve_selection(model.kind, selection, critic)
        self.temperature = temperature
        self.seed = int(seed)
        self._gen = torch.Generator().manual_seed(self.seed)
        self._hist: deque = deque(maxlen=model.spec.obs_history)
        self._queue: deque = deque()
        model.eval()
        if compile:
            compile_denoisers(model)

    def reset(self, seed: int | None = None) -> None:
        """Forget the episode's observations and queued actions (call at every env reset);
        with ``seed``, restart the sampling generator from it."""
        self._hist.clear()
        self._queue.clear()
        if seed is not None:
            self.seed = int(seed)
            self._gen = torch.Generator().manual_seed(self.seed)

    def act(self, obs: Any) -> np.ndarray:
        """The action for the raw observation ``obs`` (``(obs_dim,)``), as float32
        ``(act_dim,)``; a new sample only when the queue of chosen actions is empty."""
        from .models.selection import select_actions

        o = np.asarray(obs, dtype=np.float32)
        if o.shape != (self.model.obs_dim,):
            raise ValueError(f"obs must have shape ({self.model.obs_dim},), got {o.shape}")
        if self._hist:
            self._hist.append(o)
        else:  # the episode's first observation fills the history, as in the rollouts
            self._hist.extend([o] * self._hist.maxlen)
        if not self._queue:
            oh = torch.from_numpy(np.stack(self._hist))[None]
            out = select_actions(self.model, oh, candidates=self.candidates, steps=self.steps,
                                 selection=self.selection, critic=self.critic,
                                 generator=self._gen, temperature=self.temperature)
            self._queue.extend(out.actions[0].detach().cpu().numpy())
        return self._queue.popleft()

    def make_env(self, **kwargs: Any):
        """A new gymnasium environment of the model's task (``kwargs``: for the env's
        factory, e.g. ``render_mode``)."""
        from .eval.evaluate import task_env

        return task_env(dict(self.model.meta))[0](**kwargs)

    def __repr__(self) -> str:
        return (f"Policy(stage={self.stage!r}, kind={self.model.kind!r}, "
                f"candidates={self.candidates}, selection={self.selection!r})")


def load_policy(path: str | Path, stage: str | None = None, seed: int = 0,
                device: str = "cpu", steps: int | None = None, compile: bool = False
                ) -> Policy:
    """The policy of ``path``: an exported stage, a run directory (its final stage, or
    ``stage``) or a plain model directory; samples from generator seed ``seed`` with
    ``steps`` denoising steps (default: those the run aligned for, ``--deploy-steps``).
    ``compile``: compile the denoiser for faster decisions (:func:`compile_denoisers`)."""
    from .models.critic import load_critic
    from .runs import UserError, load_dir

    st = load_dir(path, stage=stage, device=device)
    critic = None
    if st.candidates > 1:  # one candidate needs no ranking
        if st.critic_dir is None:
            raise UserError(f"{path}: stage {st.name!r} ranks {st.candidates} candidates but "
                            "has no critic")
        critic = load_critic(st.critic_dir, device=device)
    return Policy(st.model, candidates=st.candidates, critic=critic, stage=st.name, seed=seed,
                  steps=steps, compile=compile)
