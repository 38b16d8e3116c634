"""SynthER: transition generator, up-sampling, checkpoints, and the end-to-end command."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffalign.data.episodes import Episodes
from diffalign.models.synther import (
    SynthER,
    SynthERConfig,
    SynthERTrainConfig,
    nav1d_fidelity,
    train_synther,
    train_synther_main,
    transitions_from_episodes,
)
from diffalign.tasks import resolve_task
from diffalign.train.checkpoint import CheckpointError

FIELDS = ("observations", "actions", "rewards", "next_observations", "terminals")


@pytest.fixture(scope="module")
def nav_small() -> Episodes:
    """200 episodes (6,400 transitions) of nav1d/full."""
    return resolve_task("nav1d/full").episodes.select(np.arange(200))


def _toy_episodes(seed: int = 0) -> Episodes:
    """Small data with terminals, an asymmetric action range and 3-D observations."""
    rng = np.random.default_rng(seed)
    n = 300
    obs = rng.normal(size=(n, 3)).astype(np.float32)
    act = rng.uniform(-0.5, 2.0, size=(n, 2)).astype(np.float32)
    term = np.zeros(n, bool)
    term[::7] = True
    return Episodes.from_arrays(obs, act, rng.normal(size=n), terminals=term,
                                next_observations=obs + 0.1 * rng.normal(size=(n, 3)))


@pytest.fixture(scope="module")
def trained(nav_small) -> SynthER:
    """A tiny generator trained for a few seconds with the generic trainer."""
    cfg = SynthERTrainConfig(steps=700, batch_size=256, lr=2e-3, width=64, depth=2,
                             progress=False, device="cpu")
    return train_synther(nav_small, process="ddpm", cfg=cfg)


def test_shapes_and_loss():
    eps = _toy_episodes()
    model = SynthER.from_episodes(eps, width=32, depth=1)
    assert model.cfg.x_dim == 2 * 3 + 2 + 2 == 10
    assert not model.cfg.timeouts_as_terminals
    sampler = model.make_dataset(eps)
    g = torch.Generator().manual_seed(0)
    batch = sampler.sample(16, g)
    assert batch.shape == (16, 10)
    out = model.loss(batch, g)
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="shape"):
        model.loss(torch.zeros(4, 9), g)
    gen = model.generate(5, torch.Generator().manual_seed(1), steps=3)
    assert gen["observations"].shape == (5, 3) and gen["next_observations"].shape == (5, 3)
    assert gen["actions"].shape == (5, 2) and gen["rewards"].shape == (5,)
    assert gen["terminals"].shape == (5,) and gen["terminals"].dtype == bool
    # the done flag is encoded as -1/+1, the observations of s and s' share one normaliser
    z = model.encode(batch)
    assert set(z[:, -1].tolist()) <= {-1.0, 1.0}
    assert torch.equal(model.x_mean[:3], model.x_mean[6:9])


@pytest.mark.parametrize("process", ["ddpm", "ddim", "sm", "fm"])
def test_generated_done_is_binary_and_actions_in_range(process):
    eps = _toy_episodes()
    torch.manual_seed(0)
    model = SynthER.from_episodes(eps, process=process, width=32, depth=1)
    # an untrained net generates wild values: the decoding must still obey the contract
    with torch.no_grad():
        model.net.out.bias.add_(3.0)
    gen = model.generate(64, torch.Generator().manual_seed(0), steps=4)
    assert gen["terminals"].dtype == bool
    lo, hi = eps.actions.min(0), eps.actions.max(0)
    assert (gen["actions"] >= lo).all() and (gen["actions"] <= hi).all()
    # clipping did happen (at one end or the other, depending on the process's target)
    assert (np.isclose(gen["actions"], hi) | np.isclose(gen["actions"], lo)).any()
    assert all(np.isfinite(gen[k]).all() for k in FIELDS if k != "terminals")


def test_done_threshold_at_half():
    model = SynthER.from_episodes(_toy_episodes(), width=16, depth=1,
                                  process_kwargs={"prediction": "eps"})
    model.net = _ConstNet(torch.tensor([0.0] * 9 + [0.1]))  # decoded done = 0.55 -> True
    assert model.generate(3, torch.Generator().manual_seed(0), steps=2)["terminals"].all()
    model.net = _ConstNet(torch.tensor([0.0] * 9 + [-0.1]))  # 0.45 -> False
    assert not model.generate(3, torch.Generator().manual_seed(0), steps=2)["terminals"].any()


class _ConstNet(torch.nn.Module):
    """An x0-independent 'denoiser' whose DDPM sample converges to a fixed point."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("value", value)

    def forward(self, x, t, cond=None, extra=None):
        from diffalign.processes.ddpm import DDPM

        # eps that makes the x0-prediction exactly `value`: eps = (x - sqrt(a) v)/sqrt(1-a)
        a = DDPM().abar(t, x)
        return (x - a.sqrt() * self.value) / (1 - a).sqrt()


def test_transitions_without_next_observations():
    eps = _toy_episodes()
    bare = Episodes.from_arrays(eps.observations, eps.actions, eps.rewards,
                                terminals=eps.terminals)
    tr = transitions_from_episodes(bare)
    # every episode ends in a terminal, except the unterminated tail whose last step drops
    assert len(tr["observations"]) == bare.num_steps - 1
    assert np.array_equal(tr["next_observations"][1], bare.observations[2])
    assert np.array_equal(tr["next_observations"][0], bare.observations[0])  # terminal


