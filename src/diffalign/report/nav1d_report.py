"""report.json, report.md and the pictures of a ``diffalign run`` (the paper's layout)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..atomic import atomic_path, write_json

__all__ = ["report_markdown", "write_report"]


def _f(v, fmt: str = ".2f") -> str:
    return "n/a" if v is None else format(v, fmt)


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
        "| stage | candidates | denoise steps | return | % of optimum | coherency | entropy "
        "| train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    final = (report.get("final") or {}).get("stage")
    for s in report["stages"]:
        lines.append(
            f"| {s['name']}{' **(final)**' if s['name'] == final else ''} | "
            f"{s['candidates']} | {s['denoise_steps']} | "
            f"{s['return_mean']:.2f} ± {s['return_std']:.2f} | {_f(s['normalized'], '.1f')} | "
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
              f"{report['foundation_seconds']:.0f} s.", ""]
    events = report.get("events") or []
    lines.append("## Events")
    lines.append("")
    if not events:
        lines.append("None (no collapse detected).")
    for e in events:
        lines.append("- " + ", ".join(f"{k}={v}" for k, v in e.items()))
    lines += ["", "Pictures: `returns.png` (return per stage), `trajectories.png` (reference "
              "vs final stage over the reward field), `reward_distribution.png` (episode "
              "returns per stage).", ""]
    return "\n".join(lines)


def _plots(out: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = report["stages"]
    names = [s["name"] for s in stages]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names)), 4), dpi=100)
    ax.bar(names, [s["return_mean"] for s in stages], yerr=[s["return_std"] for s in stages],
           color=["#999999" if s["name"].startswith("reference") else "#3a7dc9" for s in stages],
           capsize=3)
    ax.axhline(report["optimal_return"], color="crimson", ls="--", label="optimum (DP)")
    ax.axhline(report["dataset_return"], color="gray", ls=":", label="dataset mean")
    ax.set_ylabel("episode return")
    ax.set_title(f"Nav1D {report['dataset']}: {report['model']}/{report['process']}")
    ax.legend(fontsize=8)
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
    ax.axhline(report["optimal_return"], color="crimson", ls="--", lw=1)
    ax.set_ylabel("episode return")
    ax.set_title("Distribution of episode returns per stage")
    fig.tight_layout()
    with atomic_path(out / "reward_distribution.png") as tmp:
        fig.savefig(tmp)
    plt.close(fig)

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
