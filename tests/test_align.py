"""Alignment methods on a tiny Nav1D Diffusion Policy: each raises the reward over its
reference, only the LoRA adapter changes, the reference is untouched, guards restore."""

import dataclasses
import math

import pytest
import torch

from conftest import TargetActionCritic, train_tiny_dp
from diffalign.align.cascade import CascadeConfig, CascadeModel, build_refiner, train_cascade
from diffalign.align.common import AlignSetup, condition_pool, freeze, validation_reward
from diffalign.align.dpo import DPOConfig, DPOMethod, dataset_pairs
from diffalign.align.guards import Guard, GuardConfig
from diffalign.align.lora import add_lora, lora_parameters, reference, remove_lora
from diffalign.align.rl import RLConfig, RLMethod
from diffalign.align.sequence import SequenceConfig, run_sequence
from diffalign.align.sft import SFTConfig, SFTMethod
from diffalign.models.registry import build_model
from diffalign.tasks import resolve_task

pytest.importorskip("peft")



@pytest.fixture(scope="module")
def trained():
    task = resolve_task("nav1d/full", episodes=200)
    model = train_tiny_dp(task.episodes)
    states = condition_pool(task.episodes, model.spec.obs_history, 256, seed=0)
    val = condition_pool(task.episodes, model.spec.obs_history, 64, seed=1)
    # the same steps rewarded like the critic below: dataset pairs ranked by this return
    # prefer the windows whose actions are nearer 0.6
    episodes = dataclasses.replace(
        task.episodes, rewards=(-(task.episodes.actions[:, 0] - 0.6) ** 2).astype("float32"))
    return model, model.net.state_dict(), states, val, episodes


def _setup(trained):
    model, state, states, val, episodes = trained
    model.net.load_state_dict(state)
    freeze(model)
    torch.manual_seed(0)  # LoRA A matrices are drawn from the global generator
    net = add_lora(model.net, r=4)
    setup = AlignSetup(model=model, critic=freeze(TargetActionCritic()), states=states,
                       val_states=val, steps=5, episodes=episodes)
    return setup, net


def _unwrap(trained, net):
    # undo the in-place injection so the next test starts from the plain reference net
    remove_lora(net)


@pytest.mark.parametrize("method", ["ppo", "reinforce", "qvpg", "qvpg_group", "dpo",
                                    "dpo_dataset", "sft", "sft_diffusion", "sft_search"])
def test_each_method_raises_reward_over_reference(trained, method):
    setup, net = _setup(trained)
    base = {k: v.clone() for k, v in net.get_base_model().state_dict().items()
            if "lora_" not in k}
    ref_reward, _ = validation_reward(setup, net=net)
    g = torch.Generator().manual_seed(0)
    if method.startswith(("ppo", "reinforce", "qvpg")):
        algo, _, scale = method.partition("_")
        m = RLMethod(setup, net, RLConfig(algo=algo, states_per_update=16, group_size=8,
                                          lr=3e-3, kl_coef=0.0, qvpg_scale=scale or "none"), g)
        iters = 12
    elif method.startswith("dpo"):
        source = "dataset" if method == "dpo_dataset" else "reference"
        m = DPOMethod(setup, net, DPOConfig(states_per_update=32, candidates=8, lr=3e-3,
                                            beta=200.0, pair_source=source), g)
        iters = 12
    else:
        loss = "diffusion" if method == "sft_diffusion" else "min_snr"
        search = dict(action_proposals=21, replay=96) if method == "sft_search" else {}
        m = SFTMethod(setup, net, SFTConfig(states_per_update=32, candidates=8, lr=3e-3,
                                            epochs=6, loss=loss, **search), g)
        iters = 5
    for _ in range(iters):
        stats = m.step()
        assert all(math.isfinite(v) for v in stats.values() if isinstance(v, float))
    new_reward, _ = validation_reward(setup, net=net)
    assert new_reward > ref_reward + 0.25 * abs(ref_reward), (method, ref_reward, new_reward)
    # only adapter parameters changed; the reference (adapter off) is the original model
    after = {k: v for k, v in net.get_base_model().state_dict().items() if "lora_" not in k}
    for k, v in base.items():
        assert torch.equal(after[k], v), k
    with reference(net):
        again, _ = validation_reward(setup, net=net)
    assert again == pytest.approx(ref_reward, abs=1e-6)
    _unwrap(trained, net)


