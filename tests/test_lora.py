"""LoRA through peft: only adapter parameters train, the reference is untouched, round trips."""

import pytest
import torch

from diffalign.align.lora import (
    add_lora,
    load_adapter,
    lora_parameters,
    lora_target_modules,
    merge_lora,
    merged_copy,
    merged_view,
    reference,
    refresh_merged,
    save_adapter,
)
from diffalign.nets import build_backbone

pytest.importorskip("peft")

SIZES = {"unet": dict(dim=8, dim_mults=(1, 2)), "dit": dict(hidden=32, depth=2, heads=2),
         "mlp": dict(width=32, depth=2)}


def _net(kind):
    torch.manual_seed(0)
    return build_backbone(kind, x_dim=3, horizon=8, **SIZES[kind])


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 8, 3, generator=g), torch.rand(4, generator=g)


@torch.no_grad()
def _perturb(lnet):
    """Move every adapter parameter off its initial value (B starts at zero)."""
    for p in lora_parameters(lnet):
        p.add_(0.05 * torch.randn_like(p))


@pytest.mark.parametrize("kind", ["unet", "dit", "mlp"])
def test_only_lora_parameters_change_and_reference_is_frozen(kind):
    net = _net(kind)
    base_state = {k: v.clone() for k, v in net.state_dict().items()}
    x, t = _inputs()
    ref_out = net(x, t).detach().clone()
    lnet = add_lora(net, r=4)
    assert len(lora_target_modules(_net(kind))) > 0
    torch.testing.assert_close(lnet(x, t), ref_out, atol=0, rtol=0)  # B = 0 at start
    opt = torch.optim.SGD(lora_parameters(lnet), lr=0.5)
    for _ in range(3):
        loss = (lnet(x, t) - 1.0).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    trainable = {n for n, p in lnet.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert not torch.allclose(lnet(x, t), ref_out)
    with torch.no_grad(), reference(lnet):
        torch.testing.assert_close(lnet(x, t), ref_out, atol=1e-6, rtol=0)
    base_now = lnet.get_base_model().state_dict()
    for k, v in base_state.items():
        match = [bk for bk in base_now if bk.replace("base_layer.", "") == k]
        assert match, k
        assert torch.equal(base_now[match[0]], v), k


def test_adapter_round_trip_and_merge(tmp_path):
    net = _net("unet")
    x, t = _inputs()
    lnet = add_lora(net, r=2)
    _perturb(lnet)
    want = lnet(x, t).detach()
    save_adapter(lnet, tmp_path / "adapter")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {"adapter_model.safetensors",
                                                                 "adapter_config.json"}
    again = load_adapter(_net("unet"), tmp_path / "adapter")
    torch.testing.assert_close(again(x, t), want, atol=0, rtol=0)
    merged = merge_lora(again)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert all(p.requires_grad for p in merged.parameters())
    torch.testing.assert_close(merged(x, t), want, atol=1e-5, rtol=1e-5)


def test_merged_copy_computes_the_adapted_net_and_leaves_it_alone():
    lnet = add_lora(_net("unet"), r=2)
    x, t = _inputs()
    _perturb(lnet)
    before = {k: v.clone() for k, v in lnet.state_dict().items()}
    want = lnet(x, t).detach()
    fast = merged_copy(lnet)
    assert not any("lora_" in n for n, _ in fast.named_parameters())
    assert not any(p.requires_grad for p in fast.parameters())
    torch.testing.assert_close(fast(x, t), want, atol=1e-5, rtol=1e-5)
    after = lnet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k])
                                                  for k in before)
    assert all(p.requires_grad for p in lora_parameters(lnet))  # still trainable
    plain = _net("mlp")
    assert merged_copy(plain) is plain  # nothing to merge


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_refresh_merged_follows_the_adapter(kind):
    """A merged copy refreshed after the adapter changed computes the changed net, as a new
    merged copy does; inside reference() it computes the reference."""
    lnet = add_lora(_net(kind), r=2)
    x, t = _inputs()
    fast = merged_copy(lnet)
    _perturb(lnet)
    with torch.no_grad():
        want = lnet(x, t)
        assert not torch.allclose(fast(x, t), want, atol=1e-4)  # stale until refreshed
        assert refresh_merged(fast, lnet) is fast
        torch.testing.assert_close(fast(x, t), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast(x, t), merged_copy(lnet)(x, t), atol=1e-6, rtol=0)
        with reference(lnet):
            ref = lnet(x, t)
            refresh_merged(fast, lnet)
        torch.testing.assert_close(fast(x, t), ref, atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in fast.parameters())


def test_merged_view_is_one_copy_that_follows_the_adapter_and_the_base():
    """One copy per net, equal to a new merged copy after the adapter changed and inside
    reference(); rebuilt when a weight outside the adapter changed."""
    lnet = add_lora(_net("unet"), r=2)
    x, t = _inputs()
    view = merged_view(lnet)
    _perturb(lnet)
    with torch.no_grad():
        assert merged_view(lnet) is view
        torch.testing.assert_close(view(x, t), merged_copy(lnet)(x, t), atol=0, rtol=0)
        with reference(lnet):
            ref = lnet(x, t)
            assert merged_view(lnet) is view
        torch.testing.assert_close(view(x, t), ref, atol=1e-6, rtol=0)
        want = merged_view(lnet)(x, t)  # the adapter again
        torch.testing.assert_close(want, lnet(x, t), atol=1e-5, rtol=1e-5)
        base = next(p for n, p in lnet.named_parameters() if "lora_" not in n)
        base.add_(1.0)  # e.g. a merge that trains the base afterwards
        again = merged_view(lnet)
        assert again is not view
        torch.testing.assert_close(again(x, t), lnet(x, t), atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in view.parameters())
    plain = _net("mlp")
    assert merged_view(plain) is plain


