"""The jobs the pipeline (``diffalign run``) runs in a second process, beside its main one.

On a CPU the foundation's small U-Net gains nothing from a second torch thread (one train
step, ``benchmarks/main_job_parts.py``: 62 ms on 2 threads, 49 ms on 1, and 49 and 51 ms for
two 1-thread processes at once on the README's 2 cores), so the run keeps both cores busy
with two processes of one thread:
the critic trains while the main process trains the foundation, and every stage is evaluated
in the environment while the main process aligns. :class:`SideJobs` is that second process
(or, with ``parallel=False`` or on a GPU, no process: each job then runs at once, in order).

Jobs are module-level functions of plain arguments (paths and configs), so they pickle;
each reads what it needs from the run directory (the dataset file of its ``data/``, a saved
critic, an aligned stage's weights) and writes its results where the serial run would.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

__all__ = ["SideJobs", "critic_job", "done", "dynamics_job", "eval_job", "greedy_job",
           "save_stage_weights"]


def _one_thread(parent: int | None = None) -> None:
    """The worker's initialiser: one torch thread, and no life beyond the main process's
    (``parent``: its pid)."""
    import torch

    _die_with_parent(parent)
    torch.set_num_threads(1)


def _die_with_parent(parent: int | None) -> None:
    """On Linux, have the kernel send this process SIGTERM when the process that started it
    dies (``prctl(PR_SET_PDEATHSIG)``): a main process killed by a signal, which cannot stop
    its pool, then takes the worker with it instead of leaving it to finish its job alone.
    Elsewhere nothing is done; the worker then ends after its current job."""
    import os
    import sys

    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if parent is not None and os.getppid() != parent:  # it died before the call above
        os._exit(1)


class SideJobs:
    """A one-worker process pool beside this process, one torch thread each (``enabled``),
    or a stand-in that runs each job at once in this process (``enabled=False``).

    Use as a context manager: on exit the pool finishes its jobs and this process gets back
    its torch threads. ``submit`` returns a :class:`~concurrent.futures.Future` either way; a
    job's exception is raised by ``future.result()``.
    """

    def __init__(self, enabled: bool) -> None:
        import torch

        self.enabled = bool(enabled)
        """Whether jobs run in the second process."""
        self._threads = torch.get_num_threads()
        self._running: list[Future] = []
        self._pool = None
        if self.enabled:
            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_one_thread,
                                             initargs=(os.getpid(),))
            torch.set_num_threads(1)

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        """Run ``fn(*args, **kwargs)`` in the worker (or now, here)."""
        if self._pool is not None:
            fut = self._pool.submit(fn, *args, **kwargs)
            self._running.append(fut)
            return fut
        return done(fn(*args, **kwargs))  # an error is raised here, at once

    def poll(self) -> None:
        """Forget finished jobs; cheap enough to call before every update.

        This process keeps one torch thread while the worker lives, busy or not: giving it
        back two threads whenever the worker idles would make the alignment's arithmetic
        (and so its result, by about 1e-7 per gradient) depend on the worker's timing."""
        if self._pool is not None and self._running:
            self._running = [f for f in self._running if not f.done()]

    def close(self, kill: bool = False) -> None:
        """Wait for the submitted jobs, or with ``kill`` stop the worker now (what it was
        writing stays resumable: every step writes atomically)."""
        import torch

        if self._pool is None:
            return
        if kill:  # no public way to stop a running job of a ProcessPoolExecutor
            for proc in list((getattr(self._pool, "_processes", None) or {}).values()):
                proc.terminate()
        self._pool.shutdown(wait=not kill, cancel_futures=True)
        self._pool = None
        torch.set_num_threads(self._threads)

    def __enter__(self) -> SideJobs:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(kill=exc_type is not None)


def done(value: Any) -> Future:
    """A future that already holds ``value``."""
    fut: Future = Future()
    fut.set_result(value)
    return fut


def critic_job(data: dict, cfg: Any, out_dir: str) -> float:
    """Train the run's critic(s) on the run's dataset (``data``: the arguments of
    :func:`~diffalign.pipeline.data.load_run_task`) and save them in ``out_dir`` (a killed
    job resumes from the trainer's state there); returns the training seconds."""
    from ..models.critic import train_critic

    return _timed_training(train_critic, data, cfg, out_dir)


def dynamics_job(data: dict, cfg: Any, out_dir: str) -> float:
    """Train the run's dynamics model (:func:`~diffalign.models.dynamics.train_dynamics`) and
    save it in ``out_dir``; returns the training seconds."""
    from ..models.dynamics import train_dynamics

    return _timed_training(train_dynamics, data, cfg, out_dir)


def _timed_training(train: Callable[..., Any], data: dict, cfg: Any, out_dir: str) -> float:
    import time

    from .data import load_run_task

    task = load_run_task(**data)
    t0 = time.perf_counter()
    train(task.episodes, cfg, out_dir=out_dir, progress=False)
    return time.perf_counter() - t0


def greedy_job(critic_dir: str, layout_seed: int) -> dict:
    """:func:`~diffalign.eval.nav1d_critic.nav1d_greedy_return` of the saved critic."""
    from ..eval.nav1d_critic import nav1d_greedy_return
    from ..models.critic import load_critic

    return nav1d_greedy_return(load_critic(critic_dir), layout_seed)


def eval_job(model_dir: str, critic_dir: str, weights: str | None, **kwargs: Any) -> dict:
    """:func:`~diffalign.eval.evaluate.evaluate` of the saved model, with its network's
    weights replaced by the safetensors file ``weights`` (an aligned stage's merged weights,
    see :func:`save_stage_weights`) when given."""
    from ..eval.evaluate import evaluate
    from ..models.base import ControlModel
    from ..train.checkpoint import load_tensors

    device = kwargs.get("device", "cpu")
    model = ControlModel.load(Path(model_dir), device=device)
    if weights is not None:
        model.net.load_state_dict(load_tensors(weights, device=device))
    return evaluate(model, critic=critic_dir, **kwargs)


def save_stage_weights(net, path: Path) -> Path:
    """Write ``net``'s weights (a plain network: an aligned stage's adapter merged into a copy
    of the reference) to ``path`` atomically, for :func:`eval_job`. The stage's evaluation
    can then run later or elsewhere, and a killed run that finds the file but no
    ``eval.json`` evaluates that stage again from it."""
    from ..train.checkpoint import save_tensors

    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(path, net.state_dict())
    return path