def test_kl_term_keeps_closer_to_reference(trained):
    def drift(kl):
        setup, net = _setup(trained)
        g = torch.Generator().manual_seed(0)
        m = RLMethod(setup, net, RLConfig(algo="ppo", states_per_update=16, lr=3e-3, kl_coef=kl,
                                          ppo_epochs=1), g)
        for _ in range(5):
            m.step()
        obs = setup.val_states
        with torch.no_grad():
            x = setup.model.sample(obs, generator=torch.Generator().manual_seed(3), net=net).x0
            with reference(net):
                x_ref = setup.model.sample(obs, generator=torch.Generator().manual_seed(3),
                                           net=net).x0
        _unwrap(trained, net)
        return float((x - x_ref).pow(2).mean())

    assert drift(5.0) < drift(0.0)


def test_guard_restores_after_injected_collapse(trained):
    setup, net = _setup(trained)
    params = lora_parameters(net)
    guard = Guard(params, reference_reward=-1.0, cfg=GuardConfig())
    guard.observe(-0.5)
    good = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(float("nan"))
    opt = torch.optim.Adam(params, lr=1e-3)
    reason = guard.loss_spiked(float("nan"))
    assert reason and "non-finite" in reason
    ev = guard.handle_collapse(reason, opt, "rl", 3)
    assert all(torch.equal(p, q) for p, q in zip(params, good))
    assert ev["new_lr"] == pytest.approx(5e-4) and guard.events == [ev]
    assert guard.reward_collapsed(-2.0) is not None and guard.reward_collapsed(-0.55) is None
    for _ in range(6):
        assert guard.loss_spiked(1.0) is None
    assert "spike" in guard.loss_spiked(1000.0)
    _unwrap(trained, net)


def test_sequence_runs_methods_and_records_injected_collapse(trained, monkeypatch):
    setup, net = _setup(trained)
    calls = {"n": 0}
    orig = SFTMethod.step

    def bad_step(self):
        calls["n"] += 1
        out = orig(self)
        if calls["n"] == 2:  # poison the adapter once: the guard must undo it
            with torch.no_grad():
                for p in lora_parameters(self.net):
                    p.add_(float("nan"))
            out["loss"] = float("nan")
        return out

    monkeypatch.setattr(SFTMethod, "step", bad_step)
    seq = SequenceConfig(methods=("rl", "sft"), passes=1, max_updates=6, eval_every=2,
                         patience=3)
    cfgs = {"rl": RLConfig(states_per_update=16, lr=3e-3, kl_coef=0.0),
            "sft": SFTConfig(states_per_update=16, candidates=8, lr=3e-3, epochs=2)}
    ref_reward, _ = validation_reward(setup, net=net)
    stages, events, guard = run_sequence(setup, net, seq, cfgs, progress=False)
    assert [s.name for s in stages] == ["rl", "sft"]
    assert any(e["kind"] == "collapse" and e["stage"] == "sft" for e in events)
    final, _ = validation_reward(setup, net=net)
    assert math.isfinite(final) and final >= ref_reward
    assert final == pytest.approx(guard.best_reward, abs=1e-6)
    _unwrap(trained, net)


def test_method_eval_every_overrides_the_sequence(trained):
    setup, net = _setup(trained)
    seq = SequenceConfig(methods=("rl", "sft"), passes=1, max_updates=6, eval_every=2,
                         patience=10)
    cfgs = {"rl": RLConfig(states_per_update=8, lr=3e-3, kl_coef=0.0, eval_every=3),
            "sft": SFTConfig(states_per_update=8, candidates=4, epochs=1, max_updates=4)}
    stages, _, _ = run_sequence(setup, net, seq, cfgs, progress=False)
    validated = {s.name: [h["iteration"] for h in s.history if "val_reward" in h]
                 for s in stages}
    assert validated == {"rl": [2, 5], "sft": [1, 3]}
    with pytest.raises(ValueError, match="eval_every=0"):
        RLConfig(eval_every=0)
    _unwrap(trained, net)


