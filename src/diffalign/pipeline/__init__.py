"""The pipeline behind ``diffalign run`` and every ``diffalign bench`` cell: data →
foundation → critic → alignment → cascade → evaluation → report, resumable, for any task.

:func:`run_pipeline` runs it with :class:`RunOptions` (the task, the output directory and a
recipe from :mod:`diffalign.recipes`); :mod:`.data` writes and reads the run's dataset,
:mod:`.jobs` is the second process, :mod:`.report` the report.
"""

from .run import (
    STAGE_WEIGHTS,
    RunOptions,
    adapter_fingerprint,
    critic_warnings,
    final_row,
    run_pipeline,
    stage_score,
)

__all__ = ["STAGE_WEIGHTS", "RunOptions", "adapter_fingerprint",
           "critic_warnings", "final_row", "run_pipeline", "stage_score"]
