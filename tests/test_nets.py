"""Tests for the denoising backbones in ``diffalign.nets``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffalign.nets import (
    PRESETS,
    DiT1D,
    ResidualMLP,
    TemporalUNet,
    build_backbone,
    build_preset,
    count_parameters,
)

X_DIM, HORIZON, COND_DIM, EXTRA_DIM, B = 3, 8, 5, 2, 4

TINY = {
    "unet": {"dim": 8, "dim_mults": (1, 2), "kernel_size": 3},
    "dit": {"hidden": 16, "depth": 2, "heads": 2, "mlp_ratio": 2.0},
    "mlp": {"width": 16, "depth": 2},
}
NAMES = sorted(TINY)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny nets are far faster single-threaded (OpenMP overhead dominates on a busy CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make(name: str, cond_dim: int = 0, extra_dim: int = 0, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_backbone(
        name, x_dim=X_DIM, horizon=HORIZON, cond_dim=cond_dim, extra_dim=extra_dim, **TINY[name]
    )


def inputs(cond_dim: int = 0, extra_dim: int = 0, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, HORIZON, X_DIM, generator=g)
    t = torch.rand(B, generator=g)
    cond = torch.randn(B, cond_dim, generator=g) if cond_dim else None
    extra = torch.randn(B, HORIZON, extra_dim, generator=g) if extra_dim else None
    return x, t, cond, extra


@torch.no_grad()
def perturb_(net: nn.Module, skip: str | None = None, seed: int = 123) -> None:
    """Add noise to every parameter (so zero-initialised layers become non-trivial)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in net.named_parameters():
        if skip is not None and skip in name:
            continue
        p.add_(0.2 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("cond_dim,extra_dim", [(0, 0), (COND_DIM, 0), (0, EXTRA_DIM),
                                                (COND_DIM, EXTRA_DIM)])
def test_output_shape(name, cond_dim, extra_dim):
    net = make(name, cond_dim, extra_dim)
    x, t, cond, extra = inputs(cond_dim, extra_dim)
    out = net(x, t, cond=cond, extra=extra)
    assert out.shape == (B, HORIZON, X_DIM)
    assert out.dtype == x.dtype
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_zero_init_extra_matches_net_without_extra(name):
    # The cascade use case: a net with extra_dim>0 warm-started from a reference without.
    ref = make(name, COND_DIM, 0, seed=0)
    perturb_(ref)  # non-trivial weights everywhere (DiT's output layer is zero at init)
    casc = make(name, COND_DIM, EXTRA_DIM, seed=7)
    result = casc.load_state_dict(ref.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all("extra" in k for k in result.missing_keys)
    x, t, cond, extra = inputs(COND_DIM, EXTRA_DIM)
    out_ref = ref(x, t, cond=cond)
    out_casc = casc(x, t, cond=cond, extra=extra)
    torch.testing.assert_close(out_casc, out_ref, atol=0, rtol=0)
    # ... and the extra input is really wired in: once its projection moves, output changes.
    perturb_extra = {k: torch.randn_like(casc.get_parameter(k)) for k in result.missing_keys}
    casc.load_state_dict(perturb_extra, strict=False)
    assert not torch.allclose(casc(x, t, cond=cond, extra=extra), out_ref)


@pytest.mark.parametrize("name", NAMES)
def test_gradient_reaches_every_parameter(name):
    net = make(name, COND_DIM, EXTRA_DIM)
    perturb_(net)
    x, t, cond, extra = inputs(COND_DIM, EXTRA_DIM)
    target = torch.randn_like(x)
    loss = (net(x, t, cond=cond, extra=extra) - target).pow(2).mean()
    loss.backward()
    for pname, p in net.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert p.grad.abs().sum() > 0, f"{pname} got an all-zero gradient"


@pytest.mark.parametrize("name", NAMES)
def test_gradient_exists_at_init(name):
    # Without perturbation (zero-init layers in place) every parameter is still in the graph,
    # and the zero-initialised extra projection receives a non-zero gradient (it can learn).
    net = make(name, COND_DIM, EXTRA_DIM)
    x, t, cond, extra = inputs(COND_DIM, EXTRA_DIM)
    if name == "dit":  # zero output layer blocks every gradient but its own at step one
        with torch.no_grad():
            net.final.linear.weight.normal_()
    (net(x, t, cond=cond, extra=extra) - torch.randn_like(x)).pow(2).mean().backward()
    for pname, p in net.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
    extra_grads = [p.grad for k, p in net.named_parameters() if "extra" in k and "weight" in k]
    assert extra_grads and all(g.abs().sum() > 0 for g in extra_grads)


def test_dit_starts_at_zero_output():
    net = make("dit", COND_DIM, EXTRA_DIM)
    x, t, cond, extra = inputs(COND_DIM, EXTRA_DIM)
    assert torch.equal(net(x, t, cond=cond, extra=extra), torch.zeros_like(x))


@pytest.mark.parametrize("name", NAMES)
def test_time_and_cond_dependence(name):
    net = make(name, COND_DIM, 0)
    perturb_(net)
    x, t, cond, _ = inputs(COND_DIM)
    out = net(x, torch.full((B,), 0.1), cond=cond)
    out_t = net(x, torch.full((B,), 0.9), cond=cond)
    out_c = net(x, torch.full((B,), 0.1), cond=cond + 1.0)
    per_sample_t = (out - out_t).abs().flatten(1).amax(1)
    per_sample_c = (out - out_c).abs().flatten(1).amax(1)
    assert (per_sample_t > 1e-4).all()
    assert (per_sample_c > 1e-4).all()


@pytest.mark.parametrize("name", NAMES)
def test_samples_do_not_mix_across_batch(name):
    net = make(name, COND_DIM, EXTRA_DIM)
    perturb_(net)
    x, t, cond, extra = inputs(COND_DIM, EXTRA_DIM)
    out = net(x, t, cond=cond, extra=extra)
    x2, extra2 = x.clone(), extra.clone()
    x2[1:] += 1.0
    extra2[1:] -= 1.0
    out2 = net(x2, t, cond=cond, extra=extra2)
    torch.testing.assert_close(out2[0], out[0], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(out2[1:], out[1:])


@pytest.mark.parametrize("name", NAMES)
def test_determinism_under_seed(name):
    a, b, c = make(name, COND_DIM, EXTRA_DIM, seed=3), make(name, COND_DIM, EXTRA_DIM, seed=3), \
        make(name, COND_DIM, EXTRA_DIM, seed=4)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert any(not torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())
    for net in (a, b):
        perturb_(net)
    x, t, cond, extra = inputs(COND_DIM, EXTRA_DIM)
    assert torch.equal(a(x, t, cond=cond, extra=extra), b(x, t, cond=cond, extra=extra))


def test_unet_horizon_check_names_the_numbers():
    with pytest.raises(ValueError, match=r"horizon=30 .*2\*\*3=8.*\(1, 2, 4, 8\)"):
        TemporalUNet(x_dim=14, horizon=30, dim_mults=(1, 2, 4, 8))
    with pytest.raises(ValueError, match=r"horizon=6 .*2\*\*2=4"):
        TemporalUNet(x_dim=3, horizon=6, dim=8, dim_mults=(1, 2, 2))
    net = TemporalUNet(x_dim=3, horizon=8, dim=8, dim_mults=(1, 2, 2, 2))  # 8 % 2**3 == 0
    assert net(torch.randn(2, 8, 3), torch.rand(2)).shape == (2, 8, 3)


def test_unet_groupnorm_channel_check():
    with pytest.raises(ValueError, match=r"dim=12"):
        TemporalUNet(x_dim=3, horizon=8, dim=12, dim_mults=(1, 2))
    with pytest.raises(ValueError, match="kernel_size"):
        TemporalUNet(x_dim=3, horizon=8, dim=8, dim_mults=(1, 2), kernel_size=4)


def test_dit_heads_check():
    with pytest.raises(ValueError, match=r"hidden=10.*heads=4"):
        DiT1D(x_dim=3, horizon=8, hidden=10, heads=4)


BAD_CALLS = {
    "x wrong feature dim": lambda x, t, c, e: (x[..., :-1], t, c, e),
    "x wrong horizon": lambda x, t, c, e: (x[:, :-1], t, c, e),
    "x not 3-D": lambda x, t, c, e: (x.flatten(1), t, c, e),
    "t wrong shape": lambda x, t, c, e: (x, t[:, None], c, e),
    "t wrong batch": lambda x, t, c, e: (x, t[:-1], c, e),
    "t integer": lambda x, t, c, e: (x, (t * 1000).long(), c, e),
    "cond missing": lambda x, t, c, e: (x, t, None, e),
    "cond wrong shape": lambda x, t, c, e: (x, t, c[:, :-1], e),
    "extra missing": lambda x, t, c, e: (x, t, c, None),
    "extra wrong shape": lambda x, t, c, e: (x, t, c, e[:, :-1]),
}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_inputs_raise(name, case):
    net = make(name, COND_DIM, EXTRA_DIM)
    x, t, cond, extra = BAD_CALLS[case](*inputs(COND_DIM, EXTRA_DIM))
    with pytest.raises(ValueError, match=r"got|is None"):
        net(x, t, cond=cond, extra=extra)


@pytest.mark.parametrize("name", NAMES)
def test_unexpected_cond_or_extra_raise(name):
    net = make(name, 0, 0)
    x, t, cond, extra = inputs(COND_DIM, EXTRA_DIM)
    with pytest.raises(ValueError, match="cond_dim=0"):
        net(x, t, cond=cond)
    with pytest.raises(ValueError, match="extra_dim=0"):
        net(x, t, extra=extra)


def test_wrong_shape_message_names_expected_and_got():
    net = make("mlp")
    with pytest.raises(ValueError, match=r"\(B, 8, 3\).*got \(4, 8, 2\)"):
        net(torch.randn(B, HORIZON, 2), torch.rand(B))


ALLOWED_PARAM_MODULES = (nn.Linear, nn.Conv1d, nn.GroupNorm, nn.LayerNorm, nn.Embedding)


@pytest.mark.parametrize("name", NAMES)
def test_only_lora_wrappable_layers(name):
    net = make(name, COND_DIM, EXTRA_DIM)
    kinds = set()
    for mname, module in net.named_modules():
        assert not isinstance(module, nn.ConvTranspose1d), mname
        if next(module.parameters(recurse=False), None) is not None:
            kinds.add(type(module))
            assert type(module) in ALLOWED_PARAM_MODULES, f"{mname}: {type(module).__name__}"
    assert nn.Linear in kinds  # the check saw the layers
    if name == "unet":
        assert nn.Conv1d in kinds and nn.GroupNorm in kinds


def test_build_backbone_and_presets():
    with pytest.raises(ValueError, match=r"'transformer'.*\['dit', 'mlp', 'unet'\]"):
        build_backbone("transformer", x_dim=2, horizon=1)
    with pytest.raises(ValueError, match="unknown preset"):
        build_preset("unet-100m", x_dim=2, horizon=1)
    assert isinstance(build_backbone("mlp", x_dim=2, horizon=1), ResidualMLP)
    expected = {  # (low, high) at x_dim=14, horizon=32
        "unet-1m": (0.8e6, 1.2e6),
        "unet-4m": (3.5e6, 4.5e6),
        "dit-1.5m": (1.3e6, 1.7e6),
        "mlp": (0.5e6, 1.5e6),
    }
    assert set(PRESETS) == set(expected)
    for preset, (lo, hi) in expected.items():
        net = build_preset(preset, x_dim=14, horizon=32)
        n = count_parameters(net)
        assert lo <= n <= hi, (preset, n)
    net = build_preset("mlp", x_dim=2, horizon=1)
    net.requires_grad_(False)
    assert count_parameters(net, trainable_only=True) == 0 < count_parameters(net)


def test_mlp_toy_2d():
    net = build_backbone("mlp", x_dim=2, horizon=1)
    assert net(torch.randn(7, 1, 2), torch.rand(7)).shape == (7, 1, 2)