def test_cascade_starts_equal_to_reference_and_trains(trained):
    setup, net = _setup(trained)
    refiner = build_refiner(setup.model, net)
    obs = setup.val_states[:4]
    x = torch.randn(4, *setup.model.condition(obs).shape)
    t = torch.full((4,), 0.5)
    cond = setup.model.condition(obs).cond
    with torch.no_grad(), reference(net):
        want = net(x, t, cond=cond)
    got = refiner(x, t, cond=cond, extra=torch.randn_like(x))
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    # from the aligned weights: equal to the net with its (non-zero) adapter on
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
        aligned = net(x, t, cond=cond)
    assert not torch.allclose(aligned, want)
    refiner_a = build_refiner(setup.model, net, warm_start="aligned")
    got_a = refiner_a(x, t, cond=cond, extra=torch.randn_like(x))
    torch.testing.assert_close(got_a, aligned, atol=1e-5, rtol=1e-4)
    with torch.no_grad(), reference(net):  # the net itself is unchanged by the merge
        torch.testing.assert_close(net(x, t, cond=cond), want, atol=0, rtol=0)
    ref = train_cascade(setup, net, CascadeConfig(mode="supervised", rounds=1,
                                                  steps_per_round=3, states_per_update=8,
                                                  keep_best=False), progress=False)
    with pytest.warns(UserWarning, match="unstable"):
        CascadeModel(setup.model, net, ref, passes=2)
    casc = CascadeModel(setup.model, net, ref)
    out = casc.sample(obs, n=2, generator=torch.Generator().manual_seed(0))
    assert out.x0.shape[0] == 8 and torch.isfinite(out.x0).all()
    # the merged cascade (faster sampling) draws the same samples; the adapter stays on
    fast = casc.merged().sample(obs, n=2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fast.x0, out.x0, atol=1e-4, rtol=1e-4)
    assert lora_parameters(net) and casc._aligned is net
    _unwrap(trained, net)


def test_cascade_keeps_its_best_validated_refiner(trained):
    from diffalign.align.cascade import cascade_validation

    setup, net = _setup(trained)
    hist: list[dict] = []
    cfg = CascadeConfig(mode="supervised", rounds=2, steps_per_round=3, states_per_update=8,
                        lr=5e-2)
    refiner = train_cascade(setup, net, cfg, progress=False, history=hist)
    assert [h["round"] for h in hist] == [0, 1, 2]
    best = max(h["val_reward"] for h in hist)
    # the returned refiner is the best of the rounds, and never worse than round 0 (the
    # aligned model itself: None when no round beat it)
    assert cascade_validation(setup, net, refiner) == pytest.approx(best, abs=1e-5)
    assert best >= hist[0]["val_reward"]
    off = train_cascade(setup, net, CascadeConfig(mode="supervised", rounds=1,
                                                  steps_per_round=1, states_per_update=8,
                                                  keep_best=False),
                        progress=False, history=(h2 := []))
    assert h2 == [] and off is not None
    _unwrap(trained, net)


def test_qvpg_keeps_a_kl_on_deterministic_samplers(trained):
    """DDIM (η=0) has no noisy transition; its KL is taken on its stochastic variant."""
    from diffalign.processes import build_process

    setup, net = _setup(trained)
    model = setup.model
    original = model.process
    model.process = build_process("ddim", default_steps=5)
    try:
        m = RLMethod(setup, net, RLConfig(algo="qvpg", states_per_update=8, group_size=4,
                                          lr=3e-2, kl_coef=1.0, grad_last_k=3),
                     torch.Generator().manual_seed(0))
        first = m.step()
        assert first["kl"] == pytest.approx(0.0, abs=1e-8)  # the adapter starts at zero
        later = [m.step()["kl"] for _ in range(3)]
        assert max(later) > 0
    finally:
        model.process = original
        _unwrap(trained, net)


