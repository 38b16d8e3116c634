"""IQL critic and agent: the loss formulas by hand, gradient isolation, Polyak, checkpoints,
data handling and a seconds-long learnability check on Nav1D."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from diffalign.data.episodes import Episodes
from diffalign.data.nav1d_datasets import generate_nav1d_dataset, nav1d_dataset_attrs, to_episodes
from diffalign.data.normalizer import NormalizerSet
from diffalign.models.critic import (
    CriticConfig,
    CriticEnsemble,
    IQLCritic,
    awr_weights,
    expectile_loss,
    iql_q_loss,
    iql_value_loss,
    load_critic,
    train_critic,
    transitions_from_episodes,
)
from diffalign.models.iql_agent import IQLAgent, IQLAgentConfig, awr_actor_loss, train_iql_agent
from diffalign.train.checkpoint import CheckpointError

TINY = dict(hidden=32, depth=2, steps=5, batch_size=16, log_every=1000)


def _batch(n: int = 8, obs_dim: int = 2, act_dim: int = 1, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "observations": torch.randn(n, obs_dim, generator=g),
        "actions": torch.rand(n, act_dim, generator=g) * 2 - 1,
        "rewards": torch.rand(n, generator=g),
        "next_observations": torch.randn(n, obs_dim, generator=g),
        "dones": (torch.rand(n, generator=g) < 0.3).float(),
    }


def _critic(seed: int = 0, **kw) -> IQLCritic:
    torch.manual_seed(seed)
    return IQLCritic(2, 1, CriticConfig(**{**TINY, **kw}))


def _grads(module: nn.Module) -> list:
    return [p.grad for p in module.parameters()]


def _nav1d(episodes: int, kind: str = "full", seed: int = 0) -> Episodes:
    data = generate_nav1d_dataset(kind, episodes=episodes, seed=seed)
    return to_episodes(data, nav1d_dataset_attrs(kind, seed=seed, episodes=episodes))


# ------------------------------------------------------------------ pure losses
def test_expectile_loss_by_hand():
    diff = torch.tensor([-1.0, 2.0])
    assert expectile_loss(diff, 0.7).item() == pytest.approx((0.3 * 1 + 0.7 * 4) / 2)
    # tau = 0.5 is half the MSE
    d = torch.tensor([0.5, -3.0, 1.5])
    assert expectile_loss(d, 0.5).item() == pytest.approx(0.5 * (d**2).mean().item())


def test_value_loss_detaches_q():
    q = torch.tensor([1.0, 3.0], requires_grad=True)
    v = torch.tensor([2.0, 1.0], requires_grad=True)
    loss = iql_value_loss(q, v, 0.7)  # diff = q - v = [-1, 2]
    assert loss.item() == pytest.approx(1.55)
    loss.backward()
    assert q.grad is None
    # d/dv mean(w (q - v)^2) = -w (q - v) = [-(0.3)(-1), -(0.7)(2)]
    torch.testing.assert_close(v.grad, torch.tensor([0.3, -1.4]))


def test_q_loss_by_hand():
    q1 = torch.tensor([1.0, 2.0], requires_grad=True)
    q2 = torch.tensor([0.0, 1.0], requires_grad=True)
    next_v = torch.tensor([2.0, 5.0], requires_grad=True)
    r, done = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    # target = [1 + 0.5 * 2, 0 + 0] = [2, 0]; q1 errors [-1, 2], q2 errors [-2, 1]
    loss = iql_q_loss(q1, q2, r, done, next_v, gamma=0.5)
    assert loss.item() == pytest.approx((1 + 4) / 2 + (4 + 1) / 2)
    loss.backward()
    assert next_v.grad is None
    torch.testing.assert_close(q1.grad, torch.tensor([-1.0, 2.0]))


def test_awr_weights_clip_and_detach():
    adv = torch.tensor([0.0, 1.0, 100.0, -2.0], requires_grad=True)
    w = awr_weights(adv, beta=2.0, max_weight=100.0)
    torch.testing.assert_close(w, torch.tensor([1.0, math.exp(2.0), 100.0, math.exp(-4.0)]))
    assert not w.requires_grad
    lp = torch.tensor([-1.0, -2.0, 0.5, 1.0], requires_grad=True)
    assert awr_actor_loss(lp, w).item() == pytest.approx(-(w * lp).mean().item())


# ------------------------------------------------------------------ gradient isolation
def test_value_loss_reaches_only_v():
    c = _critic()
    c.loss(_batch())["loss_v"].backward()
    assert all(g is not None and g.abs().sum() > 0 for g in _grads(c.v_net))
    for net in (c.q1, c.q2, c.q1_target, c.q2_target):
        assert all(g is None or not g.any() for g in _grads(net))


def test_q_loss_reaches_only_online_q():
    c = _critic()
    c.loss(_batch())["loss_q"].backward()
    for net in (c.q1, c.q2):
        assert all(g is not None and g.abs().sum() > 0 for g in _grads(net))
    for net in (c.v_net, c.q1_target, c.q2_target):
        assert all(g is None or not g.any() for g in _grads(net))


def test_critic_loss_does_not_touch_an_actor_and_actor_loss_not_the_critic():
    c = _critic()
    actor = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1))
    batch = _batch()
    batch["actions"] = torch.tanh(actor(batch["observations"]))  # carries a graph
    c.loss(batch)["loss"].backward()
    assert all(g is None for g in _grads(actor))
    assert all(g is not None for g in _grads(c.q1))
    # the AWR loss of an agent, with weights from the critic's advantage, leaves the critic alone
    c.zero_grad(set_to_none=True)
    agent = IQLAgent(2, 1, IQLAgentConfig(hidden=16))
    b = _batch()
    b["weights"] = awr_weights(c.advantage(b["observations"], b["actions"]), 3.0)
    agent.loss(b)["loss"].backward()
    assert all(p.grad is None for p in c.parameters())
    assert all(p.grad is not None for p in agent.parameters())


def test_targets_frozen_in_state_dict_and_polyak_exact():
    c = _critic()
    targets = [*c.q1_target.parameters(), *c.q2_target.parameters()]
    assert targets and all(not p.requires_grad for p in targets)
    sd = c.state_dict()
    assert any(k.startswith("q1_target.") for k in sd) and any(k.startswith("q2_target.")
                                                              for k in sd)
    assert "normalizer.observations.mean" in sd and "normalizer.actions.std" in sd
    assert set(map(id, c.trainable_parameters())).isdisjoint(map(id, targets))
    # move the online nets away from the targets, then one Polyak step
    with torch.no_grad():
        for p in [*c.q1.parameters(), *c.q2.parameters()]:
            p.add_(torch.randn_like(p))
    online = [p.detach().clone() for p in [*c.q1.parameters(), *c.q2.parameters()]]
    old = [p.detach().clone() for p in targets]
    c.update_target(0.25)
    for new, o, th in zip(targets, old, online):
        torch.testing.assert_close(new, 0.75 * o + 0.25 * th, rtol=0, atol=1e-6)
        assert not torch.equal(new, o)
    c.update_target(1.0)
    for new, th in zip(targets, online):
        assert torch.equal(new, th)


def test_q_is_min_of_target_twins_and_differentiable_in_action():
    c = _critic()
    with torch.no_grad():
        c.q2_target[-1].bias.add_(1.0)  # make the twins differ
    b = _batch()
    sa = torch.cat([b["observations"], b["actions"]], -1)  # identity normalisers
    expected = torch.minimum(c.q1_target(sa), c.q2_target(sa)).squeeze(-1)
    assert torch.equal(c.q(b["observations"], b["actions"]), expected)
    a = b["actions"].clone().requires_grad_(True)
    c.q(b["observations"], a).sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    assert c.advantage(b["observations"], b["actions"]).shape == (8,)
    # leading shapes are preserved: (B, H, D) -> (B, H)
    assert c.q(torch.zeros(3, 4, 2), torch.zeros(3, 4, 1)).shape == (3, 4)


# ------------------------------------------------------------------ normalisation + checkpoints
def test_raw_inputs_are_normalised_inside(tmp_path):
    obs = np.random.default_rng(0).normal(5.0, 3.0, size=(100, 2)).astype(np.float32)
    act = np.random.default_rng(1).uniform(-2, 2, size=(100, 1)).astype(np.float32)
    ns = NormalizerSet.fit_arrays({"observations": obs, "actions": act})
    torch.manual_seed(0)
    c = IQLCritic(2, 1, CriticConfig(**TINY), ns)
    x = torch.from_numpy(ns.normalize("observations", obs))
    torch.testing.assert_close(c.v(obs), c.v_net(x).squeeze(-1))


def test_save_load_identical_outputs(tmp_path):
    obs = np.random.default_rng(0).normal(size=(64, 2)).astype(np.float32)
    act = np.random.default_rng(1).uniform(-1, 1, size=(64, 1)).astype(np.float32)
    ns = NormalizerSet.fit_arrays({"observations": obs, "actions": act})
    torch.manual_seed(0)
    c = IQLCritic(2, 1, CriticConfig(**TINY, expectile=0.8), ns)
    with torch.no_grad():
        c.q1_target[0].weight.mul_(1.5)  # targets differ from the online nets
    c.save(tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    assert cfg["kind"] == "iql_critic" and cfg["config"]["expectile"] == 0.8
    d = IQLCritic.load(tmp_path / "c")
    for a, b in ((c.q(obs, act), d.q(obs, act)), (c.v(obs), d.v(obs)),
                 (c.q1q2(obs, act)[0], d.q1q2(obs, act)[0])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert d.cfg == c.cfg
    # the agent too
    agent = IQLAgent(2, 1, IQLAgentConfig(hidden=16), NormalizerSet.fit_arrays(
        {"observations": obs, "actions": act}, kind={"actions": "minmax"}))
    agent.save(tmp_path / "a")
    agent2 = IQLAgent.load(tmp_path / "a")
    np.testing.assert_array_equal(agent.act(obs), agent2.act(obs))
    assert agent2.cfg == agent.cfg


def test_fourier_input_by_hand_and_round_trip(tmp_path):
    from diffalign.models.critic import FourierInput

    f = FourierInput(2, 3, scale=2.0, seed=0)
    x = torch.tensor([[0.5, -1.0]])
    z = 2 * math.pi * (x @ f.freqs)
    torch.testing.assert_close(f(x), torch.cat([x, z.sin(), z.cos()], -1))
    assert f.out_dim == 8 and FourierInput(2, 0, 1.0, 0)(x) is x
    obs = np.random.default_rng(0).normal(size=(16, 2)).astype(np.float32)
    act = np.random.default_rng(1).uniform(-1, 1, size=(16, 1)).astype(np.float32)
    c = IQLCritic(2, 1, CriticConfig(**TINY, fourier_features=4, fourier_scale=3.0))
    # the online net and its target use the same frequencies, so Polyak is well defined
    torch.testing.assert_close(c.q1[0].freqs, c.q1_target[0].freqs)
    c.save(tmp_path / "c")
    d = IQLCritic.load(tmp_path / "c")
    torch.testing.assert_close(c.q(obs, act), d.q(obs, act), rtol=0, atol=0)
    torch.testing.assert_close(c.v(obs), d.v(obs), rtol=0, atol=0)


def test_checkpoint_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(CheckpointError, match="nope"):
        IQLCritic.load(missing)
    c = _critic()
    c.save(tmp_path / "c")
    (tmp_path / "c" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=str(tmp_path / "c")):
        IQLCritic.load(tmp_path / "c")
    c.save(tmp_path / "c2")
    (tmp_path / "c2" / "config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="c2"):
        IQLCritic.load(tmp_path / "c2")
    # a checkpoint of another kind, or a config that does not match the weights
    c.save(tmp_path / "c3")
    cfg = json.loads((tmp_path / "c3" / "config.json").read_text())
    (tmp_path / "c3" / "config.json").write_text(json.dumps({**cfg, "kind": "diffuser"}))
    with pytest.raises(CheckpointError, match="c3.*iql_critic"):
        IQLCritic.load(tmp_path / "c3")
    cfg["config"]["hidden"] = 64
    (tmp_path / "c3" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="c3"):
        IQLCritic.load(tmp_path / "c3")
    cfg["config"]["hidden"] = 32
    cfg["config"]["expectile"] = 2.0
    (tmp_path / "c3" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="expectile"):
        IQLCritic.load(tmp_path / "c3")
    agent = IQLAgent(2, 1, IQLAgentConfig(hidden=8))
    agent.save(tmp_path / "a")
    with pytest.raises(CheckpointError, match="iql_agent"):
        IQLCritic.load(tmp_path / "a")


@pytest.mark.parametrize(("field", "value"), [
    ("expectile", 1.0), ("expectile", 0.0), ("gamma", 1.5), ("target_tau", 0.0),
    ("hidden", 0), ("depth", 0), ("steps", 0), ("batch_size", -1), ("lr", 0.0),
    ("reward_scale", 0.0), ("grad_clip", -1.0), ("seed", -1), ("fourier_features", -1),
    ("fourier_scale", 0.0), ("backup_actions", -1), ("backup_states", 0),
    ("backup_proposals", "uniform"), ("backup_select", "max"), ("ensemble", 0),
    ("backup_refine", -1),
])
def test_bad_critic_config_names_field(field, value):
    with pytest.raises(ValueError, match=field):
        CriticConfig(**{field: value})


@pytest.mark.parametrize(("field", "value"), [("beta", -1.0), ("max_weight", 0.0),
                                                ("steps", 0), ("hidden", 0)])
def test_bad_agent_config_names_field(field, value):
    with pytest.raises(ValueError, match=field):
        IQLAgentConfig(**{field: value})


def test_max_backup_target_is_the_max_over_batch_actions_by_hand():
    c = _critic(backup_actions=3)
    b = _batch(8)
    obs, act = b["observations"], b["actions"]
    with torch.no_grad():
        got = c.max_q_target(obs, act)
        want = torch.stack([c.q_target_min(obs, act[j].expand(8, 1)) for j in range(3)]).amax(0)
    torch.testing.assert_close(got, want)
    # K larger than the batch uses every row
    big = _critic(backup_actions=50)
    with torch.no_grad():
        want8 = torch.stack([big.q_target_min(obs, act[j].expand(8, 1))
                             for j in range(8)]).amax(0)
        torch.testing.assert_close(big.max_q_target(obs, act), want8)


def test_grid_backup_is_the_max_over_an_even_grid_of_the_batch_range_by_hand():
    c = _critic(backup_actions=5, backup_proposals="grid")
    b = _batch(8)
    obs, act = b["observations"], b["actions"]
    grid = torch.linspace(float(act.min()), float(act.max()), 5)
    with torch.no_grad():
        got = c.max_q_target(obs, act)
        want = torch.stack([c.q_target_min(obs, g.expand(8, 1)) for g in grid]).amax(0)
    torch.testing.assert_close(got, want)


def test_first_twin_selection_values_q1s_choice_by_the_min_of_the_twins():
    c = _critic(backup_actions=5, backup_proposals="grid", backup_select="first")
    with torch.no_grad():  # make the twins disagree
        for p in c.q2_target.parameters():
            p.add_(0.3 * torch.randn_like(p))
    b = _batch(8)
    obs, act = b["observations"], b["actions"]
    grid = torch.linspace(float(act.min()), float(act.max()), 5)
    with torch.no_grad():
        q1 = torch.stack([c.q1_target(c._sa(obs, g.expand(8, 1))).squeeze(-1) for g in grid], 1)
        chosen = grid[q1.argmax(1)][:, None]
        want = c.q_target_min(obs, chosen)
        got = c.max_q_target(obs, act)
    torch.testing.assert_close(got, want)
    # bfloat16 proposals: the value is still float32 and one of a grid action's exact values
    c.cfg.backup_bf16 = True
    with torch.no_grad():
        got16 = c.max_q_target(obs, act)
        vals = torch.stack([c.q_target_min(obs, g.expand(8, 1)) for g in grid], 1)
    assert got16.dtype == torch.float32
    assert bool(((vals - got16[:, None]).abs() < 1e-6).any(1).all())


@pytest.mark.parametrize("select", ["first", "min"])
def test_refined_grid_backup_adds_a_fine_grid_around_each_states_best_by_hand(select):
    c = _critic(backup_actions=4, backup_proposals="grid", backup_select=select,
                backup_refine=4)
    with torch.no_grad():  # make the twins disagree
        for p in c.q2_target.parameters():
            p.add_(0.3 * torch.randn_like(p))
    b = _batch(8)
    obs, act = b["observations"], b["actions"]
    lo, hi = float(act.min()), float(act.max())
    grid = torch.linspace(lo, hi, 4)
    cell = (hi - lo) / 3

    def score(o, a):
        if select == "first":
            return c.q1_target(c._sa(o, a)).squeeze(-1)
        return c.q_target_min(o, a)

    want = []
    with torch.no_grad():
        for i in range(8):
            o = obs[i:i + 1]
            s = [float(score(o, g.view(1, 1))) for g in grid]
            best = float(grid[max(range(4), key=s.__getitem__)])
            fine = [min(max(best + f * cell, lo), hi) for f in (-1, -1 / 3, 1 / 3, 1)]
            cands = [float(g) for g in grid] + fine
            s += [float(score(o, torch.tensor([[a]]))) for a in fine]
            j = max(range(8), key=s.__getitem__)
            want.append(float(c.q_target_min(o, torch.tensor([[cands[j]]]))) if select == "first"
                        else s[j])
        got = c.max_q_target(obs, act)
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-5)
    # the refined max is never below the coarse grid's
    coarse = _critic(backup_actions=4, backup_proposals="grid", backup_select="min")
    coarse.load_state_dict(c.state_dict())
    if select == "min":
        with torch.no_grad():
            assert bool((got >= coarse.max_q_target(obs, act) - 1e-6).all())


def test_backup_refine_needs_a_grid():
    with pytest.raises(ValueError, match="backup_refine"):
        CriticConfig(backup_actions=8, backup_refine=8)  # batch proposals
    with pytest.raises(ValueError, match="backup_refine"):
        CriticConfig(backup_actions=1, backup_proposals="grid", backup_refine=8)


def test_grid_backup_refuses_more_than_one_action_dimension():
    with pytest.raises(ValueError, match="backup_proposals"):
        IQLCritic(2, 2, CriticConfig(**{**TINY, "backup_actions": 4, "backup_proposals": "grid"}))


def test_max_backup_value_loss_reaches_only_v():
    c = _critic(backup_actions=4, backup_states=5)
    out = c.loss(_batch(8))
    out["loss_v"].backward()
    assert all(g is not None for g in _grads(c.v_net))
    assert all(g is None for g in _grads(c.q1) + _grads(c.q2) + _grads(c.q1_target))


def _bandit(n: int = 2000, seed: int = 0) -> Episodes:
    """One-step episodes, uniform random actions, reward −(a − 0.5)², so max_a Q = 0."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(-1, 1, (n, 1)).astype(np.float32)
    obs = np.zeros((n, 2), np.float32)
    obs[:, 0] = rng.uniform(-1, 1, n)
    return Episodes.from_arrays(obs, a, -((a[:, 0] - 0.5) ** 2), terminals=np.ones(n),
                                timeouts=np.zeros(n), next_observations=obs)


