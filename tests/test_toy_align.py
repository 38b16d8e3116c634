"""`diffalign toy --align`: QV-PG on a LoRA adapter steers the 2-D toy toward each reward."""

import copy
import json
import math

import numpy as np
import pytest
import torch

from diffalign.align.lora import lora_parameters, reference
from diffalign.cli import main
from diffalign.toy import ToyConfig, make_process, toy_data, train_toy_model
from diffalign.toy_align import (
    REWARDS,
    MergedLoRA,
    _kl_step,
    best_mode_reward,
    data_log_density,
    gain_pct,
    on_manifold,
    qvpg_align,
    reward_diagonal,
    reward_right,
    reward_top,
    transition_stds,
)

STEPS = 10  # sampling steps in these tests (tiny)


def test_rewards_hand_computed():
    x = torch.tensor([[3.0, 4.0], [0.0, 1.5], [1.0, 2.0]])
    assert torch.allclose(reward_right(x), torch.tensor([3 / math.sqrt(25.1), 0.0,
                                                         1 / math.sqrt(5.1)]))
    assert torch.allclose(reward_top(x), torch.tensor([-(9.0 + 6.25), 0.0, -(1.0 + 0.25)]))
    assert torch.allclose(reward_diagonal(x), torch.tensor([24 / 25.1, 0.0, 4 / 5.1]))
    # batched shapes (B, 1, 2) reduce the last axis only
    assert reward_top(x.view(3, 1, 2)).shape == (3, 1)
    # each reward's best ring mode is the one it names
    ang = 2 * math.pi * torch.arange(8) / 8
    modes = 1.5 * torch.stack([torch.cos(ang), torch.sin(ang)], 1)
    assert int(reward_right(modes).argmax()) == 0
    assert int(reward_top(modes).argmax()) == 2
    diag = reward_diagonal(modes)
    assert torch.allclose(diag[[1, 5]], torch.full((2,), 2 * 1.125 / 2.35))
    assert set(REWARDS) == {"right", "top", "diagonal"}


def test_measures_hand_computed():
    assert gain_pct(0.0, 0.5, 1.0) == pytest.approx(50.0)
    assert gain_pct(-4.0, -1.0, -0.04) == pytest.approx(100 * 3 / 3.96)
    assert gain_pct(1.0, 1.0, 1.0) is None
    pts = np.array([[1.5, 0.0], [1.5 + 0.44, 0.0], [1.5 + 0.46, 0.0], [0.0, 0.0]])
    assert on_manifold(pts).tolist() == [True, True, False, False]
    # at a mode centre the density is that of one of 8 isotropic Gaussians (σ = 0.15)
    expected = -math.log(2 * math.pi * 0.15**2) - math.log(8)
    assert data_log_density(pts[:1])[0] == pytest.approx(expected, abs=1e-6)


@pytest.fixture(scope="module", params=["ddpm", "fm"])
def foundation(request):
    cfg = ToyConfig(process=request.param, train_steps=300, width=64, batch_size=256,
                    n_data=3000, lr=4e-3)
    process = make_process(request.param)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: faster on one thread when the cores are busy
    try:
        net = train_toy_model(cfg, process, toy_data(cfg.n_data, seed=0), torch.device("cpu"),
                              progress=False)
    finally:
        torch.set_num_threads(threads)
    return process, net