def test_support_guard_flags_samples_off_the_data(trained):
    from diffalign.align.common import fraction_below, outside_support, support_floor

    setup, net = _setup(trained)
    floor = support_floor(setup, net)
    # the reference against its own 10% quantile: about 10% below (other noise draws)
    assert outside_support(setup, net, floor) < 0.3
    obs = setup.val_states
    with torch.no_grad(), reference(net):
        x = setup.model.sample(obs, generator=torch.Generator().manual_seed(5), net=net).x0
    assert fraction_below(setup, net, x, obs, floor) < 0.3
    # the data's random policy is temporally correlated: an action chunk that flips
    # between -1 and 1 at every step is one the reference never draws
    zigzag = torch.ones_like(x)
    zigzag[:, 1::2] = -1
    frac = fraction_below(setup, net, zigzag, obs, floor)
    assert frac > 0.8
    guard = Guard(lora_parameters(net), reference_reward=0.0, cfg=GuardConfig(support_frac=0.35))
    assert guard.support_left(0.2) is None
    reason = guard.support_left(frac)
    assert reason and "support" in reason
    _unwrap(trained, net)


def test_dataset_pairs_prefer_the_higher_return_among_near_states(trained):
    model, _, _, _, episodes = trained
    d = dataset_pairs(model, episodes, neighbours=8, discount=0.99, max_windows=2000)
    n = len(d["gap"])
    assert n > 1000 and bool((d["gap"] > 0).all())
    assert d["x_w"].shape == d["x_l"].shape == (n, model.spec.horizon, model.act_dim)
    assert d["obs"].shape == (n, model.spec.obs_history, model.obs_dim)
    # the return here rewards actions near 0.6: winners' first actions are nearer on average
    a_w = model.unnorm("actions", d["x_w"])[:, 0, 0]
    a_l = model.unnorm("actions", d["x_l"])[:, 0, 0]
    assert float((a_w - 0.6).abs().mean()) < float((a_l - 0.6).abs().mean()) - 0.1
    with pytest.raises(ValueError, match="neighbours"):
        dataset_pairs(model, episodes, neighbours=1)


def test_online_rounds_grow_the_buffer_train_the_critic_and_rebase(trained):
    from diffalign.align.online import OnlineConfig, OnlineTuner
    from diffalign.models.critic import CriticConfig, train_critic

    task = resolve_task("nav1d/full", episodes=200)
    critic = freeze(train_critic(task.episodes, CriticConfig(steps=30, hidden=32, seed=0),
                                 progress=False))
    setup, net = _setup(trained)
    setup.critic, setup.episodes = critic, task.episodes
    before = [p.detach().clone() for p in critic.trainable_parameters()]
    n_states = len(setup.states)
    tuner = OnlineTuner(setup, task.episodes, task.make_env,
                        OnlineConfig(every=2, episodes=3, critic_steps=5, max_rounds=2))
    offline = tuner.offline_size
    seq = SequenceConfig(methods=("rl",), passes=1, max_updates=6, eval_every=2, patience=5)
    stages, events, guard = run_sequence(
        setup, net, seq, {"rl": RLConfig(states_per_update=8, lr=3e-3)}, progress=False,
        online=tuner)
    rounds = [e for e in events if e["kind"] == "online_round"]
    assert [e["round"] for e in rounds] == [1, 2]  # max_rounds caps them
    assert len(tuner.buffer["rewards"]) == offline + 2 * 3 * 32  # 3 episodes of 32 steps
    assert rounds[-1]["buffer"] == offline + 192 and len(setup.states) == n_states + 192
    assert all(math.isfinite(e["val_reward"]) and math.isfinite(e["critic_loss"])
               for e in rounds)
    after = critic.trainable_parameters()
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    assert not any(p.requires_grad for p in critic.parameters())  # frozen again
    final, _ = validation_reward(setup, net=net)
    assert final == pytest.approx(guard.best_reward, abs=1e-6)  # in the new critic's units
    with pytest.raises(ValueError, match="every"):
        OnlineConfig(every=0)
    _unwrap(trained, net)


