"""Analytic checks of the four diffusion processes with dummy denoisers of known answer."""

import math

import pytest
import torch

from diffalign.processes import (
    DDIM,
    DDPM,
    FlowMatching,
    Inpaint,
    ScoreMatching,
    build_process,
    gaussian_log_prob,
    random_prefix_mask,
)
from diffalign.processes.inpainting import prefix_inpaint


class OracleGaussian(torch.nn.Module):
    """The exact denoiser for data ~ N(m, s²) (s = 0: a point mass), in each parameterisation."""

    def __init__(self, process, m: float, s: float = 0.0):
        super().__init__()
        self.p, self.m, self.s = process, m, s

    def forward(self, x, t, cond=None, extra=None):
        t = t.view(-1, 1, 1).double()
        x = x.double()
        p, m, s2 = self.p, self.m, self.s**2
        if isinstance(p, FlowMatching):
            a, sig = 1 - t, t  # x_t = a x0 + sig eps
        else:
            ab = p.abar(t.view(-1), x) if isinstance(p, DDPM) else p._abar(t.view(-1), x)
            a, sig = ab.sqrt(), (1 - ab).sqrt()
        # posterior mean of x0 given x_t for Gaussian data
        x0 = m + a * s2 / (a**2 * s2 + sig**2) * (x - a * m)
        eps = (x - a * x0) / sig
        if isinstance(p, FlowMatching):
            out = eps - x0
        elif isinstance(p, DDPM) and p.prediction == "x0":
            out = x0
        elif isinstance(p, DDPM) and p.prediction == "v":
            out = a * eps - sig * x0
        else:
            out = eps
        return out.float()


ALL = [
    ("ddpm-eps", lambda: DDPM(prediction="eps")),
    ("ddpm-x0", lambda: DDPM(prediction="x0")),
    ("ddpm-v", lambda: DDPM(prediction="v", schedule="linear")),
    ("ddim0", lambda: DDIM(eta=0.0)),
    ("ddim1", lambda: DDIM(eta=0.5)),
    ("sm-em", lambda: ScoreMatching(sampler="em")),
    ("sm-ode", lambda: ScoreMatching(sampler="ode")),
    ("fm-euler", lambda: FlowMatching(sampler="euler")),
    ("fm-heun", lambda: FlowMatching(sampler="heun")),
    ("fm-sde", lambda: FlowMatching(sampler="sde")),
]


@pytest.mark.parametrize("name,make", ALL)
def test_point_mass_recovered_exactly(name, make):
    p = make()
    net = OracleGaussian(p, m=0.3)
    g = torch.Generator().manual_seed(0)
    out = p.sample(net, (16, 4, 3), steps=10, generator=g)
    assert torch.allclose(out.x0, torch.full_like(out.x0, 0.3), atol=1e-4), name


@pytest.mark.parametrize("name,make", ALL)
def test_gaussian_data_moments(name, make):
    p = make()
    net = OracleGaussian(p, m=0.5, s=0.4)
    g = torch.Generator().manual_seed(1)
    x = p.sample(net, (4000, 1, 2), steps=100, generator=g).x0
    assert abs(x.mean().item() - 0.5) < 0.03, name
    assert abs(x.std().item() - 0.4) < 0.04, name


def test_ddim_eta1_equals_ddpm_posterior():
    ddpm, ddim = DDPM(), DDIM(eta=1.0)
    net = OracleGaussian(ddpm, m=0.1, s=0.7)
    x = torch.randn(5, 4, 2)
    times = ddpm.timesteps(7)
    for i in range(7):
        a = ddpm.step(net, x, float(times[i]), float(times[i + 1]), noise=torch.zeros_like(x))
        b = ddim.step(net, x, float(times[i]), float(times[i + 1]), noise=torch.zeros_like(x))
        assert torch.allclose(a.mean, b.mean, atol=1e-5)
        assert torch.allclose(a.std, b.std, atol=1e-6)


