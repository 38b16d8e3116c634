"""Models × processes on Nav1D: train each combination, evaluate it, print a Markdown table.

    python benchmarks/nav1d_grid.py --out runs/grid [--task nav1d/expert] [--steps 1500]
        [--episodes 50] [--candidates 1] [--critic DIR] [--kinds diffuser dd dp]
        [--processes ddpm ddim sm fm] [--synther]

Resumable: a combination whose ``eval.json`` exists is not trained again. ``--synther`` adds
SynthER rows (generator per process, then an IQL agent on real + synthetic data).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/grid"))
    ap.add_argument("--task", default="nav1d/expert")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--candidates", type=int, default=1)
    ap.add_argument("--critic", type=Path, default=None)
    ap.add_argument("--kinds", nargs="*", default=["diffuser", "dd", "dp"])
    ap.add_argument("--processes", nargs="*", default=["ddpm", "ddim", "sm", "fm"])
    ap.add_argument("--synther", action="store_true")
    args = ap.parse_args()

    from diffalign.commands.train import TrainArgs, train_model
    from diffalign.eval.evaluate import evaluate

    rows = []
    for kind in args.kinds:
        for proc in args.processes:
            d = args.out / f"{kind}-{proc}"
            ej = d / "eval.json"
            if not ej.exists():
                t0 = time.perf_counter()
                model, _, _ = train_model(TrainArgs(out=d, task=args.task, model=kind,
                                                    process=proc, steps=args.steps,
                                                    progress=False))
                train_s = time.perf_counter() - t0
                res = evaluate(model, critic=args.critic, episodes=args.episodes,
                               candidates=args.candidates, out_dir=d)
                res["train_seconds"] = train_s
                ej.write_text(json.dumps(res, indent=2))
            res = json.loads(ej.read_text())
            rows.append((kind, proc, res))
            print(f"{kind}/{proc}: {res['return_mean']:.2f} ({res['normalized']:.1f}%)",
                  flush=True)
    if args.synther:
        from diffalign.models.synther import train_synther_main

        for proc in args.processes:
            d = args.out / f"synther-{proc}"
            ej = d / "eval_synther.json"
            if not ej.exists():
                train_synther_main(TrainArgs(out=d, task=args.task, model="synther",
                                             process=proc, steps=args.steps, progress=False))
            res = json.loads(ej.read_text())
            rows.append(("synther", proc, res))

    print(f"\nNav1D {args.task}, {args.steps} training steps, {args.episodes} episodes, "
          f"{args.candidates} candidate(s)\n")
    print("| model | process | return | % of optimum | coherency | entropy | decisions/s "
          "| train s |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, proc, r in rows:
        if kind == "synther":
            aug, real = r["eval/real_plus_synthetic"], r["eval/real_only"]
            print(f"| synther: IQL on real+synthetic (real only: {real['return_mean']:.2f}) | "
                  f"{proc} | {aug['return_mean']:.2f} ± {aug['return_std']:.2f} | "
                  f"{aug['normalized_score_mean']:.1f} | | | | "
                  f"{r['timing_s']['total']:.0f} |")
            continue
        coh = "n/a" if r["coherency"] is None else f"{r['coherency']:.3f}"
        ent = "n/a" if r["entropy"] is None else f"{r['entropy']:.2f}"
        print(f"| {kind} | {proc} | {r['return_mean']:.2f} ± {r['return_std']:.2f} | "
              f"{r['normalized']:.1f} | {coh} | {ent} | {r['decisions_per_s']:.1f} | "
              f"{r.get('train_seconds', float('nan')):.0f} |")


if __name__ == "__main__":
    main()
