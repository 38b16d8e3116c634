"""Each speed option against the plain fp32 eager path, as ratios, in one run.

    python benchmarks/speed.py [--device cpu|cuda] [--repeats 5] [--rounds 5]
                               [--problems nav1d hopper] [--threads N] [--json out.json]

Problems (the Diffuser, DDPM):
* ``nav1d``: the main job's model (temporal U-Net width 16, multipliers 1-2-4, horizon 16,
  the state as a Fourier-featured condition; ≈0.26M parameters);
* ``hopper``: a Hopper-sized Diffuser (obs 11 + act 3, horizon 32, width 32, multipliers
  1-2-4-8, kernel 5; ≈4M parameters, Janner's temporal U-Net).

Measured in ``--rounds`` rounds, each timing every option in turn (the median of
``--repeats`` calls; one-candidate decisions 5× as many); an option's ratio is the median
over rounds of the plain path's time over its own in the same round:
* train step: ``model.loss`` forward + backward + AdamW at batch 64;
* decisions for one state: 64 candidates × 20 steps, 1 × 5 and 1 × 2 steps.

Options: ``plain`` (fp32, eager, torch's default AdamW: the reference every ratio divides),
``fusedadam`` (AdamW's fused kernel, as the project's trainer uses it), ``bf16`` (autocast to
bfloat16; on a CPU only where oneDNN has bf16 kernels, else skipped), and for decisions the
compiled denoisers of :mod:`diffalign.compiled` (compile times printed apart):
``compiled-own`` (``channels_last=False``: the networks' own layout at every batch size),
``compiled`` (the default: on a CPU the channels-last frozen form from
:data:`~diffalign.compiled.WIDE_WORK` rows × parameters up) and ``compiled+bf16``
(``bf16=True``: that form under bfloat16 autocast, where the kernels exist). A ratio above 1
is faster than plain. Runs unchanged on CUDA.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import time

import torch

from _timing import median_seconds, sync
from diffalign.compiled import compile_denoisers
from diffalign.models.registry import build_model
from diffalign.models.selection import select_actions
from diffalign.nets import count_parameters
from diffalign.train.trainer import bf16_is_fast
from models import _random_episodes

PROBLEMS = {
    "nav1d": dict(obs_dim=2, act_dim=1, over=dict(
        horizon=16, state_cond=True, cond_fourier=16,
        backbone_kwargs={"dim": 16, "dim_mults": [1, 2, 4], "kernel_size": 5})),
    "hopper": dict(obs_dim=11, act_dim=3, over=dict(
        horizon=32, backbone_kwargs={"dim": 32, "dim_mults": [1, 2, 4, 8], "kernel_size": 5})),
}
DECISIONS = (("64x20", 64, 20), ("1x5", 1, 5), ("1x2", 1, 2))


def _model(problem: str, device: torch.device):
    p = PROBLEMS[problem]
    torch.manual_seed(0)
    model = build_model("diffuser", "ddpm", None, obs_dim=p["obs_dim"], act_dim=p["act_dim"],
                        process_kwargs={"default_steps": 20}, **p["over"]).to(device)
    ds = model.make_dataset(_random_episodes(p["obs_dim"], p["act_dim"]))
    return model.eval(), ds


def _autocast(on: bool, device: torch.device):
    return (torch.autocast(device.type, dtype=torch.bfloat16) if on
            else contextlib.nullcontext())


def train_step(model, ds, device, bf16: bool, fused: bool = False):
    """One training step of a copy of ``model`` (forward, backward, AdamW), as a callable."""
    model = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused or None)
    g = torch.Generator().manual_seed(0)
    batch = ds.sample(64, g)

    def step():
        with _autocast(bf16, device):
            loss = model.loss(batch, generator=g)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def decision(model, device, candidates: int, steps: int, bf16: bool = False):
    """One decision for one state (``candidates`` × ``steps``), as a callable."""
    obs = torch.zeros(1, model.spec.obs_history, model.obs_dim, device=device)
    g = torch.Generator().manual_seed(0)

    def decide():
        with torch.no_grad(), _autocast(bf16, device):
            select_actions(model, obs, candidates=candidates, steps=steps,
                           selection="first", generator=g)

    return decide


def interleaved(fns: dict, device, rounds: int, repeats: int) -> dict:
    """``{option: (median ms, median ratio)}``: each round times every option (the median
    of ``repeats`` calls) one after the other, and the ratio is the plain path's time over
    the option's in the same round, so a machine whose speed drifts between rounds moves
    both sides of each ratio alike. The first call of each option (a compilation) is
    timed apart as ``compile_s``."""
    compile_s = {}
    for k, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        sync(device)
        compile_s[k] = time.perf_counter() - t0
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(1000 * median_seconds(fn, repeats, device, warmup=1))
    base = times["plain"]
    return {k: dict(ms=statistics.median(v), compile_s=compile_s[k],
                    ratio=statistics.median(b / x for b, x in zip(base, v)))
            for k, v in times.items()}


def bench(problem: str, device: torch.device, repeats: int, rounds: int) -> list[dict]:
    model, ds = _model(problem, device)
    bf16 = bf16_is_fast(str(device))
    compiled = {"compiled-own": compile_denoisers(copy.deepcopy(model), channels_last=False),
                "compiled": compile_denoisers(copy.deepcopy(model))}
    if bf16:
        compiled["compiled+bf16"] = compile_denoisers(copy.deepcopy(model), bf16=True)
    measures = {"train step b64": {
        "plain": train_step(model, ds, device, False),
        "fusedadam": train_step(model, ds, device, False, fused=True),
        **({"bf16": train_step(model, ds, device, True),
            "bf16+fused": train_step(model, ds, device, True, fused=True)} if bf16 else {})}}
    for what, n, steps in DECISIONS:
        measures[what] = {"plain": decision(model, device, n, steps),
                          **({"bf16": decision(model, device, n, steps, bf16=True)}
                             if bf16 else {}),
                          **{k: decision(m, device, n, steps) for k, m in compiled.items()}}
    rows = []
    for what, fns in measures.items():
        reps = repeats if what.startswith("train") or what.startswith("64") else 5 * repeats
        for option, r in interleaved(fns, device, rounds, reps).items():
            rows.append(dict(problem=problem, what=what, option=option,
                             params=count_parameters(model.net), **r))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5, help="calls per option and round")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of every option in turn")
    ap.add_argument("--problems", nargs="*", default=list(PROBLEMS), choices=list(PROBLEMS))
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu ({torch.get_num_threads()} threads)")
    rows = [r for p in args.problems for r in bench(p, device, args.repeats, args.rounds)]
    print(f"device: {name}; bf16 kernels: {bf16_is_fast(str(device))}; ratio = plain ms / "
          "option ms (>1: faster)")
    print(f"{'problem':7} {'params':>9} {'measure':15} {'option':13} {'ms':>9} {'ratio':>6} "
          f"{'compile s':>9}")
    for r in rows:
        cs = f"{r['compile_s']:.1f}" if r["option"].startswith("compiled") else ""
        print(f"{r['problem']:7} {r['params']:>9,} {r['what']:15} {r['option']:13} "
              f"{r['ms']:>9.2f} {r['ratio']:>6.2f} {cs:>9}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