def _mean_reward(process, net, reward, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        x = process.sample(net, (400, 1, 2), steps=STEPS, generator=g).x0
    return float(reward(x.view(-1, 2)).mean())


def test_qvpg_raises_every_reward_and_changes_only_the_adapter(foundation):
    process, net = foundation
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for j, rw in enumerate(REWARDS.values()):
        model, hist = qvpg_align(net, process, rw.fn, iters=40, batch=64, steps=STEPS, seed=j)
        assert len(hist) == 40 and all(math.isfinite(h["loss"]) for h in hist)
        r_found = _mean_reward(process, net, rw.fn)
        r_aligned = _mean_reward(process, model, rw.fn)
        gain = gain_pct(r_found, r_aligned, best_mode_reward(rw, toy_data(2000, seed=1)))
        assert gain > 50, (rw.name, r_found, r_aligned, gain)  # most of the way to the best mode
        # the base weights are bit-identical; the adapter moved
        base = copy.deepcopy(model).unload().state_dict()
        assert base.keys() == before.keys()
        assert all(torch.equal(base[k], before[k]) for k in before)
        assert any(float(p.detach().abs().max()) > 0 for n, p in model.named_parameters()
                   if "lora_B" in n)
        assert all(not p.requires_grad and p.grad is None
                   for n, p in model.named_parameters() if "lora_" not in n)
    # the foundation passed in is untouched (alignment works on a copy)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())


def test_kl_gradient_reaches_the_adapter_only(foundation):
    process, net = foundation
    model, _ = qvpg_align(net, process, reward_top, iters=3, batch=16, steps=STEPS)
    fast = MergedLoRA(model)
    x, t = torch.randn(16, 1, 2), torch.rand(16)
    with torch.no_grad(), reference(model):
        ref = model(x, t)
    assert torch.equal(fast.reference(x, t), ref)  # the reference = the adapter disabled
    assert torch.equal(ref, net(x, t))
    assert torch.allclose(fast(x, t), model(x, t), atol=1e-5)
    kl_proc = process.stochastic_variant()
    stds = [s for s in transition_stds(kl_proc, STEPS, x.device) if s > 0]
    kl = _kl_step(fast, kl_proc, x, 0.5, 0.4, min(stds))
    model.zero_grad(set_to_none=True)
    kl.sum().backward()
    assert all(p.grad is not None for p in lora_parameters(model))
    # not silently inert: after 3 updates the adapter differs from the reference, and the KL
    # pulls on it (a nonzero gradient on the trained adapter)
    assert float(kl.sum()) > 0
    assert sum(float(p.grad.abs().sum()) for p in lora_parameters(model)) > 0
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("process", ["ddim", "sm"])
def test_qvpg_runs_for_deterministic_and_sde_samplers(process):
    proc = make_process(process)
    from diffalign.nets import build_backbone

    net = build_backbone("mlp", x_dim=2, horizon=1, width=32, depth=1)
    model, hist = qvpg_align(net, proc, reward_right, iters=2, batch=8, steps=5,
                             grad_last_k=2, kl_steps=3)
    assert len(hist) == 2 and all(math.isfinite(h["kl"]) and h["kl"] >= 0 for h in hist)
    assert all(p.grad is not None for p in lora_parameters(model))


def test_toy_align_cli_writes_entry_and_figure(tmp_path):
    out = tmp_path / "toy"
    rc = main(["toy", "--align", "--process", "ddim", "--out", str(out), "--train-steps", "60",
               "--n-samples", "200", "--n-paths", "5", "--n-data", "500", "--width", "32",
               "--steps", "6", "--align-iters", "3", "--align-batch", "16"])
    assert rc == 0
    res = json.loads((out / "toy.json").read_text())
    entries = res["align"]["rewards"]
    assert [e["name"] for e in entries] == ["right", "top", "diagonal"]
    fields = {"name", "description", "reward_foundation", "reward_aligned", "gain_pct",
              "foundation_loglik_foundation_samples", "foundation_loglik_aligned_samples",
              "on_manifold_fraction", "align_seconds"}
    for e in entries:
        assert fields <= e.keys()
        assert 0 <= e["on_manifold_fraction"] <= 1 and e["align_seconds"] > 0
        assert np.load(out / f"aligned_{e['name']}.npy").shape == (200, 2)
    assert "gain_pct" in res["align"]["definitions"]
    assert (out / "align.png").read_bytes()[:4] == b"\x89PNG"


def test_align_config_rejects_bad_values():
    with pytest.raises(ValueError, match="align_iters=0"):
        ToyConfig(align=True, align_iters=0)
    with pytest.raises(ValueError, match="grad_last_k"):
        ToyConfig(grad_last_k=0)
    with pytest.raises(ValueError, match="unknown rewards"):
        ToyConfig(align=True, rewards=("left",))
