"""The paper's tables over the finished cells of a bench directory, and a plot per suite.

* Table 2 (models × samplers): rows model × process, columns the suite's tasks, reference vs
  aligned, one candidate per decision.
* Table 3 (Diffusion Policy): rows task × process, expectation vs IDQL action selection over
  N candidates, reference vs aligned.

Every entry is the mean ± the sample standard deviation (n − 1) over the seeds of that
(task, model, process); a single seed shows the mean alone. The score is the suite's metric
(:data:`~diffalign.bench.grid.SUITE_METRIC`): the normalised score, or the success rate in %.
Markdown rounds to one decimal; CSV keeps full precision.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..atomic import atomic_path
from .grid import MODELS, PROCESSES, SUITES

__all__ = ["METRIC_LABELS", "load_results", "mean_std", "table2_rows", "table3_rows",
           "write_tables"]

METRIC_LABELS = {
    "nav1d": "normalised score (% of the DP optimum)",
    "mujoco": "D4RL normalised score",
    "metaworld": "success rate (%)",
}


def load_results(out: str | Path) -> list[dict]:
    """Every ``cells/*/result.json`` under ``out``, in directory-name order."""
    return [json.loads(p.read_text()) for p in sorted(Path(out).glob("cells/*/result.json"))]


def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None, int]:
    """``(mean, sample std, n)`` of the values that are not None (std None when n < 2)."""
    vals = [float(v) for v in values if v is not None]
    n = len(vals)
    if n == 0:
        return None, None, 0
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n >= 2 else None
    return mean, std, n


def _order(name: str, known: Sequence[str]) -> tuple[int, str]:
    return (known.index(name) if name in known else len(known), name)


