"""Speed of the parts of ``diffalign run nav1d`` that decide its wall time, on this machine.

    python benchmarks/main_job_parts.py [--repeats 30] [--skip-parallel]

Prints, per line, a median over ``--repeats`` steps (after warm-up):
* one AdamW step over the foundation U-Net's parameters, plain and fused (``train.adam``);
* one training step of the run's foundation (Diffuser, Nav1D, batch 64) on 1 and 2 torch
  threads, and on 1 thread while a second process runs the same step (the run's layout:
  foundation and critic side by side, see ``diffalign/pipeline/jobs.py``);
* one SFT training step of the LoRA-adapted foundation (winners of batch 64, min-SNR x0
  loss, the adapter only) on 1 thread, with peft's LoRA forward and with the fused one
  (``align.lora.fuse_lora_forward``);
* one training step of the run's critic configurations on 1 and 2 threads: the max backup
  over a grid of 32 actions at width 256 (an earlier default), the refined grid of 8 + 8,
  and the default: two critics of width 128 with the refined grid.
The foundation trains on 200 Nav1D episodes, the critic on random Nav1D-shaped batches;
nothing is written.
"""

from __future__ import annotations

import argparse
import multiprocessing

import torch

from _timing import median_seconds
from diffalign.recipes import NAV1D_PRESETS

_RECIPE = NAV1D_PRESETS["default"]
COND_FOURIER, CRITIC_DEPTH = _RECIPE.cond_fourier, _RECIPE.critic_depth
CRITIC_BACKUP = {k: getattr(_RECIPE, f"covered_{k}") for k in (
    "backup_actions", "backup_refine", "backup_states", "backup_proposals", "backup_select")}

CPU = torch.device("cpu")


def _episodes():
    from diffalign.tasks import resolve_task

    return resolve_task("nav1d/full", layout_seed=0, episodes=200).episodes


def foundation_step(repeats: int) -> float:
    """Median seconds of one foundation training step (loss, backward, fused AdamW)."""
    from diffalign.models.registry import build_model
    from diffalign.train.trainer import adam

    torch.manual_seed(0)
    model = build_model("diffuser", "ddpm", None, obs_dim=2, act_dim=1,
                        state_cond=True, cond_fourier=COND_FOURIER)
    data = model.make_dataset(_episodes())
    opt = adam(model.parameters(), lr=1e-4, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)

    def step():
        loss = model.loss(data.sample(64, gen), generator=gen)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()

    return median_seconds(step, repeats, CPU)


def lora_step(repeats: int, fused: bool) -> float:
    """Median seconds of one SFT step of the adapted foundation (loss, backward, fused AdamW
    over the adapter)."""
    from peft.tuners.lora import layer as peft_layer

    from diffalign.align.common import condition_pool, expand_condition, freeze
    from diffalign.align.lora import add_lora, lora_parameters
    from diffalign.models.registry import build_model
    from diffalign.train.trainer import adam

    torch.manual_seed(0)
    model = build_model("diffuser", "ddpm", None, obs_dim=2, act_dim=1,
                        state_cond=True, cond_fourier=COND_FOURIER)
    episodes = _episodes()
    model.make_dataset(episodes)  # fits the normalisers
    freeze(model)
    net = add_lora(model.net, r=8, alpha=16.0)
    if not fused:
        for m in net.modules():
            for cls in (peft_layer.Conv1d, peft_layer.Linear):
                if isinstance(m, cls):
                    m.__class__ = cls
    opt = adam(lora_parameters(net), lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    states = condition_pool(episodes, model.spec.obs_history, 64, seed=0)
    x = model.sample(states, n=1, generator=gen, net=net).x0
    cond, inpaint, shape = expand_condition(model, states, 1)
    known = inpaint.mask.expand(shape)

    def step():
        loss = model.process.min_snr_x0_loss(net, x, cond=cond, known=known, gamma=5.0,
                                              generator=gen)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()

    return median_seconds(step, repeats, CPU)


def _foundation_one_thread(repeats: int) -> float:
    torch.set_num_threads(1)
    return foundation_step(repeats)


def critic_step(repeats: int, **kw) -> float:
    """Median seconds of one training step of ``CriticConfig(**kw)`` (all members)."""
    from diffalign.models.critic import CriticConfig, CriticEnsemble, IQLCritic
    from diffalign.train.trainer import adam

    torch.manual_seed(0)
    cfg = CriticConfig(depth=CRITIC_DEPTH, **kw)
    e = cfg.ensemble
    critic = IQLCritic(2, 1, cfg) if e == 1 else CriticEnsemble(2, 1, cfg)
    opt = adam(critic.trainable_parameters(), lr=3e-4, weight_decay=0.0)

    def batch():
        return {"observations": torch.rand(256, 2) * 2 - 1, "actions": torch.rand(256, 1) * 2 - 1,
                "rewards": torch.randn(256), "next_observations": torch.rand(256, 2) * 2 - 1,
                "dones": torch.zeros(256)}

    def step():
        loss = critic.loss([batch() for _ in range(e)] if e > 1 else batch())["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        critic.update_target()

    return median_seconds(step, repeats, CPU)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--skip-parallel", action="store_true",
                    help="skip the two-process foundation measurement")
    a = ap.parse_args()
    threads = torch.get_num_threads()

    from diffalign.models.registry import build_model
    params = [p for p in build_model("diffuser", "ddpm", None, obs_dim=2, act_dim=1,
                                     state_cond=True, cond_fourier=COND_FOURIER).parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    for fused in (None, True):
        opt = torch.optim.AdamW(params, lr=1e-4, fused=fused)
        ms = 1e3 * median_seconds(opt.step, a.repeats, CPU)
        print(f"AdamW step, foundation U-Net ({sum(p.numel() for p in params)} parameters), "
              f"{'fused' if fused else 'plain'}: {ms:.1f} ms", flush=True)

    for t in (1, threads):
        torch.set_num_threads(t)
        print(f"foundation train step, {t} thread(s): {1e3 * foundation_step(a.repeats):.1f} ms",
              flush=True)
    if not a.skip_parallel:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(2) as pool:
            two = pool.map(_foundation_one_thread, [a.repeats, a.repeats])
        print(f"foundation train step, 1 thread, two processes at once: "
              f"{1e3 * two[0]:.1f} / {1e3 * two[1]:.1f} ms", flush=True)

    torch.set_num_threads(1)
    for fused in (False, True):
        print(f"SFT step of the adapted foundation, 1 thread, "
              f"{'fused LoRA forward' if fused else 'peft LoRA forward'}: "
              f"{1e3 * lora_step(a.repeats, fused):.1f} ms", flush=True)

    grid32 = dict(CRITIC_BACKUP, backup_actions=32, backup_refine=0)
    for name, kw in (("width 256, grid of 32 (an earlier default)", dict(grid32, hidden=256)),
                     ("width 256, grid of 8 + 8", dict(CRITIC_BACKUP, hidden=256)),
                     ("two critics, width 256, grid of 32 (an earlier option)",
                      dict(grid32, hidden=256, ensemble=2)),
                     ("two critics, width 128, grid of 8 + 8 (the default)",
                      dict(CRITIC_BACKUP, hidden=128, ensemble=2))):
        for t in (1, threads):
            torch.set_num_threads(t)
            print(f"critic train step, {name}, {t} thread(s): "
                  f"{1e3 * critic_step(a.repeats, **kw):.1f} ms", flush=True)


if __name__ == "__main__":
    main()
