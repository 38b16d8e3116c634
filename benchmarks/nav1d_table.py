"""Markdown table of finished ``diffalign run nav1d`` directories: one row per run, the
reference, its best of N, every aligned stage, the final stage the run chose, and the
criteria of "never hurts" (final − reference, final − best of N).

    python benchmarks/nav1d_table.py runs/nav1d-*
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def row(run: Path) -> dict:
    r = json.loads((run / "report.json").read_text())
    by = {s["name"]: s for s in r["stages"]}
    best_of = next(s for s in r["stages"] if s["name"].startswith("reference@"))
    final = r.get("final", {}).get("stage", r["stages"][-1]["name"])
    ref, fin = by["reference"]["normalized"], by[final]["normalized"]
    return {"run": run.name, "model": r["model"], "dataset": r["dataset"],
            "layout": r["layout_seed"], "coverage": r.get("action_coverage"),
            "ref": ref, "best_of": best_of["normalized"],
            "stages": {n: s["normalized"] for n, s in by.items()
                       if n != "reference" and not n.startswith("reference@")},
            "final": final, "final_value": fin, "vs_ref": fin - ref,
            "vs_best_of": fin - best_of["normalized"],
            "align_ratio": r.get("alignment_fraction_of_foundation"),
            "job_s": _wall(run, r)}


def _wall(run: Path, report: dict) -> float:
    """The job's wall time: from ``DIR.time`` (``/usr/bin/time -f "%e s"``) when there, else
    the sum of the report's step times (which leaves out start-up and the last evaluation)."""
    timed = run.with_name(run.name + ".time")
    if timed.is_file():
        return float(timed.read_text().split()[0])
    return sum(v for k, v in report.get("timings", {}).items()
               if k in ("data", "alignment", "foundation_train_s"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    args = ap.parse_args(argv)
    rows = [row(p) for p in args.runs if (p / "report.json").exists()]
    stage_names: list[str] = []
    for r in rows:
        stage_names += [n for n in r["stages"] if n not in stage_names]
    head = (["model", "dataset", "layout", "coverage", "reference", "best of 64"] + stage_names
            + ["final stage", "final", "final − ref", "final − best of 64",
               "alignment / foundation", "job"])
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [r["model"], r["dataset"], str(r["layout"]),
                 "" if r["coverage"] is None else f"{r['coverage']:.2f}",
                 f"{r['ref']:.1f}", f"{r['best_of']:.1f}"]
        cells += [f"{r['stages'][n]:.1f}" if n in r["stages"] else "" for n in stage_names]
        cells += [r["final"], f"**{r['final_value']:.1f}**", f"{r['vs_ref']:+.1f}",
                  f"{r['vs_best_of']:+.1f}",
                  "" if r["align_ratio"] is None else f"{r['align_ratio']:.2f}×",
                  f"{int(r['job_s'] // 60)} min {int(r['job_s'] % 60):02d} s"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
