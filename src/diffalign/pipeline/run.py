"""One pipeline for every task: data → foundation → critic → alignment → cascade →
evaluation → report.

Every step writes into ``OUT`` and is skipped when its result is already there, so a killed
run resumes (the trainers also resume mid-run from their ``train_state``); each step reads
what the previous one wrote, in either process::

    OUT/data/<name>.hdf5 (+ .png for Nav1D)   the offline dataset (:mod:`.data`)
    OUT/behavior/                             the data's action band and its coverage
    OUT/foundation/                           the reference model
    OUT/critic/                               the IQL critic(s)
    OUT/dynamics/                             the dynamics model of the rollout conditions
    OUT/align/                                adapter, stages, cascade, align.json
    OUT/eval/<stage>/eval.json (+ eval.png)   per-stage evaluation in the environment
                                              (weights.safetensors: the stage's merged
                                              weights, until it is evaluated)
    OUT/select/<stage>/eval.json              with the recipe's ``select_episodes``: the
                                              held-out starts the final stage is chosen on
    OUT/report.json, OUT/report.md, OUT/*.png

The recipe (:mod:`diffalign.recipes`) sizes and sets up every step; what it decides from the
data is measured here first: the data's action coverage, and with it whether the data tried
most actions near every state (``covered``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from ..recipes import Recipe
from .data import load_run_task, write_run_data
from .jobs import (
    SideJobs,
    critic_job,
    done,
    dynamics_job,
    eval_job,
    greedy_job,
    save_stage_weights,
)

__all__ = ["STAGE_WEIGHTS", "RunOptions", "adapter_fingerprint",
           "critic_warnings", "final_row", "run_pipeline", "stage_score"]

STAGE_WEIGHTS = "weights.safetensors"
"""An aligned stage's merged weights, in ``OUT/eval/<stage>/`` until the stage is evaluated."""


@dataclass
class RunOptions:
    """What a run is asked to do; the recipe sizes it."""

    task: str
    """Task string (see :func:`diffalign.tasks.resolve_task`)."""
    out: Path
    """Output directory (a run there resumes)."""
    recipe: Recipe
    """Sizes and settings of every step."""
    model: str = "diffuser"
    """Foundation model: diffuser, dd or dp."""
    process: str = "ddpm"
    """Diffusion process."""
    preset: str = "default"
    """Name of the recipe's preset, for the report."""
    layout_seed: int = 0
    """Nav1D reward layout (Nav1D tasks only)."""
    methods: tuple[str, ...] = ("dpo", "sft", "rl")
    """Alignment methods in order."""
    passes: int | None = None
    """Maximum passes over the methods (default: the recipe's)."""
    cascade: bool = True
    """Train and evaluate the cascaded refiner."""
    dpo_pairs: str = "reference"
    """DPO pairs: reference, current or dataset."""
    online: bool = False
    """Online fine-tuning of the critic during alignment."""
    rollout_conditions: float | None = None
    """Share of the conditions from greedy rollouts (default: the recipe's, by coverage)."""
    critic_ensemble: int | None = None
    """Critics trained side by side (default: the recipe's)."""
    critic_steps: int | None = None
    """Steps of each critic (default: the recipe's)."""
    eval_episodes: int | None = None
    """Evaluation episodes per stage (default: the recipe's)."""
    seed: int = 0
    """Seed of every step."""
    device: str = "cpu"
    """Torch device."""
    progress: bool = True
    """Show progress bars."""
    parallel: bool = True
    """On a CPU, run the critic and the evaluations in a second process."""
    download: bool = False
    """Download a missing Minari dataset."""
    shared: Path | None = None
    """A directory whose ``data/``, ``behavior/`` and ``critic/`` this run takes instead of
    making its own (``diffalign bench`` shares one critic between cells)."""
    extra: dict = field(default_factory=dict)
    """Entries added to the report as they are."""
    overwrite: bool = False
    """Delete what an earlier run left in ``out`` first, instead of resuming it."""

    @property
    def nav1d(self) -> bool:
        return self.task.startswith("nav1d/")


def _log(msg: str) -> None:
    print(f"[diffalign run] {msg}", flush=True)