def _expectile(x: np.ndarray, tau: float) -> float:
    """The ``tau``-expectile of a sample: the root of ``Σ |tau − 1(x < m)| (x − m) = 0``,
    by bisection (independent of the critic's loss code)."""
    lo, hi = float(x.min()), float(x.max())
    for _ in range(100):
        m = (lo + hi) / 2
        d = x - m
        if float(np.sum(np.where(d > 0, tau, 1 - tau) * d)) > 0:
            lo = m
        else:
            hi = m
    return (lo + hi) / 2


def test_max_backup_values_the_best_action_where_the_expectile_does_not():
    eps = _bandit()
    kw = dict(hidden=64, depth=2, steps=400, batch_size=256, lr=3e-3, log_every=1000,
              ckpt_every=0, device="cpu", gamma=0.0)
    obs = torch.as_tensor(eps.observations[:200])
    c_max = train_critic(eps, CriticConfig(backup_actions=32, **kw), progress=False)
    c_grid = train_critic(eps, CriticConfig(backup_actions=33, backup_states=256,
                                            backup_proposals="grid", backup_select="first",
                                            backup_bf16=True, **kw), progress=False)
    c_iql = train_critic(eps, CriticConfig(expectile=0.7, **kw), progress=False)
    grid = torch.linspace(-1, 1, 201)
    with torch.no_grad():
        v_max, v_grid, v_iql = (float(c.v(obs).mean()) for c in (c_max, c_grid, c_iql))
        # each critic's own max over a dense grid of actions, found apart from its backup
        dense = [float(torch.stack([c.q_target_min(obs, a.expand(len(obs), 1)) for a in grid],
                                   1).amax(1).mean()) for c in (c_max, c_grid)]
    # max_a −(a − 0.5)² = 0 exactly; a max backup must reach it from neither side (a max over
    # noisy Q's overestimates, too few proposals underestimate; 32 uniform draws are short
    # of it by E[min_j (a_j − 0.5)²] ≈ 2 / (33 · 34) ≈ 0.002)
    for v, d in zip((v_max, v_grid), dense):
        assert abs(v - 0.0) < 0.02, (v_max, v_grid)
        assert abs(v - d) < 0.02, (v, d)
    # IQL's V is the 0.7-expectile of Q over the data's actions: here of the rewards
    want = _expectile(eps.rewards, 0.7)
    assert want == pytest.approx(-0.384, abs=0.01)
    assert abs(v_iql - want) < 0.02, (v_iql, want)


