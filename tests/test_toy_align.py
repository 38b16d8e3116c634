"""`diffalign toy --align`: QV-PG on a LoRA adapter steers the 2-D toy toward each reward."""

import copy
import json
import math

import numpy as np
import pytest
import torch

from diffalign.align.lora import (
    add_lora,
    lora_parameters,
    merged_copy,
    reference,
    reference_copy,
)
from diffalign.align.rl import qvpg_rollout, smallest_noisy_std, transition_kl
from diffalign.cli import main
from diffalign.toy import ToyConfig, make_process, toy_data, train_toy_model
from diffalign.toy_align import (
    REWARDS,
    best_mode_reward,
    data_log_density,
    gain_pct,
    on_manifold,
    qvpg_align,
    reward_diagonal,
    reward_right,
    reward_top,
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


def _adapted(net, moved: bool):
    """A LoRA-wrapped copy of ``net``: at its reference (B = 0), or with random B (moved)."""
    model = add_lora(copy.deepcopy(net), r=4, alpha=8.0)
    if moved:
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def test_kl_gradient_is_zero_at_the_reference_and_pulls_a_moved_adapter(foundation):
    process, net = foundation
    kl_proc = process.stochastic_variant()
    x = torch.randn(16, 1, 2, generator=torch.Generator().manual_seed(0))

    def kl_and_grads(model, ref_net=None):
        model.zero_grad(set_to_none=True)
        kl = transition_kl(kl_proc, model, x, 0.5, 0.4, ref_net=ref_net)
        kl.sum().backward()
        return kl.detach(), [p.grad for p in lora_parameters(model)]

    at_ref = _adapted(net, moved=False)
    kl, grads = kl_and_grads(at_ref)
    assert torch.equal(kl, torch.zeros(16))  # B = 0: the model is its reference, exactly
    assert grads and all(g is not None and int(torch.count_nonzero(g)) == 0 for g in grads)
    moved = _adapted(net, moved=True)
    kl, grads = kl_and_grads(moved)
    assert bool((kl > 0).all())
    assert all(float(g.abs().sum()) > 0 for g in grads)  # every adapter matrix is pulled
    assert all(p.grad is None for n, p in moved.named_parameters() if "lora_" not in n)
    # the reference copy is the adapter-disabled model (the foundation), and gives the same KL
    ref = reference_copy(moved)
    t = torch.rand(16)
    with torch.no_grad(), reference(moved):
        expected = moved(x, t)
    assert torch.equal(ref(x, t), expected) and torch.equal(expected, net(x, t))
    kl_copy, grads_copy = kl_and_grads(moved, ref_net=ref)
    assert torch.equal(kl_copy, kl)
    assert all(torch.equal(a, b) for a, b in zip(grads_copy, grads, strict=True))


def test_a_kl_step_leaves_the_base_weights_bit_identical(foundation):
    process, net = foundation
    model = _adapted(net, moved=True)
    base = {n: v.detach().clone() for n, v in model.state_dict().items() if "lora_" not in n}
    adapter = [p.detach().clone() for p in lora_parameters(model)]
    opt = torch.optim.Adam(lora_parameters(model), lr=1e-3)
    kl_proc = process.stochastic_variant()
    floor = smallest_noisy_std(kl_proc, STEPS, torch.zeros(1, 1, 2))

    def kl_of_chain():  # the library's QV-PG chain, KL only, from the same noise each call
        g = torch.Generator().manual_seed(3)
        _, kl = qvpg_rollout(process, model, torch.randn(16, 1, 2, generator=g), STEPS, 3, g,
                             fast=merged_copy(model), kl_process=kl_proc, kl_chain_steps=4,
                             kl_std_floor=floor)
        return kl.mean()

    kl = kl_of_chain()
    opt.zero_grad(set_to_none=True)
    kl.backward()
    opt.step()
    after = model.state_dict()
    assert all(torch.equal(after[n], v) for n, v in base.items())
    assert all(not torch.equal(p, a) for p, a in zip(lora_parameters(model), adapter,
                                                     strict=True))
    # the step moved the adapter toward the reference
    assert float(kl_of_chain().detach()) < float(kl.detach())


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
