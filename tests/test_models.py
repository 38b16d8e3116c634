"""Control models (Diffuser, Decision Diffuser, Diffusion Policy), registry and selection."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffalign.data.nav1d_datasets import generate_nav1d_dataset, nav1d_dataset_attrs, to_episodes
from diffalign.models import (
    ControlModel,
    ModelSpec,
    build_model,
    expectation,
    greedy_index,
    select_actions,
    softmax_index,
)
from diffalign.tasks import resolve_task
from diffalign.train.checkpoint import CheckpointError

KINDS = ("diffuser", "dd", "dp")
PROCESSES = ("ddpm", "ddim", "sm", "fm")
TINY = {
    "unet": {"dim": 8, "dim_mults": [1, 2]},
    "dit": {"hidden": 16, "depth": 1, "heads": 2},
    "mlp": {"width": 32, "depth": 1},
}


def tiny_model(kind: str, process: str = "ddpm", backbone: str | None = None, **kw):
    backbone = backbone or ("dit" if kind == "dp" else "unet")
    horizon = kw.pop("horizon", 4 if kind == "dp" else 8)
    return build_model(kind, process, backbone, obs_dim=2, act_dim=1, horizon=horizon,
                       backbone_kwargs=TINY[backbone], **kw)


@pytest.fixture(scope="module")
def episodes():
    data = generate_nav1d_dataset("full", episodes=20, seed=1)
    return to_episodes(data, nav1d_dataset_attrs("full", seed=1, episodes=20))


def _train(model, episodes, steps=2, seed=0):
    ds = model.make_dataset(episodes)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(steps):
        out = model.loss(ds.sample(16, g), generator=g)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    return out


@pytest.mark.parametrize("process", PROCESSES)
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_and_process_trains_and_samples(kind, process, episodes):
    torch.manual_seed(0)
    model = tiny_model(kind, process)
    out = _train(model, episodes)
    assert torch.isfinite(out["loss"])
    obs = torch.from_numpy(episodes.observations[[0, 40, 77]])  # 3 states
    g = torch.Generator().manual_seed(0)
    sample = model.sample(obs[:, None], n=2, generator=g, steps=3)
    h, d = model.spec.horizon, {"diffuser": 3, "dd": 2, "dp": 1}[kind]
    assert sample.x0.shape == (6, h, d)
    acts = model.actions_from_x(sample.x0, obs[:, None])
    assert acts.shape == (6, model.spec.action_horizon, 1)
    states, actions = model.plan_states_actions(sample.x0)
    if kind == "dp":
        assert states is None and actions is None
    else:
        assert states.shape == (6, h, 2) and actions.shape == (6, h, 1)
        # the in-painted current state is exactly the given one (row b*n+j <- state b)
        given = obs.repeat_interleave(2, 0)
        np.testing.assert_allclose(states[:, 0].numpy(), given.numpy(), atol=1e-6)


def test_dd_inverse_dynamics_is_trained_jointly(episodes):
    torch.manual_seed(0)
    model = tiny_model("dd")
    out = _train(model, episodes)
    assert {"loss", "loss_diffusion", "loss_inv_dyn"} <= set(out)
    assert torch.allclose(out["loss"].detach(), out["loss_diffusion"] + out["loss_inv_dyn"])
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.inv_dyn.parameters())


def test_sample_with_net_override_and_grad_last_k(episodes):
    torch.manual_seed(0)
    model = tiny_model("dp", "fm", "mlp")
    model.make_dataset(episodes)
    obs = torch.from_numpy(episodes.observations[:2])
    other = tiny_model("dp", "fm", "mlp").net  # different random weights
    g1, g2, g3 = (torch.Generator().manual_seed(3) for _ in range(3))
    a = model.sample(obs, 2, generator=g1, steps=3).x0
    a2 = model.sample(obs, 2, generator=g2, steps=3).x0
    b = model.sample(obs, 2, generator=g3, steps=3, net=other).x0
    assert torch.equal(a, a2) and not torch.equal(a, b)
    out = model.sample(obs, 2, steps=3, grad_last_k=1)
    out.x0.sum().backward()
    assert any(p.grad is not None for p in model.net.parameters())


def test_learnability_dp_beats_random_policy():
    """A seconds-long Diffusion Policy run on nav1d/expert clearly beats the random policy."""
    from diffalign.envs.nav1d_optimum import nav1d_optimum
    from diffalign.eval.rollout import rollout
    from diffalign.tasks import resolve_task

    torch.manual_seed(0)
    task = resolve_task("nav1d/expert", episodes=200)
    model = build_model("dp", "ddim", "mlp", obs_dim=2, act_dim=1, horizon=4, obs_history=1,
                        action_horizon=2, backbone_kwargs={"width": 128, "depth": 2})
    ds = model.make_dataset(task.episodes)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    for _ in range(400):
        loss = model.loss(ds.sample(128, g), generator=g)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    res = rollout(model, task.make_env, episodes=30, candidates=4, steps=5,
                  selection="expectation", seed=123)
    random_return = nav1d_optimum(0)["random_return"]  # 6.10
    assert res.returns.mean() > random_return + 3.0, (res.returns.mean(), random_return)


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_identical_actions(kind, episodes, tmp_path):
    torch.manual_seed(0)
    model = tiny_model(kind, "ddpm", meta={"task": "nav1d/full", "layout_seed": 0})
    _train(model, episodes)
    model.eval()
    model.save(tmp_path / "m")
    loaded = ControlModel.load(tmp_path / "m")
    assert type(loaded) is type(model) and loaded.spec == model.spec
    assert loaded.meta == model.meta
    obs = torch.from_numpy(episodes.observations[[3, 50]])[:, None]
    a = select_actions(model, obs, candidates=3, steps=4,
                       generator=torch.Generator().manual_seed(7)).actions
    b = select_actions(loaded, obs, candidates=3, steps=4,
                       generator=torch.Generator().manual_seed(7)).actions
    assert torch.equal(a, b)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["kind"] == kind and cfg["obs_dim"] == 2 and cfg["act_dim"] == 1
    assert ModelSpec.from_dict(cfg["spec"]) == model.spec


# ------------------------------------------------------------------------------ selection
def test_selection_rules_on_hand_made_candidates():
    acts = torch.tensor([[[0.0], [1.0], [2.0]], [[-1.0], [3.0], [5.0]]])  # (B=2, N=3, 1)
    assert torch.equal(expectation(acts), torch.tensor([[1.0], [7.0 / 3.0]]))
    scores = torch.tensor([[0.1, 0.9, 0.3], [2.0, -1.0, 1.5]])
    assert torch.equal(greedy_index(scores), torch.tensor([1, 0]))
    g = torch.Generator().manual_seed(0)
    assert torch.equal(softmax_index(scores, temperature=1e-4, generator=g), torch.tensor([1, 0]))
    picks = torch.stack([softmax_index(scores[:1], 1.0, g) for _ in range(4000)])
    freq = torch.bincount(picks.flatten(), minlength=3).float() / 4000
    expected = torch.softmax(scores[0], 0)
    assert torch.allclose(freq, expected, atol=0.03)
    with pytest.raises(ValueError, match="temperature"):
        softmax_index(scores, temperature=0.0)


class _TargetCritic:
    """Q(s, a) = -(a - 0.3)^2: the best candidate action is the one closest to 0.3."""

    def q(self, obs, act):
        return -((act[..., 0] - 0.3) ** 2)


@pytest.mark.parametrize("kind", ["dp", "diffuser"])
def test_select_actions_greedy_picks_argmax_and_expectation_is_mean(kind, episodes):
    torch.manual_seed(0)
    model = tiny_model(kind)
    model.make_dataset(episodes)
    obs = torch.from_numpy(episodes.observations[[1, 2]])[:, None]
    critic = _TargetCritic()
    sel_name = "idql_greedy" if kind == "dp" else "best"
    out = select_actions(model, obs, candidates=5, steps=3, selection=sel_name, critic=critic,
                         generator=torch.Generator().manual_seed(0))
    assert out.scores.shape == (2, 5)
    assert torch.equal(out.index, out.scores.argmax(1))
    if kind == "dp":  # the reward is Q(s, first action)
        best = out.candidates[:, :, 0, 0].sub(0.3).abs().argmin(1)
        assert torch.equal(out.index, best)
        assert torch.equal(out.actions, out.candidates[torch.arange(2), best])
    ex = select_actions(model, obs, candidates=5, steps=3, selection="expectation",
                        generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ex.actions, ex.candidates.mean(1))
    with pytest.raises(ValueError, match="critic"):
        select_actions(model, obs, candidates=2, selection="idql_greedy")
    with pytest.raises(ValueError, match="'bogus'"):
        select_actions(model, obs, candidates=2, selection="bogus")


# ------------------------------------------------------------------------------ bad input
def test_bad_model_options_raise_clear_errors():
    with pytest.raises(ValueError, match="'transformer'"):
        build_model("transformer", obs_dim=2, act_dim=1)
    with pytest.raises(ValueError, match="'vae'"):
        build_model("dp", "vae", obs_dim=2, act_dim=1)
    with pytest.raises(ValueError, match="'cnn'"):
        build_model("dp", "ddpm", "cnn", obs_dim=2, act_dim=1)
    with pytest.raises(ValueError, match="horizon=10"):
        build_model("diffuser", "ddpm", "unet", obs_dim=2, act_dim=1, horizon=10)
    with pytest.raises(ValueError, match="action_horizon=9"):
        build_model("dp", obs_dim=2, act_dim=1, horizon=8, action_horizon=9)
    with pytest.raises(ValueError, match="'colour'"):
        build_model("dp", obs_dim=2, act_dim=1, colour=3)


def test_dataset_with_wrong_dims_is_rejected(episodes):
    model = build_model("dp", obs_dim=3, act_dim=1, backbone_kwargs=TINY["dit"])
    with pytest.raises(ValueError, match="obs_dim=2.*obs_dim=3"):
        model.make_dataset(episodes)


def test_missing_or_corrupted_checkpoint(tmp_path, episodes):
    with pytest.raises(CheckpointError, match="does not exist"):
        ControlModel.load(tmp_path / "nope")
    model = tiny_model("dp")
    with pytest.raises(ValueError, match="normalisers"):
        model.save(tmp_path / "unfitted")
    assert not (tmp_path / "unfitted").exists()
    model.make_dataset(episodes)
    model.save(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupted"):
        ControlModel.load(tmp_path / "m")
    model.save(tmp_path / "m2")
    (tmp_path / "m2" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        ControlModel.load(tmp_path / "m2")
    model.save(tmp_path / "m3")
    cfg = json.loads((tmp_path / "m3" / "config.json").read_text())
    cfg["spec"]["backbone_kwargs"]["hidden"] = 32  # weights no longer fit the config
    (tmp_path / "m3" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not match"):
        ControlModel.load(tmp_path / "m3")


def test_planner_reward_modes_by_hand():
    from diffalign.models.registry import build_model

    class SumCritic:
        def q(self, obs, act):
            return obs[..., 0] + 10 * act[..., 0]

    task = resolve_task("nav1d/full", episodes=20)
    model = build_model("diffuser", "ddpm", None, task.obs_dim, task.act_dim)
    model.make_dataset(task.episodes)
    x = torch.rand(3, model.spec.horizon, model.obs_dim + model.act_dim) * 2 - 1
    s, a = model.plan_states_actions(x)
    q = s[..., 0] + 10 * a[..., 0]
    model.spec.reward_mode = "first"
    torch.testing.assert_close(model.reward(x, None, SumCritic()), q[:, 0])
    model.spec.reward_mode = "mean"
    torch.testing.assert_close(model.reward(x, None, SumCritic()), q.mean(1))
    model.spec.reward_mode = "discounted"
    w = model.spec.discount ** torch.arange(q.shape[1], dtype=q.dtype)
    torch.testing.assert_close(model.reward(x, None, SumCritic()), (q * w).sum(1))


@pytest.mark.parametrize("kind", ("diffuser", "dd"))
def test_state_cond_planner_feeds_the_present_state_as_a_global_condition(kind, episodes,
                                                                          tmp_path):
    torch.manual_seed(0)
    model = tiny_model(kind, "ddpm", state_cond=True,
                       meta={"task": "nav1d/full", "layout_seed": 0})
    plain = tiny_model(kind, "ddpm")
    assert model.net.cond_dim == 2 and plain.net.cond_dim == 0
    _train(model, episodes)
    obs = torch.from_numpy(episodes.observations[[3, 50]])[:, None]
    c = model.condition(obs)
    # the condition is the normalised present state, the same values that are in-painted
    torch.testing.assert_close(c.cond, model.norm("observations", obs).flatten(1))
    torch.testing.assert_close(c.cond, c.inpaint.value[:, 0, :2])
    # the denoiser's output depends on the condition, not only on the in-painted entries
    x = torch.randn(2, *c.shape)
    t = torch.full((2,), 0.5)
    with torch.no_grad():
        assert not torch.allclose(model.net(x, t, cond=c.cond), model.net(x, t, cond=-c.cond))
    model.save(tmp_path / "m")
    loaded = ControlModel.load(tmp_path / "m")
    assert loaded.spec.state_cond
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(model.sample(obs, generator=g(), steps=3).x0,
                       loaded.sample(obs, generator=g(), steps=3).x0)


def test_state_cond_is_refused_for_non_planners(tmp_path):
    from diffalign.commands.train import TrainArgs

    with pytest.raises(ValueError, match="state_cond"):
        TrainArgs(out=tmp_path / "x", model="dp", state_cond=True)
    with pytest.raises(ValueError, match="state_cond"):
        build_model("dp", obs_dim=2, act_dim=1, state_cond=True)
    assert not (tmp_path / "x").exists()


def test_fourier_features_values():
    from diffalign.nets.embeddings import fourier_features

    x = torch.tensor([[0.5, -1.0]])
    f = fourier_features(x, 2)
    # [x | sin(kπx) for each column's k | cos(kπx) likewise], columns first then k
    expect = torch.tensor([[0.5, -1.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0, -1.0, 1.0]])
    torch.testing.assert_close(f, expect, atol=1e-6, rtol=0)
    assert fourier_features(x, 0) is x
    with pytest.raises(ValueError, match="n=-1"):
        fourier_features(x, -1)


@pytest.mark.parametrize("kind", ("diffuser", "dp"))
def test_cond_fourier_widens_the_condition_and_round_trips(kind, episodes, tmp_path):
    from diffalign.nets.embeddings import fourier_features

    torch.manual_seed(0)
    kw = {"state_cond": True} if kind != "dp" else {}
    model = tiny_model(kind, "ddpm", cond_fourier=3, meta={"task": "nav1d/full"}, **kw)
    t_o = model.spec.obs_history
    assert model.net.cond_dim == t_o * 2 * 7
    _train(model, episodes)
    hist = torch.from_numpy(episodes.observations[[4, 5, 40, 41]]).view(2, 2, 2)[:, -t_o:]
    c = model.condition(hist)
    torch.testing.assert_close(c.cond, fourier_features(
        model.norm("observations", hist).flatten(1), 3))
    model.save(tmp_path / "m")
    loaded = ControlModel.load(tmp_path / "m")
    assert loaded.spec.cond_fourier == 3
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(model.sample(hist, generator=g(), steps=3).x0,
                       loaded.sample(hist, generator=g(), steps=3).x0)


def test_cond_fourier_needs_a_global_condition(tmp_path):
    from diffalign.commands.train import TrainArgs

    with pytest.raises(ValueError, match="cond_fourier=4 needs a global condition"):
        build_model("diffuser", obs_dim=2, act_dim=1, cond_fourier=4)
    with pytest.raises(ValueError, match="cond_fourier=-1"):
        build_model("dp", obs_dim=2, act_dim=1, cond_fourier=-1)
    with pytest.raises(ValueError, match="cond_fourier=4 needs a global condition"):
        TrainArgs(out=tmp_path / "x", model="dd", cond_fourier=4)
    with pytest.raises(ValueError, match="cond_fourier=-2"):
        TrainArgs(out=tmp_path / "x", model="dp", cond_fourier=-2)
    assert TrainArgs(out=tmp_path / "y", model="dd", state_cond=True, cond_fourier=4)
    assert not (tmp_path / "x").exists()


def test_executed_mask_marks_the_entries_that_decide_the_action():
    d = tiny_model("diffuser", obs_history=2, horizon=8, state_cond=True)
    m = d.executed_mask((5, 8, 3))
    assert m.shape == (1, 8, 3) and m.sum() == 1 and m[0, 1, 2]  # a at row K-1, action dim
    dd = tiny_model("dd", horizon=8)
    m = dd.executed_mask((5, 8, 2))
    assert m.sum() == 2 and m[0, 1].all()  # s_{t+1}, from which inverse dynamics acts
    dp = tiny_model("dp")
    m = dp.executed_mask((5, 4, 1))
    assert m[0, :, 0].tolist() == [True] * dp.spec.action_horizon + \
        [False] * (4 - dp.spec.action_horizon)


def test_first_action_mask_marks_the_current_action_only():
    d = tiny_model("diffuser", obs_history=2, horizon=8, state_cond=True)
    m = d.first_action_mask((5, 8, 3))
    assert m.shape == (1, 8, 3) and m.sum() == 1 and m[0, 1, 2]  # row K-1, action dim
    dp = tiny_model("dp")
    m = dp.first_action_mask((5, 4, 1))
    assert m[0, :, 0].tolist() == [True, False, False, False]
    assert tiny_model("dd", horizon=8).first_action_mask((5, 8, 2)) is None  # inferred


def _with_constant_feature(episodes, value=0.115):
    """``episodes`` with a third observation feature that never changes."""
    from diffalign.data.episodes import Episodes

    def widen(o):
        return np.concatenate([o, np.full((len(o), 1), value, np.float32)], 1)

    return Episodes(observations=widen(episodes.observations), actions=episodes.actions,
                    rewards=episodes.rewards, terminals=episodes.terminals,
                    timeouts=episodes.timeouts,
                    next_observations=widen(episodes.next_observations), meta=episodes.meta)


def test_normalizer_finds_the_constant_dimensions():
    from diffalign.data.normalizer import make_normalizer

    rng = np.random.default_rng(0)
    x = np.stack([rng.normal(size=500), np.full(500, 0.115), 1 + 3e-6 * rng.normal(size=500),
                  np.zeros(500)], 1).astype(np.float32)
    for kind in ("minmax", "gaussian"):
        n = make_normalizer(kind)
        n.fit(x)
        assert n.constant().tolist() == [False, True, False, True], kind
        assert torch.equal(n.normalize(torch.from_numpy(x))[:, [1, 3]], torch.zeros(500, 2))


@pytest.mark.parametrize("kind", ["diffuser", "dd"])
def test_planner_constant_features_are_known_in_training_and_sampling(kind, episodes,
                                                                      tmp_path):
    """A feature constant in the data is in-painted at every position: excluded from the
    loss, imposed while sampling, and exactly its value in every plan."""
    eps3 = _with_constant_feature(episodes)
    torch.manual_seed(0)
    model = build_model(kind, "ddim", "unet", obs_dim=3, act_dim=1, horizon=8,
                        backbone_kwargs=TINY["unet"])
    assert model.spec.fixed_known
    _train(model, eps3)
    fixed = model.fixed_features()
    assert fixed.tolist() == [False, False, True] + ([False] if kind == "diffuser" else [])
    known = model._known(16, torch.Generator().manual_seed(0))
    assert known[..., 2].all() and not known[:, 2:, 0].any()  # prefixes of 1-2 states
    obs = torch.from_numpy(eps3.observations[[3, 50]])
    c = model.condition(obs)
    assert c.inpaint.mask[..., 2].all() and not c.inpaint.mask[:, 1:, :2].any()
    out = model.sample(obs, n=4, generator=torch.Generator().manual_seed(1), steps=3)
    states = model.plan_states(out.x0)
    assert torch.equal(states[..., 2], torch.full_like(states[..., 2], np.float32(0.115)))
    # an observation that strays from the data's constant does not reach the plan
    strayed = obs.clone()
    strayed[:, 2] += 1e-3  # 2000 in normalised units
    assert torch.equal(model.condition(strayed).inpaint.value, c.inpaint.value)
    # a model saved without the field (an older checkpoint) keeps its training convention
    model.save(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["spec"]["fixed_known"] is True
    del cfg["spec"]["fixed_known"]
    old = ModelSpec.from_dict(cfg["spec"])
    assert old.fixed_known is False
    # nothing changes where no feature is constant (Nav1D)
    plain = tiny_model(kind, "ddim")
    _train(plain, episodes)
    assert plain.fixed_features() is None


def test_diffuser_action_weight_weights_the_executed_action_in_the_loss(episodes):
    from diffalign.processes.base import masked_mean

    torch.manual_seed(0)
    model = tiny_model("diffuser", "ddpm", action_weight=10.0)
    plain = tiny_model("diffuser", "ddpm")
    plain.net.load_state_dict(model.net.state_dict())
    ds = model.make_dataset(episodes)
    plain.make_dataset(episodes)
    batch = ds.sample(8, torch.Generator().manual_seed(0))
    x0 = batch["x"]
    w = model._loss_weight(tuple(x0.shape))
    assert w[0, 0, 2] == 10 and w.sum() == 8 * 3 - 1 + 10  # one executed action entry
    assert plain._loss_weight(tuple(x0.shape)) is None
    # the weighted loss is the weighted mean of the same squared errors
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    known = model._known(8, g())
    t = model.process.sample_train_time(8, g(), x0)
    noise = torch.randn(x0.shape, generator=g())
    kw = dict(known=known, t=t, noise=noise)
    got = model.process.loss(model.net, x0, weight=w, **kw)["loss"]
    xt = torch.where(known, x0, model.process.add_noise(x0, t, noise))
    err = (model.net(xt, t) - model.process.target(x0, noise, t)) ** 2
    want, _ = masked_mean(err, w * (~known).float())
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="action_weight"):
        tiny_model("diffuser", action_weight=0.0)
    with pytest.raises(ValueError, match="action_weight is for the diffuser"):
        tiny_model("dp", action_weight=10.0)


class _MoreIsBetter(torch.nn.Module):
    """Q(s, a) = a: a critic that extrapolates, rewarding ever larger actions."""

    def q(self, obs, act):
        return act[..., 0]


@pytest.mark.parametrize("kind", KINDS)
def test_reward_scores_only_what_lies_in_the_data_range(kind, episodes):
    """An action (or plan) far outside the data earns no more reward than the data's edge:
    alignment cannot climb a critic's extrapolation (aligned Diffuser-SM actions reached
    -1200 on Nav1D partial, where the data spans [-1, 1])."""
    model = tiny_model(kind)
    model._fit_normalizers(episodes)
    g = torch.Generator().manual_seed(0)
    obs = torch.as_tensor(episodes.observations[:4])[:, None]
    shape = model.expanded_condition(obs, 1)[2]
    x = torch.zeros(shape)
    x[:] = 0.3 * torch.randn(shape, generator=g)
    far, edge = x.clone(), x.clone()
    far[...] = 50.0  # every feature far outside the normalised data range [-1, 1]
    edge[...] = 1.0
    critic = _MoreIsBetter()
    r_far, r_edge, r_in = (model.reward(v, obs, critic) for v in (far, edge, x))
    torch.testing.assert_close(r_far, r_edge)
    hi = float(episodes.actions.max())
    assert float(r_edge.max()) <= hi + 1e-5
    assert bool((r_edge >= r_in - 1e-6).all())