# ------------------------------------------------------------------ data
def test_transitions_without_next_observations():
    obs = np.arange(10, dtype=np.float32).reshape(5, 2)
    eps = Episodes.from_arrays(obs, np.zeros((5, 1)), np.arange(5.0),
                               terminals=[0, 1, 0, 0, 0], timeouts=[0, 0, 0, 1, 0])
    # episodes: [0, 1] (terminal), [2, 3] (time-out), [4] (unterminated tail)
    t = transitions_from_episodes(eps)
    np.testing.assert_array_equal(t["rewards"], [0.0, 1.0, 2.0])  # ends w/o s' dropped
    np.testing.assert_array_equal(t["next_observations"][[0, 2]], obs[[1, 3]])
    np.testing.assert_array_equal(t["dones"], [0.0, 1.0, 0.0])
    # with next_observations every step is kept; time-outs optionally terminal
    eps2 = Episodes.from_arrays(obs, np.zeros((5, 1)), np.arange(5.0), terminals=[0, 1, 0, 0, 0],
                                timeouts=[0, 0, 0, 1, 0], next_observations=obs + 1)
    t2 = transitions_from_episodes(eps2, timeouts_as_terminals=True)
    assert len(t2["rewards"]) == 5
    np.testing.assert_array_equal(t2["dones"], [0, 1, 0, 1, 0])


