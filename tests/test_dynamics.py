"""The learned dynamics model and the conditions from greedy rollouts through it."""

import numpy as np
import pytest
import torch

from diffalign.align.conditions import (
    RolloutConditions,
    action_proposals,
    greedy_actions,
    greedy_rollouts,
    mix_rollout_states,
)
from diffalign.envs.nav1d import dynamics as nav1d_step
from diffalign.models.dynamics import DynamicsConfig, DynamicsModel, train_dynamics
from diffalign.tasks import resolve_task
from diffalign.train.checkpoint import CheckpointError


@pytest.fixture(scope="module")
def task():
    return resolve_task("nav1d/full", episodes=100)


class TargetCritic(torch.nn.Module):
    """Q(s, a) = −(a − target(s))² with target = −x (go back toward 0, overshooting)."""

    def q(self, obs, act):
        obs, act = torch.as_tensor(obs), torch.as_tensor(act)
        return -((act[:, 0] + obs[:, 0]) ** 2)


class ExactNav1D(torch.nn.Module):
    """Nav1D's own step as a dynamics model: x' = clip(x + 0.1 a), t' = t + 1/32."""

    def forward(self, obs, act):
        obs, act = torch.as_tensor(obs), torch.as_tensor(act)
        x = (obs[:, 0] + 0.1 * act[:, 0]).clamp(-1, 1)
        return torch.stack([x, obs[:, 1] + 1 / 32], 1)


def test_dynamics_learns_nav1d_and_round_trips(task, tmp_path):
    model = train_dynamics(task.episodes, DynamicsConfig(steps=400, hidden=64, depth=2,
                                                         device="cpu"),
                           out_dir=tmp_path / "dyn", progress=False)
    rng = np.random.default_rng(0)
    x, a = rng.uniform(-0.9, 0.9, 512), rng.uniform(-1, 1, 512)
    obs = np.stack([x, rng.integers(0, 31, 512) / 32], 1).astype(np.float32)
    with torch.no_grad():
        pred = model(obs, a[:, None].astype(np.float32)).numpy()
    assert np.abs(pred[:, 0] - nav1d_step(x, a)).mean() < 0.01  # steps are 0.1 a
    assert np.abs(pred[:, 1] - (obs[:, 1] + 1 / 32)).mean() < 0.005
    loaded = DynamicsModel.load(tmp_path / "dyn")
    with torch.no_grad():
        torch.testing.assert_close(loaded(obs, a[:, None].astype(np.float32)),
                                   torch.as_tensor(pred))


def test_dynamics_refuses_bad_config_and_foreign_checkpoints(tmp_path):
    with pytest.raises(ValueError, match="steps"):
        DynamicsConfig(steps=0)
    with pytest.raises(ValueError, match="lr"):
        DynamicsConfig(lr=0.0)
    (tmp_path / "config.json").write_text('{"kind": "iql_critic"}')
    with pytest.raises(CheckpointError):
        DynamicsModel.load(tmp_path)


def test_action_proposals_grid_and_box():
    g = torch.Generator().manual_seed(0)
    grid = action_proposals(3, 5, torch.tensor([-2.0]), torch.tensor([2.0]), g)
    assert grid.shape == (3, 5, 1)
    torch.testing.assert_close(grid[1, :, 0], torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0]))
    box = action_proposals(4, 100, torch.tensor([0.0, -1.0]), torch.tensor([1.0, 0.0]), g)
    assert box.shape == (4, 100, 2)
    assert (box[..., 0] >= 0).all() and (box[..., 0] <= 1).all()
    assert (box[..., 1] >= -1).all() and (box[..., 1] <= 0).all()


def test_greedy_rollouts_follow_the_critics_argmax_through_the_dynamics():
    critic, dyn = TargetCritic(), ExactNav1D()
    obs = torch.tensor([[0.5, 0.0], [-0.25, 0.0]])
    acts = action_proposals(2, 201, torch.tensor([-1.0]), torch.tensor([1.0]),
                            torch.Generator())
    torch.testing.assert_close(greedy_actions(critic, obs, acts),
                               torch.tensor([[-0.5], [0.25]]))
    traj = greedy_rollouts(critic, dyn, obs, 3, 201, torch.tensor([-1.0]),
                           torch.tensor([1.0]), torch.Generator())
    assert traj.shape == (2, 4, 2)
    x = np.array([0.5, -0.25])
    for k in range(1, 4):  # a = -x each step: x <- 0.9 x (up to the grid's 0.01)
        x = x * 0.9
        np.testing.assert_allclose(traj[:, k, 0].numpy(), x, atol=0.005 * k)
        np.testing.assert_allclose(traj[:, k, 1].numpy(), k / 32, atol=1e-6)


def test_mix_rollout_states_replaces_a_share_with_histories(task):
    pool = torch.full((40, 2, 2), 7.0)  # marked dataset states, history of 2
    cfg = RolloutConditions(fraction=0.25, proposals=21, horizon=5)
    mixed, info = mix_rollout_states(pool, TargetCritic(), ExactNav1D(), task.episodes, 2, cfg,
                                     seed=0)
    assert mixed.shape == pool.shape
    assert info["rollout_states"] == 10 and info["dataset_states"] == 30
    assert info["rollout_horizon"] == 5
    assert (mixed[10:] == 7.0).all() and (mixed[:10] != 7.0).all()
    # each row's history is the previous step of its rollout (or the start, repeated)
    t_prev, t_now = mixed[:10, 0, 1], mixed[:10, 1, 1]
    step = torch.round((t_now - t_prev) * 32)
    assert set(step.tolist()) <= {0.0, 1.0}
    assert ((t_now * 32).round() < 5).all()  # states before the horizon's last
    with pytest.raises(ValueError, match="fraction"):
        RolloutConditions(fraction=0.0)


def test_nav1d_greedy_return_of_the_true_q_is_the_optimum():
    """The critic-ceiling check (``nav1d_greedy_return``) searches actions with
    ``greedy_actions``: a critic that is the DP's own Q* must reach the optimum."""
    from diffalign.commands.critic import nav1d_greedy_return
    from diffalign.envs.nav1d import nav1d_layout
    from diffalign.envs.nav1d_optimum import solve_layout

    sol = solve_layout(*nav1d_layout(3))

    class TrueQ(torch.nn.Module):
        def q(self, obs, act):
            obs, act = torch.as_tensor(obs).double().numpy(), torch.as_tensor(act).numpy()
            t = np.rint(obs[:, 1] * 32).astype(int)
            q = sol.q_values(obs[:, 0], t)
            i = np.abs(sol.actions[None, :] - act[:, :1]).argmin(1)
            return torch.as_tensor(q[np.arange(len(q)), i])

    res = nav1d_greedy_return(TrueQ(), layout_seed=3, episodes=100)
    assert res["greedy_normalized"] > 97.0
