"""RL variants (QV-PG, PPO, REINFORCE; credit, dynamic truncation, entropy) and SFT's data
threshold, on a tiny seeded Nav1D Diffusion Policy with a known critic, and their flags."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from conftest import TargetActionCritic, train_tiny_dp
from diffalign.align.common import (
    AlignSetup,
    condition_pool,
    freeze,
    reference_likelihood,
    validation_reward,
)
from diffalign.align.lora import add_lora, lora_parameters, remove_lora
from diffalign.align.rl import (
    RLConfig,
    RLMethod,
    credit_decreasing,
    credit_step_scales,
    knn_entropy,
    policy_gradient_loss,
)
from diffalign.align.sft import SFTConfig, SFTMethod
from diffalign.eval.metrics import candidate_entropy
from diffalign.tasks import resolve_task

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def trained():
    task = resolve_task("nav1d/full", episodes=200)
    model = train_tiny_dp(task.episodes)
    states = condition_pool(task.episodes, model.spec.obs_history, 256, seed=0)
    val = condition_pool(task.episodes, model.spec.obs_history, 64, seed=1)
    return model, model.net.state_dict(), states, val, task.episodes


@pytest.fixture
def setup(trained):
    """A fresh LoRA adapter (rank 4, seeded) on the reference; removed after the test."""
    model, state, states, val, episodes = trained
    model.net.load_state_dict(state)
    freeze(model)
    torch.manual_seed(0)  # LoRA A matrices are drawn from the global generator
    net = add_lora(model.net, r=4)
    s = AlignSetup(model=model, critic=freeze(TargetActionCritic()), states=states,
                   val_states=val, steps=5, episodes=episodes)
    yield s, net
    remove_lora(net)


def _perturb_adapter(net, seed: int = 5) -> None:
    """Give the adapter's B matrices (zero at the start) seeded values, so that both A and B
    get gradients and the adapted net differs from the reference."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def _grads(net) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in lora_parameters(net)]


def _one_step_grads(setup, net, cfg: RLConfig, patch=None) -> list[torch.Tensor]:
    """The adapter's gradient of one update of ``cfg`` from the current adapter, which is
    restored afterwards."""
    params = lora_parameters(net)
    saved = [p.detach().clone() for p in params]
    m = RLMethod(setup, net, cfg, torch.Generator().manual_seed(0))
    if patch is not None:
        patch(m)
    m.step()
    grads = _grads(net)
    with torch.no_grad():
        for p, v in zip(params, saved):
            p.copy_(v)
            p.grad = None
    return grads


# ------------------------------------------------------------------ each variant helps

