"""Use what ``diffalign run`` wrote: its stages, their models, exports of them.

A run directory holds the reference (``foundation/``), the critic (``critic/``), each aligned
stage's LoRA adapter (``align/stages/<stage>/adapter/``; older runs keep only the last one,
``align/adapter/``), the cascade refiner (``align/cascade/``), each stage's evaluation
(``eval/<stage>/eval.json``) and ``report.json``, whose ``stages`` rows say how each stage
was evaluated and whose ``final`` names the stage the run recommends.

:func:`load_stage` rebuilds a stage as the run evaluated it; :func:`export_stage` writes it
as a plain model directory (``config.json`` + ``model.safetensors``, adapter merged) that
:meth:`~diffalign.models.base.ControlModel.load` reads, with the run's ``export`` entry in
its config, the cascade refiner (``cascade/``) and, for a best-of-N stage, a copy of the
critic (``critic/``). :func:`load_dir` loads any of the three kinds of directory.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError

__all__ = ["EXPORT_KEY", "LoadedStage", "UserError", "export_stage", "final_stage",
           "is_export_dir", "is_run_dir", "load_cascade_export", "load_dir", "load_export",
           "load_stage", "read_report", "run_stages", "stage_adapter_dir", "stage_eval"]

REPORT = "report.json"
EXPORT_KEY = "export"
"""Key of the export's entry in an exported directory's ``config.json``."""
_BEST_OF = re.compile(r"^reference@(\d+)$")


@dataclass
class LoadedStage:
    """A stage's model, ready to sample, and how its evaluation ran."""

    name: str | None
    """Stage name (None for a plain model directory)."""
    model: Any
    """What samples: a ControlModel, or for the cascade a CascadeModel."""
    base: Any
    """The ControlModel under it (for the cascade: the aligned model the refiner follows)."""
    candidates: int
    """Samples per decision, ranked by the critic when more than one."""
    critic_dir: Path | None
    """The critic that ranked them (None: none known)."""
    seed: int
    """Seed of the stage's evaluation (environment starts and sampling)."""
    episodes: int | None
    """Episodes of the stage's evaluation (None: not known)."""
    source: Path
    """The directory it was loaded from."""
    eval_json: Path | None = None
    """The run's own evaluation of the stage, where there is one."""


# ------------------------------------------------------------------ run directories
def is_run_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory written by ``diffalign run nav1d``."""
    p = Path(path)
    return p.is_dir() and ((p / REPORT).is_file() or (p / "foundation" / "config.json").is_file())


def _check_run(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise UserError(f"{run_dir} is not a run directory of `diffalign run nav1d` (it has "
                        f"neither {REPORT} nor foundation/config.json)")
    return run_dir


def read_report(run_dir: str | Path) -> dict:
    """The run's ``report.json`` ({} while the run has not written it)."""
    p = Path(run_dir) / REPORT
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{p} is not valid JSON: {e}") from e


def run_stages(run_dir: str | Path) -> list[str]:
    """The run's stage names, in the report's order. Before the report is written: the
    reference, the best-of-N and aligned stages found on disk, then the cascade."""
    run_dir = _check_run(run_dir)
    rows = read_report(run_dir).get("stages")
    if rows:
        return [str(r["name"]) for r in rows]
    names = ["reference"] if (run_dir / "foundation" / "config.json").is_file() else []
    evald = run_dir / "eval"
    if evald.is_dir():
        names += sorted(p.name for p in evald.iterdir() if _BEST_OF.match(p.name))
    sdir = run_dir / "align" / "stages"
    if sdir.is_dir():
        names += sorted(p.name for p in sdir.iterdir() if (p / "adapter").is_dir())
    if (run_dir / "align" / "cascade" / "refiner.safetensors").is_file():
        names.append("cascade")
    return names


def final_stage(run_dir: str | Path) -> str:
    """The stage the run recommends (report ``final``), else its last stage."""
    run_dir = _check_run(run_dir)
    final = read_report(run_dir).get("final")
    if isinstance(final, dict) and final.get("stage"):
        return str(final["stage"])
    names = run_stages(run_dir)
    if not names:
        raise UserError(f"{run_dir} has no stage yet (no trained foundation)")
    return names[-1]


def _is_aligned(name: str) -> bool:
    return name != "reference" and not _BEST_OF.match(name) and name != "cascade"


