"""The second process of ``diffalign run``: moved to :mod:`diffalign.pipeline.jobs` (the
library), re-exported here for code that imports it from its old place."""

from ..pipeline.jobs import (
    SideJobs,
    critic_job,
    done,
    dynamics_job,
    eval_job,
    greedy_job,
    save_stage_weights,
)

__all__ = ["SideJobs", "critic_job", "done", "dynamics_job", "eval_job", "greedy_job",
           "save_stage_weights"]
