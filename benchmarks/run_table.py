"""Markdown table of finished ``diffalign run TASK`` directories on simulator tasks: one row
per run, the reference, its best of N, every aligned stage and the final stage the run chose,
all in the task's metric (success rate in % on MetaWorld, the D4RL-normalised score on
MuJoCo), and the criterion of "never hurts" (final − reference).

    python benchmarks/run_table.py runs/mw-*

``DIR.time`` beside a run directory (``/usr/bin/time -f "%e s" -o DIR.time``), when there,
gives the job's wall time.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

#: Aligned stages in the order of the default sequence (two passes) and the cascade.
STAGE_ORDER = ("dpo", "sft", "rl", "dpo_p2", "sft_p2", "rl_p2", "dpo_p3", "sft_p3", "rl_p3",
               "cascade")


def row(run: Path) -> dict:
    """The table's entries of one run directory."""
    r = json.loads((run / "report.json").read_text())
    by = {s["name"]: s for s in r["stages"]}
    best_of = next((s for s in r["stages"] if s["name"].startswith("reference@")), None)
    final = r.get("final", {}).get("stage", "reference")
    settings = _settings(run)
    task = r["task"].split("/")
    return {"task": task[1] if len(task) == 3 else r["task"], "model": r["model"],
            "seed": r.get("seed"), "online": bool(r.get("online")),
            "coverage": r.get("action_coverage"), "ref": by["reference"]["score"],
            "best_of": None if best_of is None else best_of["score"],
            "best_of_name": None if best_of is None else best_of["name"],
            "stages": {n: s["score"] for n, s in by.items()
                       if n != "reference" and not n.startswith("reference@")},
            "final": final, "final_value": by[final]["score"],
            "vs_ref": by[final]["score"] - by["reference"]["score"],
            "chosen_by": "env" if "selection" in r.get("final", {}) else "critic",
            "preset": settings.get("preset", r.get("preset")), "job_s": _wall(run)}


def _settings(run: Path) -> dict:
    p = run / "run.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def _wall(run: Path) -> float | None:
    timed = run.with_name(run.name + ".time")
    return float(timed.read_text().split()[0]) if timed.is_file() else None


def _minutes(s: float | None) -> str:
    return "" if s is None else f"{int(s // 60)} min {int(s % 60):02d} s"


def markdown(rows: list[dict]) -> str:
    """The rows as one markdown table, stages in the sequence's order."""
    names = [n for n in STAGE_ORDER if any(n in r["stages"] for r in rows)]
    names += sorted({n for r in rows for n in r["stages"]} - set(names))
    best = next((r["best_of_name"] for r in rows if r["best_of_name"]), "best of N")
    head = (["task", "model", "seed", "online", "coverage", "reference", best] + names
            + ["final stage", "final", "final − ref", "job"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["task"], r["model"], str(r["seed"]), "yes" if r["online"] else "no",
                 "" if r["coverage"] is None else f"{r['coverage']:.2f}", f"{r['ref']:.1f}",
                 "" if r["best_of"] is None else f"{r['best_of']:.1f}"]
        cells += [f"{r['stages'][n]:.1f}" if n in r["stages"] else "" for n in names]
        cells += [r["final"], f"**{r['final_value']:.1f}**", f"{r['vs_ref']:+.1f}",
                  _minutes(r["job_s"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    args = ap.parse_args(argv)
    print(markdown([row(p) for p in args.runs if (p / "report.json").exists()]))


if __name__ == "__main__":
    main()