def run_pipeline(opts: RunOptions) -> dict:
    """Run every step (skipping finished ones) and write the report; returns report.json."""
    out = Path(opts.out)
    if opts.overwrite:
        clear_run(out)
    out.mkdir(parents=True, exist_ok=True)
    check_run_settings(out, run_settings(opts))
    timings: dict[str, float] = {}
    if opts.shared is not None:
        _take_shared(Path(opts.shared), out)

    # 1. data: written into OUT/data, and read back from there by every later step
    t0 = time.perf_counter()
    data = write_run_data(opts.task, out, episodes=opts.recipe.data_episodes,
                          layout_seed=opts.layout_seed, seed=opts.seed, download=opts.download,
                          progress=opts.progress)
    task = load_run_task(**data)
    ret = float(task.episodes.returns().mean())
    if opts.nav1d:
        _log(f"data: {len(task.episodes)} episodes of {opts.task} (mean return {ret:.2f}, "
             f"optimum {task.ref_max:.2f}) -> {data_file_of(data)}")
    else:
        _log(f"data: {len(task.episodes)} episodes of {opts.task} (mean return {ret:.2f}) -> "
             f"{data_file_of(data)}")
    timings["data"] = time.perf_counter() - t0

    from ..train.trainer import resolve_device

    with SideJobs(opts.parallel and resolve_device(opts.device).type == "cpu") as jobs:
        return _steps(opts, data, task, timings, jobs)


RUN_SETTINGS = "run.json"
"""The settings that determine a run's output, as its first start recorded them."""

_RUN_ENTRIES = ("data", "behavior", "foundation", "critic", "dynamics", "align", "eval",
                "eval-again", "select", "report.json", "report.md", "timings.json", RUN_SETTINGS)
"""What :func:`run_pipeline` (and ``diffalign evaluate`` of the run) writes in ``OUT``,
besides the report's pictures."""


def set_default_steps(fdir: Path, model, steps: int) -> None:
    """Make the loaded foundation ``model`` of ``fdir`` sample with ``steps`` denoising steps
    (the recipe's ``denoise_steps``, ``--deploy-steps``), here and for everything that loads
    it from ``fdir`` later: the evaluations, ``load_policy``, exports. Only its
    ``config.json`` is rewritten; the weights do not depend on the step count."""
    from ..atomic import write_json

    model.set_default_steps(steps)
    cfg = json.loads((fdir / "config.json").read_text())
    cfg["spec"]["process_kwargs"] = dict(model.spec.process_kwargs)
    write_json(fdir / "config.json", cfg)


def run_settings(opts: RunOptions) -> dict:
    """The settings of ``opts`` that determine what the run writes: not the device, the
    progress bars or the second process (those change how fast, not what)."""
    from dataclasses import asdict

    return {"task": opts.task, "model": opts.model, "process": opts.process,
            "preset": opts.preset, "layout_seed": opts.layout_seed if opts.nav1d else None,
            "methods": list(opts.methods), "passes": opts.passes, "cascade": opts.cascade,
            "dpo_pairs": opts.dpo_pairs, "online": opts.online,
            "rollout_conditions": opts.rollout_conditions,
            "critic_ensemble": opts.critic_ensemble, "critic_steps": opts.critic_steps,
            "eval_episodes": opts.eval_episodes, "seed": opts.seed,
            "shared": str(opts.shared) if opts.shared is not None else None,
            "recipe": json.loads(json.dumps(asdict(opts.recipe), default=str))}


def check_run_settings(out: Path, settings: dict) -> None:
    """Record ``settings`` in ``OUT/run.json`` on a run's first start; on a later start,
    refuse (one line naming each differing setting) to resume a run made with others.

    A directory holding a run from before settings were recorded is taken as it is. Keys
    that only one side has (a recipe field added or renamed since) are not compared."""
    from ..atomic import write_json
    from ..errors import UserError
    from ..train.trainer import settings_diff

    path = out / RUN_SETTINGS
    if not path.exists():
        write_json(path, settings)
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not readable JSON ({e}); delete it, or rerun with "
                        "--overwrite to start afresh") from None
    if isinstance(old, dict) and isinstance(old.get("recipe"), dict):
        from ..recipes.base import renamed_fields

        old["recipe"] = renamed_fields(old["recipe"])
    diff = settings_diff(old, settings)
    if diff:
        raise UserError(f"{out} holds a run with other settings ({'; '.join(diff)}): rerun "
                        "with the same flags to resume it, with --overwrite to start afresh, "
                        "or with a new --out")


