"""Control-model speed: training samples/s and decision latency, Nav1D and Hopper-sized.

    python benchmarks/models.py [--device cpu|cuda] [--repeats 10] [--json out.json]

For each model kind (diffuser, dd, dp) with its default process and backbone:
* Nav1D sizes (obs 2, act 1; the registry defaults), and
* a Hopper-sized problem (obs 11, act 3, horizon 32). For the Diffuser this is the
  Janner-style temporal U-Net (base width 32, multipliers 1-2-4-8, kernel 5, ≈4M parameters;
  Janner's locomotion configuration — multipliers 1-2-2-2 at width 32 are only ≈0.7M here).

A training step is ``model.loss`` forward + backward + AdamW at batch 64 on random normalised
data; a decision is ``select_actions`` for one state with 64 candidates and 20 DDPM steps
(16 for the others' defaults where noted). Medians over ``--repeats``; runs unchanged on CUDA.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from _timing import median_seconds
from diffalign.data.episodes import Episodes
from diffalign.models.registry import build_model
from diffalign.models.selection import select_actions
from diffalign.nets import count_parameters


def _random_episodes(obs_dim, act_dim, n_episodes=20, length=64, seed=0):
    rng = np.random.default_rng(seed)
    n = n_episodes * length
    obs = rng.standard_normal((n, obs_dim)).astype(np.float32)
    timeouts = np.zeros(n, dtype=bool)
    timeouts[length - 1::length] = True
    return Episodes.from_arrays(observations=obs, actions=rng.uniform(-1, 1, (n, act_dim)),
                                rewards=rng.standard_normal(n), terminals=np.zeros(n, bool),
                                timeouts=timeouts, next_observations=obs)


def bench(kind, problem, device, repeats, candidates=64, steps=20, batch=64):
    if problem == "nav1d":
        obs_dim, act_dim, over = 2, 1, {}
    else:
        obs_dim, act_dim = 11, 3
        over = {"horizon": 32}
        if kind in ("diffuser", "dd"):
            over["backbone_kwargs"] = {"dim": 32, "dim_mults": [1, 2, 4, 8], "kernel_size": 5}
        else:
            over["horizon"] = 16
    torch.manual_seed(0)
    process_kwargs = {"default_steps": steps} if kind != "dp" else {}
    model = build_model(kind, "ddpm", None, obs_dim=obs_dim, act_dim=act_dim,
                        process_kwargs=process_kwargs, **over).to(device)
    ds = model.make_dataset(_random_episodes(obs_dim, act_dim))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    batch_data = ds.sample(batch, g)

    def train_step():
        loss = model.loss(batch_data, generator=g)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    obs = torch.zeros(1, model.spec.obs_history, obs_dim, device=device)

    def decide():
        with torch.no_grad():
            select_actions(model, obs, candidates=candidates, steps=steps,
                           selection="first" if kind != "dp" else "expectation", generator=g)

    t_train = median_seconds(train_step, repeats, device, warmup=2)
    t_dec = median_seconds(decide, max(3, repeats // 2), device, warmup=2)
    return {"kind": kind, "problem": problem, "params": count_parameters(model.net),
            "train_step_ms": 1000 * t_train, "train_samples_per_s": batch / t_train,
            "decision_ms": 1000 * t_dec, "candidates": candidates, "denoise_steps": steps}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--kinds", nargs="*", default=["diffuser", "dd", "dp"])
    ap.add_argument("--problems", nargs="*", default=["nav1d", "hopper"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    rows = [bench(k, p, device, args.repeats) for p in args.problems for k in args.kinds]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {name}; DDPM; decision = 64 candidates x 20 steps for one state")
    print(f"{'problem':8} {'kind':9} {'params':>10} {'train ms':>9} {'samples/s':>10} "
          f"{'decision ms':>12}")
    for r in rows:
        print(f"{r['problem']:8} {r['kind']:9} {r['params']:>10,} {r['train_step_ms']:>9.1f} "
              f"{r['train_samples_per_s']:>10.0f} {r['decision_ms']:>12.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