def test_merged_copy_inside_reference_is_the_reference():
    """With the adapter switched off, the copy computes the reference, not the adapted net."""
    lnet = add_lora(_net("unet"), r=2)
    x, t = _inputs()
    _perturb(lnet)
    with torch.no_grad():
        adapted = lnet(x, t)
        with reference(lnet):
            want = lnet(x, t)
            fast = merged_copy(lnet)
        assert not torch.allclose(want, adapted)
        assert not any("lora_" in n for n, _ in fast.named_parameters())
        torch.testing.assert_close(fast(x, t), want, atol=1e-6, rtol=0)
        torch.testing.assert_close(lnet(x, t), adapted, atol=0, rtol=0)  # adapter back on


def test_bad_rank_and_missing_adapter(tmp_path):
    with pytest.raises(ValueError, match="r=0"):
        add_lora(_net("mlp"), r=0)
    from diffalign.train.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="adapter"):
        load_adapter(_net("mlp"), tmp_path)


def _peft_forward(lnet):
    """Switch ``lnet``'s layers back to peft's own LoRA forward (in place)."""
    from peft.tuners.lora import layer as peft_layer

    from diffalign.align.lora import FusedLoraConv1d, FusedLoraLinear

    for m in lnet.modules():
        if type(m) is FusedLoraConv1d:
            m.__class__ = peft_layer.Conv1d
        elif type(m) is FusedLoraLinear:
            m.__class__ = peft_layer.Linear
    return lnet


@pytest.mark.parametrize("kind", ["unet", "dit", "mlp"])
def test_fused_lora_forward_matches_peft_values_and_gradients(kind):
    from diffalign.align.lora import FusedLoraConv1d, FusedLoraLinear, fuse_lora_forward

    lnet = add_lora(_net(kind), r=4)
    fused = [m for m in lnet.modules() if isinstance(m, (FusedLoraConv1d, FusedLoraLinear))]
    assert len(fused) == len(lora_target_modules(_net(kind)))
    _perturb(lnet)
    x, t = _inputs()

    def out_and_grads():
        for p in lora_parameters(lnet):
            p.grad = None
        y = lnet(x, t)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        return y.detach(), [p.grad.clone() for p in lora_parameters(lnet)]

    y_fused, g_fused = out_and_grads()
    _peft_forward(lnet)
    y_peft, g_peft = out_and_grads()
    torch.testing.assert_close(y_fused, y_peft, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_fused, g_peft, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4 * float(b.abs().max()), rtol=1e-3)
    assert not torch.allclose(y_fused, net_out := _net(kind)(x, t).detach())  # adapted
    fuse_lora_forward(lnet)
    with torch.no_grad(), reference(lnet):  # adapter off: the plain net
        torch.testing.assert_close(lnet(x, t), net_out, atol=1e-6, rtol=0)


def test_fused_lora_forward_defers_to_peft_with_dropout():
    from diffalign.align.lora import FusedLoraConv1d, _fusable

    lnet = add_lora(_net("unet"), r=4, dropout=0.5)
    conv = next(m for m in lnet.modules() if isinstance(m, FusedLoraConv1d))
    assert not _fusable(conv, (), {})
    lnet.eval()  # dropout off: peft's forward, same function
    _perturb(lnet)
    x, t = _inputs()
    with torch.no_grad():
        y = lnet(x, t)
        torch.testing.assert_close(y, _peft_forward(lnet)(x, t), atol=1e-6, rtol=0)


def test_fused_lora_forward_defers_to_peft_when_dtypes_differ():
    from diffalign.align.lora import FusedLoraConv1d, _fusable

    lnet = add_lora(_net("unet"), r=4)
    conv = next(m for m in lnet.modules() if isinstance(m, FusedLoraConv1d))
    assert _fusable(conv, (), {})
    conv.base_layer.double()  # e.g. a base in another precision than its fp32 adapter
    assert not _fusable(conv, (), {})


@pytest.mark.parametrize("kind", ["unet", "mlp"])
def test_adapter_fixed_folds_once_with_the_same_values_and_gradients(kind):
    from diffalign.align.lora import FusedLoraLinear, adapter_fixed, reference_copy

    lnet = add_lora(_net(kind), r=4)
    _perturb(lnet)
    x, t = _inputs()

    def chain():  # three calls on one adapter, as a sampling chain makes them
        for p in lora_parameters(lnet):
            p.grad = None
        with torch.no_grad():
            y = lnet(x, t)  # a no-gradient call first: its fold must not serve the next ones
        for _ in range(3):
            y = lnet(x + 0.1 * y, t)
        y.square().sum().backward()
        return y.detach(), [p.grad.clone() for p in lora_parameters(lnet)]

    y_plain, g_plain = chain()
    with adapter_fixed(lnet):
        y_fixed, g_fixed = chain()
        linear = next(m for m in lnet.modules() if isinstance(m, FusedLoraLinear))
        assert set(linear._fixed) == {False, True}  # one fold per grad mode
    assert all(m._fixed is None for m in lnet.modules() if isinstance(m, FusedLoraLinear))
    torch.testing.assert_close(y_fixed, y_plain, atol=1e-6, rtol=1e-6)
    for a, b in zip(g_fixed, g_plain, strict=True):
        assert float(b.abs().sum()) > 0
        torch.testing.assert_close(a, b, atol=1e-5 * float(b.abs().max()), rtol=1e-4)
    ref = reference_copy(lnet)  # the base weights as a plain frozen module
    with torch.no_grad(), reference(lnet):
        assert torch.equal(ref(x, t), lnet(x, t))
    assert all(not p.requires_grad for p in ref.parameters())