def test_align_online_saves_the_fine_tuned_critic(trained, tmp_path):
    from diffalign.align.online import OnlineConfig
    from diffalign.align.runner import AlignConfig, align
    from diffalign.models.critic import CriticConfig, IQLCritic, train_critic

    model, state, _, _, _ = trained
    model.net.load_state_dict(state)
    task = resolve_task("nav1d/full", episodes=200)
    critic = train_critic(task.episodes, CriticConfig(steps=20, hidden=32, seed=0),
                          progress=False)
    offline = {k: v.clone() for k, v in critic.state_dict().items()}
    cfg = AlignConfig(
        sequence=SequenceConfig(methods=("rl",), passes=1, max_updates=2, eval_every=1,
                                patience=5),
        rl=RLConfig(states_per_update=4), cascade=None, conditions=32, val_conditions=8,
        steps=5, online=OnlineConfig(every=1, episodes=1, critic_steps=3))
    meta = model.meta
    model.meta = {**meta, "task": "nav1d/full"}  # the rounds' env comes from the model's task
    try:
        res = align(model, critic, task.episodes, cfg, out_dir=tmp_path, progress=False)
    finally:
        model.meta = meta
    assert [e["round"] for e in res.events if e["kind"] == "online_round"] == [1, 2]
    saved = IQLCritic.load(tmp_path / "critic_online")
    assert all(torch.equal(saved.state_dict()[k], v) for k, v in critic.state_dict().items())
    assert any(not torch.equal(offline[k], v) for k, v in critic.state_dict().items())
    remove_lora(res.net)


def test_align_merge_saves_the_adapted_model_and_calls_back_with_the_net(trained, tmp_path):
    from diffalign.align.runner import AlignConfig, _merged_copy, align
    from diffalign.models.base import ControlModel

    model, state, _, val, episodes = trained
    model.net.load_state_dict(state)
    cfg = AlignConfig(
        sequence=SequenceConfig(methods=("rl",), passes=1, max_updates=2, eval_every=1,
                                patience=5),
        rl=RLConfig(states_per_update=4, lr=3e-2, kl_coef=0.0), cascade=None, conditions=32,
        val_conditions=8, steps=5)
    seen = []
    res = align(model, freeze(TargetActionCritic()), episodes, cfg, out_dir=tmp_path,
                progress=False, merge=True,
                on_stage_end=lambda st, net: seen.append((st.name, net)))
    assert [name for name, _ in seen] == ["rl"] and seen[0][1] is res.net
    cond = model.condition(val[:3]).cond
    x = torch.randn(3, *model.condition(val[:1]).shape,
                    generator=torch.Generator().manual_seed(0))
    t = torch.full((3,), 0.4)
    saved = ControlModel.load(tmp_path / "merged")  # round trip of the merged checkpoint
    with torch.no_grad():
        torch.testing.assert_close(saved.net(x, t, cond=cond), res.net(x, t, cond=cond),
                                   atol=1e-5, rtol=1e-4)
        for p in lora_parameters(res.net):  # a visible adapter, whatever RL kept
            p.add_(0.05)
        want = res.net(x, t, cond=cond)
        with reference(res.net):
            ref = res.net(x, t, cond=cond)
        got = _merged_copy(model, res.net).net(x, t, cond=cond)
    assert not torch.allclose(want, ref, atol=1e-4)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    remove_lora(res.net)


def test_align_mixes_in_greedy_rollout_conditions_and_keeps_the_dynamics(trained, tmp_path,
                                                                       monkeypatch):
    import json

    import diffalign.models.dynamics as dyn_mod
    from diffalign.align.conditions import RolloutConditions
    from diffalign.align.runner import AlignConfig, align
    from diffalign.models.dynamics import DynamicsConfig

    model, state, _, _, episodes = trained
    cfg = AlignConfig(
        sequence=SequenceConfig(methods=("rl",), passes=1, max_updates=1, eval_every=1,
                                patience=5),
        rl=RLConfig(states_per_update=4), cascade=None, conditions=32, val_conditions=8,
        steps=5, rollouts=RolloutConditions(fraction=0.5, proposals=11, horizon=4,
                                            dynamics=DynamicsConfig(steps=20, hidden=16)))
    for _ in range(2):
        model.net.load_state_dict(state)
        res = align(model, freeze(TargetActionCritic()), episodes, cfg, out_dir=tmp_path,
                    progress=False)
        remove_lora(res.net)
        info = json.loads((tmp_path / "align.json").read_text())["conditions"]
        assert info["train"] == 32 and info["rollout_states"] == 16
        assert info["dataset_states"] == 16 and info["rollout_horizon"] == 4
        assert (tmp_path / "dynamics" / "config.json").is_file()
        # the second run loads the saved dynamics instead of training another
        monkeypatch.setattr(dyn_mod, "train_dynamics", lambda *a, **k: pytest.fail("trained"))


