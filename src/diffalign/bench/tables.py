"""The paper's tables over the finished cells of a bench directory, and a figure per table.

* Table 2 (planners): rows the suite's tasks, columns Diffuser with DDPM, DDIM, SM and FM,
  then Decision Diffuser (with each process it was run with); one candidate per decision.
* Table 3 (Diffusion Policy): rows the suite's tasks, columns expectation and IDQL selection
  over N candidates per decision (for each process Diffusion Policy was run with).

Every cell reads "reference → aligned", where *aligned* is the stage each run chose as its
final one. Its score is the mean ± the sample standard deviation (n − 1) over the seeds of
that (task, column); a single seed shows the mean alone. The score is the suite's metric
(:data:`~diffalign.bench.grid.SUITE_METRIC`): the normalised score, or the success rate in %.
Below it come the return's standard deviation over a run's episodes (mean over seeds), and
coherency and entropy where the evaluations measured them. Markdown rounds; CSV keeps full
precision, one row per (task, column).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from ..atomic import atomic_path
from .grid import MODELS, PROCESSES, SUITES

__all__ = ["CSV_COLUMNS", "METRIC_LABELS", "load_results", "mean_std", "table2_rows",
           "table3_rows", "write_tables"]

METRIC_LABELS = {
    "nav1d": "normalised score (% of the DP optimum)",
    "mujoco": "D4RL normalised score",
    "metaworld": "success rate (%)",
}
PROCESS_LABELS = {"ddpm": "DDPM", "ddim": "DDIM", "sm": "SM", "fm": "FM"}
MODEL_LABELS = {"diffuser": "Diffuser", "dd": "Decision Diffuser", "dp": "Diffusion Policy"}
PLANNERS = ("diffuser", "dd")
SELECTIONS = (("expectation", "Expectation"), ("idql", "IDQL"))
MISSING = "—"

NUMERIC_COLUMNS = ("ref_mean", "ref_std", "aligned_mean", "aligned_std", "ref_return_std",
                   "aligned_return_std", "coherency_ref", "coherency_aligned", "entropy_ref",
                   "entropy_aligned", "n_seeds")
CSV_COLUMNS = ("suite", "task", "column", "model", "process", "selection", "candidates",
               "metric", *NUMERIC_COLUMNS, "seeds")
"""Columns of ``table2.csv`` and ``table3.csv``: one row per (task, column) of the table."""


# ----------------------------------------------------------------------------- reading
def load_results(out: str | Path) -> list[dict]:
    """Every ``cells/*/result.json`` under ``out``, in directory-name order, with its
    ``aligned`` numbers those of the run's final stage."""
    results = []
    for p in sorted(Path(out).glob("cells/*/result.json")):
        r = json.loads(p.read_text())
        _align_to_final(r, p.parent)
        results.append(r)
    return results


def _align_to_final(r: dict, cell_dir: Path) -> None:
    """Cells whose ``aligned`` is another stage than the run's ``final`` (recorded by
    versions that took the last aligned stage): take the final stage's numbers from the
    cell's ``report.json``; the selection evaluations of the other stage are dropped."""
    final, used = r.get("final"), r.get("aligned_stage")
    if final is None or used is None or final == used:
        return
    evals = r.setdefault("evals", {})
    if final == "reference":
        ali = evals.get("reference")
    else:
        from ..pipeline.run import stage_score

        try:
            stages = json.loads((cell_dir / "report.json").read_text()).get("stages", [])
        except (OSError, ValueError):
            stages = []
        row = next((s for s in stages if s.get("name") == final), None)
        ali = None if row is None else {
            "score": stage_score(row, r.get("metric")), "return_std": row.get("return_std"),
            "coherency": row.get("coherency"), "entropy": row.get("entropy"),
            "candidates": row.get("candidates")}
    evals["aligned"] = ali
    r["aligned"] = None if ali is None else ali.get("score")
    sel = r.get("selection")
    for key, _ in SELECTIONS:
        same = evals.get(f"reference_{key}") if final == "reference" else None
        evals[f"aligned_{key}"] = same
        if isinstance(sel, dict) and isinstance(sel.get(key), dict):
            sel[key]["aligned"] = None if same is None else same.get("score")
    r["aligned_stage"] = final


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


def _suites(results: list[dict]) -> list[str]:
    return sorted({r["suite"] for r in results}, key=lambda s: _order(s, list(SUITES)))


def _tasks(results: list[dict], suite: str) -> list[str]:
    return sorted({r["task"] for r in results if r["suite"] == suite},
                  key=lambda t: _order(t, SUITES.get(suite, ())))


