"""Pessimism from the data and the honest final stage: the behaviour band measures coverage,
the penalty keeps alignment on the data's support when the critic is wrong off it, the same
code path still gains on random data, and the final stage falls back to the reference."""

import dataclasses

import numpy as np
import pytest
import torch

from conftest import train_tiny_dp
from diffalign.align.final_stage import FinalStageConfig, choose_final
from diffalign.align.lora import remove_lora
from diffalign.align.pessimism import (
    PessimismConfig,
    PessimisticCritic,
    pessimism_weight,
    pessimistic_critic,
)
from diffalign.align.rl import RLConfig
from diffalign.align.runner import AlignConfig, align
from diffalign.align.sequence import SequenceConfig
from diffalign.models.behavior import BehaviorConfig, BehaviorModel, train_behavior
from diffalign.tasks import resolve_task

pytest.importorskip("peft")

BAND = BehaviorConfig(steps=1000)


class GreedyCritic(torch.nn.Module):
    """Q(s, a) = a: wrong wherever the data never went (it always says "more")."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def q(self, obs, act):
        act = torch.as_tensor(act, dtype=torch.float32)
        return act[..., 0] + 0 * self.dummy


def _narrow(episodes, seed=0):
    """The same states with an 'expert' that acts near -0.6 left of 0 and near 0.6 right
    of it: one action per state, the whole range across states."""
    rng = np.random.default_rng(seed)
    side = np.where(episodes.observations[:, :1] < 0, -0.6, 0.6)
    acts = np.clip(side + 0.05 * rng.standard_normal(episodes.actions.shape), -1, 1)
    return dataclasses.replace(episodes, actions=acts.astype("float32"))


def _off_band(model, band, episodes, n=256):
    """Share of the model's first actions outside the data's band, and their mean."""
    obs = torch.as_tensor(episodes.observations[-n:])
    with torch.no_grad():
        x = model.sample(obs[:, None], generator=torch.Generator().manual_seed(5),
                         steps=10).x0
        a = model.actions_from_x(x)[:, 0]
    return float((band.excess(obs, a) > 1).float().mean()), float(a.mean())


def _train_dp(episodes, steps=300):
    return train_tiny_dp(episodes, steps=steps)


@pytest.fixture(scope="module")
def data():
    full = resolve_task("nav1d/full", episodes=200).episodes
    return full, _narrow(full)


@pytest.fixture(scope="module")
def bands(data):
    full, narrow = data
    return train_behavior(full, BAND, progress=False), train_behavior(narrow, BAND,
                                                                       progress=False)


def test_coverage_tells_random_from_expert_data(data, bands):
    full, narrow = data
    b_full, b_narrow = bands
    obs_f = torch.as_tensor(full.observations[:2000])
    assert b_full.coverage(obs_f) > 0.7
    assert b_narrow.coverage(torch.as_tensor(narrow.observations[:2000])) < 0.3
    # the data's own actions are on the support; the other side's are not
    a = torch.as_tensor(narrow.actions[:2000])
    assert (b_narrow.excess(obs_f, a) > 1).float().mean() < 0.05
    assert (b_narrow.excess(obs_f, -a) > 1).float().mean() > 0.9


def test_band_round_trips_through_its_checkpoint(bands, tmp_path):
    b = bands[1]
    b.save(tmp_path / "b")
    c = BehaviorModel.load(tmp_path / "b")
    obs = torch.randn(16, 2)
    for x, y in zip(b.band(obs), c.band(obs)):
        assert torch.equal(x, y)


def test_weight_ramps_from_full_to_off():
    cfg = PessimismConfig(strength=2.0, coverage_low=0.3, coverage_high=0.7)
    assert pessimism_weight(0.1, cfg) == 2.0 and pessimism_weight(0.3, cfg) == 2.0
    assert pessimism_weight(0.5, cfg) == pytest.approx(1.0)
    assert pessimism_weight(0.7, cfg) == 0.0 and pessimism_weight(0.95, cfg) == 0.0
    with pytest.raises(ValueError, match="coverage_low"):
        PessimismConfig(coverage_low=0.8, coverage_high=0.7)


def test_penalty_lowers_q_only_off_support_and_points_back(data, bands):
    _, narrow = data
    crit, info = pessimistic_critic(GreedyCritic(), narrow, PessimismConfig(),
                                    behavior=bands[1])
    assert isinstance(crit, PessimisticCritic) and info["weight"] == 1.0
    left = narrow.observations[:, 0] < -0.1
    obs = torch.as_tensor(narrow.observations[left][:256])
    inside = torch.full((len(obs), 1), -0.6)
    assert torch.allclose(crit.q(obs, inside), GreedyCritic().q(obs, inside))
    far = torch.full((len(obs), 1), 0.8, requires_grad=True)
    q = crit.q(obs, far)
    assert (q < GreedyCritic().q(obs, far.detach()) - 1).all()
    q.sum().backward()
    assert (far.grad[:, 0] < 0).all()  # towards the data's actions
    # random data: the weight is 0 and the critic is unchanged
    crit_f, info_f = pessimistic_critic(GreedyCritic(), data[0], PessimismConfig(),
                                        behavior=bands[0])
    assert info_f["weight"] == 0.0
    assert torch.equal(crit_f.q(obs, far.detach()), GreedyCritic().q(obs, far.detach()))


def _align_cfg(pessimism):
    seq = SequenceConfig(methods=("rl",), passes=1, max_updates=30, eval_every=5, patience=10)
    seq = dataclasses.replace(seq, guard=dataclasses.replace(seq.guard, support_frac=1.0))
    return AlignConfig(sequence=seq, conditions=128, val_conditions=32, cascade=None,
                       rl=RLConfig(lr=3e-3, kl_coef=0.0, states_per_update=32, group_size=1),
                       pessimism=pessimism, final=FinalStageConfig(states=64), seed=0)


@pytest.mark.slow
def test_pessimism_keeps_alignment_on_narrow_data_and_gains_on_random(data, bands):
    full, narrow = data
    b_full, b_narrow = bands
    ref = _train_dp(narrow)
    ref_state = {k: v.clone() for k, v in ref.net.state_dict().items()}
    ref_off, ref_mean = _off_band(ref, b_narrow, narrow)
    assert ref_off < 0.15
    # without pessimism the wrong critic drags the actions off the data
    free = align(ref, GreedyCritic(), narrow, _align_cfg(None), progress=False)
    off, mean = _off_band(ref, b_narrow, narrow)
    assert off > 0.4 and mean > ref_mean + 0.3
    remove_lora(free.net)
    ref.net.load_state_dict(ref_state)
    assert _off_band(ref, b_narrow, narrow) == (ref_off, ref_mean)
    # with it (the data decide the weight: full here) they stay in the band
    kept = align(ref, GreedyCritic(), narrow, _align_cfg(PessimismConfig(behavior=BAND)),
                 progress=False, behavior=b_narrow)
    assert kept.pessimism["weight"] == 1.0
    off, mean = _off_band(ref, b_narrow, narrow)
    assert off < ref_off + 0.1 and abs(mean - ref_mean) < 0.15
    # the same code path on random data: weight 0, the reward goes up
    ref_f = _train_dp(full)
    _, before = _off_band(ref_f, b_full, full)
    gained = align(ref_f, GreedyCritic(), full, _align_cfg(PessimismConfig(behavior=BAND)),
                   progress=False, behavior=b_full)
    assert gained.pessimism["weight"] == 0.0
    assert _off_band(ref_f, b_full, full)[1] > before + 0.3
    assert gained.final["stage"] == "rl"


def test_final_stage_falls_back_to_the_reference_when_no_stage_is_better():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(512, generator=g)
    worse = ref - 0.5 + 0.1 * torch.randn(512, generator=g)
    noise = ref + 0.01 + torch.randn(512, generator=g)  # a gain far below its noise
    name, reason, table = choose_final(ref, {"sft": worse, "rl": noise})
    assert name == "reference" and "no stage" in reason
    assert table["sft"]["gain"] < 0 and table["reference"]["gain"] == 0.0


def test_final_stage_is_the_reliably_best_stage():
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(512, generator=g)
    sft = ref + 0.3 + 0.1 * torch.randn(512, generator=g)
    rl = ref + 0.5 + 0.1 * torch.randn(512, generator=g)
    name, reason, table = choose_final(ref, {"sft": sft, "rl": rl})
    assert name == "rl" and table["rl"]["gain"] == pytest.approx(0.5, abs=0.05)
    assert "held-out gain" in reason


def test_final_stage_needs_more_evidence_where_the_data_covers_less():
    from diffalign.align.final_stage import choose_from_table

    g = torch.Generator().manual_seed(2)
    ref = torch.randn(512, generator=g)
    rl = ref + 0.02 + 0.1 * torch.randn(512, generator=g)  # about 4.5 standard errors
    assert choose_final(ref, {"rl": rl}, weight=0.0)[0] == "rl"
    assert choose_final(ref, {"rl": rl}, weight=0.5)[0] == "rl"  # needs 4
    assert choose_final(ref, {"rl": rl}, weight=0.7)[0] == "reference"  # needs 6.7
    name, reason, table = choose_final(ref, {"rl": ref + 1.0}, weight=1.0)
    assert name == "reference" and "one action per state" in reason
    # a finished run's recorded table gives the same answer
    assert choose_from_table(table, 2.0, 0.0)[0] == "rl"
    assert choose_from_table(table, 2.0, 1.0)[0] == "reference"