def clear_run(out: Path) -> None:
    """Delete what :func:`run_pipeline` writes in ``out``, and nothing else there."""
    if not out.is_dir():
        return
    for name in _RUN_ENTRIES:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
    for p in out.glob("*.png"):
        p.unlink()


def data_file_of(data: dict) -> Path:
    """The dataset file of :func:`write_run_data`'s answer, relative to the working directory
    where it lies below it."""
    p = Path(data["file"])
    try:
        return p.relative_to(Path.cwd())
    except ValueError:
        return p


def _take_shared(shared: Path, out: Path) -> None:
    """Hard-link (or copy) the shared directory's data, behaviour band and critic into
    ``out`` where ``out`` has none: the run then reads its own directory only."""
    for sub in ("data", "behavior", "critic"):
        src, dst = shared / sub, out / sub
        if not src.is_dir() or dst.exists():
            continue
        tmp = out / f".{sub}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for f in src.iterdir():  # the finished files, not a training state
            if f.is_file():
                try:
                    os.link(f, tmp / f.name)
                except OSError:
                    shutil.copyfile(f, tmp / f.name)
        os.replace(tmp, dst)


def behavior_band(episodes, where: Path, cfg, seed: int, progress: bool = False):
    """The data's action band (trained with ``cfg``, or loaded from ``where``) and its
    coverage on 4096 of the dataset's states."""
    import numpy as np
    import torch

    from ..models.behavior import BehaviorModel, train_behavior

    if (where / "config.json").exists():
        behavior = BehaviorModel.load(where, device=cfg.device)
    else:
        behavior = train_behavior(episodes, cfg, out_dir=where, progress=progress)
    idx = np.random.default_rng(seed).integers(0, len(episodes.observations), 4096)
    obs = torch.as_tensor(episodes.observations[idx], dtype=torch.float32)
    return behavior, behavior.coverage(obs)


def train_run_critic(opts: RunOptions, data: dict, task, jobs: SideJobs | None = None):
    """The data's action band, its coverage and the critic of the run, trained (in the side
    process when ``jobs`` has one) unless ``OUT/critic`` holds it. Returns ``(behavior,
    coverage, covered, future of the critic's training seconds or None)``."""
    from ..train.trainer import bf16_is_fast

    R, out = opts.recipe, Path(opts.out)
    behavior, coverage = behavior_band(task.episodes, out / "behavior",
                                       R.behavior_config(opts.seed, opts.device), opts.seed,
                                       opts.progress)
    covered = coverage >= R.covered_at
    _log(f"data: action coverage {coverage:.2f} ("
         + ("most actions tried near every state: the critic is trusted everywhere"
            if covered else "the critic is distrusted off the data's actions") + ")")
    cdir = out / "critic"
    if (cdir / "config.json").exists():
        return behavior, coverage, covered, None
    jobs = jobs or SideJobs(False)
    ccfg = R.critic_config(covered, opts.seed, opts.device,
                           bf16=covered and R.covered_backup_actions > 0
                           and bf16_is_fast(opts.device),
                           ensemble=opts.critic_ensemble, steps=opts.critic_steps)
    n = ccfg.ensemble
    _log(f"critic: training {n} IQL critic{'s' if n > 1 else ''} for {ccfg.steps} steps"
         + (f" (max backup over a grid of {ccfg.backup_actions}+{ccfg.backup_refine} actions)"
            if ccfg.backup_actions else "")
         + (" in a second process, beside the foundation" if jobs.enabled else ""))
    return behavior, coverage, covered, jobs.submit(critic_job, data, ccfg, str(cdir))


