"""The speed options against the plain float32 eager path: the same loss, samples and
parameters within stated bounds, and the bfloat16 fallback where a device has no kernels.

Bounds. float32 paths that only reorder arithmetic (AdamW's fused kernel) agree to 1e-5.
bfloat16 keeps 8 significand bits: one rounding is off by at most 2^-9 ≈ 0.2% of the value.
The denoising loss is a mean over thousands of squared errors whose rounding errors are
independent, so it moves far less than that (measured 9e-6 relative); it is bounded at
1e-3. A 20-step chain in bfloat16 compounds the denoiser's 0.2% errors but each step
contracts towards the data, so samples stay within a few bfloat16 ulps of the float32 ones
on average (measured 0.001-0.002 mean absolute difference on samples scaled to [-1, 1]; an
ulp at 1 is 2^-7 ≈ 0.008); it is bounded at 0.01 on average. Single coordinates may move
further where the chain crosses the clip at ±1, so the maximum is not bounded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffalign.data.episodes import Episodes
from diffalign.models.registry import build_model
from diffalign.train import trainer


def _episodes(n_episodes=10, length=32, seed=0):
    rng = np.random.default_rng(seed)
    n = n_episodes * length
    obs = rng.standard_normal((n, 2)).astype(np.float32)
    timeouts = np.zeros(n, dtype=bool)
    timeouts[length - 1::length] = True
    return Episodes.from_arrays(observations=obs, actions=rng.uniform(-1, 1, (n, 1)),
                                rewards=rng.standard_normal(n), terminals=np.zeros(n, bool),
                                timeouts=timeouts, next_observations=obs)


def _trained(process: str, steps: int = 60):
    torch.manual_seed(0)
    model = build_model("diffuser", process, None, obs_dim=2, act_dim=1, horizon=16,
                        state_cond=True, cond_fourier=8, process_kwargs={"default_steps": 20},
                        backbone_kwargs={"dim": 8, "dim_mults": [1, 2], "kernel_size": 5})
    ds = model.make_dataset(_episodes())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss = model.loss(ds.sample(64, g), generator=g)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), ds


@pytest.mark.parametrize("process", ["ddpm", "fm"])
def test_bf16_loss_and_samples_within_the_bounds(process):
    model, ds = _trained(process)
    batch = ds.sample(64, torch.Generator().manual_seed(1))
    with torch.no_grad():
        l32 = float(model.loss(batch, generator=torch.Generator().manual_seed(2))["loss"])
        with torch.autocast("cpu", torch.bfloat16):
            l16 = float(model.loss(batch, generator=torch.Generator().manual_seed(2))["loss"])
        obs = torch.randn(16, 1, 2, generator=torch.Generator().manual_seed(4))
        x32 = model.sample(obs, n=4, generator=torch.Generator().manual_seed(3)).x0
        with torch.autocast("cpu", torch.bfloat16):
            x16 = model.sample(obs, n=4, generator=torch.Generator().manual_seed(3)).x0
    assert abs(l16 - l32) <= 1e-3 * abs(l32)
    assert x16.dtype == torch.float32  # the chain's state stays float32
    diff = (x16 - x32).abs()
    assert float(diff.mean()) <= 0.01
    assert float(diff.mean()) > 0  # bfloat16 did run: the samples are not bit-equal


def test_fused_adamw_takes_the_plain_steps():
    model, ds = _trained("ddpm", steps=0)
    g = torch.Generator().manual_seed(0)
    grads = []  # five steps' gradients, replayed into both optimisers (Adam turns a
    for _ in range(5):  # rounding-level gradient into a full step, so none is recomputed)
        model.zero_grad()
        model.loss(ds.sample(32, g), generator=g)["loss"].backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    params = {}
    for fused in (None, True):
        ps = [p.detach().clone().requires_grad_() for p in model.parameters()]
        opt = torch.optim.AdamW(ps, lr=1e-3, fused=fused)
        for step in grads:
            for p, gr in zip(ps, step):
                p.grad = gr.clone()
            opt.step()
        params[fused] = torch.cat([p.detach().flatten() for p in ps])
    torch.testing.assert_close(params[True], params[None], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kernels", [False, True])
def test_bf16_falls_back_to_float32_where_the_cpu_has_no_kernels(kernels, monkeypatch,
                                                                  capsys):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: kernels)
    assert trainer.bf16_is_fast("cpu") is kernels
    assert trainer.bf16_if_fast(True, "cpu", "--bf16") is kernels
    assert trainer.bf16_if_fast(False, "cpu", "--bf16") is False
    err = capsys.readouterr().err
    assert ("--bf16: no bfloat16 kernels on device 'cpu'; float32 instead" in err) != kernels


def test_train_and_critic_commands_take_the_fallback(monkeypatch, capsys, tmp_path):
    from diffalign.commands.critic import CriticArgs
    from diffalign.commands.train import TrainArgs, foundation_config

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert foundation_config(TrainArgs(out=tmp_path / "f", bf16=True)).bf16 is False
    assert CriticArgs(out=tmp_path / "c", backup_bf16=True).backup_bf16 is False
    err = capsys.readouterr().err
    assert "--bf16: no bfloat16" in err and "--backup-bf16: no bfloat16" in err
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert foundation_config(TrainArgs(out=tmp_path / "f", bf16=True)).bf16 is True
    assert CriticArgs(out=tmp_path / "c", backup_bf16=True).backup_bf16 is True


def test_mish_compiled_is_torchs_mish(monkeypatch):
    """The compiled form of the nets' Mish (one exponential) is torch's mish to float32
    rounding, values and gradients, from far below zero to past the clamp at 20."""
    from diffalign.nets.embeddings import Mish

    x = torch.cat([torch.linspace(-40, 40, 4001), torch.randn(4000) * 3])
    assert torch.equal(Mish()(x), torch.nn.functional.mish(x))  # eager: torch's kernel

    def values_and_grads(f):
        xg = x.clone().requires_grad_()
        y = f(xg)
        y.sum().backward()
        return y.detach(), xg.grad

    want = values_and_grads(torch.nn.functional.mish)
    compiled = torch.compile(Mish(), dynamic=False)
    got = [values_and_grads(compiled)]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    got.append(values_and_grads(Mish()))  # the compiled branch's formula, run eagerly
    for y, g in got:
        torch.testing.assert_close(y, want[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g, want[1], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not trainer.bf16_is_fast("cpu"), reason="no bfloat16 kernels here")
def test_compiled_bf16_denoiser_within_the_bounds_and_inpaints():
    import copy

    from diffalign.compiled import _Bf16, compile_denoisers

    model, _ = _trained("ddpm")
    fast = compile_denoisers(copy.deepcopy(model), bf16=True)
    assert isinstance(fast.net.wide._orig_mod, _Bf16) and fast.net.uses_wide(64)
    obs = torch.randn(16, 1, 2, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        x32 = model.sample(obs, n=4, generator=torch.Generator().manual_seed(3)).x0
        x16 = fast.sample(obs, n=4, generator=torch.Generator().manual_seed(3)).x0
    assert x16.dtype == torch.float32
    diff = (x16 - x32).abs()
    assert 0 < float(diff.mean()) <= 0.01  # bfloat16 ran, within the bound above
    _, inpaint, _ = model.expanded_condition(obs.repeat_interleave(4, dim=0))
    assert inpaint is not None  # the planner in-paints the state: exactly, in both
    mask = inpaint.mask.expand_as(x16)
    torch.testing.assert_close(x16[mask], inpaint.value.expand_as(x16)[mask], rtol=0, atol=0)


def test_compiled_bf16_falls_back_to_float32_without_kernels(monkeypatch, capsys):
    import copy

    from diffalign.compiled import _Bf16, compile_denoisers

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    model, _ = _trained("ddpm", steps=0)
    fast = compile_denoisers(copy.deepcopy(model), bf16=True)
    assert not isinstance(fast.net.wide._orig_mod, _Bf16) and not fast.net.bf16
    assert "compile_denoisers(bf16=True): no bfloat16 kernels" in capsys.readouterr().err


def test_channels_last_convs_compute_the_same_function():
    import copy

    from torch import nn

    from diffalign.align.lora import add_lora
    from diffalign.nets.channels_last import ChannelsLastConv1d, channels_last_convs
    from diffalign.nets.temporal_unet import TemporalUNet

    torch.manual_seed(0)
    net = TemporalUNet(3, 16, cond_dim=4, extra_dim=2, dim=8, dim_mults=(1, 2, 4)).eval()
    nn.init.normal_(net.extra_proj.weight)  # not the zero start: the extra input counts
    before = copy.deepcopy(net.state_dict())
    fast = channels_last_convs(net)
    convs = sum(isinstance(m, nn.Conv1d) for m in net.modules())
    assert convs > 0 and sum(isinstance(m, ChannelsLastConv1d) for m in fast.modules()) == convs
    assert not any(isinstance(m, nn.Conv1d) for m in fast.modules())
    g = torch.Generator().manual_seed(1)
    x, e = torch.randn(5, 16, 3, generator=g), torch.randn(5, 16, 2, generator=g)
    t, c = torch.rand(5, generator=g), torch.randn(5, 4, generator=g)
    with torch.no_grad():  # strided downsampling, 1x1 projections: the same function
        torch.testing.assert_close(fast(x, t, c, e), net(x, t, c, e), rtol=1e-5, atol=1e-5)
    for k, v in net.state_dict().items():  # the network itself is unchanged
        assert torch.equal(v, before[k])
    # layers inside an adapter wrapper are left alone, and a 'same'-padded conv too
    wrapped = channels_last_convs(add_lora(copy.deepcopy(net)))
    assert not any(isinstance(m, ChannelsLastConv1d) for m in wrapped.modules())
    same = nn.Sequential(nn.Conv1d(2, 2, 3, padding="same"))
    assert isinstance(channels_last_convs(same)[0], nn.Conv1d)


def _with_adapter(model):
    """``model`` with a LoRA adapter whose B matrices are not zero (it changes the net)."""
    from diffalign.align.lora import add_lora

    model.net = add_lora(model.net, r=2)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.net.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_the_channels_last_form_samples_as_the_eager_model(monkeypatch):
    """The channels-last frozen form (forced by the work threshold) gives the eager samples
    to float32 rounding, through an adapter folded into the frozen copy, with the state
    in-painted. (The other form is tests/test_use.py's compiled policy, one row.)"""
    import copy

    import diffalign.compiled as compiled

    monkeypatch.setattr(compiled, "WIDE_WORK", 0)
    model = _with_adapter(_trained("ddpm", steps=20)[0])
    fast = compiled.compile_denoisers(copy.deepcopy(model))
    assert fast.net.uses_wide(1)
    obs = torch.randn(4, 1, 2, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        x32 = model.sample(obs, n=2, generator=torch.Generator().manual_seed(3)).x0
        xc = fast.sample(obs, n=2, generator=torch.Generator().manual_seed(3)).x0
    torch.testing.assert_close(xc, x32, rtol=1e-5, atol=1e-5)
    _, inpaint, _ = model.expanded_condition(obs.repeat_interleave(2, dim=0))
    mask = inpaint.mask.expand_as(xc)
    torch.testing.assert_close(xc[mask], inpaint.value.expand_as(xc)[mask], rtol=0, atol=0)
    assert torch._dynamo.config.recompile_limit >= compiled.RECOMPILE_LIMIT
    with pytest.raises(RuntimeError, match="without gradients"):  # truncated-gradient
        fast.sample(obs, n=2, grad_last_k=1)  # sampling needs the model's own network


def test_the_work_threshold_picks_the_form():
    from diffalign.compiled import WIDE_WORK, CompiledDenoiser
    from diffalign.nets.mlp import ResidualMLP
    from diffalign.nets.temporal_unet import TemporalUNet

    net = TemporalUNet(3, 16, dim=8, dim_mults=(1, 2))
    rows = -(-WIDE_WORK // sum(p.numel() for p in net.parameters()))
    cpu = CompiledDenoiser(net, torch.device("cpu"))  # compiles lazily: nothing runs here
    assert not cpu.uses_wide(rows - 1) and cpu.uses_wide(rows)
    assert not CompiledDenoiser(net, torch.device("cpu"), channels_last=False).uses_wide(rows)
    assert (cpu.x_dim, cpu.horizon) == (3, 16)  # the network's attributes read through
    with pytest.raises(AttributeError):
        _ = cpu._no_such_thing
    # a network without Conv1d has no channels-last form; bf16 then goes to the one form
    mlp = CompiledDenoiser(ResidualMLP(3, 1), torch.device("cpu"), bf16=True)
    assert mlp.wide is None and not mlp.uses_wide(10**9)
    assert type(mlp.narrow._orig_mod).__name__ == "_Bf16"
    assert type(cpu.narrow._orig_mod) is TemporalUNet