def test_dpo_config_rejects_bad_dataset_pair_settings():
    with pytest.raises(ValueError, match="discount"):
        DPOConfig(discount=1.5)
    with pytest.raises(ValueError, match="max_windows=1"):
        DPOConfig(max_windows=1)


def test_a_methods_max_updates_caps_its_stage_below_the_sequence(trained):
    setup, net = _setup(trained)
    seq = SequenceConfig(methods=("rl", "sft"), passes=1, max_updates=6, eval_every=2,
                         patience=100)
    cfgs = {"rl": RLConfig(states_per_update=8, group_size=4),
            "sft": SFTConfig(states_per_update=8, candidates=4, epochs=1, max_updates=2)}
    stages, _, _ = run_sequence(setup, net, seq, cfgs, progress=False)
    assert [(s.name, s.iterations) for s in stages] == [("rl", 6), ("sft", 2)]
    _unwrap(trained, net)


@pytest.mark.parametrize("cfg", [RLConfig, DPOConfig, SFTConfig])
def test_max_updates_below_one_is_refused(cfg):
    with pytest.raises(ValueError, match="max_updates=0"):
        cfg(max_updates=0)


def test_sft_action_search_inpaints_the_critics_best_action(trained):
    setup, net = _setup(trained)
    model = setup.model
    g = torch.Generator().manual_seed(0)
    m = SFTMethod(setup, net, SFTConfig(states_per_update=16, candidates=2, action_proposals=41,
                                        replay=40, likelihood_quantile=0.0), g)
    x, obs, stats = m.winners()
    assert x.shape[0] == obs.shape[0] == 16 and stats["winners"] == 16
    a = model.actions_from_x(x)[:, 0, 0]  # RAW first action of each winner
    # the best of the 41 grid points (and 2 samples) for Q = -(a - 0.6)^2: within half a step
    step = float(model.unnorm("actions", torch.tensor([[1.0]])) -
                 model.unnorm("actions", torch.tensor([[-1.0]]))) / 40
    assert (a - 0.6).abs().max() <= step / 2 + 1e-5
    assert stats["winner_reward"] >= stats["candidate_best_reward"] - 1e-6
    # the rest of the chunk is the model's own sample, not the in-painted action repeated
    assert not torch.allclose(x[:, 1:], x[:, :1].expand_as(x[:, 1:]))
    # replay: earlier winners stay in a buffer of at most 40
    first, _ = m._train_set(x, obs)
    x2, obs2, _ = m.winners()
    both, both_obs = m._train_set(x2, obs2)
    assert len(first) == 16 and len(both) == 32 and torch.equal(both[:16], x)
    x3, obs3, _ = m.winners()
    three, _ = m._train_set(x3, obs3)
    assert len(three) == 40 and torch.equal(three[-16:], x3)
    _unwrap(trained, net)


def test_sft_learning_rate_follows_a_cosine_to_lr_final(trained):
    setup, net = _setup(trained)
    m = SFTMethod(setup, net, SFTConfig(states_per_update=4, candidates=2, epochs=1, lr=1e-3,
                                        lr_final=0.1, max_updates=5, likelihood_quantile=0.0),
                  torch.Generator().manual_seed(0))
    lrs = []
    for _ in range(6):
        m.step()
        lrs.append(m.optimizer.param_groups[0]["lr"])
    want = [1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1, i / 4)))) for i in range(6)]
    assert lrs == pytest.approx(want)
    # a guard's lowering (x0.5) multiplies the schedule from then on
    m.optimizer.param_groups[0]["lr"] *= 0.5
    m.step()
    assert m.optimizer.param_groups[0]["lr"] == pytest.approx(0.5e-4)
    _unwrap(trained, net)
    with pytest.raises(ValueError, match="lr_final=0"):
        SFTConfig(lr_final=0.0)


def test_sft_action_search_refuses_models_that_infer_actions(tmp_path):
    task = resolve_task("nav1d/full", episodes=20)
    dd = build_model("dd", "ddpm", None, task.obs_dim, task.act_dim)
    dd.make_dataset(task.episodes)  # fits the normalisers
    freeze(dd)
    states = condition_pool(task.episodes, dd.spec.obs_history, 8, seed=0)
    torch.manual_seed(0)
    net = add_lora(dd.net, r=2)
    setup = AlignSetup(model=dd, critic=freeze(TargetActionCritic()), states=states,
                       val_states=states)
    with pytest.raises(ValueError, match="action_proposals=8 needs a model that samples"):
        SFTMethod(setup, net, SFTConfig(action_proposals=8), torch.Generator())
    remove_lora(net)
    with pytest.raises(ValueError, match="action_proposals=-1"):
        SFTConfig(action_proposals=-1)


