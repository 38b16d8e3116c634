"""Where an aligned Nav1D model falls short of its critic: dataset states vs visited states.

Given a finished ``diffalign run nav1d --out DIR`` (foundation, critic and ``align/adapter``),
this rolls the aligned model out (one candidate per decision) and, on the states it visits
and on held-out dataset states, compares its first action with the critic's argmax over a
grid of actions and with the reference's best of N samples::

    python benchmarks/alignment_gap.py runs/nav1d [--episodes 50] [--candidates 64]

Per band of time steps it prints the mean Q of the aligned action, of the critic's argmax
and of the reference's best-of-N and one sample; ``|a-a*|``, the distance of the aligned
action from the argmax; and ``spread``, the std of the aligned model's first action over 8
samples of one state; ``regret*`` and ``regret*(a*)``, how much return the aligned action
and the critic's argmax lose against the optimal action by the true Q* of the layout (the
dynamic-programming solution). The alignment methods optimise the critic on their conditions;
the return comes from the states the model visits. The last two columns once showed
why a layout-5 run stayed below its critic: on the states the model visited, its regret was
2.3x the argmax's, on dataset states 1.4x (hence ``align/conditions.py``).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch

BANDS = 4


def _first_actions(model, obs, n, gen, net=None):
    with torch.no_grad():
        x0 = model.sample(obs[:, None], n=n, generator=gen, net=net).x0
        return model.actions_from_x(x0)[:, 0, 0].clamp(-1, 1).view(len(obs), n)


def _true_regret(sol, obs, actions, horizon):
    """Q*(s, a*) - Q*(s, a) of the layout's DP solution, per state."""
    x = obs[:, 0].numpy().astype(np.float64)
    t = np.rint(obs[:, 1].numpy() * horizon).astype(int)
    q = sol.q_values(x, t)
    got = np.array([np.interp(a, sol.actions, qi) for a, qi in zip(actions, q)])
    return q.max(1) - got


def _state_stats(model, critic, anet, obs, gen, candidates, grid, sol, horizon, chunk=256):
    """Per-state rows: Q(aligned), max Q, Q(best-of-N ref), Q(one ref), |a-a*|, spread,
    true regret of the aligned action and of the critic's argmax."""
    if len(obs) > chunk:  # bounded memory: N candidates per state are sampled at once
        return np.concatenate([_state_stats(model, critic, anet, obs[i:i + chunk], gen,
                                            candidates, grid, sol, horizon, chunk)
                               for i in range(0, len(obs), chunk)])
    n = len(obs)
    with torch.no_grad():
        a_al = _first_actions(model, obs, 8, gen, anet)
        q_al = critic.q(obs, a_al[:, :1])
        q_grid = critic.q(obs.repeat_interleave(len(grid), 0),
                          grid.repeat(n)[:, None]).view(n, len(grid))
        q_max, i_max = q_grid.max(1)
        a_ref = _first_actions(model, obs, candidates, gen)
        q_ref = critic.q(obs.repeat_interleave(candidates, 0),
                         a_ref.reshape(-1, 1)).view(n, candidates)
    return np.stack([q_al.numpy(), q_max.numpy(), q_ref.max(1).values.numpy(),
                     q_ref[:, 0].numpy(), (a_al[:, 0] - grid[i_max]).abs().numpy(),
                     a_al.std(1).numpy(), _true_regret(sol, obs, a_al[:, 0].numpy(), horizon),
                     _true_regret(sol, obs, grid[i_max].numpy(), horizon)], 1)


def _print_table(title, rows, steps, horizon):
    print(f"\n{title}")
    print(f"{'steps':>8} {'states':>6} {'Q(aligned)':>10} {'max Q':>7} {'Q(best)':>8} "
          f"{'Q(ref)':>7} {'capture':>7} {'|a-a*|':>7} {'spread':>7} {'regret*':>7} "
          f"{'regret*(a*)':>11}")
    width = horizon // BANDS
    for b in range(BANDS):
        m = (steps >= b * width) & (steps < (b + 1) * width)
        if not m.any():
            continue
        r = rows[m].mean(0)
        gap = r[1] - r[3]
        capture = (r[0] - r[3]) / gap if gap > 1e-9 else float("nan")
        print(f"{b * width:>3}-{(b + 1) * width - 1:<4} {int(m.sum()):>6} {r[0]:>10.3f} "
              f"{r[1]:>7.3f} {r[2]:>8.3f} {r[3]:>7.3f} {capture:>7.2f} {r[4]:>7.3f} "
              f"{r[5]:>7.3f} {r[6]:>7.3f} {r[7]:>11.3f}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="output directory of `diffalign run nav1d`")
    p.add_argument("--episodes", type=int, default=50)
    p.add_argument("--candidates", type=int, default=64, help="N of the reference's best-of-N")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    for name in ("episodes", "candidates"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")

    from diffalign.align.common import condition_pool
    from diffalign.align.lora import load_adapter
    from diffalign.align.online import history_states
    from diffalign.eval.evaluate import task_env
    from diffalign.eval.rollout import rollout
    from diffalign.models.base import ControlModel
    from diffalign.models.critic import load_critic
    from diffalign.tasks import resolve_task

    for sub in ("foundation", "critic", "align/adapter"):
        if not (args.run / sub).exists():
            sys.exit(f"error: {args.run / sub} not found; run `diffalign run nav1d --out "
                     f"{args.run}` first")
    model = ControlModel.load(args.run / "foundation").eval()
    critic = load_critic(args.run / "critic")
    if model.act_dim != 1 or model.spec.obs_history != 1:
        sys.exit("error: this check is written for Nav1D models with one action dimension and "
                 "an observation history of 1")
    anet = copy.deepcopy(model.net)
    load_adapter(anet, args.run / "align" / "adapter")
    anet.eval()
    meta = dict(model.meta)
    layout = int(meta.get("layout_seed", 0))
    horizon = int(meta.get("horizon", 32))
    grid = torch.linspace(-1, 1, 201)
    gen = torch.Generator().manual_seed(args.seed)

    make_env, _, optimum = task_env(meta)
    res = rollout(model, make_env, episodes=args.episodes, candidates=1, seed=args.seed,
                  net=anet, entropy_states=0)
    print(f"aligned model, one candidate: {100 * float(res.returns.mean()) / optimum:.1f}% of "
          f"the optimum ({args.episodes} episodes, layout {layout})")
    visited = history_states(res.trajectories, 1)[:, -1]
    from diffalign.envs.nav1d import nav1d_layout
    from diffalign.envs.nav1d_optimum import solve_layout

    sol = solve_layout(*nav1d_layout(layout, horizon))
    _print_table("states the aligned model visits",
                 _state_stats(model, critic, anet, visited, gen, args.candidates, grid, sol,
                              horizon),
                 np.rint(visited[:, 1].numpy() * horizon).astype(int), horizon)

    dataset = str(meta.get("dataset_kind", "full"))
    task = resolve_task(f"nav1d/{dataset}", layout_seed=layout, episodes=1000, seed=0)
    obs = condition_pool(task.episodes, 1, 512, seed=1)[:, -1]
    rows = _state_stats(model, critic, anet, obs, gen, args.candidates, grid, sol, horizon)
    _print_table(f"held-out dataset states (nav1d/{dataset})", rows,
                 np.rint(obs[:, 1].numpy() * horizon).astype(int), horizon)
    print("\ncapture = (Q(aligned) - Q(ref)) / (max Q - Q(ref)): the share of the critic's "
          "headroom the aligned model took")


if __name__ == "__main__":
    main()