# ----------------------------------------------------------------------------- rows
def _eval(r: dict, key: str, stage: str) -> dict:
    """A cell's evaluation summary (``score``, ``return_std``, ``coherency``, ``entropy``)
    for Table 2 (``key`` None) or a selection of Table 3, at ``stage``."""
    name = stage if key is None else f"{stage}_{key}"
    ev = (r.get("evals") or {}).get(name) or {}
    if "score" not in ev:  # the score is also kept outside evals
        if key is None:
            score = r.get(stage)
        else:
            score = ((r.get("selection") or {}).get(key) or {}).get(stage)
        ev = {**ev, "score": score}
    return ev


def _cell_row(rs: list[dict], key: str | None) -> dict:
    """The numbers of one table cell over the results of its seeds."""
    row: dict = {}
    for stage, short in (("reference", "ref"), ("aligned", "aligned")):
        evs = [_eval(r, key, stage) for r in rs]
        m, s, n = mean_std(e.get("score") for e in evs)
        row[f"{short}_mean"], row[f"{short}_std"], row[f"{short}_n"] = m, s, n
        row[f"{short}_return_std"] = mean_std(e.get("return_std") for e in evs)[0]
        row[f"coherency_{short}"] = mean_std(e.get("coherency") for e in evs)[0]
        row[f"entropy_{short}"] = mean_std(e.get("entropy") for e in evs)[0]
    row["n_seeds"] = len(rs)
    row["seeds"] = sorted(r["seed"] for r in rs)
    return row


def _table_rows(results: list[dict], columns: Callable[[list[dict]], list[tuple]],
                pick: Callable[[dict, tuple], bool], key_of: Callable[[tuple], str | None],
                describe: Callable[[tuple], dict]) -> list[dict]:
    rows = []
    for suite in _suites(results):
        sres = [r for r in results if r["suite"] == suite]
        cols = columns(sres)
        for task in _tasks(sres, suite):
            for col in cols:
                rs = [r for r in sres if r["task"] == task and pick(r, col)]
                rows.append({"suite": suite, "task": task, **describe(col),
                             "metric": rs[0].get("metric") if rs else None,
                             **_cell_row(rs, key_of(col))})
    return rows


def _present(results: list[dict], models: Sequence[str]) -> list[tuple[str, str]]:
    """The (model, process) pairs of ``models`` run in ``results``, in the paper's order."""
    have = {(r["model"], r["process"]) for r in results if r["model"] in models}
    return sorted(have, key=lambda mp: (_order(mp[0], MODELS), _order(mp[1], PROCESSES)))


def _label2(model: str, process: str) -> str:
    return f"{MODEL_LABELS.get(model, model)} {PROCESS_LABELS.get(process, process)}"


def _candidates(r: dict, key: str | None) -> int | None:
    if key is not None:
        return (r.get("selection") or {}).get("candidates")
    return ((r.get("evals") or {}).get("reference") or {}).get("candidates", 1)


def table2_rows(results: list[dict]) -> list[dict]:
    """Table 2: one row per (suite, task, planner column); rows of a task and columns
    without any cell are left out, a missing cell has ``n_seeds`` 0."""
    planners = [r for r in results if r.get("model") in PLANNERS]
    rows = _table_rows(
        planners, lambda rs: _present(rs, PLANNERS),
        lambda r, col: (r["model"], r["process"]) == col, lambda col: None,
        lambda col: {"column": _label2(*col), "model": col[0], "process": col[1],
                     "selection": "single"})
    for row in rows:
        rs = [r for r in planners if (r["suite"], r["task"], r["model"], r["process"]) ==
              (row["suite"], row["task"], row["model"], row["process"])]
        row["candidates"] = max((_candidates(r, None) or 1 for r in rs), default=None)
    return rows


def table3_rows(results: list[dict]) -> list[dict]:
    """Table 3: one row per (suite, task, Diffusion Policy process, selection)."""
    dp = [r for r in results if r.get("model") == "dp" and r.get("selection")]

    def cols(rs: list[dict]) -> list[tuple[str, str]]:
        return [(p, sel) for _, p in _present(rs, ("dp",)) for sel, _ in SELECTIONS]

    rows = _table_rows(
        dp, cols, lambda r, col: r["process"] == col[0], lambda col: col[1],
        lambda col: {"column": f"{dict(SELECTIONS)[col[1]]} "
                               f"({PROCESS_LABELS.get(col[0], col[0])})",
                     "model": "dp", "process": col[0], "selection": col[1]})
    for row in rows:
        ns = {_candidates(r, row["selection"]) for r in dp
              if (r["suite"], r["task"], r["process"]) ==
              (row["suite"], row["task"], row["process"])}
        ns.discard(None)
        row["candidates"] = max(ns, default=None)
    return rows