def test_learns_nav1d_dynamics(trained, nav_small):
    gen = trained.generate(4000, torch.Generator().manual_seed(0), steps=20)
    fid = nav1d_fidelity(gen)
    real = transitions_from_episodes(nav_small)
    perm = np.random.default_rng(0).permutation(len(real["observations"]))
    shuffled = nav1d_fidelity(dict(real, next_observations=real["next_observations"][perm]))
    assert nav1d_fidelity(real)["dynamics_error"] < 1e-6  # the metric is exact on real data
    assert shuffled["dynamics_error"] > 0.3
    assert fid["dynamics_error"] < 0.25 * shuffled["dynamics_error"], (fid, shuffled)
    # Nav1D's time-out is a true end: the generator's done flag includes it
    assert trained.cfg.timeouts_as_terminals
    frac_done = gen["terminals"].mean()
    assert 0.0 < frac_done < 0.15  # 1/32 of the real transitions are final


def test_upsample(trained, nav_small):
    n = 50
    aug = trained.upsample(nav_small, n, generator=torch.Generator().manual_seed(3), steps=5)
    gen = trained.generate(n, torch.Generator().manual_seed(3), steps=5)
    N = nav_small.num_steps
    assert aug.num_steps == N + n and len(aug) == len(nav_small) + n
    for k in ("observations", "actions", "rewards", "next_observations"):
        assert np.array_equal(getattr(aug, k)[:N], getattr(nav_small, k)), k
        assert np.array_equal(getattr(aug, k)[N:], gen[k].astype(np.float32)), k
    # real time-outs are true ends for Nav1D: copied into terminals
    assert np.array_equal(aug.terminals[:N], nav_small.terminals | nav_small.timeouts)
    assert np.array_equal(aug.timeouts[:N], nav_small.timeouts)
    # every synthetic transition is its own one-step episode
    assert (aug.lengths()[len(nav_small):] == 1).all()
    assert np.array_equal(aug.terminals[N:], gen["terminals"])
    assert np.array_equal(aug.timeouts[N:], ~gen["terminals"])
    assert aug.meta["n_real_steps"] == N and aug.meta["n_synthetic"] == n


def test_upsample_keeps_real_flags_without_timeout_ends():
    eps = _toy_episodes()
    model = SynthER.from_episodes(eps, width=16, depth=1)
    aug = model.upsample(eps, 7, generator=torch.Generator().manual_seed(0), steps=2)
    assert np.array_equal(aug.terminals[:eps.num_steps], eps.terminals)
    assert aug.num_steps == eps.num_steps + 7


@pytest.mark.parametrize("process", ["ddpm", "fm"])
def test_save_load_identical_samples(tmp_path, process):
    eps = _toy_episodes()
    torch.manual_seed(1)
    model = SynthER.from_episodes(eps, process=process, width=32, depth=2,
                                  process_kwargs={"default_steps": 6})
    model.save(tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["kind"] == "synther" and cfg["process"] == process
    loaded = SynthER.load(tmp_path / "ckpt")
    a = model.generate(32, torch.Generator().manual_seed(7))
    b = loaded.generate(32, torch.Generator().manual_seed(7))
    for k in FIELDS:
        np.testing.assert_allclose(a[k], b[k], atol=0, rtol=0)
    c = loaded.generate(32, torch.Generator().manual_seed(8))
    assert not np.array_equal(a["observations"], c["observations"])


def test_load_errors(tmp_path):
    with pytest.raises(CheckpointError):
        SynthER.load(tmp_path / "missing")
    model = SynthER.from_episodes(_toy_episodes(), width=16, depth=1)
    model.save(tmp_path / "ok")
    (tmp_path / "ok" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError):
        SynthER.load(tmp_path / "ok")
    model.save(tmp_path / "other")
    cfg = json.loads((tmp_path / "other" / "config.json").read_text())
    (tmp_path / "other" / "config.json").write_text(json.dumps(dict(cfg, kind="diffuser")))
    with pytest.raises(CheckpointError, match="synther"):
        SynthER.load(tmp_path / "other")
    (tmp_path / "other" / "config.json").write_text(json.dumps(dict(cfg, width=17)))
    with pytest.raises(CheckpointError):
        SynthER.load(tmp_path / "other")


def test_config_validation():
    with pytest.raises(ValueError, match="process"):
        SynthERConfig(obs_dim=2, act_dim=1, process="nope")
    with pytest.raises(ValueError, match="steps"):
        SynthERTrainConfig(steps=0)
    # DDPM/DDIM default to v-prediction (eps-prediction blows up on unbounded data)
    assert SynthERConfig(obs_dim=1, act_dim=1, process="ddim").process_kwargs == {
        "prediction": "v"}
    assert SynthERConfig(obs_dim=1, act_dim=1, process="ddpm",
                         process_kwargs={"prediction": "eps"}).process_kwargs["prediction"] == "eps"


def test_train_synther_main_smoke(tmp_path):
    args = SimpleNamespace(task="nav1d/full", process="fm", out=tmp_path / "run", layout_seed=0,
                           steps=20, batch_size=64, lr=1e-3, seed=0, device="cpu",
                           synthetic_ratio=0.05, iql_steps=10, eval_episodes=2, progress=False)
    report = train_synther_main(args)
    on_disk = json.loads((tmp_path / "run" / "eval_synther.json").read_text())
    assert on_disk["n_synthetic"] == report["n_synthetic"] == 1600
    for name in ("eval/real_only", "eval/real_plus_synthetic"):
        assert {"return_mean", "return_std", "normalized_score_mean"} <= set(on_disk[name])
    fid = on_disk["fidelity"]
    assert fid["energy_distance"] is not None
    assert {"dynamics_error", "reward_error"} <= set(fid["synthetic"])
    assert fid["real"]["dynamics_error"] < 1e-6
    assert SynthER.load(tmp_path / "run" / "synther").cfg.process == "fm"
    assert (tmp_path / "run" / "iql_real_plus_synthetic" / "config.json").is_file()
