"""Return and decision rate of a run's stages at several denoising step counts.

A diffusion policy's cost per decision is its number of denoising steps; an aligned model is
meant to need fewer of them for the same return (docs/design.md §10). :func:`steps_sweep`
evaluates the reference and the final stage of a run at each step count of
:data:`SWEEP_STEPS` (and the run's own), and times one decision of each for ONE environment
on ONE CPU thread (:func:`decision_rate`): the rate an exported policy acting in one
environment gets, which the batched evaluation's ``decisions_per_s`` (all episodes' states
in one batch) does not tell.

Everything is cached in ``RUN/steps/<stage>/<S>/`` (``eval.json`` from the evaluation,
``rate.json`` from the timing): a killed sweep resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

__all__ = ["SWEEP_STEPS", "decision_rate", "steps_sweep", "sweep_stages"]

SWEEP_STEPS = (1, 2, 5, 20)
"""The step counts every sweep visits (the run's own count is added)."""


def decision_rate(model, steps: int | None = None, candidates: int = 1, critic=None,
                  obs=None, repeats: int = 30, threads: int = 1, seed: int = 0) -> float:
    """Decisions per second of ``model`` acting in one environment: the median time of
    :func:`~diffalign.models.selection.select_actions` on one observation history, with
    ``threads`` CPU threads (restored afterwards). ``obs``: a raw observation (default: the
    zero observation; the time does not depend on its value)."""
    from ..models.selection import select_actions

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got repeats={repeats}")
    obs_t = (torch.zeros(model.obs_dim) if obs is None
             else torch.as_tensor(obs, dtype=torch.float32).reshape(model.obs_dim))
    hist = obs_t.expand(1, model.spec.obs_history, model.obs_dim)
    gen = torch.Generator().manual_seed(seed)
    cuda = model.device.type == "cuda"
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        times = []
        for i in range(repeats + 2):  # two warm-up decisions
            t0 = time.perf_counter()
            select_actions(model, hist, candidates=candidates, steps=steps, critic=critic,
                           generator=gen)
            if cuda:
                torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    times.sort()
    return 1.0 / max(times[len(times) // 2], 1e-9)


def sweep_stages(final: str) -> list[str]:
    """The stages a sweep visits: the reference and the final stage."""
    return ["reference"] + ([final] if final != "reference" else [])


def steps_sweep(run_dir: str | Path, stages: list[str], steps: tuple[int, ...] = SWEEP_STEPS,
                episodes: int = 50, seed: int = 0, device: str = "cpu", log=None) -> dict:
    """Evaluate each of ``stages`` of the run in ``run_dir`` at each step count of ``steps``
    (``episodes`` episodes from reset seeds ``seed + i``, as the stage evaluations) and time
    its decisions (:func:`decision_rate`). Returns the report's ``steps_sweep`` section:
    ``{"episodes", "threads", "rows": [{"stage", "steps", "return_mean", "return_std",
    "normalized", "success_rate", "decisions_per_s"}, …]}``."""
    from ..atomic import write_json
    from ..models.critic import load_critic
    from ..runs import load_stage
    from .evaluate import evaluate

    run_dir = Path(run_dir)
    steps = tuple(sorted({int(s) for s in steps}))
    if not steps or steps[0] < 1:
        raise ValueError(f"steps must be positive integers, got steps={steps}")
    rows = []
    for name in stages:
        st = load_stage(run_dir, name, device=device)
        critic = load_critic(st.critic_dir, device=device) if st.candidates > 1 else None
        for s in steps:
            where = run_dir / "steps" / name / str(s)
            if (where / "eval.json").exists():
                res = json.loads((where / "eval.json").read_text())
            else:
                res = evaluate(st.model, critic=critic, episodes=episodes,
                               candidates=st.candidates, steps=s, out_dir=where, seed=seed,
                               device=device)
            if (where / "rate.json").exists():
                rate = json.loads((where / "rate.json").read_text())["decisions_per_s"]
            else:
                rate = decision_rate(st.model, steps=s, candidates=st.candidates,
                                     critic=critic, seed=seed)
                write_json(where / "rate.json", {"decisions_per_s": rate, "threads": 1})
            row = {"stage": name, "steps": s, "return_mean": res["return_mean"],
                   "return_std": res["return_std"], "normalized": res.get("normalized"),
                   "success_rate": res.get("success_rate"), "decisions_per_s": rate}
            rows.append(row)
            if log is not None:
                log(f"steps: {name} at {s} step{'s' if s > 1 else ''}: {_text(row)}, "
                    f"{rate:.0f} decisions/s (1 env, 1 thread)")
    return {"episodes": episodes, "threads": 1, "rows": rows}


def _text(row: dict) -> str:
    parts = [f"return {row['return_mean']:.2f}"]
    if row.get("normalized") is not None:
        parts.append(f"normalised {row['normalized']:.1f}")
    if row.get("success_rate") is not None:
        parts.append(f"success {100 * row['success_rate']:.1f}%")
    return ", ".join(parts)
