"""report.json, report.md and the pictures of a run: Nav1D's own report
(:mod:`diffalign.report.nav1d_report`), or for every other task the same table in the
task's metric."""

from __future__ import annotations

from pathlib import Path

from ..atomic import atomic_path, write_json
from ..report.common import closing_lines, plot_returns, stage_table

__all__ = ["METRIC_LABELS", "run_report_markdown", "write_run_report"]

METRIC_LABELS = {"normalized": "normalised score (D4RL)", "success_rate": "success rate (%)",
                 "return_mean": "return"}


def run_report_markdown(report: dict) -> str:
    """A simulator run's report as Markdown: one row per stage."""
    label = METRIC_LABELS.get(report.get("metric"), "score")
    lines = [
        f"# Alignment report: {report['model']} / {report['process']} on {report['task']}",
        "",
        f"Data `{report.get('data')}`: mean return {report['dataset_return']:.2f}"
        + (f" (reference scores {report['ref_min']:g} / {report['ref_max']:g})"
           if report.get("ref_max") is not None else "")
        + f". Preset `{report['preset']}`, device `{report['device']}`. Score: {label}.",
        "",
        *stage_table(report, "score", label),
        *closing_lines(report, "`returns.png` (score per stage), `reward_distribution.png` "
                       "(episode returns per stage)"),
    ]
    return "\n".join(lines)


def _plots(out: Path, report: dict) -> None:
    stages = report["stages"]
    scores = [s.get("score") if s.get("score") is not None else s["return_mean"]
              for s in stages]
    plot_returns(out, report, scores, METRIC_LABELS.get(report.get("metric"), "return"),
                 f"{report['task']}: {report['model']}/{report['process']}")


def write_run_report(out: str | Path, report: dict) -> None:
    """Write report.json, report.md and the PNGs into ``out``."""
    out = Path(out)
    if str(report.get("task", "")).startswith("nav1d/"):
        from ..report.nav1d_report import write_report

        write_report(out, report)
        return
    write_json(out / "report.json", report)
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(run_report_markdown(report))
    _plots(out, report)