def _steps(opts: RunOptions, data: dict, task, timings: dict, jobs: SideJobs) -> dict:
    """Steps 2-6 of :func:`run_pipeline`; ``jobs`` runs the critic and the evaluations."""
    import torch

    from ..align.lora import merged_copy
    from ..align.runner import align
    from ..eval.evaluate import evaluate
    from ..models.base import ControlModel
    from ..models.critic import load_critic
    from ..models.dynamics import DynamicsModel
    from ..train.foundation import train_foundation

    R, out = opts.recipe, Path(opts.out)
    # 2-3. critic (in the side process) beside the foundation (here). What the critic and
    # the alignment may assume is measured from the data first: the band of actions the
    # data took near each state, and how much of the action space it covers.
    behavior, coverage, covered, critic_future = train_run_critic(opts, data, task, jobs)
    cdir, fdir = out / "critic", out / "foundation"
    critic_trained = critic_future is not None
    rollouts = R.rollout_share(covered, opts.rollout_conditions)
    ddir = out / "dynamics"
    dcfg = R.dynamics_config(opts.seed, opts.device)
    dynamics_trained = rollouts > 0 and not (ddir / "config.json").exists()
    if dynamics_trained:  # queued after the critic: it runs while the foundation trains
        dyn_future = jobs.submit(dynamics_job, data, dcfg, str(ddir))
    t0 = time.perf_counter()
    if (fdir / "config.json").exists():
        model = ControlModel.load(fdir, device=opts.device)
        _log(f"foundation: loaded {fdir}")
        trained = False
        if R.denoise_steps is not None and model.process.default_steps != R.denoise_steps:
            _log(f"foundation: sampling with {R.denoise_steps} denoising steps, not the "
                 f"{model.process.default_steps} it was saved with")
            set_default_steps(fdir, model, R.denoise_steps)
    else:
        trained = True
        fcfg = R.foundation_config(opts.model, opts.process, opts.seed, opts.device)
        _log(f"foundation: training {opts.model}/{opts.process} for {fcfg.steps} steps")
        model, _, _ = train_foundation(task, fcfg, fdir, layout_seed=opts.layout_seed,
                                       progress=opts.progress)
    foundation_s = _remember(out, "foundation_train_s", time.perf_counter() - t0, trained)
    if critic_trained:
        if jobs.enabled:
            _log("critic: waiting for the second process")
        _remember(out, "critic_train_s", critic_future.result(), True)
    critic = load_critic(cdir, device=opts.device)
    _log(f"critic: {'trained' if critic_trained else 'loaded'} {cdir}")
    dynamics = None
    if rollouts > 0:
        if dynamics_trained:
            _remember(out, "dynamics_train_s", dyn_future.result(), True)
        dynamics = DynamicsModel.load(ddir, device=opts.device)
        _log(f"dynamics: {'trained' if dynamics_trained else 'loaded'} {ddir}")
    greedy = jobs.submit(greedy_job, str(cdir), opts.layout_seed) if opts.nav1d else None

    episodes = opts.eval_episodes or R.eval_episodes
    pending: list[list] = []  # [name, candidates, wall_s, future, same_as], in stage order
    evaluated: dict[str, str] = {}  # adapter fingerprint -> stage that had it
    stages: list[dict] = []
    # one-candidate stages -> the future of their episodes from the held-out starts, the
    # name of the stage whose model they share, or None (evaluated before selection existed)
    selecting: dict[str, Future | str | None] = {}

    def run_eval(name: str, candidates: int, wall_s: float, n_episodes: int | None = None,
                 net=None, model_obj=None) -> None:
        """Evaluate a stage: the foundation (``net`` None), the foundation with an aligned
        ``net``'s weights (in the side process), or another model (``model_obj``, here).
        With ``select_episodes``, a one-candidate stage also plays the held-out starts the
        final stage is chosen on (queued first: the weights are gone once it is evaluated)."""
        edir = out / "eval" / name
        cached, weights = edir / "eval.json", edir / STAGE_WEIGHTS
        key = adapter_fingerprint(net) if net is not None else None
        prev = json.loads(cached.read_text()) if cached.exists() else None  # resumed
        same_as = None
        if prev is None and net is not None:
            # kept until evaluated: a killed run evaluates the stage from them on resume
            # (the adapter folded into a plain copy of the net: faster to sample)
            save_stage_weights(merged_copy(net), weights)
        if prev is None and key in evaluated:
            # the stage kept the adapter of an earlier stage (no update beat it): same
            # model, same seed, same rollouts -- that evaluation is copied at the end
            same_as = evaluated[key]
        kw = dict(episodes=n_episodes or episodes, candidates=candidates,
                  out_dir=str(edir), seed=opts.seed, device=opts.device)
        if R.select_episodes and candidates == 1:
            sfile = out / "select" / name / "eval.json"
            skw = dict(kw, episodes=R.select_episodes, out_dir=str(sfile.parent),
                       seed=opts.seed + SELECT_SEED_OFFSET)
            # a stage sharing an earlier stage's model (also when resumed) shares its returns
            shared = same_as or (prev or {}).get("same_model_as")
            if sfile.exists():
                selecting[name] = done(json.loads(sfile.read_text()))
            elif shared is not None:
                selecting[name] = shared
            elif prev is not None and not weights.exists() and net is None \
                    and not name.startswith("reference") and model_obj is None:
                selecting[name] = None
            else:
                selecting[name] = _submit_eval(jobs, evaluate, critic, fdir, cdir, weights,
                                               net, model_obj, skw)
        if prev is not None:
            fut = done(prev)
        elif same_as is not None:
            fut = None
        else:
            if net is None and model_obj is None and not name.startswith("reference"):
                if not weights.exists():
                    raise FileNotFoundError(
                        f"stage {name!r} has neither {cached} nor {weights}: its adapter "
                        f"is gone; delete {out / 'align'} to run the alignment again")
            fut = _submit_eval(jobs, evaluate, critic, fdir, cdir, weights, net, model_obj, kw)
        if key is not None:
            evaluated.setdefault(key, name)
        pending.append([name, candidates, wall_s, fut, same_as])
        collect(wait=False)

    def collect(wait: bool) -> None:
        """Turn finished evaluations into report rows, in stage order."""
        from ..atomic import write_json

        while len(stages) < len(pending):
            name, candidates, wall_s, fut, same_as = pending[len(stages)]
            if same_as is not None:
                edir, same = out / "eval" / name, out / "eval" / same_as
                res = {**json.loads((same / "eval.json").read_text()), "same_model_as": same_as}
                if (same / "eval.png").exists():
                    edir.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(same / "eval.png", edir / "eval.png")
                write_json(edir / "eval.json", res)
                (edir / STAGE_WEIGHTS).unlink(missing_ok=True)
            elif wait or fut.done():
                res = fut.result()
                (out / "eval" / name / STAGE_WEIGHTS).unlink(missing_ok=True)  # evaluated
            else:
                return
            row = {"name": name, "return_mean": res["return_mean"],
                   "return_std": res["return_std"], "normalized": res["normalized"],
                   "coherency": res["coherency"], "entropy": res["entropy"],
                   "candidates": candidates, "denoise_steps": res["steps"], "wall_s": wall_s,
                   "eval_s": res.get("wall_seconds"), "eval_episodes": res.get("episodes"),
                   "returns": res.get("returns"),
                   "picture": str(out / "eval" / name / "eval.png")}
            if res.get("success_rate") is not None:
                row["success_rate"] = res["success_rate"]
            stages.append(row)
            _log(f"stage {name}: return {row['return_mean']:.2f} ± {row['return_std']:.2f} "
                 f"({_score_text(row, opts.nav1d)}), coherency {_fmt(row['coherency'])}, "
                 f"entropy {_fmt(row['entropy'])}")

    # 4. reference stages
    run_eval("reference", 1, foundation_s)
    if R.ref_candidates > 1:  # best-of-N is N times dearer per decision: fewer episodes
        run_eval(f"reference@{R.ref_candidates}", R.ref_candidates, foundation_s,
                 n_episodes=min(episodes, R.ref_eval_episodes))

    # 5. alignment sequence (+ cascade)
    acfg = R.align_config(covered, opts.methods, opts.seed, passes=opts.passes,
                          dpo_pairs=opts.dpo_pairs, online=opts.online, cascade=opts.cascade,
                          rollouts=rollouts, dynamics=dcfg,
                          action_search=model.samples_actions)
    t_align = time.perf_counter()
    adir = out / "align"
    if (adir / "align.json").exists():  # finished earlier: reuse adapter, cascade, evaluations
        from ..align.runner import reuse_alignment

        events, stage_walls, cascade_model, cascade_s, final = reuse_alignment(
            model, adir, opts.cascade)
        _log(f"alignment: loaded {adir}")
        for name, wall in stage_walls:
            run_eval(name, 1, wall)  # their eval.json are there from the first run
        if cascade_model is not None:
            run_eval("cascade", 1, cascade_s, model_obj=cascade_model)
        align_train_s = sum(w for _, w in stage_walls) + cascade_s
    else:
        result = align(model, critic, task.episodes, acfg, out_dir=adir,
                       on_stage_end=lambda st, net: run_eval(st.name, 1, st.wall_s, net=net),
                       progress=opts.progress, make_env=task.make_env, on_update=jobs.poll,
                       dynamics=dynamics, behavior=behavior)
        if result.cascade is not None:
            run_eval("cascade", 1, result.cascade_wall_s, model_obj=result.cascade.merged())
        events, final = result.events, result.final
        align_train_s = sum(st.wall_s for st in result.stages) + result.cascade_wall_s
    collect(wait=True)
    if R.select_episodes:
        final = choose_in_env(selecting, final, R.select_episodes,
                              opts.seed + SELECT_SEED_OFFSET, acfg.final.z)
        _log(f"final stage: {final['stage']} ({final['reason']})")
    timings["alignment"] = time.perf_counter() - t_align
    metric = "normalized" if opts.nav1d else task_metric(stages[0])
    for row in stages:
        row["score"] = stage_score(row, metric)
    ceiling = greedy.result() if greedy is not None else None
    if ceiling is not None:
        _log(f"critic: its greedy policy reaches {ceiling['greedy_normalized']:.1f}% of the "
             "optimum (the ceiling of a one-candidate policy aligned to it)")
    warnings = (critic_warnings(stages[0], stages[1], "sim_normalized" if metric ==
                                "normalized" and not opts.nav1d else metric)
                if R.ref_candidates > 1 else [])
    for w in warnings:
        _log(f"warning: {w['reason']}")

    final = final_row(final, stages)
    sweep = None
    if R.steps_sweep_episodes:
        from ..eval.steps_sweep import SWEEP_STEPS, steps_sweep, sweep_stages

        own = stages[0]["denoise_steps"]
        sweep = steps_sweep(out, sweep_stages(final["stage"]),
                            steps=SWEEP_STEPS + ((own,) if own else ()),
                            episodes=R.steps_sweep_episodes, seed=opts.seed,
                            device=opts.device, log=_log)
        for row in sweep["rows"]:
            row["score"] = stage_score(row, metric)

    report = {"task": opts.task}
    if opts.nav1d:
        report.update(dataset=opts.task.split("/", 1)[1], model=opts.model,
                      process=opts.process, layout_seed=opts.layout_seed, preset=opts.preset,
                      optimal_return=task.ref_max)
    else:
        report.update(data=data["file"], model=opts.model, process=opts.process,
                      preset=opts.preset, ref_min=task.ref_min, ref_max=task.ref_max)
    report.update({
        "metric": metric,
        "dataset_return": float(task.episodes.returns().mean()),
        "critic_greedy_normalized": None if ceiling is None else ceiling["greedy_normalized"],
        "critic_ensemble": int(critic.cfg.ensemble), "critic_steps": int(critic.cfg.steps),
        "online": opts.online, "dpo_pairs": opts.dpo_pairs,
        "stages": stages,
        "final": final,
        "action_coverage": coverage,
        "events": warnings + events,
        "steps_sweep": sweep,
        "alignment_seconds": align_train_s,
        "foundation_seconds": foundation_s,
        "alignment_fraction_of_foundation": (None if foundation_s is None
                                             else align_train_s / max(foundation_s, 1e-9)),
        "timings": {**timings, **_remembered(out)},
        "device": str(torch.device(opts.device)),
        "seed": opts.seed,
        **opts.extra,
    })
    from .report import write_run_report

    write_run_report(out, report)
    ratio = report["alignment_fraction_of_foundation"]
    _log(f"report: {out / 'report.md'} (alignment took {align_train_s:.0f}s"
         + ("" if ratio is None else f" = {ratio:.2f}x foundation training") + ")")
    return report


