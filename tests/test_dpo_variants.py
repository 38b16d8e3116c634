"""Diffusion-DPO's variants: on-policy pairs (``pair_source="current"``) and the min-SNR-γ
weighting, each against an independent computation and on a tiny Nav1D alignment."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import TargetActionCritic, train_tiny_dp
from diffalign.align import dpo
from diffalign.align.common import AlignSetup, condition_pool, freeze, validation_reward
from diffalign.align.dpo import DPOConfig, DPOMethod, diffusion_dpo_loss, snr_weight
from diffalign.align.lora import add_lora, lora_parameters, reference, remove_lora
from diffalign.processes import build_process
from diffalign.tasks import resolve_task

pytest.importorskip("peft")

GAMMA = 5.0  # the γ diffusion_dpo_loss weights with


# ------------------------------------------------------------------ min-SNR-γ, by hand
def _snr_by_hand(name: str, t: torch.Tensor) -> torch.Tensor:
    """SNR(t) = ᾱ / (1 − ᾱ) from each process's closed form (not from its code)."""
    t = t.double()
    if name == "fm":  # x_t = (1 − t) x0 + t ε
        return ((1 - t) / t) ** 2
    if name == "sm":  # VP-SDE, β(t) = 0.1 + 19.9 t: log ᾱ = −(0.1 t + ½ 19.9 t²)
        abar = torch.exp(-(0.1 * t + 0.5 * 19.9 * t**2))
    else:  # DDPM, cosine schedule (Nichol & Dhariwal), K = 100 levels, s = 0.008
        def f(u):
            return torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        abar = f(t) / f(torch.zeros(()))
    return abar / (1 - abar)


@pytest.mark.parametrize("name", ["ddpm", "sm", "fm"])
def test_min_snr_weight_is_min_snr_gamma_over_snr(name):
    p = build_process(name)
    # DDPM times are levels k / K; below the last level the cosine schedule is unclipped
    t = torch.tensor([0.01, 0.1, 0.2, 0.3, 0.5, 0.9])
    snr = _snr_by_hand(name, t)
    assert bool((snr > GAMMA).any() and (snr < GAMMA).any())  # both sides of γ are tried
    want = torch.minimum(snr, torch.tensor(GAMMA, dtype=torch.float64)) / snr
    got = snr_weight(p, t, "min_snr", gamma=GAMMA)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    # low noise (high SNR) is down-weighted, high noise keeps weight 1
    assert float(got[0]) < 0.5 and float(got[-1]) == pytest.approx(1.0)
    torch.testing.assert_close(snr_weight(p, t, "constant"), torch.ones_like(t))


class _Scale(torch.nn.Module):
    def __init__(self, w: float):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w))

    def forward(self, x, t, cond=None, extra=None):
        return self.w * x


