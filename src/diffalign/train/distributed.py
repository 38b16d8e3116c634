"""Several processes, one model: data-parallel training under ``torchrun``.

How to run it::

    torchrun --nproc_per_node=2 -m diffalign.cli train ...      # 2 GPUs (or 2 CPU processes)

``torchrun`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``; when
``WORLD_SIZE > 1`` the trainer calls :func:`init_distributed`, which starts
``torch.distributed`` (NCCL on CUDA, Gloo on CPU) and pins each rank to ``cuda:LOCAL_RANK``.
Every rank starts from rank 0's weights (:func:`broadcast_module`), samples its own batches
from its own generator stream (:func:`rank_seed`), and the gradients are averaged across
ranks after each backward pass (:func:`all_reduce_grads`), so every rank takes the same
optimiser step and the replicas stay bit-identical. Only rank 0 logs, shows progress and
writes checkpoints. The effective batch is ``world_size × batch_size``.

Gradients are averaged explicitly instead of through ``DistributedDataParallel`` because a
loss function here may call any method of the model (``model.q(...)``, a process calling
``model.net``), and DDP only synchronises what passes through ``forward``.

:func:`launch_local` runs a function on N local CPU processes (Gloo, a file store), for tests.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistInfo", "all_reduce_grads", "all_reduce_mean", "broadcast_module",
           "cleanup_distributed", "init_distributed", "launch_local", "rank_seed"]

#: Offset between the data seeds of consecutive ranks (rank 0 uses the config's seed itself);
#: large so that runs with neighbouring seeds do not share streams.
RANK_SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``; ``owns_group`` if it started it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def rank_seed(seed: int, rank: int) -> int:
    """The data-generator seed of ``rank`` (``seed`` itself on rank 0)."""
    return seed + RANK_SEED_STRIDE * rank


def init_distributed(device_type: str) -> DistInfo:
    """Join (or start) the process group if there is one; a single process gets rank 0 of 1.

    An already initialised group (e.g. from :func:`launch_local`) is used as it is. Otherwise,
    if the environment says ``WORLD_SIZE > 1`` (torchrun), the group is started with NCCL for
    CUDA and Gloo otherwise, and ``owns_group`` is set so :func:`cleanup_distributed` ends it.
    """
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(),
                        int(os.environ.get("LOCAL_RANK", dist.get_rank())), False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world} but torch.distributed is not available")
    backend = "nccl" if device_type == "cuda" else "gloo"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, True)


def cleanup_distributed(info: DistInfo) -> None:
    """Wait for all ranks, and end the group if :func:`init_distributed` started it."""
    if info.enabled:
        dist.barrier()
        if info.owns_group:
            dist.destroy_process_group()


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (in place)."""
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=src)


@torch.no_grad()
def all_reduce_grads(params: Iterable[nn.Parameter], world_size: int) -> None:
    """Average gradients over ranks, one flat all-reduce per dtype.

    A parameter with a gradient on some rank but not on another gets a zero gradient on the
    latter (so every rank calls the same collectives); one with no gradient anywhere keeps
    ``None`` (so the optimiser skips it, as it would in one process).
    """
    params = list(params)
    if not params:
        return
    dev = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=dev)
    dist.all_reduce(has)
    groups: dict[torch.dtype, list[nn.Parameter]] = {}
    for p, h in zip(params, has.tolist()):
        if h == 0:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        groups.setdefault(p.grad.dtype, []).append(p)
    for ps in groups.values():
        flat = torch.cat([p.grad.reshape(-1) for p in ps])
        dist.all_reduce(flat)
        flat /= world_size
        off = 0
        for p in ps:
            n = p.grad.numel()
            p.grad.copy_(flat[off:off + n].view_as(p.grad))
            off += n


def all_reduce_mean(values: dict[str, torch.Tensor], world_size: int,
                    device: torch.device) -> dict[str, torch.Tensor]:
    """Mean of scalar tensors over ranks (every rank must pass the same keys)."""
    if not values:
        return values
    keys = sorted(values)
    flat = torch.stack([values[k].detach().to(device, torch.float64).reshape(()) for k in keys])
    dist.all_reduce(flat)
    flat /= world_size
    return dict(zip(keys, flat.unbind()))


def _worker(rank: int, fn: Callable, world_size: int, store: str, args: tuple) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank),
                       "WORLD_SIZE": str(world_size)})
    torch.set_num_threads(1)
    # a file store: no rank hosts a TCP store that has to outlive its peers
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world_size)
    try:
        fn(rank, *args)
        dist.barrier()  # every rank reaches here before any tears down
    finally:
        dist.destroy_process_group()
    # The work is done and its files are written. A normal interpreter exit still runs C++
    # static destructors, and after a training run one of them sometimes met a running
    # thread and aborted the process (SIGABRT, about one run in 20 under spawn), failing a
    # launch whose work had succeeded: leave without them.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch_local(fn: Callable, world_size: int, *args, start_method: str = "spawn") -> None:
    """Run ``fn(rank, *args)`` on ``world_size`` local CPU processes joined by Gloo.

    ``fn`` must be picklable (a module-level function); results go through files. An
    exception on any rank is raised here. ``start_method="fork"`` (POSIX, CPU only) skips
    re-importing torch in every child, which makes short tests much faster.
    """
    import torch.multiprocessing as mp

    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got world_size={world_size}")
    with tempfile.TemporaryDirectory(prefix="diffalign-gloo-") as tmp:
        mp.start_processes(_worker, args=(fn, world_size, str(Path(tmp) / "store"), args),
                           nprocs=world_size, join=True, start_method=start_method)