# ------------------------------------------------------------------ learning
def test_short_training_ranks_optimal_action_above_random(tmp_path):
    from diffalign.envs.nav1d_optimum import nav1d_optimum

    torch.manual_seed(0)
    eps = _nav1d(150)
    cfg = CriticConfig(hidden=64, depth=2, steps=600, batch_size=128, lr=1e-3,
                       target_tau=0.02, log_every=100, ckpt_every=0, device="cpu")
    critic = train_critic(eps, cfg, tmp_path / "critic", progress=False)
    assert json.loads((tmp_path / "critic" / "config.json").read_text())["kind"] == "iql_critic"
    obs = eps.observations
    a_opt = nav1d_optimum()["policy"](obs)
    a_rand = np.random.default_rng(0).uniform(-1, 1, size=a_opt.shape).astype(np.float32)
    with torch.no_grad():
        frac = (critic.q(obs, a_opt) > critic.q(obs, a_rand)).float().mean().item()
    assert frac > 0.6, frac
    loaded = IQLCritic.load(tmp_path / "critic")
    torch.testing.assert_close(loaded.v(obs), critic.v(obs), rtol=0, atol=0)

    # the AWR agent on top of this critic: valid actions, deterministic act is repeatable
    acfg = IQLAgentConfig(hidden=32, steps=50, batch_size=64, log_every=100, device="cpu")
    agent = train_iql_agent(eps, acfg, None, critic=critic, progress=False)
    a = agent.act(obs[:10])
    assert a.shape == (10, 1) and a.dtype == np.float32 and np.all(np.abs(a) <= 1.0)
    assert agent.act(obs[0]).shape == (1,)
    g = torch.Generator().manual_seed(0)
    s1 = agent.act(obs[:10], deterministic=False, generator=g)
    s2 = agent.act(obs[:10], deterministic=False, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(s1, s2)
    assert not np.array_equal(s1, a)


class _Killed(Exception):
    """Stands for the process being killed between two checkpoints."""


def _count_training_steps(monkeypatch, cls, kill_at: int | None = None) -> list:
    """Count the optimiser steps of ``cls`` critics (loss calls with gradients on, so the
    evaluation's loss calls do not count); with ``kill_at`` raise :class:`_Killed` after that
    many steps, before the step's checkpoint could be written."""
    calls: list = []
    loss, update = cls.loss, cls.update_target

    def counting_loss(self, batch):
        if torch.is_grad_enabled():
            calls.append(1)
        return loss(self, batch)

    def killing_update(self, tau=None):
        update(self, tau)
        if kill_at is not None and len(calls) == kill_at:
            raise _Killed

    monkeypatch.setattr(cls, "loss", counting_loss)
    monkeypatch.setattr(cls, "update_target", killing_update)
    return calls


@pytest.mark.parametrize("ensemble", [1, 2])
def test_killed_training_resumes_from_its_last_checkpoint(tmp_path, monkeypatch, ensemble):
    # a fresh run with the same seed reaches the same weights, so bit-identity alone cannot
    # tell a resume from a retraining: count the steps the resumed run takes
    eps = _nav1d(10)
    cfg = dict(hidden=16, batch_size=32, log_every=1, ckpt_every=5, device="cpu",
               ensemble=ensemble)
    cls = CriticEnsemble if ensemble > 1 else IQLCritic
    full = train_critic(eps, CriticConfig(steps=20, **cfg), tmp_path / "a", progress=False)
    with monkeypatch.context() as m:
        calls = _count_training_steps(m, cls, kill_at=8)
        with pytest.raises(_Killed):
            train_critic(eps, CriticConfig(steps=20, **cfg), tmp_path / "b", progress=False)
        assert len(calls) == 8
    assert not (tmp_path / "b" / "config.json").exists()  # killed before the end
    with monkeypatch.context() as m:
        calls = _count_training_steps(m, cls)
        resumed = train_critic(eps, CriticConfig(steps=20, **cfg), tmp_path / "b",
                               progress=False)
        assert len(calls) == 15  # steps 6..20: the checkpoint of step 5 was its start
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    # the log holds each step once: what the killed run logged after step 5 was dropped
    from diffalign.train.logging import read_metrics

    steps = [r["step"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl")]
    assert steps == list(range(1, 21))
    # a finished run asked for more steps continues from its end
    with monkeypatch.context() as m:
        calls = _count_training_steps(m, cls)
        train_critic(eps, CriticConfig(steps=23, **cfg), tmp_path / "b", progress=False)
        assert len(calls) == 3


def test_critic_command_resumes_instead_of_retraining(tmp_path, monkeypatch, capsys):
    from diffalign.commands.critic import CriticArgs, critic_main

    def args(steps):
        return CriticArgs(out=tmp_path / "c", task="nav1d/full", episodes=8, steps=steps,
                          hidden=16, batch_size=16, device="cpu", progress=False)

    calls = _count_training_steps(monkeypatch, IQLCritic)
    critic_main(args(4))
    assert len(calls) == 4
    calls.clear()
    critic_main(args(4))  # finished: nothing to train again
    assert calls == []
    critic_main(args(7))
    assert len(calls) == 3
    # the steps taken in total are the saved state's
    state = json.loads((tmp_path / "c" / "train_state" / "state.json").read_text())
    assert state["step"] == 7


def test_critic_command_smoke(tmp_path, capsys):
    from diffalign.commands.critic import CriticArgs, critic_main

    with pytest.raises(ValueError, match="expectile"):
        CriticArgs(out=tmp_path / "x", expectile=1.2)
    args = CriticArgs(out=tmp_path / "c", task="nav1d/full", episodes=8, steps=3, hidden=16,
                      batch_size=16, device="cpu", progress=False)
    summary = critic_main(args)
    out = capsys.readouterr().out
    assert "loss_q" in out and "mean V" in out
    for key in ("critic/loss_q", "critic/loss_v", "critic/q_mean", "critic/v_mean",
                "critic/nav1d/frac_opt_over_random"):
        assert math.isfinite(summary[key]), key
    assert summary["transitions"] == 8 * 32
    IQLCritic.load(tmp_path / "c")
    assert (tmp_path / "c" / "critic_summary.json").is_file()


# ------------------------------------------------------------------ ensembles
def _ensemble(n: int = 2, seed: int = 0, **kw) -> CriticEnsemble:
    torch.manual_seed(seed)
    return CriticEnsemble(2, 1, CriticConfig(**{**TINY, "ensemble": n, **kw}))


def test_ensemble_values_are_the_members_means_by_hand():
    e = _ensemble(3)
    b = _batch(8)
    obs, act = b["observations"], b["actions"]
    qs = [m.q(obs, act) for m in e.members]
    vs = [m.v(obs) for m in e.members]
    torch.testing.assert_close(e.q(obs, act), (qs[0] + qs[1] + qs[2]) / 3)
    torch.testing.assert_close(e.v(obs), (vs[0] + vs[1] + vs[2]) / 3)
    torch.testing.assert_close(e(obs, act), e.q(obs, act))
    torch.testing.assert_close(e.advantage(obs, act), e.q(obs, act) - e.v(obs))
    # the members start from different weights
    assert not torch.equal(e.members[0].q1[0].weight, e.members[1].q1[0].weight)
    # the mean Q stays differentiable in the action (QV-PG needs it)
    a = act.clone().requires_grad_(True)
    e.q(obs, a).sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="ensemble=1"):
        CriticEnsemble(2, 1, CriticConfig(**TINY))
    # one critic refuses an ensemble config, so a saved config never claims more critics
    with pytest.raises(ValueError, match="ensemble=2"):
        IQLCritic(2, 1, CriticConfig(**TINY, ensemble=2))


def test_ensemble_loss_is_the_sum_and_each_member_gets_only_its_own_gradient():
    e = _ensemble(2)
    b0, b1 = _batch(8, seed=0), _batch(8, seed=1)
    out = e.loss([b0, b1])
    l0, l1 = e.members[0].loss(b0), e.members[1].loss(b1)
    for k in ("loss", "loss_q", "loss_v"):
        torch.testing.assert_close(out[k], l0[k] + l1[k])
    torch.testing.assert_close(out["q_mean"], (l0["q_mean"] + l1["q_mean"]) / 2)
    # one shared batch is the same as giving it to each member
    torch.testing.assert_close(e.loss(b0)["loss"], e.loss([b0, b0])["loss"])
    with pytest.raises(ValueError, match="3 batches for 2"):
        e.loss([b0, b1, b0])
    # member 0's loss reaches member 0's online nets only
    e.zero_grad(set_to_none=True)
    e.members[0].loss(b0)["loss"].backward()
    assert all(p.grad is not None for p in e.members[0].trainable_parameters())
    assert all(p.grad is None for p in e.members[1].parameters())
    assert len(e.trainable_parameters()) == 2 * len(e.members[0].trainable_parameters())
    # Polyak moves every member's targets
    before = [m.q1_target[0].weight.clone() for m in e.members]
    with torch.no_grad():
        for m in e.members:
            m.q1[0].weight.add_(1.0)
    e.update_target(0.5)
    for m, w in zip(e.members, before):
        torch.testing.assert_close(m.q1_target[0].weight, w + 0.5 * (m.q1[0].weight - w))


def test_ensemble_round_trip_and_load_critic_dispatch(tmp_path):
    obs = np.random.default_rng(0).normal(5.0, 2.0, size=(64, 2)).astype(np.float32)
    act = np.random.default_rng(1).uniform(-1, 1, size=(64, 1)).astype(np.float32)
    ns = NormalizerSet.fit_arrays({"observations": obs, "actions": act})
    torch.manual_seed(0)
    e = CriticEnsemble(2, 1, CriticConfig(**TINY, ensemble=2, expectile=0.8), ns)
    with torch.no_grad():
        e.members[1].q1_target[0].weight.mul_(1.5)
    e.save(tmp_path / "e")
    cfg = json.loads((tmp_path / "e" / "config.json").read_text())
    assert cfg["kind"] == "iql_critic_ensemble" and cfg["config"]["ensemble"] == 2
    d = load_critic(tmp_path / "e")
    assert isinstance(d, CriticEnsemble) and d.cfg == e.cfg and not d.training
    torch.testing.assert_close(d.q(obs, act), e.q(obs, act), rtol=0, atol=0)
    torch.testing.assert_close(d.v(obs), e.v(obs), rtol=0, atol=0)
    # the normalisers travel with the weights (raw inputs in, as for one critic)
    x = torch.from_numpy(ns.normalize("observations", obs))
    torch.testing.assert_close(d.members[0].v(obs), d.members[0].v_net(x).squeeze(-1))
    # one critic loads through the same function; other kinds are refused by name
    c = _critic()
    c.save(tmp_path / "c")
    assert isinstance(load_critic(tmp_path / "c"), IQLCritic)
    with pytest.raises(CheckpointError, match="iql_critic_ensemble"):
        IQLCritic.load(tmp_path / "e")
    IQLAgent(2, 1, IQLAgentConfig(hidden=8)).save(tmp_path / "a")
    with pytest.raises(CheckpointError, match="iql_agent"):
        load_critic(tmp_path / "a")
    with pytest.raises(CheckpointError, match="nope"):
        load_critic(tmp_path / "nope")
    from diffalign.eval.evaluate import load_critic as eval_load_critic

    assert isinstance(eval_load_critic(str(tmp_path / "e")), CriticEnsemble)


def test_train_critic_ensemble_gives_each_member_its_own_batches(tmp_path, monkeypatch):
    eps = _nav1d(10)
    cfg = CriticConfig(hidden=16, steps=3, batch_size=32, log_every=100, ckpt_every=0,
                       device="cpu", ensemble=2)
    seen = []
    original = CriticEnsemble.loss

    def spy(self, batch):
        seen.append(batch)
        return original(self, batch)

    monkeypatch.setattr(CriticEnsemble, "loss", spy)
    torch.manual_seed(cfg.seed)
    init = CriticEnsemble(2, 1, cfg)
    e = train_critic(eps, cfg, tmp_path / "e", progress=False)
    assert isinstance(e, CriticEnsemble) and len(e) == 2
    assert isinstance(load_critic(tmp_path / "e"), CriticEnsemble)
    assert len(seen) == 3
    for batches in seen:
        assert isinstance(batches, list) and len(batches) == 2
        assert not torch.equal(batches[0]["observations"], batches[1]["observations"])
    # both members moved from their (different) starting weights
    for m, m0 in zip(e.members, init.members):
        assert not torch.equal(m.v_net[0].weight, m0.v_net[0].weight)
    assert not torch.equal(e.members[0].v_net[0].weight, e.members[1].v_net[0].weight)


def test_critic_command_ensemble(tmp_path, capsys):
    from diffalign.commands.critic import CriticArgs, critic_main

    with pytest.raises(ValueError, match="ensemble"):
        CriticArgs(out=tmp_path / "x", ensemble=0)
    args = CriticArgs(out=tmp_path / "c", task="nav1d/full", episodes=8, steps=3, hidden=16,
                      batch_size=16, device="cpu", progress=False, ensemble=2)
    summary = critic_main(args)
    assert math.isfinite(summary["critic/loss_q"])
    assert isinstance(load_critic(tmp_path / "c"), CriticEnsemble)


@pytest.mark.slow
def test_critic_sigkilled_after_a_checkpoint_resumes_to_the_same_critic(tmp_path):
    """`diffalign critic` killed by SIGKILL after its step-1000 checkpoint and run again
    writes the uninterrupted run's critic byte for byte, keeping the records from before
    the kill (a run that started afresh would drop the mark put on one)."""
    import sys

    from conftest import killed_and_resumed

    def cmd(out):
        return [sys.executable, "-m", "diffalign.cli", "critic", "--task", "nav1d/full",
                "--episodes", "100", "--steps", "1800", "--hidden", "64", "--seed", "0",
                "--no-progress", "--out", str(out)]

    killed_and_resumed(cmd, tmp_path, steps=1800)