def stage_adapter_dir(run_dir: str | Path, stage: str) -> Path:
    """The LoRA adapter of an aligned ``stage``: its own, or for the last aligned stage of a
    run that kept only one, ``align/adapter``."""
    run_dir = Path(run_dir)
    own = run_dir / "align" / "stages" / stage / "adapter"
    if (own / "adapter_config.json").is_file():
        return own
    aligned = [n for n in run_stages(run_dir) if _is_aligned(n)]
    last = run_dir / "align" / "adapter"
    if aligned and stage == aligned[-1] and (last / "adapter_config.json").is_file():
        return last
    raise UserError(f"the run has no adapter of stage {stage!r}: {own} is missing (a run that "
                    f"keeps only align/adapter has the last aligned stage's, "
                    f"{aligned[-1] if aligned else 'none'!r})")


def stage_eval(run_dir: str | Path, stage: str) -> dict | None:
    """The run's own ``eval/<stage>/eval.json`` (None if it has none)."""
    p = Path(run_dir) / "eval" / stage / "eval.json"
    return json.loads(p.read_text()) if p.is_file() else None


def _run_seed(run_dir: Path, stage: str) -> int:
    """The seed the run evaluated with: the stage's eval.json, the report, another stage's
    eval.json, else the run's default 0."""
    ev = stage_eval(run_dir, stage)
    if ev is not None and "seed" in ev:
        return int(ev["seed"])
    report = read_report(run_dir)
    if "seed" in report:
        return int(report["seed"])
    for p in sorted((run_dir / "eval").glob("*/eval.json")):
        seed = json.loads(p.read_text()).get("seed")
        if seed is not None:
            return int(seed)
    return 0


def load_stage(run_dir: str | Path, stage: str | None = None, device: str = "cpu"
               ) -> LoadedStage:
    """Stage ``stage`` of a run (default: :func:`final_stage`) as the run evaluated it.

    reference: the foundation; ``reference@N``: the foundation, N candidates ranked by the
    run's critic; an aligned stage: the foundation with that stage's adapter merged into a
    plain copy of its net; cascade: the last adapter merged, followed by the refiner.
    """
    from .align.common import freeze
    from .align.lora import load_adapter, merged_copy
    from .models.base import ControlModel

    run_dir = _check_run(run_dir)
    names = run_stages(run_dir)
    name = stage if stage is not None else final_stage(run_dir)
    if name not in names:
        raise UserError(f"no stage {name!r} in {run_dir}; its stages: {', '.join(names)}")
    row = next((r for r in read_report(run_dir).get("stages", []) if r.get("name") == name), {})
    ev = stage_eval(run_dir, name)
    best_of = _BEST_OF.match(name)
    candidates = int(row.get("candidates") or (ev or {}).get("candidates")
                     or (best_of.group(1) if best_of else 1))
    critic_dir = run_dir / "critic"
    if not (critic_dir / "config.json").is_file():
        if candidates > 1:
            raise UserError(f"stage {name!r} ranks {candidates} candidates by the run's critic, "
                            f"but {critic_dir} holds none")
        critic_dir = None

    model = ControlModel.load(run_dir / "foundation", device=device)
    if _is_aligned(name) or name == "cascade":
        adapter = (run_dir / "align" / "adapter" if name == "cascade"
                   else stage_adapter_dir(run_dir, name))
        freeze(model)
        # sampling through the merged net is faster and is how the run evaluated the stage
        model.net = merged_copy(load_adapter(model.net, adapter))
        model.eval()
    base = model
    if name == "cascade":
        from .align.runner import load_cascade

        model = load_cascade(base, run_dir / "align")
    episodes = row.get("eval_episodes") or (ev or {}).get("episodes")
    return LoadedStage(name=name, model=model, base=base, candidates=candidates,
                       critic_dir=critic_dir, seed=_run_seed(run_dir, name),
                       episodes=None if episodes is None else int(episodes), source=run_dir,
                       eval_json=(run_dir / "eval" / name / "eval.json") if ev else None)


# ------------------------------------------------------------------ exports
def _config(directory: Path) -> dict | None:
    try:
        cfg = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return cfg if isinstance(cfg, dict) else None


def is_export_dir(path: str | Path) -> bool:
    """Whether ``path`` was written by :func:`export_stage`."""
    cfg = _config(Path(path))
    return cfg is not None and isinstance(cfg.get(EXPORT_KEY), dict)