@pytest.mark.parametrize("name", ["ddpm", "fm"])
def test_min_snr_dpo_loss_weights_each_pair_by_its_own_time(name, monkeypatch):
    p = build_process(name)
    net, ref = _Scale(0.7), _Scale(0.4)
    g = torch.Generator().manual_seed(0)
    xw, xl = torch.randn(64, 4, 2, generator=g), torch.randn(64, 4, 2, generator=g)
    seen = []
    loss = p.loss

    def spy(*args, **kw):
        seen.append((kw["t"], kw["noise"]))
        return loss(*args, **kw)

    monkeypatch.setattr(p, "loss", spy)
    beta = 3.0
    out = diffusion_dpo_loss(p, net, ref, xw, xl, beta=beta, weighting="min_snr",
                             generator=torch.Generator().manual_seed(1))
    # the four error terms of a pair share one time and one noise
    t, noise = seen[0]
    assert all(torch.equal(s[0], t) and torch.equal(s[1], noise) for s in seen)
    with torch.no_grad():
        def err(model, x):
            return loss(model, x, t=t, noise=noise)["loss_per_sample"]

        margin = (err(net, xw) - err(ref, xw)) - (err(net, xl) - err(ref, xl))
        snr = _snr_by_hand(name, t)
        w = (torch.minimum(snr, torch.tensor(GAMMA, dtype=torch.float64)) / snr).float()
        want = -F.logsigmoid(-beta * w * margin).mean()
        unweighted = -F.logsigmoid(-beta * margin).mean()
    assert bool((w < 0.99).any())  # some pairs are really down-weighted
    torch.testing.assert_close(out["loss"].detach(), want, rtol=1e-5, atol=1e-6)
    assert abs(float(want - unweighted)) > 1e-3
    seen.clear()
    const = diffusion_dpo_loss(p, net, ref, xw, xl, beta=beta,
                               generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(const["loss"].detach(), unweighted, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ on a tiny Nav1D policy

@pytest.fixture(scope="module")
def trained():
    task = resolve_task("nav1d/full", episodes=200)
    model = train_tiny_dp(task.episodes)
    states = condition_pool(task.episodes, model.spec.obs_history, 256, seed=0)
    val = condition_pool(task.episodes, model.spec.obs_history, 64, seed=1)
    return model, model.net.state_dict(), states, val


@pytest.fixture
def setup_net(trained):
    model, state, states, val = trained
    model.net.load_state_dict(state)
    freeze(model)
    torch.manual_seed(0)  # LoRA A matrices are drawn from the global generator
    net = add_lora(model.net, r=4)
    setup = AlignSetup(model=model, critic=freeze(TargetActionCritic()), states=states,
                       val_states=val, steps=5)
    yield setup, net
    remove_lora(net)  # the next test starts from the plain reference net


def _pairs(method, seed):
    method.gen = torch.Generator().manual_seed(seed)
    return method.pairs()


@torch.no_grad()
def _pairs_by_hand(setup, net, n_states, candidates, seed):
    """Best and worst of ``candidates`` samples of ``net`` per drawn state, by the reward."""
    g = torch.Generator().manual_seed(seed)
    obs = setup.states[torch.randint(0, len(setup.states), (n_states,), generator=g)]
    x0 = setup.model.sample(obs, n=candidates, generator=g, steps=setup.steps, net=net).x0
    r = setup.reward(x0, obs.repeat_interleave(candidates, 0)).view(n_states, candidates)
    x = x0.view(n_states, candidates, *x0.shape[1:])
    rows = torch.arange(n_states)
    return x[rows, r.argmax(1)], x[rows, r.argmin(1)], obs


def test_current_pairs_are_the_adapters_samples_and_reference_pairs_are_not(setup_net):
    setup, net = setup_net
    g = torch.Generator().manual_seed(0)
    cur = DPOMethod(setup, net, DPOConfig(candidates=4, pair_source="current"), g)
    ref = DPOMethod(setup, net, DPOConfig(candidates=4, pair_source="reference"), g)
    cur0, ref0 = _pairs(cur, 3), _pairs(ref, 3)
    # a fresh adapter (B = 0) is the reference: both sources give the same pairs
    for a, b in zip(cur0[:3], ref0[:3]):
        torch.testing.assert_close(a, b)
    n = cur0[2].shape[0]
    with torch.no_grad():  # another adapter, as after some updates
        for p in lora_parameters(net):
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    cur1, ref1 = _pairs(cur, 3), _pairs(ref, 3)
    # the current source follows the adapter; the reference source ignores it
    assert not torch.allclose(cur1[0], cur0[0], atol=1e-3)
    for a, b in zip(ref1[:3], ref0[:3]):
        torch.testing.assert_close(a, b)
    want = _pairs_by_hand(setup, net, n, 4, 3)
    for a, b in zip(cur1[:3], want):
        torch.testing.assert_close(a, b)
    with reference(net):
        want_ref = _pairs_by_hand(setup, net, n, 4, 3)
    for a, b in zip(ref1[:3], want_ref):
        torch.testing.assert_close(a, b)
    # the reported gap is the mean best-minus-worst reward of those candidates
    assert cur1[3] > 0


def test_method_passes_its_weighting_to_the_loss(setup_net, monkeypatch):
    setup, net = setup_net
    kinds = []
    original = dpo.snr_weight

    def spy(process, t, kind="constant", gamma=GAMMA):
        kinds.append(kind)
        return original(process, t, kind, gamma)

    monkeypatch.setattr(dpo, "snr_weight", spy)
    m = DPOMethod(setup, net, DPOConfig(candidates=4, weighting="min_snr", updates_per_batch=2),
                  torch.Generator().manual_seed(0))
    m.step()
    assert kinds == ["min_snr", "min_snr"]


@pytest.mark.parametrize("source, weighting", [("current", "constant"),
                                               ("current", "min_snr"),
                                               ("reference", "min_snr")])
def test_variant_raises_reward_over_reference(setup_net, source, weighting):
    setup, net = setup_net
    ref_reward, _ = validation_reward(setup, net=net)
    m = DPOMethod(setup, net, DPOConfig(candidates=8, lr=3e-3, beta=200.0, pair_source=source,
                                        weighting=weighting),
                  torch.Generator().manual_seed(0))
    for _ in range(12):
        stats = m.step()
        assert all(math.isfinite(v) for v in stats.values())
    new_reward, _ = validation_reward(setup, net=net)
    assert new_reward > ref_reward + 0.25 * abs(ref_reward), (ref_reward, new_reward)
