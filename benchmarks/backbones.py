"""Backbone speed: train-step time and 20-step sampling time per preset.

    python benchmarks/backbones.py [--device cpu|cuda] [--repeats 20] [--json out.json]

Problem size: a Hopper-like trajectory, x_dim = 14 (11 obs + 3 act), horizon = 32; the MLP
preset is measured on the same flattened input. A train step is one DDPM loss forward,
backward and AdamW step at batch 64; sampling is 20 DDPM steps at batch 64 and at batch 1.
Figures are medians over ``--repeats`` runs after warm-up. Runs unchanged on CUDA.
"""

from __future__ import annotations

import argparse
import json

import torch

from _timing import median_seconds
from diffalign.nets import PRESETS, build_preset, count_parameters
from diffalign.processes import DDPM


def _median_ms(fn, repeats: int, device: torch.device) -> float:
    return 1000 * median_seconds(fn, repeats, device)


def bench_preset(preset: str, device: torch.device, repeats: int, x_dim: int = 14,
                 horizon: int = 32, batch: int = 64, steps: int = 20) -> dict:
    torch.manual_seed(0)
    net = build_preset(preset, x_dim=x_dim, horizon=horizon).to(device)
    process = DDPM(num_train_steps=100, default_steps=steps)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x0 = torch.randn(batch, horizon, x_dim, device=device)
    g = torch.Generator(device=device).manual_seed(0)

    def train_step():
        loss = process.loss(net, x0, generator=g)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sample(b):
        with torch.no_grad():
            process.sample(net, (b, horizon, x_dim), steps=steps, generator=g)

    return {
        "preset": preset,
        "params": count_parameters(net),
        "train_step_ms_b64": _median_ms(train_step, repeats, device),
        "sample20_ms_b64": _median_ms(lambda: sample(batch), repeats, device),
        "sample20_ms_b1": _median_ms(lambda: sample(1), repeats, device),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--presets", nargs="*", default=list(PRESETS))
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = [bench_preset(p, device, args.repeats) for p in args.presets]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {name}; x_dim=14, horizon=32; medians of {args.repeats}")
    print(f"{'preset':10} {'params':>10} {'train b64 ms':>13} {'sample20 b64 ms':>16} "
          f"{'sample20 b1 ms':>15}")
    for r in rows:
        print(f"{r['preset']:10} {r['params']:>10,} {r['train_step_ms_b64']:>13.1f} "
              f"{r['sample20_ms_b64']:>16.1f} {r['sample20_ms_b1']:>15.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