# ----------------------------------------------------------------------------- markdown
def fmt_entry(mean: float | None, std: float | None, n: int, n_max: int) -> str:
    """``"45.2 ± 3.1"`` (one seed: ``"45.2"``; ``" (n=k)"`` when fewer seeds than the most)."""
    if mean is None:
        return "n/a"
    text = f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"
    return text + (f" (n={n})" if n < n_max else "")


def _num(v: float | None) -> str:
    if v is None:
        return "n/a"
    a = abs(v)
    return f"{v:.0f}" if a >= 100 else f"{v:.1f}" if a >= 10 else f"{v:.2f}"


def fmt_cell(row: dict, n_max: int) -> str:
    """A Markdown table cell: the score ``ref → aligned``, then the return's std, coherency
    and entropy ``before → after`` (each only where measured), one per line."""
    if row["n_seeds"] == 0:
        return MISSING
    lines = [f"{fmt_entry(row['ref_mean'], row['ref_std'], row['ref_n'], n_max)} → "
             f"{fmt_entry(row['aligned_mean'], row['aligned_std'], row['aligned_n'], n_max)}"]
    for label, a, b in (("return std", "ref_return_std", "aligned_return_std"),
                        ("coherency", "coherency_ref", "coherency_aligned"),
                        ("entropy", "entropy_ref", "entropy_aligned")):
        if row[a] is not None or row[b] is not None:
            lines.append(f"{label} {_num(row[a])} → {_num(row[b])}")
    return "<br>".join(lines)


def _seeds_line(rows: list[dict]) -> str:
    seeds = sorted({s for r in rows for s in r["seeds"]})
    return f"seeds {', '.join(map(str, seeds))}"


def _size_note(results: list[dict], suite: str) -> str:
    from ..recipes.base import renamed_fields

    sizes = {json.dumps(renamed_fields(r["sizes"]) if isinstance(r.get("sizes"), dict)
                        else r.get("sizes"), sort_keys=True)
             for r in results if r["suite"] == suite}
    if len(sizes) > 1:
        return ("Note: these cells were run with different sizes (quick and full runs in one "
                "directory?); compare with care.")
    return ""


def _alignment_line(results: list[dict]) -> str:
    """How the cells were aligned: their methods and whether the cascade followed."""
    kinds = sorted({(" → ".join(r.get("methods") or ["?"]),
                     bool(r.get("cascade", False))) for r in results})
    if not kinds:
        return ""
    text = "; ".join(m + (", then the cascade" if c else ", no cascade") for m, c in kinds)
    note = " (the cells differ)" if len(kinds) > 1 else ""
    return (f"Alignment: {text}{note}. Aligned = the stage each run chose as its final one "
            "(on held-out states or starts), which may be the reference itself.")