def _group(results: list[dict], keys: Sequence[str]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    return groups


def _sort_key(suite: str, task: str, model: str = "", process: str = ""):
    return (_order(suite, list(SUITES)), _order(task, SUITES.get(suite, ())),
            _order(model, MODELS), _order(process, PROCESSES))


def table2_rows(results: list[dict]) -> list[dict]:
    """One row per (suite, task, model, process): reference and aligned mean/std over seeds."""
    rows = []
    groups = _group(results, ("suite", "task", "model", "process"))
    for (suite, task, model, process), rs in sorted(groups.items(),
                                                    key=lambda kv: _sort_key(*kv[0])):
        ref = mean_std(r.get("reference") for r in rs)
        ali = mean_std(r.get("aligned") for r in rs)
        rows.append({"suite": suite, "task": task, "model": model, "process": process,
                     "metric": rs[0].get("metric"),
                     "reference_mean": ref[0], "reference_std": ref[1],
                     "aligned_mean": ali[0], "aligned_std": ali[1],
                     "reference_n": ref[2], "aligned_n": ali[2],
                     "n_seeds": len(rs), "seeds": sorted(r["seed"] for r in rs)})
    return rows


SELECTIONS = (("expectation", "expectation"), ("idql", "IDQL"))
STAGES = ("reference", "aligned")


def table3_rows(results: list[dict]) -> list[dict]:
    """One row per Diffusion Policy (suite, task, process): expectation vs IDQL selection."""
    dp = [r for r in results if r.get("model") == "dp" and r.get("selection")]
    rows = []
    groups = _group(dp, ("suite", "task", "process"))
    for (suite, task, process), rs in sorted(groups.items(),
                                             key=lambda kv: _sort_key(kv[0][0], kv[0][1], "dp",
                                                                      kv[0][2])):
        row = {"suite": suite, "task": task, "process": process,
               "metric": rs[0].get("metric"),
               "candidates": sorted({r["selection"]["candidates"] for r in rs})}
        for sel, _ in SELECTIONS:
            for stage in STAGES:
                m, s, n = mean_std(r["selection"][sel][stage] for r in rs)
                row[f"{sel}_{stage}_mean"], row[f"{sel}_{stage}_std"] = m, s
                row[f"{sel}_{stage}_n"] = n
        row["n_seeds"], row["seeds"] = len(rs), sorted(r["seed"] for r in rs)
        rows.append(row)
    return rows


def fmt_entry(mean: float | None, std: float | None, n: int, n_max: int) -> str:
    """``"45.2 ± 3.1"`` (one seed: ``"45.2"``; ``" (n=k)"`` when fewer seeds than the most)."""
    if mean is None:
        return "n/a"
    text = f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"
    return text + (f" (n={n})" if n < n_max else "")


def _csv_value(v) -> str:
    if v is None:
        return ""
    if isinstance(v, list):
        return " ".join(str(x) for x in v)
    return repr(v) if isinstance(v, float) else str(v)


def _csv(rows: list[dict], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([_csv_value(r[c]) for c in columns])
    return buf.getvalue()


def _seeds_line(rows: list[dict]) -> str:
    seeds = sorted({s for r in rows for s in r["seeds"]})
    return f"seeds {', '.join(map(str, seeds))}"


def _size_note(results: list[dict], suite: str) -> str:
    from ..recipes.base import renamed_fields

    sizes = {json.dumps(renamed_fields(r["sizes"]) if isinstance(r.get("sizes"), dict)
                        else r.get("sizes"), sort_keys=True)
             for r in results if r["suite"] == suite}
    if len(sizes) > 1:
        return ("\nNote: these cells were run with different sizes (quick and full runs in one "
                "directory?); compare with care.\n")
    return ""


def table2_markdown(rows: list[dict], results: list[dict]) -> str:
    lines = ["# Table 2: models × samplers, reference vs aligned", "",
             "Mean ± sample std over seeds; one candidate per decision. "
             "\"(n=k)\" marks an entry over fewer seeds than the most in its suite.", ""]
    for suite in sorted({r["suite"] for r in rows}, key=lambda s: _order(s, list(SUITES))):
        srows = [r for r in rows if r["suite"] == suite]
        tasks = sorted({r["task"] for r in srows}, key=lambda t: _order(t, SUITES.get(suite, ())))
        n_max = max(r["n_seeds"] for r in srows)
        lines += [f"## {suite}: {METRIC_LABELS.get(suite, srows[0]['metric'])}; "
                  f"{_seeds_line(srows)}", _size_note(results, suite)]
        head = ["model", "process"] + [f"{t}: {s}" for t in tasks for s in STAGES]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        combos = sorted({(r["model"], r["process"]) for r in srows},
                        key=lambda mp: (_order(mp[0], MODELS), _order(mp[1], PROCESSES)))
        for model, process in combos:
            cells = [model, process]
            for t in tasks:
                r = next((x for x in srows if (x["task"], x["model"], x["process"]) ==
                          (t, model, process)), None)
                for stage in STAGES:
                    cells.append("–" if r is None else fmt_entry(
                        r[f"{stage}_mean"], r[f"{stage}_std"], r[f"{stage}_n"], n_max))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def table3_markdown(rows: list[dict], results: list[dict]) -> str:
    lines = ["# Table 3: Diffusion Policy, expectation vs IDQL action selection", "",
             "Mean ± sample std over seeds of N candidates per decision: their mean "
             "(expectation) or the one the critic's Q ranks highest (IDQL).", ""]
    if not rows:
        lines.append("(no Diffusion Policy cells)")
    for suite in sorted({r["suite"] for r in rows}, key=lambda s: _order(s, list(SUITES))):
        srows = [r for r in rows if r["suite"] == suite]
        n_max = max(r["n_seeds"] for r in srows)
        lines += [f"## {suite}: {METRIC_LABELS.get(suite, srows[0]['metric'])}; "
                  f"{_seeds_line(srows)}", _size_note(results, suite)]
        head = ["task", "process", "N"] + [f"{label}: {s}" for _, label in SELECTIONS
                                           for s in STAGES]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in srows:
            cells = [r["task"], r["process"], "/".join(map(str, r["candidates"]))]
            for sel, _ in SELECTIONS:
                for stage in STAGES:
                    k = f"{sel}_{stage}"
                    cells.append(fmt_entry(r[f"{k}_mean"], r[f"{k}_std"], r[f"{k}_n"], n_max))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


TABLE2_COLUMNS = ("suite", "task", "model", "process", "metric", "reference_mean",
                  "reference_std", "aligned_mean", "aligned_std", "n_seeds", "seeds")
TABLE3_COLUMNS = ("suite", "task", "process", "metric", "candidates",
                  *(f"{sel}_{stage}_{x}" for sel, _ in SELECTIONS for stage in STAGES
                    for x in ("mean", "std")), "n_seeds", "seeds")


def plot_suite(rows: list[dict], suite: str, path: str | Path) -> None:
    """Bars of reference vs aligned (± std over seeds) per model/process, one panel per task."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    srows = [r for r in rows if r["suite"] == suite]
    tasks = sorted({r["task"] for r in srows}, key=lambda t: _order(t, SUITES.get(suite, ())))
    combos = sorted({(r["model"], r["process"]) for r in srows},
                    key=lambda mp: (_order(mp[0], MODELS), _order(mp[1], PROCESSES)))
    fig = Figure(figsize=(max(4.0, 0.6 * len(combos) + 1.5) * len(tasks), 3.6), dpi=90)
    FigureCanvasAgg(fig)
    for i, task in enumerate(tasks):
        ax = fig.add_subplot(1, len(tasks), i + 1)
        for j, (stage, color) in enumerate((("reference", "#9aa9bd"), ("aligned", "#1f4e8c"))):
            xs, ys, es = [], [], []
            for k, mp in enumerate(combos):
                r = next((x for x in srows if (x["task"], x["model"], x["process"]) ==
                          (task, *mp)), None)
                if r is None or r[f"{stage}_mean"] is None:
                    continue
                xs.append(k + (j - 0.5) * 0.38)
                ys.append(r[f"{stage}_mean"])
                es.append(r[f"{stage}_std"] or 0.0)
            ax.bar(xs, ys, width=0.38, yerr=es, color=color, label=stage, capsize=2)
        ax.set_xticks(range(len(combos)))
        ax.set_xticklabels([f"{m}\n{p}" for m, p in combos], fontsize=7)
        ax.set_title(f"{suite}/{task}", fontsize=9)
        if i == 0:
            ax.set_ylabel(METRIC_LABELS.get(suite, "score"), fontsize=8)
            ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_tables(out: str | Path) -> list[Path]:
    """Write table2/table3 (.md, .csv) and ``<suite>.png`` from ``out/cells``; returns the
    paths written (nothing when no cell has finished)."""
    out = Path(out)
    results = load_results(out)
    if not results:
        return []
    t2, t3 = table2_rows(results), table3_rows(results)
    files = [out / "table2.md", out / "table2.csv", out / "table3.md", out / "table3.csv"]
    _write_text(files[0], table2_markdown(t2, results))
    _write_text(files[1], _csv(t2, TABLE2_COLUMNS))
    _write_text(files[2], table3_markdown(t3, results))
    _write_text(files[3], _csv(t3, TABLE3_COLUMNS))
    for suite in sorted({r["suite"] for r in t2}, key=lambda s: _order(s, list(SUITES))):
        plot_suite(t2, suite, out / f"{suite}.png")
        files.append(out / f"{suite}.png")
    return files
