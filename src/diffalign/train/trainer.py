"""The generic training loop: one optimiser, one loss function, resumable bit for bit.

``fit(model, loss_fn, cfg, out_dir)`` runs ``cfg.steps`` AdamW steps on
``loss_fn(model, batch_size, generator)["loss"]`` with warm-up + cosine/constant learning
rate, gradient clipping, an EMA of the weights and an optional ``after_step`` hook.

Determinism contract (for authors of models and loss functions): all randomness of a step —
batch sampling, diffusion noise, timesteps, dropout masks — must come from the ``generator``
handed to ``loss_fn`` (a CPU ``torch.Generator`` owned, seeded and checkpointed by the
trainer). Then a run killed at any point and resumed ends bit-identical to an uninterrupted
one (CPU; on CUDA up to non-deterministic kernels). The global torch/numpy/python RNGs are
seeded from ``cfg.seed`` at a fresh start and restored on resume as a fallback, but only the
generator is per-rank under ``torchrun``.

Training state lives in ``out_dir/train_state/``: ``state.json`` (step, config, optimiser
and scheduler structure, RNG scalars, the run's settings) and ``tensors-<step>.safetensors``
(model, EMA, optimiser moments, RNG states). ``state.json`` is written last and atomically
and names its tensor file (and its SHA-256), so a kill during a save leaves the previous
state in force. Nothing is pickled.

Resuming needs the same run: the settings that determine the result (``fit(settings=...)``,
or :func:`run_settings` around a library function that calls ``fit``) are recorded in the
state and a resume with other values is refused with a :class:`~diffalign.errors.UserError`
naming them (the optimisation settings of :class:`TrainConfig` only warn).

A non-finite loss or gradient norm is caught at the step it happens, before the optimiser
applies it: the weights, EMA and optimiser go back to the last in-memory copy taken at a
finite step (one every :data:`SNAPSHOT_EVERY` steps), the learning rate is halved and
training goes on. A second one ends the run with :class:`~diffalign.errors.TrainingDiverged`.
Checking costs one host-device sync per step (and one small all-reduce under torchrun).

Multi-process training: see :mod:`diffalign.train.distributed`
(``torchrun --nproc_per_node=2 -m diffalign.cli train ...``).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import json
import math
import random
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from ..atomic import clean_stale_temps, write_json
from ..errors import TrainingDiverged, UserError
from .checkpoint import CheckpointError, load_tensors, read_json, save_model, save_tensors
from .distributed import (
    DistInfo,
    all_reduce_grads,
    all_reduce_mean,
    broadcast_module,
    cleanup_distributed,
    init_distributed,
    rank_seed,
)
from .ema import EMA
from .logging import MetricLogger

__all__ = ["SNAPSHOT_EVERY", "FitResult", "LossFn", "TrainConfig", "TrainingDiverged", "adam",
           "fit", "load_train_state", "lr_factor", "resolve_device", "run_settings",
           "save_train_state", "seed_everything"]

LossFn = Callable[[nn.Module, int, torch.Generator], dict[str, Tensor]]


def adam(params: Iterable[nn.Parameter], lr: float, weight_decay: float | None = None
         ) -> torch.optim.Optimizer:
    """Adam (AdamW when ``weight_decay`` is given) with torch's fused kernel wherever the
    parameters allow it (floating point, all on CPU or all on one CUDA device), else the
    default implementation. Same update either way; the fused one is one kernel call instead
    of a dozen small ops per parameter: on the 2-core CPU of the README's figures an AdamW
    step of the 263k-parameter foundation U-Net took 14.3 ms unfused and 2.0 ms fused (a
    fifth of its 74 ms training step)."""
    params = list(params)
    types = {p.device.type for p in params}
    fused = (len(types) == 1 and types <= {"cpu", "cuda"}
             and all(p.is_floating_point() for p in params))
    if weight_decay is None:
        return torch.optim.Adam(params, lr=lr, fused=fused or None)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)

STATE_DIR = "train_state"
STATE_JSON = "state.json"
STATE_FORMAT = "diffalign.train_state/1"

# config fields whose change between a run and its resumption is harmless
_RESUME_FREE = {"steps", "log_every", "ckpt_every", "progress", "device"}

SNAPSHOT_EVERY = 25
"""Steps between the in-memory copies of the training state that a non-finite loss rolls
back to (a copy costs about one optimiser step's memory traffic)."""

_SETTINGS: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "diffalign_run_settings", default=None)