def load_cascade_export(directory: str | Path, device: str = "cpu"):
    """The :class:`~diffalign.align.cascade.CascadeModel` of an exported cascade stage: the
    directory's model (adapter merged) followed by its ``cascade/`` refiner."""
    st = load_export(directory, device=device)
    if st.name != "cascade":
        raise UserError(f"{directory} holds stage {st.name!r}, not the cascade")
    return st.model


def load_export(directory: str | Path, device: str = "cpu") -> LoadedStage:
    """An exported stage: its model (with the cascade, where exported), candidates, critic."""
    from .align.runner import load_cascade
    from .models.base import ControlModel

    directory = Path(directory)
    cfg = _config(directory)
    info = (cfg or {}).get(EXPORT_KEY)
    if not isinstance(info, dict):
        raise UserError(f"{directory} is not an exported stage (its config.json has no "
                        f"{EXPORT_KEY!r} entry)")
    base = ControlModel.load(directory, device=device)
    model = load_cascade(base, directory) if info.get("cascade") else base
    critic_dir = directory / info["critic"] if info.get("critic") else None
    return LoadedStage(name=info.get("stage"), model=model, base=base,
                       candidates=int(info.get("candidates", 1)), critic_dir=critic_dir,
                       seed=int(info.get("seed", 0)), episodes=info.get("eval_episodes"),
                       source=directory)


def load_dir(path: str | Path, stage: str | None = None, device: str = "cpu") -> LoadedStage:
    """A run directory's stage (default: its final one), an exported stage, or a plain model
    directory (one candidate, no critic)."""
    from .models.base import ControlModel

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"directory {str(path)!r} does not exist")
    if is_run_dir(path):
        return load_stage(path, stage, device=device)
    if stage is not None:
        raise UserError(f"stage {stage!r}: stages are chosen in a run directory, and {path} is "
                        "a model directory")
    if is_export_dir(path):
        return load_export(path, device=device)
    model = ControlModel.load(path, device=device)
    return LoadedStage(name=None, model=model, base=model, candidates=1, critic_dir=None,
                       seed=0, episodes=None, source=path)


def export_stage(run_dir: str | Path, out: str | Path, stage: str | None = None,
                 device: str = "cpu") -> Path:
    """Write stage ``stage`` of a run (default: its final one) to the new directory ``out``
    as a plain model checkpoint (see the module docstring); returns ``out``.

    ``out`` must not exist or be empty. Everything is written into a temporary directory
    beside it, renamed onto ``out`` at the end: a killed export leaves no partial ``out``.
    """
    from .atomic import atomic_path
    from .models.critic import load_critic

    run_dir, out = _check_run(run_dir), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not empty: export into a new directory")
    st = load_stage(run_dir, stage, device=device)
    report = read_report(run_dir)
    final = report.get("final") if isinstance(report.get("final"), dict) else {}
    ev = stage_eval(run_dir, st.name)
    info = {"stage": st.name, "candidates": st.candidates,
            "critic": "critic" if st.candidates > 1 else None,
            "cascade": "cascade" if st.name == "cascade" else None,
            "run_dir": str(run_dir.resolve()), "task": report.get("task"),
            "seed": st.seed, "eval_episodes": st.episodes,
            "final": final_stage(run_dir) == st.name,
            "reason": final.get("reason") if final.get("stage") == st.name else None,
            "run_eval": None if ev is None else {k: ev.get(k) for k in
                                                 ("return_mean", "return_std", "normalized")}}
    found = _config(run_dir / "foundation") or {}
    kept = {"train": found["train"]} if "train" in found else {}

    out.parent.mkdir(parents=True, exist_ok=True)
    # os.mkdir, not mkdtemp: the directory gets the umask's permissions, not 0700
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        st.base.save(tmp, extra_config={**kept, EXPORT_KEY: info})
        if info["cascade"]:
            src = run_dir / "align" / "cascade"
            for f in ("refiner.safetensors", "config.json"):
                with atomic_path(tmp / "cascade" / f) as dst:
                    shutil.copyfile(src / f, dst)
        if info["critic"]:  # the weights alone: no training state
            load_critic(st.critic_dir).save(tmp / "critic")
        os.replace(tmp, out)  # onto a missing or empty directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
