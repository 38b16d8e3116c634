"""The CUDA paths: training (fp32 and bf16), sampling, the critic and alignment on a GPU, and
CPU and GPU agreeing on the same weights and noise. Skipped where no GPU is visible (CI)."""

import copy
import math
import os

import pytest
import torch

from diffalign.align.common import AlignSetup, condition_pool, freeze, validation_reward
from diffalign.align.lora import add_lora, lora_parameters, remove_lora
from diffalign.align.rl import RLConfig, RLMethod
from diffalign.models.critic import CriticConfig, train_critic
from diffalign.models.registry import build_model
from diffalign.tasks import resolve_task
from diffalign.train.trainer import TrainConfig, fit

DEV = os.environ.get("DIFFALIGN_TEST_GPU", "cuda")
"""The device under test; DIFFALIGN_TEST_GPU=cpu runs these tests' code paths on a CPU."""

pytestmark = pytest.mark.skipif(DEV.startswith("cuda") and not torch.cuda.is_available(),
                                reason="needs a CUDA device")


@pytest.fixture(scope="module")
def task():
    return resolve_task("nav1d/full", episodes=64)


def _fit(model, episodes, steps, bf16):
    ds = model.make_dataset(episodes)

    def loss_fn(m, batch_size, gen):
        return m.loss(ds.sample(batch_size, gen), gen)

    cfg = TrainConfig(steps=steps, batch_size=32, lr=1e-3, device=DEV, bf16=bf16,
                      progress=False, ema_decay=0.0)
    return fit(model, loss_fn, cfg).model


@pytest.mark.parametrize("kind", ["diffuser", "dd", "dp"])
@pytest.mark.parametrize("process", ["ddpm", "ddim", "sm", "fm"])
@pytest.mark.parametrize("bf16", [False, True])
def test_train_and_sample_on_cuda(task, kind, process, bf16):
    torch.manual_seed(0)
    model = build_model(kind, process, None, task.obs_dim, task.act_dim,
                        process_kwargs={"default_steps": 5})
    model = _fit(model, task.episodes, steps=5, bf16=bf16)
    assert model.device.type == torch.device(DEV).type
    obs = condition_pool(task.episodes, model.spec.obs_history, 4, seed=0)
    with torch.no_grad():
        out = model.sample(obs, n=2, generator=torch.Generator().manual_seed(0))
    assert out.x0.device.type == torch.device(DEV).type
    assert torch.isfinite(out.x0).all()


@pytest.mark.parametrize("process", ["ddim", "fm"])
def test_cpu_and_cuda_sample_alike(task, process):
    """Same weights and a CPU generator: the deterministic samplers agree to float tolerance."""
    torch.manual_seed(0)
    cpu = build_model("dp", process, None, task.obs_dim, task.act_dim,
                      process_kwargs={"default_steps": 5}).eval()
    cpu.make_dataset(task.episodes)  # fits the normalisers
    gpu = copy.deepcopy(cpu).to(DEV)
    obs = condition_pool(task.episodes, cpu.spec.obs_history, 8, seed=0)
    with torch.no_grad():
        a = cpu.sample(obs, n=2, generator=torch.Generator().manual_seed(3)).x0
        b = gpu.sample(obs, n=2, generator=torch.Generator().manual_seed(3)).x0
    torch.testing.assert_close(b.cpu(), a, atol=2e-3, rtol=2e-3)


def test_critic_trains_on_cuda(task):
    critic = train_critic(task.episodes, CriticConfig(steps=20, device=DEV, log_every=10,
                                                      fourier_features=8),
                          progress=False)
    obs = torch.zeros(3, task.obs_dim, device=DEV)
    act = torch.zeros(3, task.act_dim, device=DEV)
    q = critic.q(obs, act)
    assert q.device.type == torch.device(DEV).type and torch.isfinite(q).all()


def test_lora_alignment_step_on_cuda(task):
    torch.manual_seed(0)
    model = build_model("dp", "ddpm", None, task.obs_dim, task.act_dim,
                        process_kwargs={"default_steps": 5})
    model = _fit(model, task.episodes, steps=5, bf16=False).eval()
    critic = train_critic(task.episodes, CriticConfig(steps=10, device=DEV), progress=False)
    freeze(model)
    net = add_lora(model.net, r=4)
    states = condition_pool(task.episodes, model.spec.obs_history, 32, seed=0)
    setup = AlignSetup(model=model, critic=freeze(critic), states=states, val_states=states,
                       steps=5)
    before = [p.detach().clone() for p in lora_parameters(net)]
    frozen = {k: v.clone() for k, v in net.get_base_model().state_dict().items()
              if "lora_" not in k}
    method = RLMethod(setup, net, RLConfig(algo="qvpg", states_per_update=8, group_size=4),
                      torch.Generator().manual_seed(0))
    method.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, lora_parameters(net)))
    after = net.get_base_model().state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())
    r, _ = validation_reward(setup, net=net)
    assert math.isfinite(r)
    remove_lora(net)


@pytest.mark.parametrize("bf16", [False, True])
def test_compiled_denoiser_samples_as_the_eager_one(task, bf16):
    """compile_denoisers on the device: in float32 the network's outputs agree with the eager
    ones to float tolerance (2e-3, as the CPU-GPU test: cuDNN may use TF32) and the samples on
    average (a rare coordinate moves further: the first DDPM steps divide the noise estimate
    by sqrt(ᾱ_t), near 0, before the clip); in bfloat16 the samples stay within the bound of
    tests/test_fast_paths.py; the state is in-painted exactly."""
    from diffalign.compiled import compile_denoisers

    torch.manual_seed(0)
    model = build_model("diffuser", "ddpm", None, task.obs_dim, task.act_dim,
                        process_kwargs={"default_steps": 5})
    model = _fit(model, task.episodes, steps=5, bf16=False).eval()
    fast = compile_denoisers(copy.deepcopy(model), bf16=bf16)
    obs = condition_pool(task.episodes, model.spec.obs_history, 16, seed=0)
    with torch.no_grad():
        a = model.sample(obs, n=4, generator=torch.Generator().manual_seed(3)).x0
        b = fast.sample(obs, n=4, generator=torch.Generator().manual_seed(3)).x0
        cond, inpaint, _ = model.expanded_condition(obs.repeat_interleave(4, dim=0))
        t = torch.rand(a.shape[0], generator=torch.Generator().manual_seed(5)).to(a.device)
        out = (model.net(a, t, cond=cond), fast.net(a, t, cond=cond))
    if bf16 and fast.net.bf16:
        assert float((b - a).abs().mean()) <= 0.01
    else:
        torch.testing.assert_close(out[1], out[0], atol=2e-3, rtol=2e-3)
        assert float((b - a).abs().mean()) <= 1e-4
    if inpaint is not None:
        mask = inpaint.mask.expand_as(b)
        torch.testing.assert_close(b[mask], inpaint.value.expand_as(b)[mask], rtol=0, atol=0)