@contextlib.contextmanager
def run_settings(settings: dict[str, Any]) -> Iterator[None]:
    """Settings that every :func:`fit` inside the block records in its training state and
    requires unchanged on resume, as if passed as ``fit(settings=...)``; for library
    functions that call ``fit`` themselves (nested blocks add to the outer ones)."""
    outer = _SETTINGS.get() or {}
    token = _SETTINGS.set({**outer, **settings})
    try:
        yield
    finally:
        _SETTINGS.reset(token)


@dataclass
class TrainConfig:
    """Optimisation settings shared by every training command."""

    steps: int = 2000
    """Total optimiser steps (a resumed run continues up to this number)."""
    batch_size: int = 64
    """Samples per step (per process under torchrun)."""
    lr: float = 3e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    warmup_steps: int = 100
    """Linear warm-up steps from lr/warmup_steps to lr."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """Learning rate after warm-up: cosine decay to 0 at `steps`, or constant."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    ema_decay: float = 0.995
    """Decay of the weights' exponential moving average (0 disables: EMA model = model)."""
    log_every: int = 50
    """Write metrics every this many steps (and at the last step)."""
    ckpt_every: int = 500
    """Save the resumable training state every this many steps (0 = only at the end)."""
    seed: int = 0
    """Seed of the trainer's data/noise generator and the global RNGs."""
    device: str = "auto"
    """Torch device: 'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ..."""
    bf16: bool = False
    """Run the forward pass and loss under torch.autocast(bfloat16)."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"TrainConfig: {msg}")

        need(isinstance(self.steps, int) and self.steps >= 1,
             f"steps must be an integer >= 1, got steps={self.steps!r}")
        need(isinstance(self.batch_size, int) and self.batch_size >= 1,
             f"batch_size must be an integer >= 1, got batch_size={self.batch_size!r}")
        need(math.isfinite(self.lr) and self.lr > 0, f"lr must be > 0, got lr={self.lr!r}")
        need(math.isfinite(self.weight_decay) and self.weight_decay >= 0,
             f"weight_decay must be >= 0, got weight_decay={self.weight_decay!r}")
        need(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0,
             f"warmup_steps must be an integer >= 0, got warmup_steps={self.warmup_steps!r}")
        need(self.schedule in ("cosine", "constant"),
             f"schedule must be 'cosine' or 'constant', got schedule={self.schedule!r}")
        need(math.isfinite(self.grad_clip) and self.grad_clip >= 0,
             f"grad_clip must be >= 0 (0 disables), got grad_clip={self.grad_clip!r}")
        need(0 <= self.ema_decay < 1,
             f"ema_decay must be in [0, 1) (0 disables), got ema_decay={self.ema_decay!r}")
        need(isinstance(self.log_every, int) and self.log_every >= 1,
             f"log_every must be an integer >= 1, got log_every={self.log_every!r}")
        need(isinstance(self.ckpt_every, int) and self.ckpt_every >= 0,
             f"ckpt_every must be an integer >= 0 (0 = only at the end), "
             f"got ckpt_every={self.ckpt_every!r}")
        need(isinstance(self.seed, int) and 0 <= self.seed < 2**32,
             f"seed must be an integer in [0, 2**32), got seed={self.seed!r}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as e:
                raise ValueError(f"TrainConfig: device must be 'auto' or a torch device, "
                                 f"got device={self.device!r} ({e})") from e


@dataclass
class FitResult:
    """What :func:`fit` returns."""

    model: nn.Module
    """The trained model (raw weights)."""
    ema_model: nn.Module
    """The EMA copy (the model itself when ``ema_decay == 0``): the one to evaluate/save."""
    step: int
    """Optimiser steps done in total."""
    last_metrics: dict[str, float] = field(default_factory=dict)
    """The last logged metrics (namespaced keys)."""
    resumed_from: int = 0
    """The step the run resumed from (0 for a fresh run)."""


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` for the optimiser step that follows ``step`` completed steps.

    Warm-up: ``(step + 1) / warmup_steps`` while ``step < warmup_steps``; then 1 (constant)
    or ``0.5·(1 + cos(π·(step − warmup)/(steps − warmup)))`` (cosine).
    """
    w = cfg.warmup_steps
    if step < w:
        return (step + 1) / w
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - w) / max(1, cfg.steps - w))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_device(device: str, info: DistInfo | None = None) -> torch.device:
    """``auto`` → cuda if available else cpu; under torchrun CUDA means ``cuda:LOCAL_RANK``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} requested but CUDA is not available")
        if info is not None and info.enabled and dev.index is None:
            dev = torch.device("cuda", info.local_rank)
    return dev


def bf16_is_fast(device: str = "auto") -> bool:
    """Whether bfloat16 matmuls are native on ``device``: a CUDA GPU that supports them, or
    a CPU whose oneDNN build has bfloat16 kernels (AVX512-BF16 or AMX)."""
    try:
        dev = resolve_device(device)
    except ValueError:  # CUDA asked for, none here
        return False
    if dev.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def bf16_if_fast(requested: bool, device: str, flag: str) -> bool:
    """``requested``, unless ``device`` has no bfloat16 kernels: then False, with a one-line
    note naming ``flag`` on stderr (emulated bfloat16 is slower than float32, and the
    results of the two agree to the bounds in tests/test_fast_paths.py)."""
    if requested and not bf16_is_fast(device):
        import sys

        print(f"[diffalign] {flag}: no bfloat16 kernels on device {device!r}; "
              "float32 instead", file=sys.stderr, flush=True)
        return False
    return requested


# ----------------------------------------------------------------------------------------
# pickle-free (de)serialisation of nested states: tensors -> safetensors, the rest -> JSON

def _encode(obj: Any, key: str, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, Tensor):
        if key in tensors:
            raise ValueError(f"duplicate tensor key {key!r} in training state")
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _encode(v, f"{key}.{k}", tensors) for k, v in obj.items()}
        if all(isinstance(k, int) for k in obj):
            return {"__intdict__": {str(k): _encode(v, f"{key}.{k}", tensors)
                                    for k, v in obj.items()}}
        raise TypeError(f"cannot serialise dict with keys {list(obj)[:5]} at {key!r}")
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    raise TypeError(f"cannot serialise {type(obj).__name__} at {key!r} without pickle")


def _decode(obj: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            try:
                return tensors[obj["__tensor__"]]
            except KeyError as e:
                raise CheckpointError(f"training state lacks tensor {e}") from e
        if set(obj) == {"__intdict__"}:
            return {int(k): _decode(v, tensors) for k, v in obj["__intdict__"].items()}
        if set(obj) == {"__tuple__"}:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def _optim_encode(sd: dict, tensors: dict[str, Tensor]) -> dict:
    """Optimiser state: per-param tensors as ``optim.<idx>.<name>``, the rest JSON."""
    return {"state": _encode(sd["state"], "optim", tensors),
            "param_groups": _encode(sd["param_groups"], "optim_groups", tensors)}


def _numpy_state() -> tuple[dict, Tensor]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return ({"name": name, "pos": int(pos), "has_gauss": int(has_gauss),
             "cached_gaussian": float(cached)}, torch.from_numpy(keys.astype(np.int64)))


def _set_numpy_state(meta: dict, keys: Tensor) -> None:
    np.random.set_state((meta["name"], keys.numpy().astype(np.uint32), meta["pos"],
                         meta["has_gauss"], meta["cached_gaussian"]))


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global RNG and torch's (CPU and every CUDA device):
    what a model's initialisation draws from."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------
# training state on disk

def save_train_state(directory: str | Path, *, step: int, model: nn.Module, ema: EMA | None,
                     optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler,
                     generator_states: list[Tensor], config: dict,
                     world_size: int = 1, settings: dict[str, Any] | None = None,
                     nan_restarts: int = 0) -> Path:
    """Write a resumable state (tensors first, then ``state.json`` atomically, then clean up).

    ``generator_states``: the trainer generators' states, one per rank. ``settings``: the
    run's result-determining settings (JSON), checked on resume.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    meta: dict[str, Any] = {"format": STATE_FORMAT, "step": int(step),
                            "world_size": int(world_size), "config": config,
                            "settings": settings, "nan_restarts": int(nan_restarts)}
    meta["model"] = _encode(dict(model.state_dict()), "model", tensors)
    meta["ema"] = _encode(dict(ema.state_dict()), "ema", tensors) if ema is not None else None
    meta["optimizer"] = _optim_encode(optimizer.state_dict(), tensors)
    meta["scheduler"] = _encode(scheduler.state_dict(), "scheduler", tensors)
    meta["generators"] = [_encode(g, f"rng.generator.{r}", tensors)
                          for r, g in enumerate(generator_states)]
    meta["rng_torch"] = _encode(torch.get_rng_state(), "rng.torch", tensors)
    dev = next(iter(model.parameters()), torch.empty(0)).device
    # the model's own CUDA device only (touching the others would create contexts there)
    meta["rng_cuda"] = (_encode(torch.cuda.get_rng_state(dev), "rng.cuda", tensors)
                        if dev.type == "cuda" else None)
    np_meta, np_keys = _numpy_state()
    meta["rng_numpy"] = {**np_meta, "keys": _encode(np_keys, "rng.numpy_keys", tensors)}
    meta["rng_python"] = _encode(random.getstate(), "rng.python", tensors)
    name = f"tensors-{int(step):09d}.safetensors"
    meta["tensors"] = name
    # copies: safetensors refuses tensors that share memory (tied weights)
    meta["tensors_sha256"] = save_tensors(
        directory / name, {k: v.detach().to("cpu", copy=True).contiguous()
                           for k, v in tensors.items()})
    write_json(directory / STATE_JSON, meta)  # the commit point
    for old in directory.glob("tensors-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    clean_stale_temps(directory)  # temp files left by a killed save
    return directory


def load_train_state(directory: str | Path) -> tuple[dict, dict[str, Tensor]]:
    """``(meta, tensors)`` of a state written by :func:`save_train_state`."""
    directory = Path(directory)
    path = directory / STATE_JSON
    meta = read_json(path, f"{directory} has no {STATE_JSON}: no complete training state")
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{path}: unknown format {got!r}")
    return meta, load_tensors(directory / meta["tensors"], sha256=meta.get("tensors_sha256"))


def _has_state(out_dir: Path | None) -> bool:
    return out_dir is not None and (out_dir / STATE_DIR / STATE_JSON).is_file()


# ----------------------------------------------------------------------------------------

def _scalars(out: dict[str, Any]) -> dict[str, Tensor]:
    """The loggable entries of a loss dict: scalar tensors and numbers."""
    res = {}
    for k, v in out.items():
        if isinstance(v, Tensor):
            if v.numel() == 1:
                res[k] = v.detach().float().reshape(())
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            res[k] = torch.tensor(float(v))
    return res


def _total_norm(params: list[nn.Parameter]) -> Tensor:
    norms = [torch.linalg.vector_norm(p.grad.detach()) for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


def fit(model: nn.Module, loss_fn: LossFn, cfg: TrainConfig, out_dir: str | Path | None = None,
        save_fn: Callable[[Path, nn.Module], None] | None = None,
        params: Iterable[nn.Parameter] | None = None,
        after_step: Callable[[nn.Module, int], None] | None = None,
        log_prefix: str = "train", settings: dict[str, Any] | None = None) -> FitResult:
    """Train ``model`` for ``cfg.steps`` steps of ``loss_fn``; resume from ``out_dir`` if a
    training state is there.

    ``loss_fn(model, batch_size, generator)`` samples its batch with ``generator`` (CPU),
    moves it to the model's device and returns a dict with ``"loss"`` (a scalar to minimise)
    and optionally other scalars (``loss_*``, diagnostics) that are logged as
    ``<log_prefix>/<key>``. ``params``: what AdamW optimises (default: every parameter with
    ``requires_grad``). ``after_step(model, step)`` runs after each optimiser step (e.g.
    target-network updates; what it changes must live in ``model.state_dict()``).
    At the end ``save_fn(out_dir, ema_model)`` is called, or, without it,
    ``save_model(out_dir, ema_model, {"train": asdict(cfg)})`` writes ``config.json`` and
    ``model.safetensors``. Without ``out_dir`` nothing is logged or saved.

    ``settings`` (JSON-able, merged over those of an enclosing :func:`run_settings`): what
    determines the result beyond ``cfg`` (task, model, ...); a training state written with
    other values is not resumed (:class:`~diffalign.errors.UserError` naming them).
    A non-finite loss restarts once from the last good copy at half the learning rate; a
    second one raises :class:`~diffalign.errors.TrainingDiverged`.
    """
    out = Path(out_dir) if out_dir is not None else None
    merged = {**(_SETTINGS.get() or {}), **(settings or {})}
    dev0 = resolve_device(cfg.device)
    info = init_distributed(dev0.type)
    try:
        return _fit(model, loss_fn, cfg, out, save_fn, params, after_step, log_prefix, info,
                    _as_json(merged) if merged else None)
    finally:
        if info.owns_group:
            cleanup_distributed(info)


def _as_json(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` as they read back from ``state.json`` (tuples become lists, paths str)."""
    return json.loads(json.dumps(settings, default=str))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def settings_diff(saved: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    """``"key old -> new"`` for each (nested, dotted) key whose value differs between two
    settings dicts; keys only one side has are not compared (a field added since)."""
    old, new = _flatten(saved), _flatten(settings)

    def short(v: Any) -> str:
        r = repr(v)
        return r if len(r) <= 40 else r[:37] + "..."

    return [f"{k} {short(old[k])} -> {short(new[k])}" for k in sorted(set(old) & set(new))
            if old[k] != new[k]]


def _check_settings(directory: Path, saved: Any, settings: dict[str, Any] | None) -> None:
    """Refuse to resume a state whose recorded settings differ from this run's."""
    if not isinstance(saved, dict) or not settings:
        return  # a state from before settings were recorded, or a run that records none
    diff = settings_diff(saved, settings)
    if diff:
        run = directory.parent
        raise UserError(f"{run} holds a run with other settings ({'; '.join(diff)}): it cannot "
                        f"be resumed; use a new --out, or delete {run} to start afresh")


@dataclass
class _Snapshot:
    """An in-memory copy of the training state at a step whose loss was finite."""

    step: int
    model: dict[str, Tensor]
    ema: dict[str, Tensor] | None
    optimizer: dict[str, Any]


def _snapshot(step: int, model: nn.Module, ema: EMA | None,
              optimizer: torch.optim.Optimizer) -> _Snapshot:
    return _Snapshot(step, {k: v.detach().clone() for k, v in model.state_dict().items()},
                     ({k: v.detach().clone() for k, v in ema.state_dict().items()}
                      if ema is not None else None),
                     copy.deepcopy(optimizer.state_dict()))


def _roll_back(snap: _Snapshot, step: int, cfg: TrainConfig, model: nn.Module,
               ema: EMA | None, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Put back ``snap``'s weights, EMA and optimiser moments; halve the learning rate from
    ``step`` on (the schedule keeps its place: only its peak halves)."""
    model.load_state_dict(snap.model, strict=True)
    if ema is not None and snap.ema is not None:
        ema.load_state_dict(snap.ema)
    # a copy: the optimiser adopts CPU tensors in place, and the snapshot must stay intact
    optimizer.load_state_dict(copy.deepcopy(snap.optimizer))
    scheduler.base_lrs = [lr / 2 for lr in scheduler.base_lrs]
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        group["initial_lr"] = base
        group["lr"] = base * lr_factor(step, cfg)
    model.zero_grad(set_to_none=True)


def _fit(model, loss_fn, cfg, out, save_fn, params, after_step, log_prefix,
         info: DistInfo, settings: dict[str, Any] | None = None) -> FitResult:
    device = resolve_device(cfg.device, info)
    main = info.is_main
    model.to(device)
    model.train()
    if info.enabled:
        broadcast_module(model)

    params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    if not params:
        raise ValueError("fit: no trainable parameters (all have requires_grad=False)")
    optimizer = adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None

    generator = torch.Generator()  # CPU: batches are drawn on the host, then moved
    step = 0
    nan_restarts = 0
    if _has_state(out):
        step, nan_restarts = _restore(out / STATE_DIR, cfg, info, model, ema, optimizer,
                                      scheduler, generator, settings)
    else:
        generator.manual_seed(rank_seed(cfg.seed, info.rank))
        seed_everything(rank_seed(cfg.seed, info.rank))
    resumed_from = step

    logger = MetricLogger(out, enabled=main, resume_step=step)
    bar = None
    if cfg.progress and main:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc=log_prefix, dynamic_ncols=True)
    last: dict[str, float] = {}
    sums: dict[str, Tensor] = {}
    count = 0
    snap: _Snapshot | None = None
    try:
        while step < cfg.steps:
            lr_used = optimizer.param_groups[0]["lr"]
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                                enabled=cfg.bf16):
                res = loss_fn(model, cfg.batch_size, generator)
            if not isinstance(res, dict) or "loss" not in res:
                got = list(res) if isinstance(res, dict) else type(res).__name__
                raise TypeError(f"loss_fn must return a dict with key 'loss', got {got}")
            model.zero_grad(set_to_none=True)
            optimizer.zero_grad(set_to_none=True)
            loss = res["loss"].float()
            loss.backward()
            if info.enabled:
                all_reduce_grads(params, info.world_size)
            log_now = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps
            if cfg.grad_clip > 0:
                gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            else:
                gnorm = _total_norm(params)
            # checked before the update, so a bad batch never reaches the weights
            finite = torch.isfinite(loss.detach()) & torch.isfinite(gnorm.detach())
            if info.enabled:  # every rank must take the same branch
                finite = all_reduce_mean({"ok": finite.float()}, info.world_size,
                                         device)["ok"] == 1
            if not bool(finite):
                loss_val = float(loss.detach())
                what = (f"loss is {loss_val}" if not math.isfinite(loss_val)
                        else f"gradient norm is {float(gnorm)}")
                if snap is None or nan_restarts >= 1:
                    how = ("after a restart at half the learning rate" if nan_restarts
                           else "and no earlier step of this run had a finite loss")
                    raise TrainingDiverged(
                        f"{log_prefix}: {what} at step {step + 1} {how}; training diverged "
                        f"(lower the learning rate: it was {lr_used:.3g} at that step)")
                _roll_back(snap, step, cfg, model, ema, optimizer, scheduler)
                nan_restarts += 1
                if main:
                    warnings.warn(f"{log_prefix}: {what} at step {step + 1}; went back to the "
                                  f"weights of step {snap.step} and halved the learning rate",
                                  stacklevel=3)
                continue
            if snap is None or step - snap.step >= SNAPSHOT_EVERY:
                snap = _snapshot(step, model, ema, optimizer)
            optimizer.step()
            scheduler.step()
            step += 1
            if after_step is not None:
                after_step(model, step)
            if ema is not None:
                ema.update(model)

            for k, v in _scalars(res).items():
                sums[k] = sums[k] + v if k in sums else v
            count += 1
            if log_now:
                vals = {k: v / count for k, v in sums.items()}
                vals["grad_norm"] = gnorm.detach().float().reshape(())
                if info.enabled:
                    vals = all_reduce_mean(vals, info.world_size, device)
                last = {f"{log_prefix}/{k}": float(v) for k, v in vals.items()}
                last[f"{log_prefix}/lr"] = float(lr_used)
                logger.log(step, last)
                sums, count = {}, 0
                if bar is not None:
                    bar.set_postfix(loss=f"{last[f'{log_prefix}/loss']:.4g}", refresh=False)
            if bar is not None:
                bar.update(1)
            if out is not None and (step == cfg.steps
                                    or (cfg.ckpt_every > 0 and step % cfg.ckpt_every == 0)):
                _checkpoint(out / STATE_DIR, cfg, info, step, model, ema, optimizer, scheduler,
                            generator, settings, nan_restarts)
    finally:
        if bar is not None:
            bar.close()
        logger.close()

    model.zero_grad(set_to_none=True)
    ema_model = ema.model if ema is not None else model
    if out is not None and main:
        if save_fn is not None:
            save_fn(out, ema_model)
        else:
            save_model(out, ema_model, {"train": asdict(cfg)})
    if info.enabled:
        torch.distributed.barrier()
    return FitResult(model, ema_model, step, last, resumed_from)


def _gather_generators(generator: torch.Generator, info: DistInfo,
                       device: torch.device) -> list[Tensor]:
    state = generator.get_state()
    if not info.enabled:
        return [state]
    import torch.distributed as dist

    backend_dev = device if dist.get_backend() == "nccl" else torch.device("cpu")
    local = state.to(backend_dev)
    all_states = [torch.empty_like(local) for _ in range(info.world_size)]
    dist.all_gather(all_states, local)
    return [s.cpu() for s in all_states]


def _checkpoint(directory: Path, cfg: TrainConfig, info: DistInfo, step: int, model, ema,
                optimizer, scheduler, generator, settings: dict[str, Any] | None = None,
                nan_restarts: int = 0) -> None:
    device = next(model.parameters()).device
    gens = _gather_generators(generator, info, device)  # collective: every rank
    if info.is_main:
        save_train_state(directory, step=step, model=model, ema=ema, optimizer=optimizer,
                         scheduler=scheduler, generator_states=gens, config=asdict(cfg),
                         world_size=info.world_size, settings=settings,
                         nan_restarts=nan_restarts)
    if info.enabled:
        torch.distributed.barrier()


def _restore(directory: Path, cfg: TrainConfig, info: DistInfo, model, ema, optimizer,
             scheduler, generator, settings: dict[str, Any] | None = None) -> tuple[int, int]:
    """Load the state in ``directory``; return ``(step, nan_restarts)``."""
    meta, tensors = load_train_state(directory)
    _check_settings(directory, meta.get("settings"), settings)
    old_cfg = meta.get("config", {})
    changed = {k: (old_cfg.get(k), v) for k, v in asdict(cfg).items()
               if k not in _RESUME_FREE and old_cfg.get(k) != v}
    if changed and info.is_main:
        warnings.warn(f"resuming {directory} with changed settings (old, new): {changed}",
                      stacklevel=3)
    try:
        model.load_state_dict(_decode(meta["model"], tensors), strict=True)
        if ema is not None:
            if meta.get("ema") is not None:
                ema.load_state_dict(_decode(meta["ema"], tensors))
            else:
                ema.model.load_state_dict(model.state_dict())
    except RuntimeError as e:  # shape/key mismatch: another model's state
        raise CheckpointError(f"{directory} does not match this model (delete it to start "
                              f"afresh): {e}") from e
    opt = {"state": _decode(meta["optimizer"]["state"], tensors),
           "param_groups": _decode(meta["optimizer"]["param_groups"], tensors)}
    if len(opt["param_groups"]) != len(optimizer.param_groups) or any(
            len(a["params"]) != len(b["params"])
            for a, b in zip(opt["param_groups"], optimizer.param_groups)):
        raise CheckpointError(f"{directory}: the optimiser state does not match the "
                              f"trainable parameters of this model")
    optimizer.load_state_dict(opt)
    scheduler.load_state_dict(_decode(meta["scheduler"], tensors))

    step = int(meta["step"])
    if step > cfg.steps and info.is_main:
        warnings.warn(f"{directory} is at step {step}, past steps={cfg.steps}: nothing to "
                      f"train", stacklevel=3)
    gens = _decode(meta["generators"], tensors)
    if len(gens) == info.world_size:
        generator.set_state(gens[info.rank])
    else:
        if info.is_main:
            warnings.warn(f"{directory} was saved with world_size={len(gens)}, now "
                          f"{info.world_size}: data streams are reseeded", stacklevel=3)
        generator.manual_seed(rank_seed(cfg.seed, info.rank) + 7919 * step)
    if info.rank == 0:
        torch.set_rng_state(_decode(meta["rng_torch"], tensors))
        dev = next(iter(model.parameters())).device
        if meta.get("rng_cuda") is not None and dev.type == "cuda":
            torch.cuda.set_rng_state(_decode(meta["rng_cuda"], tensors), dev)
        npm = meta["rng_numpy"]
        _set_numpy_state(npm, _decode(npm["keys"], tensors))
        random.setstate(_decode(meta["rng_python"], tensors))
    else:  # only rank 0's global RNG states are saved
        seed_everything((rank_seed(cfg.seed, info.rank) + 7919 * step) % 2**32)
    return step, int(meta.get("nan_restarts", 0))
