"""report.json, report.md and the pictures of a ``diffalign run`` (the paper's layout)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..atomic import atomic_path, write_json
from .common import closing_lines, plot_returns, stage_table

__all__ = ["report_markdown", "write_report"]


def report_markdown(report: dict) -> str:
    """The report as Markdown: one row per stage, as in the paper's tables."""
    lines = [
        f"# Nav1D alignment report: {report['model']} / {report['process']} on "
        f"{report['dataset']} (layout {report['layout_seed']})",
        "",
        f"Optimal return {report['optimal_return']:.2f} (dynamic programming); dataset mean "
        f"return {report['dataset_return']:.2f}. Preset `{report['preset']}`, device "
        f"`{report['device']}`."
        + (f" The critic's greedy policy (argmax over 201 actions of Q) reaches "
           f"{report['critic_greedy_normalized']:.1f}% of the optimum: the ceiling of a "
           "one-candidate policy aligned to it."
           if report.get("critic_greedy_normalized") is not None else ""),
        "",
        *stage_table(report, "normalized", "% of optimum"),
        *closing_lines(report, "`returns.png` (return per stage), `trajectories.png` "
                       "(reference vs final stage over the reward field), "
                       "`reward_distribution.png` (episode returns per stage)"),
    ]
    return "\n".join(lines)


def _plots(out: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = report["stages"]
    plot_returns(out, report, [s["return_mean"] for s in stages], "episode return",
                 f"Nav1D {report['dataset']}: {report['model']}/{report['process']}",
                 errors=[s["return_std"] for s in stages],
                 lines=((report["optimal_return"], "optimum (DP)"),
                        (report["dataset_return"], "dataset mean")))
    final = (report.get("final") or {}).get("stage")
    first = stages[0]
    last = next((s for s in stages if s["name"] == final), stages[-1])
    shown = (first,) if last is first else (first, last)
    pics = [(s["name"], Path(s["picture"])) for s in shown if Path(s["picture"]).exists()]
    if pics:
        fig, axes = plt.subplots(1, len(pics), figsize=(7 * len(pics), 4.5), dpi=100)
        for ax, (name, p) in zip(np.atleast_1d(axes), pics):
            ax.imshow(plt.imread(p))
            ax.set_title(name)
            ax.axis("off")
        fig.tight_layout()
        with atomic_path(out / "trajectories.png") as tmp:
            fig.savefig(tmp)
        plt.close(fig)


def write_report(out: str | Path, report: dict) -> None:
    """Write report.json, report.md and the PNGs into ``out``."""
    out = Path(out)
    write_json(out / "report.json", report)
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(report_markdown(report))
    _plots(out, report)
