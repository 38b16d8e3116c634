"""Alignment losses against hand-computed values on tiny tensors."""

import math

import pytest
import torch

from diffalign.align.dpo import diffusion_dpo_loss, dpo_loss, snr_weight
from diffalign.align.rl import (
    credit_decreasing,
    credit_retrospective,
    gaussian_kl_equal_var,
    group_advantages,
    group_scale,
    policy_gradient_loss,
)
from diffalign.processes import build_process


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 3.0, 10.0, 10.0])
    adv = group_advantages(r, 2)
    # group 1: mean 2, std 1 -> (-1, 1); group 2: std 0 -> (0, 0)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, 0.0, 0.0]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(r, 3)


def test_group_scale_by_hand():
    r = torch.tensor([1.0, 3.0, 10.0, 10.0, 0.0, 6.0])
    # group stds 1, 0, 3 (mean 4/3); scale = std + 0.1 * 4/3
    want = torch.tensor([1.0, 1.0, 0.0, 0.0, 3.0, 3.0]) + 0.4 / 3
    torch.testing.assert_close(group_scale(r, 2), want + 1e-8)
    # rescaling every reward leaves r / scale unchanged: the KL weight means the same
    torch.testing.assert_close(r / group_scale(r, 2), 100 * r / group_scale(100 * r, 2))
    with pytest.raises(ValueError, match="groups of 4"):
        group_scale(r, 4)


def test_reinforce_and_ppo_by_hand():
    logp = torch.tensor([[0.3, -0.2], [0.3, 0.0]], requires_grad=True)
    adv = torch.tensor([2.0, -1.0])
    out = policy_gradient_loss(logp, adv, logp_old=None)
    # -(mean_b sum_k logp*A) = -((0.3-0.2)*2 + (0.3+0)*-1)/2 = -(0.2-0.3)/2 = 0.05
    assert out["loss"].item() == pytest.approx(0.05)
    old = torch.zeros(2, 2)
    out = policy_gradient_loss(logp, adv, logp_old=old, clip=0.2)
    r = torch.exp(logp.detach())
    a = adv.view(-1, 1)
    expect = -(torch.minimum(r * a, r.clamp(0.8, 1.2) * a)).sum(1).mean()
    assert out["loss"].item() == pytest.approx(expect.item())
    # ratio e^0.3 = 1.35 > 1+eps: clipped (no gradient) where A > 0, not where A < 0
    out["loss"].backward()
    assert logp.grad[0, 0] == 0 and logp.grad[1, 0] != 0 and logp.grad[0, 1] != 0
    credit = torch.tensor([0.0, 1.0])
    out = policy_gradient_loss(logp.detach(), adv, credit=credit)
    assert out["loss"].item() == pytest.approx(-((-0.2) * 2 + 0.0 * -1) / 2)


def test_ppo_clip_is_two_sided():
    """Ratios below 1−ε and above 1+ε, each with A > 0 and A < 0: the objective is clipped
    (no gradient) exactly where moving the ratio further would gain, ρ < 1−ε with A < 0 and
    ρ > 1+ε with A > 0; a clamp on one side only fails one of the two."""
    logp = torch.tensor([[-0.5, 0.5], [-0.5, 0.5]], requires_grad=True)  # ρ = 0.61, 1.65
    adv = torch.tensor([1.0, -1.0])
    out = policy_gradient_loss(logp, adv, logp_old=torch.zeros(2, 2), clip=0.2)
    lo, hi = math.exp(-0.5), math.exp(0.5)
    # A = +1: min(ρ, clip(ρ)) = (0.61, 1.2); A = −1: min(−ρ, −clip(ρ)) = (−0.8, −1.65)
    assert out["loss"].item() == pytest.approx(-((lo + 1.2) + (-0.8 - hi)) / 2)
    out["loss"].backward()
    want = torch.tensor([[-lo / 2, 0.0], [0.0, hi / 2]])
    torch.testing.assert_close(logp.grad, want)
    assert out["clip_frac"].item() == 1.0


