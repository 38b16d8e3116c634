"""How well a critic ranks actions on Nav1D, where the optimum is known exactly.

:func:`nav1d_greedy_return` is the critic's ceiling (the return of its greedy policy), which
``diffalign critic`` and the pipeline report on Nav1D tasks; :func:`nav1d_critic_check`
compares its Q of the optimal and of random actions on the dataset's states.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["nav1d_critic_check", "nav1d_greedy_return"]


def nav1d_critic_check(critic: Any, episodes: Any, layout_seed: int = 0, seed: int = 0
                       ) -> dict[str, float]:
    """How well a critic ranks actions on Nav1D data.

    ``frac_opt_over_random``: fraction of dataset states where ``Q(s, π*(s)) > Q(s, a)``
    with ``a ~ U(−1, 1)`` (``π*`` the DP-optimal policy); ``v_start``: mean ``V`` over the
    episodes' first observations; ``v_star_start``: mean DP optimum ``V*`` there (undiscounted).
    """
    import torch

    from diffalign.envs.nav1d_optimum import nav1d_optimum

    opt = nav1d_optimum(layout_seed=layout_seed)
    obs = episodes.observations
    a_opt = opt["policy"](obs)
    a_rand = np.random.default_rng(seed).uniform(-1, 1, size=a_opt.shape).astype(np.float32)
    with torch.no_grad():
        q_opt = critic.q(obs, a_opt).cpu().numpy()
        q_rand = critic.q(obs, a_rand).cpu().numpy()
        s0 = obs[episodes.starts]
        v0 = critic.v(s0).cpu().numpy()
    return {
        "frac_opt_over_random": float((q_opt > q_rand).mean()),
        "v_start": float(v0.mean()),
        "v_star_start": float(opt["solution"].value(s0[:, 0]).mean()),
    }


def nav1d_greedy_return(critic: Any, layout_seed: int = 0, episodes: int = 200,
                        n_actions: int = 201, seed: int = 0) -> dict[str, float]:
    """Return of the critic's greedy policy ``argmax_a Q(s, a)`` (over ``n_actions`` evenly
    spaced actions in [-1, 1]) on Nav1D, from ``episodes`` uniform starts.

    Any one-candidate policy aligned to this critic is bounded by about this return: it is
    the critic's ceiling. ``greedy_normalized`` is the percentage of the DP optimum.
    """
    import torch

    from diffalign.align.conditions import action_proposals, greedy_actions
    from diffalign.envs.nav1d import dynamics, nav1d_layout, reward
    from diffalign.envs.nav1d_optimum import nav1d_optimum

    mu, sigma = nav1d_layout(layout_seed)
    horizon = len(mu)
    optimum = float(nav1d_optimum(layout_seed=layout_seed)["optimal_return"])
    x = np.random.default_rng(seed).uniform(-1, 1, episodes)
    box = torch.ones(1)
    grid = action_proposals(episodes, n_actions, -box, box, torch.Generator())
    ret = np.zeros(episodes)
    for t in range(horizon):
        obs = torch.as_tensor(np.stack([x, np.full(episodes, t / horizon)], 1),
                              dtype=torch.float32)
        best = greedy_actions(critic, obs, grid)[:, 0].numpy().astype(np.float64)
        x_next = dynamics(x, best)
        ret += reward(x_next, np.full(episodes, t), mu, sigma)
        x = x_next
    return {"greedy_return": float(ret.mean()),
            "greedy_normalized": 100.0 * float(ret.mean()) / optimum}
