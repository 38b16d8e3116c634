"""report.json, report.md and the pictures of a run: Nav1D's own report
(:mod:`diffalign.report.nav1d_report`), or for every other task the same table in the
task's metric."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..atomic import atomic_path, write_json

__all__ = ["METRIC_LABELS", "run_report_markdown", "write_run_report"]

METRIC_LABELS = {"normalized": "normalised score (D4RL)", "success_rate": "success rate (%)",
                 "return_mean": "return"}


def _f(v, fmt: str = ".2f") -> str:
    return "n/a" if v is None else format(v, fmt)


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
        f"| stage | candidates | denoise steps | return | {label} | coherency | entropy "
        "| train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    final = (report.get("final") or {}).get("stage")
    for s in report["stages"]:
        lines.append(
            f"| {s['name']}{' **(final)**' if s['name'] == final else ''} | "
            f"{s['candidates']} | {s['denoise_steps']} | "
            f"{s['return_mean']:.2f} ± {s['return_std']:.2f} | {_f(s.get('score'), '.1f')} | "
            f"{_f(s['coherency'], '.3f')} | {_f(s['entropy'], '.2f')} | {_f(s['wall_s'], '.0f')} |")
    if final is not None:
        lines += ["", f"Final stage: **{final}** ({report['final'].get('reason', '')}); it is "
                  "chosen on held-out dataset states, not on these evaluation episodes, and "
                  "is what `diffalign evaluate` and `diffalign export` use by default."]
    if report.get("action_coverage") is not None:
        lines += ["", f"Action coverage of the data: {report['action_coverage']:.2f} "
                  "(1: every action tried near every state)."]
    lines += ["", f"Alignment training took {report['alignment_seconds']:.0f} s, "
              f"{report['alignment_fraction_of_foundation']:.2f}× the foundation's "
              f"{report['foundation_seconds']:.0f} s.", "", "## Events", ""]
    events = report.get("events") or []
    if not events:
        lines.append("None (no collapse detected).")
    for e in events:
        lines.append("- " + ", ".join(f"{k}={v}" for k, v in e.items()))
    lines += ["", "Pictures: `returns.png` (score per stage), `reward_distribution.png` "
              "(episode returns per stage).", ""]
    return "\n".join(lines)


def _plots(out: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = report["stages"]
    names = [s["name"] for s in stages]
    scores = [s.get("score") if s.get("score") is not None else s["return_mean"]
              for s in stages]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names)), 4), dpi=100)
    ax.bar(names, scores,
           color=["#999999" if n.startswith("reference") else "#3a7dc9" for n in names])
    ax.set_ylabel(METRIC_LABELS.get(report.get("metric"), "return"))
    ax.set_title(f"{report['task']}: {report['model']}/{report['process']}")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    with atomic_path(out / "returns.png") as tmp:
        fig.savefig(tmp)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    data = [np.asarray(s["returns"]) for s in stages if s.get("returns")]
    if data:
        ax.violinplot(data, showmeans=True)
        ax.set_xticks(range(1, len(data) + 1),
                      [s["name"] for s in stages if s.get("returns")], rotation=30, ha="right")
    ax.set_ylabel("episode return")
    ax.set_title("Distribution of episode returns per stage")
    fig.tight_layout()
    with atomic_path(out / "reward_distribution.png") as tmp:
        fig.savefig(tmp)
    plt.close(fig)


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
