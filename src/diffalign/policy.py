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

from .compiled import compile_denoisers

__all__ = ["Policy", "compile_denoisers", "load_policy"]


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