def test_settings_saved_under_the_old_field_names_still_resume(tmp_path):
    """A stage boundary whose fingerprint was taken with the fields under their old names
    (``max_iters``, ``states_per_iter``, ``states_per_round``) resumes; other settings do not."""
    import hashlib
    import json
    import types

    from diffalign.align.common import renamed_fields
    from diffalign.align.runner import AlignConfig, _fingerprint, _load_boundary, _save_boundary
    from diffalign.errors import UserError

    cfg = AlignConfig()
    old = dataclasses.asdict(cfg)
    old["sequence"]["max_iters"] = old["sequence"].pop("max_updates")
    for section, name in (("rl", "states_per_iter"), ("dpo", "states_per_iter"),
                          ("sft", "states_per_round"), ("cascade", "states_per_round")):
        old[section][name] = old[section].pop("states_per_update")
    assert renamed_fields(old) == dataclasses.asdict(cfg)
    assert renamed_fields(dataclasses.asdict(cfg), to_old=True) == old
    model = types.SimpleNamespace(spec=types.SimpleNamespace(to_dict=lambda: {"kind": "dp"}))
    saved = hashlib.sha256(json.dumps({"config": old, "spec": {"kind": "dp"}}, sort_keys=True,
                                      default=str).encode()).hexdigest()
    where = tmp_path / "progress"
    state = {"generator": torch.Generator().get_state(), "torch_rng": torch.get_rng_state(),
             "stages": []}
    _save_boundary(where, dict(state), saved)
    assert _fingerprint(cfg, model) != saved
    resumed = _load_boundary(where, _fingerprint(cfg, model),
                             _fingerprint(cfg, model, old_names=True))
    assert resumed is not None and resumed["stages"] == []
    other = dataclasses.replace(cfg, sequence=SequenceConfig(max_updates=7))
    with pytest.raises(UserError, match="other settings"):
        _load_boundary(where, _fingerprint(other, model), _fingerprint(other, model,
                                                                       old_names=True))


def test_decision_diffuser_aligns_on_its_states_and_without_an_action_search():
    # what the net denoises: the Decision Diffuser's plans hold states only, so the SFT
    # floor of the data and DPO's dataset pairs take the windows' states, not x
    import numpy as np

    from diffalign.data.episodes import Episodes
    from diffalign.models.registry import build_model
    from diffalign.recipes import NAV1D_PRESETS

    rng = np.random.default_rng(0)
    n = 8 * 32
    obs = rng.standard_normal((n, 2)).astype(np.float32)
    timeouts = np.zeros(n, dtype=bool)
    timeouts[31::32] = True
    eps = Episodes.from_arrays(observations=obs, actions=rng.uniform(-1, 1, (n, 1)),
                               rewards=rng.standard_normal(n), terminals=np.zeros(n, bool),
                               timeouts=timeouts, next_observations=obs)
    for kind in ("diffuser", "dd", "dp"):
        model = build_model(kind, "ddpm", None, obs_dim=2, act_dim=1, horizon=8)
        ds = model.make_dataset(eps)
        x = model.diffused(ds.get_batch(np.arange(4)))
        pairs = dataset_pairs(model, eps, neighbours=4, max_windows=64, seed=0)
        hist = torch.zeros(1, model.spec.obs_history, 2)
        assert tuple(x.shape[1:]) == model.expanded_condition(hist, 1)[2][1:]  # a sample's
        assert pairs["x_w"].shape[1:] == x.shape[1:]
        assert model.samples_actions == (kind != "dd")
        assert (model.first_action_mask((1, 8, x.shape[-1])) is None) == (kind == "dd")
    cfg = NAV1D_PRESETS["default"]
    assert cfg.align_config(True, ("sft",), 0).sft.action_proposals > 0
    off = cfg.align_config(True, ("sft",), 0, action_search=False).sft
    assert off.action_proposals == 0 and off.candidates > 1
