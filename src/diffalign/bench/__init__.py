"""``diffalign bench``: a grid of (task, model, process, seed) cells, each trained, aligned and
evaluated, and the paper's tables (Table 2: models × samplers, reference vs aligned; Table 3:
Diffusion Policy with expectation vs IDQL action selection) over the finished cells.

:mod:`.grid` defines the suites, the cells and their sizes and runs the grid (sequentially, or
through Ray when it is installed); :mod:`.cell` runs one cell; :mod:`.tables` writes the tables
and plots.
"""

from .grid import (
    MODELS,
    PROCESSES,
    SUITES,
    BenchSizes,
    Cell,
    make_cells,
    parse_sizes,
    run_bench,
    task_string,
)
from .tables import write_tables

__all__ = ["MODELS", "PROCESSES", "SUITES", "BenchSizes", "Cell", "make_cells", "parse_sizes",
           "run_bench", "task_string", "write_tables"]