def _markdown(title: str, selection_line: str, rows: list[dict], results: list[dict],
              empty: str) -> str:
    lines = [f"# {title}", "",
             "Each cell: the score as reference → aligned, mean ± sample std (n − 1) over "
             "seeds; below it the return's standard deviation over a run's episodes, and "
             "coherency and entropy where measured, before → after (means over seeds). "
             f"\"(n=k)\": fewer seeds than the most in the table; {MISSING}: no finished cell.",
             "", selection_line, _alignment_line(results), ""]
    if not rows:
        lines.append(empty)
    for suite in _suites(rows):
        srows = [r for r in rows if r["suite"] == suite]
        n_max = max(r["n_seeds"] for r in srows)
        cols = list(dict.fromkeys(r["column"] for r in srows))
        lines += [f"## {suite}: {METRIC_LABELS.get(suite, srows[0]['metric'])}; "
                  f"{_seeds_line(srows)}", ""]
        note = _size_note(results, suite)
        if note:
            lines += [note, ""]
        lines += ["| task | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for task in dict.fromkeys(r["task"] for r in srows):
            cells = [fmt_cell(r, n_max) for r in srows if r["task"] == task]
            lines.append(f"| {task} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _selection_line2(rows: list[dict]) -> str:
    ns = sorted({r["candidates"] for r in rows if r["candidates"] is not None})
    if ns in ([], [1]):
        return ("Selection: 1 candidate per decision, taken as sampled (not ranked: no "
                "greedy selection by Q).")
    return (f"Selection: {'/'.join(map(str, ns))} candidates per decision, the plan of "
            "highest value under the task's IQL critic (greedy by Q).")


def _selection_line3(rows: list[dict], results: list[dict]) -> str:
    ns = sorted({r["candidates"] for r in rows if r["candidates"] is not None})
    rules = {((r.get("evals") or {}).get("reference_idql") or {}).get("selection")
             for r in results if r.get("model") == "dp" and r.get("selection")}
    rules.discard(None)
    idql = {"idql_greedy": "the candidate of highest Q (greedy by Q)",
            "idql_softmax": "a candidate drawn ∝ softmax(Q) (not greedy)"}
    how = "; ".join(idql.get(s, s) for s in sorted(rules)) or idql["idql_greedy"]
    return (f"Selection: {'/'.join(map(str, ns)) or 'N'} candidates per decision; "
            f"expectation: their mean action; IDQL: {how} under the task's IQL critic.")


# ----------------------------------------------------------------------------- figures
def plot_table(rows: list[dict], title: str, path: str | Path) -> None:
    """Grouped bars, reference vs aligned (± std over seeds), one group per column, one
    panel per (suite, task)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = list(dict.fromkeys((r["suite"], r["task"]) for r in rows))
    ncols = max(1, min(3, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    width = max((len({r["column"] for r in rows if r["suite"] == s}) for s, _ in panels),
                default=1)
    fig = Figure(figsize=(max(4.0, 1.0 * width + 1.5) * ncols, 3.4 * nrows + 0.4), dpi=90)
    FigureCanvasAgg(fig)
    fig.suptitle(title, fontsize=10)
    if not panels:
        ax = fig.add_subplot(1, 1, 1)
        ax.axis("off")
        ax.text(0.5, 0.5, "no finished cells", ha="center", va="center")
    for i, (suite, task) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        prow = [r for r in rows if (r["suite"], r["task"]) == (suite, task)]
        for j, (short, label, color) in enumerate((("ref", "reference", "#9aa9bd"),
                                                   ("aligned", "aligned", "#1f4e8c"))):
            xs, ys, es = [], [], []
            for k, r in enumerate(prow):
                if r[f"{short}_mean"] is None:
                    continue
                xs.append(k + (j - 0.5) * 0.38)
                ys.append(r[f"{short}_mean"])
                es.append(r[f"{short}_std"] or 0.0)
            ax.bar(xs, ys, width=0.38, yerr=es, color=color, label=label, capsize=2)
        ax.set_xticks(range(len(prow)))
        ax.set_xticklabels([r["column"].replace(" (", "\n(").replace("Diffuser ", "Diffuser\n")
                            for r in prow], fontsize=6)
        ax.set_title(f"{suite}/{task}", fontsize=9)
        ax.set_ylabel(METRIC_LABELS.get(suite, "score"), fontsize=7)
        if i == 0:
            ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


# ----------------------------------------------------------------------------- files
def _csv_value(v) -> str:
    if v is None:
        return ""
    if isinstance(v, list):
        return " ".join(str(x) for x in v)
    return repr(v) if isinstance(v, float) else str(v)


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in rows:
        w.writerow([_csv_value(r[c]) for c in CSV_COLUMNS])
    return buf.getvalue()


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_tables(out: str | Path) -> list[Path]:
    """Write ``table2``/``table3`` (``.md``, ``.csv``, ``.png``) from ``out/cells``; returns
    the paths written (nothing when no cell has finished)."""
    out = Path(out)
    results = load_results(out)
    if not results:
        return []
    t2, t3 = table2_rows(results), table3_rows(results)
    planners = [r for r in results if r.get("model") in PLANNERS]
    dp = [r for r in results if r.get("model") == "dp" and r.get("selection")]
    md2 = _markdown("Table 2: planners, reference → aligned", _selection_line2(t2), t2,
                    planners, "(no Diffuser or Decision Diffuser cells)")
    md3 = _markdown("Table 3: Diffusion Policy, expectation vs IDQL selection, "
                    "reference → aligned", _selection_line3(t3, results), t3, dp,
                    "(no Diffusion Policy cells)")
    files = []
    for name, md, rows, title in (("table2", md2, t2, "Table 2: planners"),
                                  ("table3", md3, t3, "Table 3: Diffusion Policy")):
        _write_text(out / f"{name}.md", md)
        _write_text(out / f"{name}.csv", _csv(rows))
        plot_table(rows, title, out / f"{name}.png")
        files += [out / f"{name}.md", out / f"{name}.csv", out / f"{name}.png"]
    return files