SELECT_SEED_OFFSET = 10_000
"""The held-out starts of the final stage's choice reset with ``seed + 10000 + i``, apart
from the evaluation's ``seed + i``."""


def _submit_eval(jobs: SideJobs, evaluate, critic, fdir: Path, cdir: Path, weights: Path,
                 net, model_obj, kw: dict) -> Future:
    """One evaluation of a stage: another model here, else the saved foundation (with the
    stage's merged ``weights`` where it has them) in the side process."""
    if model_obj is not None:
        return done(evaluate(model_obj, critic=critic, **kw))
    return jobs.submit(eval_job, str(fdir), str(cdir),
                       str(weights) if weights.exists() else None, **kw)


def choose_in_env(selecting: dict, final: dict, episodes: int, seed: int, z: float) -> dict:
    """The final stage chosen on each one-candidate stage's returns from the same held-out
    starts (paired with the reference's, :func:`~diffalign.align.final_stage.choose_final`
    with the environment's returns in place of the critic's), or ``final`` (the critic's
    choice) with a note when some stage was evaluated before these starts were played."""
    import torch

    from ..align.final_stage import choose_final

    returns: dict[str, list[float]] = {}
    for name, got in selecting.items():
        if got is None:
            return {**final, "reason": final.get("reason", "") + " (chosen by the critic: "
                    f"stage {name!r} was evaluated before the held-out starts were played)"}
        returns[name] = returns[got] if isinstance(got, str) else got.result()["returns"]
    ref = torch.tensor(returns.pop("reference"), dtype=torch.float64)
    name, reason, table = choose_final(
        ref, {k: torch.tensor(v, dtype=torch.float64) for k, v in returns.items()}, z=z,
        where=f"in {episodes} episodes from held-out starts (reset seeds {seed}-"
              f"{seed + episodes - 1})")
    return {"stage": name, "reason": reason, "heldout": final.get("heldout", {}),
            "selection": table}