def test_kl_equal_variance_matches_torch():
    m, mr = torch.randn(3, 4, 2), torch.randn(3, 4, 2)
    std = torch.full((3, 1, 1), 0.7)
    p = torch.distributions.Normal(m, std.expand_as(m))
    q = torch.distributions.Normal(mr, std.expand_as(m))
    expect = torch.distributions.kl_divergence(p, q).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_kl_equal_var(m, mr, std), expect)


def test_credit_sequences():
    lam = credit_decreasing(4, gamma=0.5, normalize=False)
    torch.testing.assert_close(lam, torch.tensor([0.125, 0.25, 0.5, 1.0]))
    assert credit_decreasing(4, 0.5).mean().item() == pytest.approx(1.0)
    x0 = torch.zeros(2, 1, 1)
    preds = torch.stack([torch.full((2, 1, 1), v) for v in (2.0, 1.0, 0.0)])
    lam = credit_retrospective(preds, x0, normalize=False)
    torch.testing.assert_close(lam[0], torch.tensor([math.exp(-4), math.exp(-1), 1.0]))


def test_dpo_loss_by_hand():
    ew, erw, el, erl = (torch.tensor([v]) for v in (0.5, 0.7, 0.9, 0.6))
    out = dpo_loss(ew, erw, el, erl, beta=2.0)
    margin = (0.5 - 0.7) - (0.9 - 0.6)  # -0.5: the model prefers the winner
    assert out["loss"].item() == pytest.approx(-math.log(1 / (1 + math.exp(-(-2.0 * margin)))))
    assert out["accuracy"].item() == 1.0


class Lin(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w))

    def forward(self, x, t, cond=None, extra=None):
        return self.w * x


@pytest.mark.parametrize("pname", ["ddpm", "sm", "fm"])
def test_diffusion_dpo_reference_gets_no_gradient(pname):
    p = build_process(pname)
    net, ref = Lin(0.5), Lin(0.4)
    xw, xl = torch.randn(8, 4, 2), torch.randn(8, 4, 2)
    out = diffusion_dpo_loss(p, net, ref, xw, xl, beta=10.0,
                             generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert net.w.grad is not None and net.w.grad != 0
    assert ref.w.grad is None
    # a model equal to the reference has margin 0 -> loss log 2
    same = diffusion_dpo_loss(p, ref, ref, xw, xl, beta=10.0)
    assert same["loss"].item() == pytest.approx(math.log(2), abs=1e-6)


def test_snr_weights():
    for pname in ("ddpm", "sm", "fm"):
        p = build_process(pname)
        t = torch.tensor([0.05, 0.5, 0.95])
        snr = p.snr(t)
        assert (snr[:-1] > snr[1:]).all()  # SNR decreases with t
        w = snr_weight(p, t, "min_snr", gamma=5.0)
        torch.testing.assert_close(w, snr.clamp(max=5.0) / snr)
    with pytest.raises(ValueError, match="weighting"):
        snr_weight(p, t, "bogus")


@pytest.mark.parametrize("pname", ["ddpm", "fm"])
def test_smallest_noisy_std_is_the_chains_smallest_nonzero_std(pname):
    from diffalign.align.rl import smallest_noisy_std

    proc = build_process(pname).stochastic_variant()

    def net(x, t, cond=None, extra=None):
        return 0.3 * x

    out = proc.sample(net, (2, 1, 2), steps=7, generator=torch.Generator().manual_seed(0),
                      return_chain=True)
    stds = out.stds.flatten()
    assert float(stds.min()) == 0  # the last step to t = 0
    assert smallest_noisy_std(proc, 7, torch.zeros(1, 1, 2)) == pytest.approx(
        float(stds[stds > 0].min()), rel=1e-6)
    assert smallest_noisy_std(build_process("ddim"), 7, torch.zeros(1, 1, 2)) is None  # η = 0
