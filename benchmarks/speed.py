"""Each speed option against the plain fp32 eager path, as ratios, in one run.

    python benchmarks/speed.py [--device cpu|cuda] [--repeats 10] [--problems nav1d hopper]
                               [--threads N] [--json out.json]

Problems (the Diffuser, DDPM):
* ``nav1d``: the main job's model (temporal U-Net width 16, multipliers 1-2-4, horizon 16,
  the state as a Fourier-featured condition; ≈0.26M parameters);
* ``hopper``: a Hopper-sized Diffuser (obs 11 + act 3, horizon 32, width 32, multipliers
  1-2-4-8, kernel 5; ≈4M parameters, Janner's temporal U-Net).

Measured, each as the median of ``--repeats``:
* train step: ``model.loss`` forward + backward + AdamW at batch 64;
* decisions for one state: 64 candidates × 20 steps, 1 × 5 and 1 × 2 steps.

Options: ``plain`` (fp32, eager, torch's default AdamW: the reference every ratio divides),
``fusedadam`` (AdamW's fused kernel, as the project's trainer uses it), ``bf16`` (autocast to
bfloat16; on a CPU only where oneDNN has bf16 kernels, else skipped), ``compiled``
(decisions only: :func:`diffalign.policy.compile_denoisers`, TorchInductor with frozen
weights and the C++ wrapper; its compile time is printed apart) and ``compiled+bf16``
(``compile_denoisers(model, bf16=True)``: the compiled net under bfloat16 autocast, where
the kernels exist). A ratio above 1 is faster than plain. Runs unchanged on CUDA.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import time

import torch

from _timing import median_seconds
from diffalign.models.registry import build_model
from diffalign.models.selection import select_actions
from diffalign.nets import count_parameters
from diffalign.policy import compile_denoisers
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


def train_ms(model, ds, device, repeats: int, bf16: bool, fused: bool = False) -> float:
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

    return 1000 * median_seconds(step, repeats, device, warmup=2)


def decision_ms(model, device, repeats: int, candidates: int, steps: int,
                bf16: bool = False) -> float:
    obs = torch.zeros(1, model.spec.obs_history, model.obs_dim, device=device)
    g = torch.Generator().manual_seed(0)

    def decide():
        with torch.no_grad(), _autocast(bf16, device):
            select_actions(model, obs, candidates=candidates, steps=steps,
                           selection="first", generator=g)

    return 1000 * median_seconds(decide, repeats, device, warmup=2)


def bench(problem: str, device: torch.device, repeats: int) -> list[dict]:
    model, ds = _model(problem, device)
    bf16 = bf16_is_fast(str(device))
    rows = []
    plain = train_ms(model, ds, device, repeats, False)
    rows.append(dict(problem=problem, what="train step b64", option="plain", ms=plain))
    rows.append(dict(problem=problem, what="train step b64", option="fusedadam",
                     ms=train_ms(model, ds, device, repeats, False, fused=True), plain_ms=plain))
    if bf16:
        rows.append(dict(problem=problem, what="train step b64", option="bf16",
                         ms=train_ms(model, ds, device, repeats, True), plain_ms=plain))
        rows.append(dict(problem=problem, what="train step b64", option="bf16+fused",
                         ms=train_ms(model, ds, device, repeats, True, fused=True),
                         plain_ms=plain))
    compiled = {"compiled": compile_denoisers(copy.deepcopy(model))}
    if bf16:
        compiled["compiled+bf16"] = compile_denoisers(copy.deepcopy(model), bf16=True)
    for what, n, steps in DECISIONS:
        reps = max(3, repeats // 2) if n > 1 else 5 * repeats
        base = decision_ms(model, device, reps, n, steps)
        rows.append(dict(problem=problem, what=what, option="plain", ms=base))
        if bf16:
            rows.append(dict(problem=problem, what=what, option="bf16", plain_ms=base,
                             ms=decision_ms(model, device, reps, n, steps, bf16=True)))
        for option, fast in compiled.items():
            t0 = time.perf_counter()
            decision_ms(fast, device, 1, n, steps)  # compiles this batch size
            compile_s = time.perf_counter() - t0
            rows.append(dict(problem=problem, what=what, option=option, plain_ms=base,
                             ms=decision_ms(fast, device, reps, n, steps),
                             compile_s=compile_s))
    for r in rows:
        r["params"] = count_parameters(model.net)
        r["ratio"] = r.get("plain_ms", r["ms"]) / r["ms"]
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--problems", nargs="*", default=list(PROBLEMS), choices=list(PROBLEMS))
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu ({torch.get_num_threads()} threads)")
    rows = [r for p in args.problems for r in bench(p, device, args.repeats)]
    print(f"device: {name}; bf16 kernels: {bf16_is_fast(str(device))}; ratio = plain ms / "
          "option ms (>1: faster)")
    print(f"{'problem':7} {'params':>9} {'measure':15} {'option':13} {'ms':>9} {'ratio':>6} "
          f"{'compile s':>9}")
    for r in rows:
        cs = f"{r['compile_s']:.1f}" if "compile_s" in r else ""
        print(f"{r['problem']:7} {r['params']:>9,} {r['what']:15} {r['option']:13} "
              f"{r['ms']:>9.2f} {r['ratio']:>6.2f} {cs:>9}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