def task_metric(row: dict) -> str:
    """The task's own metric, from what its evaluation measured: the success rate where the
    environment reports one, else the normalised score where reference scores exist, else
    the return."""
    if row.get("success_rate") is not None:
        return "success_rate"
    if row.get("normalized") is not None:
        return "normalized"
    return "return_mean"


def stage_score(row: dict, metric: str | None) -> float | None:
    """A report row's score in ``metric`` (the success rate in %)."""
    if metric is None:
        return None
    v = row.get(metric)
    if v is None:
        return None
    return 100.0 * float(v) if metric == "success_rate" else float(v)


def _score_text(row: dict, nav1d: bool) -> str:
    if nav1d:
        return f"{row['normalized']:.1f}% of optimum"
    parts = []
    if row.get("success_rate") is not None:
        parts.append(f"success {100 * row['success_rate']:.1f}%")
    if row.get("normalized") is not None:
        parts.append(f"normalised {row['normalized']:.1f}")
    return ", ".join(parts) or "no score"


def final_row(final: dict, stages: list[dict]) -> dict:
    """The report's ``final``: the stage chosen on held-out states (``align.json``), as the
    name of one of the report's stages, and why."""
    names = [st["name"] for st in stages]
    name = final.get("stage", "reference")
    if name not in names:  # e.g. the cascade chosen but not evaluated
        name, why = "reference", f"{name!r} was chosen but has no evaluation in this report"
    else:
        why = final.get("reason", "")
    row = {"stage": name, "reason": why, "heldout": final.get("heldout", {})}
    if "selection" in final:
        row["selection"] = final["selection"]
    return row