def test_ddim_eta0_is_deterministic():
    p = DDIM(eta=0.0)
    net = OracleGaussian(p, m=0.0, s=1.0)
    x_init = torch.randn(8, 4, 2)
    a = p.sample(net, x_init.shape, x_init=x_init, generator=torch.Generator().manual_seed(1))
    b = p.sample(net, x_init.shape, x_init=x_init, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.x0, b.x0)
    c = DDIM(eta=0.5).sample(net, x_init.shape, x_init=x_init,
                             generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(a.x0, c.x0)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_flow_matching_exact_on_linear_field(sampler):
    c = torch.tensor([0.5, -1.5])

    def const_field(x, t, cond=None, extra=None):
        return c.expand_as(x)

    x1 = torch.randn(3, 2, 2)
    for steps in (1, 3, 17):
        x0 = FlowMatching(sampler=sampler).sample(const_field, x1.shape, steps=steps,
                                                  x_init=x1).x0
        torch.testing.assert_close(x0, x1 - c, atol=1e-5, rtol=0)

    # A field affine in x: the exact flow from x1 = 1 under v = x is x(t) = e^(t-1); Euler
    # with h = 1/S gives (1 - 1/S)^S and converges to e^-1 as S grows.
    def lin(x, t, cond=None, extra=None):
        return x

    ones = torch.ones(1, 1, 1)
    for steps in (4, 16):
        got = FlowMatching(sampler="euler").sample(lin, ones.shape, steps=steps, x_init=ones).x0
        assert got.item() == pytest.approx((1 - 1 / steps) ** steps, rel=1e-5)


@pytest.mark.parametrize("name,make", [a for a in ALL if a[0] in
                                       ("ddpm-eps", "ddim1", "sm-em", "fm-sde")])
def test_transition_log_prob_matches_normal(name, make):
    p = make()
    net = OracleGaussian(p, m=0.2, s=0.5)
    x = torch.randn(6, 4, 3)
    times = p.timesteps(10)
    t, tp = float(times[3]), float(times[4])
    out = p.step(net, x, t, tp, generator=torch.Generator().manual_seed(0))
    assert (out.std > 0).all()
    ref = torch.distributions.Normal(out.mean, out.std.expand_as(out.mean))
    expected = ref.log_prob(out.prev).flatten(1).sum(1)
    torch.testing.assert_close(p.log_prob(net, x, out.prev, t, tp), expected, atol=1e-4,
                               rtol=1e-5)
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[:, 1:] = True
    exp_m = ref.log_prob(out.prev)[:, 1:].flatten(1).sum(1)
    torch.testing.assert_close(gaussian_log_prob(out.prev, out.mean, out.std, mask), exp_m,
                               atol=1e-4, rtol=1e-5)


def test_log_prob_of_deterministic_step_raises():
    p = DDIM(eta=0.0)
    net = OracleGaussian(p, m=0.0, s=1.0)
    x = torch.randn(2, 4, 1)
    with pytest.raises(ValueError, match="deterministic"):
        p.log_prob(net, x, x, 0.5, 0.4)


@pytest.mark.parametrize("name,make", ALL)
def test_inpainted_entries_equal_given_values(name, make):
    p = make()
    net = OracleGaussian(p, m=0.0, s=1.0)
    values = torch.randn(5, 1, 2)
    inp = prefix_inpaint(values, horizon=8, dim=3, dims=[0, 2])
    x = p.sample(net, (5, 8, 3), steps=6, inpaint=inp,
                 generator=torch.Generator().manual_seed(3)).x0
    assert torch.equal(x[:, :1, [0, 2]], values)
    assert not torch.equal(x[:, 1:, :], torch.zeros_like(x[:, 1:, :]))


def test_inpaint_clean_by_default():
    """Known entries are clean at every step by default: what the network saw in training."""
    p = DDPM()
    net = OracleGaussian(p, m=0.0, s=1.0)
    value = torch.full((64, 4, 1), 2.0)
    mask = torch.zeros(1, 4, 1, dtype=torch.bool)
    mask[:, 0] = True
    out = p.sample(net, (64, 4, 1), steps=10, inpaint=Inpaint(value, mask), return_chain=True,
                   generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.chain[:, :, 0, 0], torch.full_like(out.chain[:, :, 0, 0], 2.0))
    assert out.chain[5][:, 1:].std() > 0.1  # the free entries are still noisy mid-chain


class RecordingNet(torch.nn.Module):
    """A denoiser that predicts zero and records every input it is given."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.inputs: list[torch.Tensor] = []

    def forward(self, x, t, cond=None, extra=None):
        self.inputs.append(x.detach().clone())
        return x * self.w


@pytest.mark.parametrize("pname", ["ddpm", "ddim", "sm", "fm"])
def test_planner_samples_known_entries_as_trained(pname):
    """The network sees the in-painted current state with the same values in training
    (``loss(known=...)``) and in sampling (``Planner.sample``): clean, at every step."""
    from diffalign.models.registry import build_model

    model = build_model("diffuser", process=pname, backbone="mlp", obs_dim=2, act_dim=1,
                        horizon=8, state_cond=False)
    from diffalign.data.normalizer import NormalizerSet

    model.normalizers = NormalizerSet.fit_arrays(
        {"observations": 3 * torch.randn(50, 2).numpy(), "actions": torch.randn(50, 1).numpy()},
        kind="minmax")
    rec = RecordingNet()
    model.net = rec
    obs = torch.randn(4, 1, 2)
    model.sample(obs, generator=torch.Generator().manual_seed(0), steps=5)
    known = model.norm("observations", obs[:, 0])
    for x in rec.inputs:
        assert torch.allclose(x[:, 0, :2], known, atol=1e-6)
    rec.inputs.clear()
    x0 = torch.randn(4, 8, 3)
    mask = torch.zeros(1, 8, 3, dtype=torch.bool)
    mask[:, 0, :2] = True
    model.process.loss(rec, x0, known=mask, generator=torch.Generator().manual_seed(1))
    assert torch.equal(rec.inputs[0][:, 0, :2], x0[:, 0, :2])


def test_inpaint_reimposed_at_noise_level():
    """With ``noised=True`` (RePaint) known entries are re-noised at each intermediate step,
    not clamped to clean values."""
    p = DDPM()
    net = OracleGaussian(p, m=0.0, s=1.0)
    value = torch.full((64, 4, 1), 2.0)
    mask = torch.zeros(1, 4, 1, dtype=torch.bool)
    mask[:, 0] = True
    out = p.sample(net, (64, 4, 1), steps=10, inpaint=Inpaint(value, mask, noised=True),
                   return_chain=True, generator=torch.Generator().manual_seed(0))
    mid = out.chain[5][:, 0, 0]  # t = 0.5
    a = p.abar(torch.tensor(float(out.times[5])), mid)
    assert abs(mid.mean().item() - 2.0 * a.sqrt().item()) < 0.15
    assert abs(mid.std().item() - (1 - a).sqrt().item()) < 0.15
    assert torch.equal(out.chain[-1][:, 0, 0], value[:, 0, 0])


class Elementwise(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.3))

    def forward(self, x, t, cond=None, extra=None):
        return self.w * x + t.view(-1, 1, 1)


@pytest.mark.parametrize("pname", ["ddpm", "ddim", "sm", "fm"])
def test_masked_loss_ignores_masked_entries(pname):
    p = build_process(pname)
    net = Elementwise()
    x0 = torch.randn(4, 6, 2)
    mask = torch.ones_like(x0, dtype=torch.bool)
    mask[:, 4:] = False
    t = p.sample_train_time(4, torch.Generator().manual_seed(0), x0)
    noise = torch.randn_like(x0)
    a = p.loss(net, x0, mask=mask, t=t, noise=noise)
    x0b = x0.clone()
    x0b[:, 4:] = 1e3
    b = p.loss(net, x0b, mask=mask, t=t, noise=noise)
    torch.testing.assert_close(a["loss"], b["loss"])
    # and equals the hand computation over the unmasked entries
    xt = p.add_noise(x0, t, noise)
    err = (net(xt, t) - p.target(x0, noise, t)) ** 2
    torch.testing.assert_close(a["loss"], err[:, :4].mean())
    torch.testing.assert_close(a["loss_per_sample"], err[:, :4].flatten(1).mean(1))
    full = p.loss(net, x0b, t=t, noise=noise)
    assert full["loss"] > 10 * a["loss"]


def test_known_entries_fixed_in_xt_and_excluded_from_loss():
    p = DDPM()
    seen = {}

    def net(x, t, cond=None, extra=None):
        seen["x"] = x
        return torch.zeros_like(x)

    x0 = torch.randn(8, 5, 3)
    known = random_prefix_mask(8, 5, 3, dims=[0, 1], generator=torch.Generator().manual_seed(0))
    noise = torch.randn_like(x0)
    out = p.loss(net, x0, known=known, noise=noise)
    assert torch.equal(seen["x"][known], x0[known])
    noise_free = torch.zeros_like(x0)
    # with a zero net the eps-loss is the mean of noise² over free entries only
    assert out["loss"].item() > 0
    assert noise_free.shape == x0.shape
    torch.testing.assert_close(out["loss"], noise[~known].pow(2).mean())


def test_random_prefix_mask_is_causal():
    m = random_prefix_mask(200, 8, 3, dims=[1], max_prefix=5,
                           generator=torch.Generator().manual_seed(0))
    assert not m[:, :, [0, 2]].any()
    col = m[:, :, 1]
    lengths = col.sum(1)
    assert lengths.max() == 5 and lengths.min() == 0
    for row, n in zip(col, lengths):
        assert row[:n].all() and not row[n:].any()


class CountingNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)
        self.grad_calls = 0
        self.calls = 0

    def forward(self, x, t, cond=None, extra=None):
        self.calls += 1
        self.grad_calls += int(torch.is_grad_enabled())
        return self.lin(x) * (1 + t.view(-1, 1, 1))


@pytest.mark.parametrize("pname", ["ddpm", "ddim", "sm", "fm"])
def test_gradient_truncation_reaches_only_last_k(pname):
    p = build_process(pname)
    net = CountingNet()
    out = p.sample(net, (4, 2, 3), steps=12, grad_last_k=3,
                   generator=torch.Generator().manual_seed(0))
    assert net.calls == 12 and net.grad_calls == 3
    out.x0.sum().backward()
    assert net.lin.weight.grad is not None and net.lin.weight.grad.abs().sum() > 0
    # K = 0: no gradient at all
    net2 = CountingNet()
    out0 = p.sample(net2, (4, 2, 3), steps=12, grad_last_k=0)
    assert net2.grad_calls == 0 and not out0.x0.requires_grad


def test_gradient_truncation_equals_manual_chain():
    """The gradient of the truncated sample equals backprop through the last K steps alone."""
    p = DDIM(eta=0.0)
    torch.manual_seed(0)
    net = CountingNet()
    x_init = torch.randn(2, 2, 3)
    out = p.sample(net, x_init.shape, steps=6, grad_last_k=2, x_init=x_init, return_chain=True)
    g = torch.autograd.grad(out.x0.sum(), net.lin.weight)[0]
    x = out.chain[4].clone()  # detached start of the last two steps
    times = p.timesteps(6)
    for i in (4, 5):
        x = p.step(net, x, float(times[i]), float(times[i + 1])).prev
    g2 = torch.autograd.grad(x.sum(), net.lin.weight)[0]
    torch.testing.assert_close(g, g2)


def _saved_bytes(p, steps, k):
    net = CountingNet()
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        p.sample(net, (8, 4, 3), steps=steps, grad_last_k=k,
                 generator=torch.Generator().manual_seed(0))
    return total[0]


@pytest.mark.parametrize("pname", ["ddpm", "sm", "fm"])
def test_truncated_memory_flat_in_step_count(pname):
    p = build_process(pname, **({"num_train_steps": 200} if pname == "ddpm" else {}))
    small, big = _saved_bytes(p, 10, 2), _saved_bytes(p, 100, 2)
    assert small > 0 and small == big
    assert _saved_bytes(p, 10, 4) > small  # grows with K, as it should


@pytest.mark.parametrize("name,make", ALL)
def test_same_seed_same_samples(name, make):
    p = make()
    net = OracleGaussian(p, m=0.0, s=1.0)
    a = p.sample(net, (3, 4, 2), steps=5, generator=torch.Generator().manual_seed(7)).x0
    b = p.sample(net, (3, 4, 2), steps=5, generator=torch.Generator().manual_seed(7)).x0
    c = p.sample(net, (3, 4, 2), steps=5, generator=torch.Generator().manual_seed(8)).x0
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_return_chain_shapes_and_x0_pred():
    p = DDPM()
    net = OracleGaussian(p, m=0.25)
    out = p.sample(net, (2, 4, 3), steps=5, return_chain=True)
    assert out.chain.shape == (6, 2, 4, 3)
    assert out.means.shape == (5, 2, 4, 3) and out.stds.shape == (5, 2, 1, 1)
    assert torch.allclose(out.x0_preds, torch.full_like(out.x0_preds, 0.25), atol=1e-3)
    assert out.stds[-1].abs().max() == 0  # final transition deterministic
    x = torch.randn(2, 4, 3)
    assert torch.allclose(p.predict_x0(net, x, 0.6), torch.full_like(x, 0.25), atol=1e-4)


def test_likelihood_proxy_prefers_in_distribution():
    p = DDPM()
    net = OracleGaussian(p, m=0.0, s=0.3)
    g = torch.Generator().manual_seed(0)
    inside = torch.randn(64, 4, 2, generator=g) * 0.3
    outside = inside + 3.0
    li = p.likelihood(net, inside, generator=g)
    lo = p.likelihood(net, outside, generator=g)
    assert li.shape == (64,)
    assert li.mean() > lo.mean() + 1.0


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="'foo'"):
        build_process("foo")
    with pytest.raises(ValueError, match="prediction"):
        DDPM(prediction="score")
    with pytest.raises(ValueError, match="steps=0"):
        DDPM().timesteps(0)
    with pytest.raises(ValueError, match="exceeds"):
        DDPM(num_train_steps=10, default_steps=5).timesteps(11)
    with pytest.raises(ValueError, match="grad_last_k"):
        FlowMatching().sample(lambda x, t, **k: x, (1, 1, 1), steps=3, grad_last_k=5)
    with pytest.raises(ValueError, match="eta"):
        DDIM(eta=-1)
    with pytest.raises(ValueError, match="sampler"):
        FlowMatching(sampler="rk4")


def test_schedules_monotone_and_end_near_noise():
    for sched in ("linear", "cosine"):
        for k in (20, 100, 1000):
            ab = DDPM(num_train_steps=k, schedule=sched, default_steps=min(20, k)).alpha_bar
            assert ab[0] == 1 and (ab[1:] < ab[:-1]).all()
            assert ab[-1] < 0.01, (sched, k, ab[-1])
    sm = ScoreMatching()
    assert math.exp(sm.log_abar(1.0)) < 1e-3


@pytest.mark.parametrize("name,make", ALL)
def test_stochastic_variant_has_gaussian_transitions(name, make):
    p = make().stochastic_variant()
    assert p.stochastic
    net = OracleGaussian(p, m=0.0, s=1.0)
    x = torch.randn(3, 2, 2)
    times = p.timesteps(5)
    out = p.step(net, x, float(times[1]), float(times[2]))
    assert (out.std > 0).all()
    lp = p.log_prob(net, x, out.prev, float(times[1]), float(times[2]))
    assert torch.isfinite(lp).all()


@pytest.mark.parametrize("name,make", ALL)
def test_min_snr_x0_loss_zero_for_the_exact_denoiser_and_capped_otherwise(name, make):
    p = make()
    x0 = torch.full((16, 4, 2), 0.3)
    exact = p.min_snr_x0_loss(OracleGaussian(p, 0.3), x0,
                              generator=torch.Generator().manual_seed(0))
    assert exact["loss"].item() < 1e-8
    # a denoiser that predicts x0 + 1 everywhere: the loss is the mean of min(SNR(t), γ)
    off = p.min_snr_x0_loss(OracleGaussian(p, 1.3), x0, gamma=2.0,
                            generator=torch.Generator().manual_seed(1))
    t = p.sample_train_time(16, torch.Generator().manual_seed(1), x0)
    want = p.snr(t).clamp(max=2.0)
    torch.testing.assert_close(off["loss_per_sample"], want.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(off["loss"], want.float().mean(), rtol=1e-4, atol=1e-5)


def test_min_snr_x0_loss_excludes_known_and_zero_weight_entries():
    p = DDPM()
    x0 = torch.zeros(8, 4, 2)
    known = torch.zeros(1, 4, 2, dtype=torch.bool)
    known[:, 0] = True
    weight = torch.ones(1, 4, 2)
    weight[:, 3] = 0.0
    bad = x0.clone()
    bad[:, 0] = 1e3  # known: the net sees the clean value and the loss ignores it
    bad[:, 3] = 1e3  # zero weight
    net = OracleGaussian(p, 0.0)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = p.min_snr_x0_loss(net, x0, known=known, weight=weight, generator=g())
    b = p.min_snr_x0_loss(net, bad, known=known, weight=weight, generator=g())
    assert a["loss"].item() < 1e-8 and b["loss"].item() < 1e-8
    assert p.min_snr_x0_loss(net, bad, generator=g())["loss"].item() > 1.0
    with pytest.raises(ValueError, match="gamma=0"):
        p.min_snr_x0_loss(net, x0, gamma=0)
