"""``diffalign bench``: run a grid of (task, model, process, seed) cells, each a run of the
pipeline of ``diffalign run``, and write the paper's Table 2 and Table 3 and a figure each.

A thin call into :func:`diffalign.bench.run_bench`; see :mod:`diffalign.bench.grid` for the
output layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..bench.grid import DEFAULT_METHODS
from ..errors import UserError
from .run import AlignFlags

__all__ = ["BenchArgs", "bench_main"]


FULL_GRID = {"models": "diffuser,dd,dp", "processes": "ddpm,ddim,sm,fm", "seeds": "0,1,2"}
QUICK_GRID = {"models": "diffuser,dp", "processes": "ddim", "seeds": "0"}
"""The grid when --models/--processes/--seeds are not given."""


@dataclass
class BenchArgs(AlignFlags):
    """Benchmark grid: one run of the pipeline (diffalign run: by default its unified
    sequence dpo,sft,rl and the cascade) per cell; Table 2 (planners: rows tasks, columns
    Diffuser DDPM/DDIM/SM/FM and Decision Diffuser) and Table 3 (Diffusion Policy:
    expectation vs IDQL selection), reference → the run's final stage."""

    out: Path = Path("runs/bench")
    """Output directory (re-running skips finished cells; tables cover every finished cell
    in it)."""
    suite: str = "nav1d"
    """Suite: nav1d (partial, full, expert), metaworld (button-press-v3, drawer-open-v3,
    sweep-into-v3, plate-slide-v3; expert data) or mujoco (hopper, walker2d, halfcheetah;
    medium data). Simulator datasets are collected first when missing."""
    tasks: str = ""
    """Tasks of the suite, comma-separated (default: all of them)."""
    models: str | None = None
    """Models, comma-separated: diffuser, dd, dp (default: all three; with --quick
    diffuser,dp)."""
    processes: str | None = None
    """Diffusion processes, comma-separated: ddpm, ddim, sm, fm (default: all four; with
    --quick ddim)."""
    methods: str = DEFAULT_METHODS
    """Alignment methods in order, comma-separated (rl, dpo, sft). The default is diffalign
    run's unified sequence; rl,dpo,sft is the paper's order, rl alone RL only."""
    cascade: bool = True
    """Train and evaluate the cascaded refiner after the alignment in every cell, as
    diffalign run does (--no-cascade: without)."""
    seeds: str | None = None
    """Seeds, comma-separated (tables give mean ± std over them; default 0,1,2, with
    --quick 0)."""
    quick: bool = False
    """The quick preset of the suite's recipe (a smoke test of every step) and, unless given,
    a small grid: diffuser and dp, ddim, seed 0."""
    sizes: str = ""
    """Recipe overrides KEY=VALUE,… (e.g. foundation_steps=1000,eval_episodes=20: any field
    of diffalign.recipes.Recipe), and candidates=N (Table 3's candidates per decision). The
    --rl-*/--sft-likelihood/--cascade-passes flags are added to them."""
    device: str = "cpu"
    """Torch device of every cell: cpu, cuda or auto."""
    ray: Literal["auto", "on", "off"] = "auto"
    """Run cells in parallel through Ray: auto (when `import ray` works), on, off."""
    ray_address: str | None = None
    """Ray cluster to join (e.g. ray://host:10001); OUT must be on a shared filesystem."""
    cpus_per_cell: float = 1.0
    """CPUs Ray reserves per cell (also the torch threads of a cell)."""
    gpus_per_cell: float = 0.0
    """GPUs Ray reserves per cell (fractions share a GPU)."""
    threads: int | None = None
    """Torch CPU threads of a cell (default: torch's own; under Ray, cpus_per_cell). On a
    busy machine 1 avoids oversubscription."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        from ..bench.grid import make_cells, parse_methods, parse_sizes

        self.out = Path(self.out)
        grid = QUICK_GRID if self.quick else FULL_GRID
        self.models = grid["models"] if self.models is None else self.models
        self.processes = grid["processes"] if self.processes is None else self.processes
        self.seeds = grid["seeds"] if self.seeds is None else self.seeds
        make_cells(self.suite, self.tasks, self.models, self.processes, self.seeds)
        parse_methods(self.methods)
        self.with_flags(parse_sizes(self.all_sizes(), self.quick, self.suite).recipe,
                        self.methods)
        if self.threads is not None and self.threads < 1:
            raise UserError(f"threads must be >= 1, got threads={self.threads}")
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"out {str(self.out)!r} exists and is not a directory")

    def all_sizes(self) -> str:
        """``--sizes`` with the alignment flags given appended as KEY=VALUE (each cell's
        recipe overrides)."""
        flags = ",".join(f"{k}={v}" for k, v in self.alignment_overrides().items())
        return ",".join(part for part in (self.sizes, flags) if part)


def bench_main(args: BenchArgs) -> dict[str, Any]:
    """Entry point of ``diffalign bench``; prints Tables 2 and 3 at the end and returns a
    summary."""
    from ..bench import run_bench

    summary = run_bench(args.out, args.suite, tasks=args.tasks, models=args.models,
                        processes=args.processes, methods=args.methods,
                        cascade=args.cascade, seeds=args.seeds,
                        quick=args.quick, sizes=args.all_sizes(), device=args.device, ray=args.ray,
                        ray_address=args.ray_address, cpus_per_cell=args.cpus_per_cell,
                        gpus_per_cell=args.gpus_per_cell, threads=args.threads,
                        progress=args.progress)
    for name in ("table2.md", "table3.md"):
        table = args.out / name
        if table.exists():
            print()
            print(table.read_text())
    return summary