VARIANTS = {
    "qvpg": dict(algo="qvpg"),
    "ppo": dict(algo="ppo"),
    "reinforce": dict(algo="reinforce"),
    "qvpg_decreasing_random_k": dict(algo="qvpg", credit="decreasing", grad_last_k=4,
                                     grad_k_min=2, random_k=True),
    "qvpg_x0_similarity": dict(algo="qvpg", credit="x0_similarity"),
    "ppo_x0_similarity": dict(algo="ppo", credit="x0_similarity"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_rl_variant_raises_reward(setup, variant):
    s, net = setup
    ref_reward, _ = validation_reward(s, net=net)
    m = RLMethod(s, net, RLConfig(states_per_update=16, group_size=8, lr=3e-3, kl_coef=0.0,
                                  **VARIANTS[variant]), torch.Generator().manual_seed(0))
    ks = set()
    for _ in range(12):
        stats = m.step()
        assert all(math.isfinite(v) for v in stats.values() if isinstance(v, float)), stats
        ks.add(stats.get("grad_last_k"))
    new_reward, _ = validation_reward(s, net=net)
    assert new_reward > ref_reward + 0.25 * abs(ref_reward), (variant, ref_reward, new_reward)
    if VARIANTS[variant].get("random_k"):
        assert ks <= {2, 3, 4} and len(ks) > 1  # K drawn per update from [2, 4]


# ------------------------------------------------------------------ credit assignment

def test_credit_step_scales_multiply_to_the_weights():
    lam = torch.tensor([[0.5, 2.0, 1.0], [0.0, 0.0, 3.0]])
    s = credit_step_scales(lam)
    torch.testing.assert_close(s, torch.tensor([[0.25, 2.0, 1.0], [0.0, 0.0, 3.0]]))
    # step j's share is weighted by the product of the scales from j to the last step
    prod = torch.flip(torch.cumprod(torch.flip(s, [1]), 1), [1])
    torch.testing.assert_close(prod, lam)
    with pytest.raises(ValueError, match="weight of 0"):
        credit_step_scales(torch.tensor([1.0, 0.0, 1.0]))


def test_qvpg_credit_on_last_step_equals_truncation_k1(setup):
    s, net = setup
    _perturb_adapter(net)
    base = dict(algo="qvpg", states_per_update=8, group_size=4, kl_coef=0.0, lr=1e-3,
                max_grad_norm=1e9)
    want = _one_step_grads(s, net, RLConfig(grad_last_k=1, **base))

    def last_step_only(m):
        def weights(x0_preds, x0):
            lam = torch.zeros(x0.shape[0], x0_preds.shape[0], device=x0.device)
            lam[:, -1] = 1.0
            return lam
        m._credit_weights = weights

    got = _one_step_grads(s, net, RLConfig(grad_last_k=4, credit="decreasing", **base),
                          patch=last_step_only)
    full = _one_step_grads(s, net, RLConfig(grad_last_k=4, **base))
    assert any(float(w.abs().max()) > 1e-4 for w in want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
    # the earlier steps' shares are really gone: the untruncated gradient differs
    assert max(float((f - w).abs().max()) for f, w in zip(full, want)) > 1e-4
    # all weights 1 (γ = 1) is the unweighted QV-PG gradient
    ones = _one_step_grads(s, net, RLConfig(grad_last_k=4, credit="decreasing", credit_gamma=1.0,
                                            **base))
    for g, f in zip(ones, full):
        torch.testing.assert_close(g, f, atol=1e-6, rtol=1e-5)


def test_ppo_credit_all_ones_equals_unweighted(setup):
    s, net = setup
    _perturb_adapter(net)
    logp = torch.randn(6, 4)
    adv, old = torch.randn(6), logp + 0.3 * torch.randn(6, 4)
    for lp_old in (None, old):
        a = policy_gradient_loss(logp, adv, lp_old, credit=torch.ones(4))["loss"]
        b = policy_gradient_loss(logp, adv, lp_old)["loss"]
        assert a.item() == pytest.approx(b.item(), abs=1e-7)
    assert credit_decreasing(5, gamma=1.0).tolist() == [1.0] * 5
    base = dict(algo="ppo", states_per_update=8, group_size=4, kl_coef=0.0, ppo_epochs=1,
                max_grad_norm=1e9)
    want = _one_step_grads(s, net, RLConfig(**base))
    got = _one_step_grads(s, net, RLConfig(credit="decreasing", credit_gamma=1.0, **base))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
    other = _one_step_grads(s, net, RLConfig(credit="x0_similarity", **base))
    assert max(float((o - w).abs().max()) for o, w in zip(other, want)) > 1e-6


# ------------------------------------------------------------------ entropy

def test_knn_entropy_matches_a_gaussian():
    g = torch.Generator().manual_seed(0)
    for d, sigma in ((1, 0.5), (2, 1.0), (3, 0.2)):
        x = sigma * torch.randn(4000, 1, d, generator=g)
        true = 0.5 * d * math.log(2 * math.pi * math.e * sigma**2)
        assert float(knn_entropy(x, 4000).mean()) == pytest.approx(true, abs=0.08)
    # groups are separate: a collapsed group has a far lower estimate than a spread one
    x = torch.cat([torch.zeros(8, 1, 2) + 1e-3 * torch.randn(8, 1, 2, generator=g),
                   torch.randn(8, 1, 2, generator=g)])
    h = knn_entropy(x, 8).view(2, 8).mean(1)
    assert h[0] < h[1] - 5
    assert torch.isfinite(knn_entropy(torch.zeros(4, 1, 2), 2)).all()  # duplicates
    with pytest.raises(ValueError, match="group_size >= 2"):
        knn_entropy(x, 1)


def _first_action_entropy(s, net) -> float:
    """candidate_entropy of 8 first actions per validation state (fixed seed)."""
    from diffalign.align.lora import merged_copy

    model, obs = s.model, s.val_states[:32]
    out = model.sample(obs, n=8, generator=torch.Generator().manual_seed(7), steps=s.steps,
                       net=merged_copy(net))
    act = model.actions_from_x(out.x0, obs.repeat_interleave(8, 0))[:, 0]
    return candidate_entropy(act.view(len(obs), 8, -1).detach())


@pytest.mark.parametrize("algo, coef", [("qvpg", 0.01), ("ppo", 0.05)])
def test_entropy_bonus_keeps_candidates_diverse(trained, algo, coef):
    """The same seeded run with and without the bonus: with it the candidates of a state
    stay more spread (Gaussian-fit entropy of their first actions), and the reward still
    rises well above the reference's."""
    def run(c):
        model, state, states, val, episodes = trained
        model.net.load_state_dict(state)
        freeze(model)
        torch.manual_seed(0)
        net = add_lora(model.net, r=4)
        s = AlignSetup(model=model, critic=freeze(TargetActionCritic()), states=states,
                       val_states=val, steps=5, episodes=episodes)
        ref = validation_reward(s, net=net)[0]
        m = RLMethod(s, net, RLConfig(algo=algo, states_per_update=16, group_size=8, lr=3e-3,
                                      kl_coef=0.0, entropy_coef=c),
                     torch.Generator().manual_seed(0))
        for _ in range(10):
            stats = m.step()
        assert ("entropy" in stats) == (c > 0)
        h, r = _first_action_entropy(s, net), validation_reward(s, net=net)[0]
        remove_lora(net)
        return ref, h, r

    ref, h0, r0 = run(0.0)
    _, h1, r1 = run(coef)
    assert h1 > h0 + 0.5, (h0, h1)
    assert r1 > ref + 0.25 * abs(ref), (ref, r0, r1)


# ------------------------------------------------------------------ SFT's data threshold

class _Out:
    def __init__(self, x0):
        self.x0 = x0


def _sft_case(s, net, monkeypatch, source: str, off_data_wins: bool, quantile: float = 0.1):
    """One SFT round whose candidates per state are a typical dataset window (in the data)
    and the same window with its actions far outside the data's range; the critic picks the
    off-data one when ``off_data_wins``."""
    model = s.model
    batch = model.make_dataset(s.episodes).get_batch(np.arange(64) * 7)
    obs_all = model.unnorm("observations", batch["obs_history"])
    ll = reference_likelihood(s, net, batch["x"], obs_all)
    pick = ll.argsort()[[32, 40, 48, 56]]  # windows between the median and the 90% quantile
    x_in, obs = batch["x"][pick], obs_all[pick]
    x_off = torch.full_like(x_in, 4.0)  # normalised actions live in [-1, 1]
    cands = torch.stack([x_in, x_off], 1)  # (S, 2, H, D)
    a_off = float(model.actions_from_x(x_off[:1])[0, 0, 0])
    s = dataclasses.replace(s, states=obs, critic=freeze(TargetActionCritic(
        a_off if off_data_wins else -1e3)))
    m = SFTMethod(s, net, SFTConfig(states_per_update=4, candidates=2, likelihood_source=source,
                                    likelihood_quantile=quantile), torch.Generator().manual_seed(0))

    def fake_sample(o, n=1, **kw):  # each drawn state's own two candidates
        i = torch.cdist(o.flatten(1), obs.flatten(1)).argmin(1)
        return _Out(cands[i].reshape(-1, *x_in.shape[1:]))

    monkeypatch.setattr(model, "sample", fake_sample)
    x, _, stats = m.winners()
    return m, x, stats, x_in, x_off, obs


def test_sft_data_threshold_rejects_off_data_winner_and_keeps_in_data(setup, monkeypatch):
    s, net = setup
    m, x, stats, x_in, x_off, obs = _sft_case(s, net, monkeypatch, "data", off_data_wins=True)
    assert stats["winners"] == 0 and stats["rejected_ood"] == 1.0
    floor = m.data_floor()
    assert stats["likelihood_floor"] == pytest.approx(floor)
    assert m._data_floor == floor  # cached: computed once per method
    assert float(m._ref_likelihood(x_off, obs, 1).max()) < floor
    m, x, stats, x_in, x_off, obs = _sft_case(s, net, monkeypatch, "data", off_data_wins=False)
    assert stats["winners"] == 4 and stats["rejected_ood"] == 0.0
    assert all(any(torch.equal(w, xi) for xi in x_in) for w in x)


def test_sft_current_threshold_is_relative_and_zero_disables(setup, monkeypatch):
    s, net = setup
    # half the round's candidates are off the data: their own 10% quantile drops at most
    # the least likely one, and lets the other off-data winners through
    _, _, stats, *_ = _sft_case(s, net, monkeypatch, "current", off_data_wins=True)
    assert stats["winners"] >= 3
    # likelihood_quantile=0 (run nav1d on random-policy data) disables the guard
    m, _, stats, *_ = _sft_case(s, net, monkeypatch, "data", off_data_wins=True, quantile=0.0)
    assert stats["winners"] == 4 and "rejected_ood" not in stats and m._data_floor is None
    no_data = dataclasses.replace(s, episodes=None)
    with pytest.raises(ValueError, match="likelihood_source='data' needs the dataset"):
        SFTMethod(no_data, net, SFTConfig(), torch.Generator())
    SFTMethod(no_data, net, SFTConfig(likelihood_quantile=0.0), torch.Generator())
    with pytest.raises(ValueError, match="likelihood_source='nope'"):
        SFTConfig(likelihood_source="nope")


@pytest.mark.parametrize("search", [False, True])
def test_sft_with_data_threshold_raises_reward(setup, search):
    s, net = setup
    ref_reward, _ = validation_reward(s, net=net)
    extra = dict(action_proposals=21, replay=96) if search else {}
    m = SFTMethod(s, net, SFTConfig(states_per_update=32, candidates=8, lr=3e-3, epochs=6,
                                    **extra), torch.Generator().manual_seed(0))
    for _ in range(5):
        stats = m.step()
    assert stats["rejected_ood"] < 0.5
    new_reward, _ = validation_reward(s, net=net)
    assert new_reward > ref_reward + 0.25 * abs(ref_reward), (ref_reward, new_reward)


# ------------------------------------------------------------------ config and flags

def test_rl_config_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="random_k"):
        RLConfig(algo="ppo", random_k=True)
    with pytest.raises(ValueError, match="entropy_coef=0.1"):
        RLConfig(group_size=1, entropy_coef=0.1)
    with pytest.raises(ValueError, match="grad_k_min=4"):
        RLConfig(grad_last_k=3, grad_k_min=4)
    with pytest.raises(ValueError, match="credit='retro'"):
        RLConfig(credit="retro")
    with pytest.raises(ValueError, match="credit_gamma=0"):
        RLConfig(credit_gamma=0.0)


def _ckpt(tmp_path):
    for name in ("ref", "critic"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    return [str(tmp_path / "ref"), "--critic", str(tmp_path / "critic"), "--out",
            str(tmp_path / "out")]


def test_align_flags_reach_the_configs(tmp_path):
    import tyro

    from diffalign.commands.align import AlignArgs

    base = _ckpt(tmp_path)
    a = tyro.cli(AlignArgs, args=base)
    assert RLConfig(**a.rl_overrides()) == dataclasses.replace(
        RLConfig(), lr=1e-3, kl_coef=0.005, states_per_update=32, group_size=8)
    assert a.sft_likelihood == "data"
    a = tyro.cli(AlignArgs, args=base + ["--rl-algo", "ppo", "--rl-credit", "x0_similarity",
                                         "--rl-entropy-coef", "0.2", "--sft-likelihood",
                                         "current"])
    cfg = RLConfig(**a.rl_overrides())
    assert (cfg.algo, cfg.credit, cfg.entropy_coef) == ("ppo", "x0_similarity", 0.2)
    assert a.sft_likelihood == "current"
    a = tyro.cli(AlignArgs, args=base + ["--rl-grad-k", "2", "--rl-grad-k-max", "5"])
    cfg = RLConfig(**a.rl_overrides())
    assert (cfg.random_k, cfg.grad_k_min, cfg.grad_last_k) == (True, 2, 5)
    cfg = RLConfig(**tyro.cli(AlignArgs, args=base + ["--rl-grad-k", "1"]).rl_overrides())
    assert (cfg.random_k, cfg.grad_last_k) == (False, 1)


@pytest.mark.parametrize("argv, named", [
    (["--rl-algo", "nope"], "nope"),
    (["--rl-credit", "sometimes"], "sometimes"),
    (["--sft-likelihood", "maybe"], "maybe"),
    (["--rl-algo", "ppo", "--rl-grad-k", "2"], "rl_grad_k=2"),
    (["--rl-grad-k", "4", "--rl-grad-k-max", "2"], "rl_grad_k_max=2"),
    (["--rl-group", "1", "--rl-entropy-coef", "0.1"], "rl_entropy_coef=0.1"),
    (["--rl-algo", "reinforce", "--rl-group", "1"], "rl_group=1"),
])
def test_align_bad_rl_flags_exit_2_naming_the_value(tmp_path, capsys, argv, named):
    from diffalign.cli import main

    assert main(["align", *_ckpt(tmp_path), *argv]) == 2
    out = capsys.readouterr()
    assert named in " ".join((out.out + out.err).split())
    assert not (tmp_path / "out").exists()