_UNITS = {"normalized": ("% of the optimum", "%"), "success_rate": ("% success", "%"),
          "sim_normalized": (" (normalised score)", ""), "return_mean": (" (mean return)", "")}


def critic_warnings(reference: dict, best_of_n: dict, metric: str = "normalized") -> list[dict]:
    """A warning event when ranking the reference's candidates by the critic LOWERS the score:
    the critic then prefers worse actions, and aligning to it is expected to hurt (seen with
    expert data, whose critic never saw other actions). ``metric``: the rows' ``score``
    (else ``normalized``) is in it; ``sim_normalized`` is a D4RL-normalised score."""
    ref, best = (row.get("score", row.get("normalized")) for row in (reference, best_of_n))
    if ref is None or best is None or best >= ref:
        return []
    unit, short = _UNITS[metric]
    return [{"kind": "warning", "stage": best_of_n["name"],
             "reason": (f"the critic's best of {best_of_n['candidates']} scores "
                        f"{best:.1f}{unit}, below one reference sample ({ref:.1f}{short}): "
                        "this critic ranks actions worse than chance, so alignment to it is "
                        "expected to lower the return")}]


def adapter_fingerprint(net) -> str:
    """A hash of the LoRA parameters of ``net``: equal for equal adapters."""
    h = hashlib.sha1()
    for name, p in net.named_parameters():
        if "lora_" in name:
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _remembered(out: Path) -> dict:
    p = out / "timings.json"
    return json.loads(p.read_text()) if p.exists() else {}


def _remember(out: Path, key: str, seconds: float, ran: bool) -> float | None:
    """Store a step's wall time when the step ran; when it was loaded, read the stored one
    (None where the step's output came from elsewhere: its loading time is not its time)."""
    from ..atomic import write_json

    known = _remembered(out)
    if ran:
        known[key] = seconds
        write_json(out / "timings.json", known)
    return None if known.get(key) is None else float(known[key])
