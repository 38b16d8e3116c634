"""What every run's report shares: the stage table, the final stage and the closing lines of
report.md, and the pictures of returns per stage."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..atomic import atomic_path

__all__ = ["closing_lines", "fmt", "plot_returns", "stage_table"]


def fmt(v, spec: str = ".2f") -> str:
    return "n/a" if v is None else format(v, spec)


def stage_table(report: dict, value_key: str, label: str) -> list[str]:
    """One row per stage, the final stage marked, ``value_key`` of each row as ``label``."""
    lines = [f"| stage | candidates | denoise steps | return | {label} | coherency | entropy "
             "| train s |", "|---|---|---|---|---|---|---|---|"]
    final = (report.get("final") or {}).get("stage")
    for s in report["stages"]:
        lines.append(
            f"| {s['name']}{' **(final)**' if s['name'] == final else ''} | "
            f"{s['candidates']} | {s['denoise_steps']} | "
            f"{s['return_mean']:.2f} ± {s['return_std']:.2f} | {fmt(s.get(value_key), '.1f')} | "
            f"{fmt(s['coherency'], '.3f')} | {fmt(s['entropy'], '.2f')} | "
            f"{fmt(s['wall_s'], '.0f')} |")
    return lines


def steps_lines(report: dict) -> list[str]:
    """The steps sweep as a table: score and decision rate per stage and step count."""
    sweep = report.get("steps_sweep")
    if not sweep or not sweep.get("rows"):
        return []
    lines = ["", f"## Denoising steps ({sweep['episodes']} episodes each; decisions/s for one "
             "environment on one CPU thread)", "",
             "| stage | steps | score | return | decisions/s |", "|---|---|---|---|---|"]
    for r in sweep["rows"]:
        score = "n/a" if r.get("score") is None else f"{r['score']:.1f}"
        lines.append(f"| {r['stage']} | {r['steps']} | {score} | {r['return_mean']:.2f} ± "
                     f"{r['return_std']:.2f} | {r['decisions_per_s']:.0f} |")
    return lines


def closing_lines(report: dict, pictures: str) -> list[str]:
    """The final stage and why, the data's coverage, the alignment's time, the events."""
    lines: list[str] = []
    final = (report.get("final") or {}).get("stage")
    if final is not None:
        on = ("episodes from held-out starts" if "selection" in report["final"]
              else "held-out dataset states")
        lines += ["", f"Final stage: **{final}** ({report['final'].get('reason', '')}); it is "
                  f"chosen on {on}, not on these evaluation episodes, and "
                  "is what `diffalign evaluate` and `diffalign export` use by default."]
    if report.get("action_coverage") is not None:
        lines += ["", f"Action coverage of the data: {report['action_coverage']:.2f} "
                  "(1: every action tried near every state)."]
    lines += steps_lines(report)
    if report.get("foundation_seconds") is None:  # trained elsewhere: no time to compare
        lines += ["", f"Alignment training took {report['alignment_seconds']:.0f} s.", "",
                  "## Events", ""]
    else:
        lines += ["", f"Alignment training took {report['alignment_seconds']:.0f} s, "
                  f"{report['alignment_fraction_of_foundation']:.2f}× the foundation's "
                  f"{report['foundation_seconds']:.0f} s.", "", "## Events", ""]
    events = report.get("events") or []
    if not events:
        lines.append("None (no collapse detected).")
    for e in events:
        lines.append("- " + ", ".join(f"{k}={v}" for k, v in e.items()))
    return lines + ["", f"Pictures: {pictures}.", ""]


def plot_returns(out: Path, report: dict, values: list[float], ylabel: str, title: str,
                 errors: list[float] | None = None, lines: tuple = ()) -> None:
    """``returns.png`` (``values`` per stage, references grey) and ``reward_distribution.png``
    (episode returns per stage); ``lines``: ``(y, label)`` drawn across both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = report["stages"]
    names = [s["name"] for s in stages]
    styles = [dict(color="crimson", ls="--"), dict(color="gray", ls=":")]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names)), 4), dpi=100)
    ax.bar(names, values, yerr=errors, capsize=3 if errors else 0,
           color=["#999999" if n.startswith("reference") else "#3a7dc9" for n in names])
    for (y, label), style in zip(lines, styles):
        ax.axhline(y, label=label, **style)
    if lines:
        ax.legend(fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
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
    for (y, _), style in zip(lines[:1], styles):
        ax.axhline(y, lw=1, **style)
    ax.set_ylabel("episode return")
    ax.set_title("Distribution of episode returns per stage")
    fig.tight_layout()
    with atomic_path(out / "reward_distribution.png") as tmp:
        fig.savefig(tmp)
    plt.close(fig)
