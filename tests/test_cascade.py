"""The aligned cascade on a tiny Nav1D Diffusion Policy with a known critic: with no training
it is the aligned model, P passes apply the refiner P times, and the refiner's own alignment
(SFT, QV-PG) raises the critic's reward over the aligned model's."""

import copy
import json

import pytest
import torch

from conftest import TargetActionCritic, train_tiny_dp
from diffalign.align.cascade import (
    CascadeConfig,
    CascadeModel,
    cascade_validation,
    pass_metrics,
    refine,
    train_cascade,
)
from diffalign.align.common import AlignSetup, condition_pool, freeze, validation_reward
from diffalign.align.final_stage import heldout_rewards
from diffalign.align.lora import add_lora
from diffalign.align.sft import SFTConfig
from diffalign.tasks import resolve_task

pytest.importorskip("peft")

FRAC = 0.6  # of 5 denoising steps: the refiner re-noises to the time of the last 3



@pytest.fixture(scope="module")
def problem():
    task = resolve_task("nav1d/full", episodes=200)
    model = freeze(train_tiny_dp(task.episodes))
    torch.manual_seed(0)
    # an aligned model unlike the reference: a copy of the net with a non-zero adapter
    net = add_lora(copy.deepcopy(model.net), r=4)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    hist = model.spec.obs_history
    setup = AlignSetup(model=model, critic=freeze(TargetActionCritic()),
                       states=condition_pool(task.episodes, hist, 256, seed=0),
                       val_states=condition_pool(task.episodes, hist, 64, seed=1), steps=5,
                       episodes=task.episodes)
    heldout = condition_pool(task.episodes, hist, 256, seed=2)
    return setup, net, heldout


def _cfg(**kw):
    base = dict(rounds=4, states_per_update=16, branches=8, refine_frac=FRAC,
                sft=SFTConfig(likelihood_source="current", epochs=8))
    return CascadeConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(problem):
    setup, net, _ = problem
    refiner = train_cascade(setup, net, _cfg(), progress=False)
    assert refiner is not None
    return refiner


def _draw(model, obs, seed=0, n=2, **kw):
    return model.sample(obs, n=n, generator=torch.Generator().manual_seed(seed), steps=5,
                        **kw).x0


def test_zero_training_is_exactly_the_aligned_model(problem):
    setup, net, _ = problem
    obs = setup.val_states[:6]
    want = _draw(setup.model, obs, net=net)
    for mode in ("aligned", "supervised"):
        hist: list[dict] = []
        refiner = train_cascade(setup, net, _cfg(mode=mode, rounds=0), progress=False,
                                history=hist)
        assert refiner is None and [h["round"] for h in hist] == [0]
        assert hist[0]["val_reward"] == validation_reward(setup, net=net)[0]
        frac = FRAC if mode == "aligned" else None
        one = CascadeModel(setup.model, net, refiner, refine_frac=frac)
        with pytest.warns(UserWarning, match="unstable"):
            two = CascadeModel(setup.model, net, refiner, passes=2, refine_frac=frac)
        for casc in (one, two):
            torch.testing.assert_close(_draw(casc, obs), want, atol=0, rtol=0)
            torch.testing.assert_close(_draw(casc.merged(), obs), want, atol=1e-5, rtol=1e-4)


def test_passes_apply_the_refiner_p_times(problem, trained):
    setup, net, _ = problem
    model, obs = setup.model, setup.val_states[:6]
    with pytest.warns(UserWarning, match="unstable"):
        two = CascadeModel(model, net, trained, passes=2, refine_frac=FRAC)
    one = CascadeModel(model, net, trained, passes=1, refine_frac=FRAC)
    g = torch.Generator().manual_seed(0)
    x = model.sample(obs, n=2, generator=g, steps=5, net=net).x0
    for _ in range(2):  # by hand: aligned sample, then the refiner twice, one generator
        x = refine(model, trained, x, obs, 2, FRAC, steps=5, generator=g)
    torch.testing.assert_close(_draw(two, obs), x, atol=0, rtol=0)
    assert not torch.allclose(_draw(one, obs), _draw(two, obs))
    assert not torch.allclose(_draw(one, obs), _draw(model, obs, net=net))


@pytest.mark.parametrize("methods", [("sft",), ("rl",), ("sft", "rl")])
def test_aligned_refiner_raises_the_critics_reward(problem, trained, methods):
    setup, net, heldout = problem
    hist: list[dict] = []
    refiner = (trained if methods == ("sft", "rl") else
               train_cascade(setup, net, _cfg(methods=methods), progress=False, history=hist))
    assert refiner is not None, "no refiner validated above the aligned model"
    if hist:
        assert {h["method"] for h in hist[1:]} == set(methods)
        assert cascade_validation(setup, net, refiner, FRAC) == pytest.approx(
            max(h["val_reward"] for h in hist), abs=1e-5)
    # on states neither training nor validation saw: the refiner closes at least a third
    # of the aligned model's gap to the critic's optimum (R = 0)
    casc = CascadeModel(setup.model, net, refiner, refine_frac=FRAC)
    aligned = heldout_rewards(setup, heldout, net=net).mean()
    refined = heldout_rewards(setup, heldout, model=casc).mean()
    assert aligned < -0.05
    assert refined > aligned + 0.33 * (0 - aligned), (float(aligned), float(refined))


def test_per_pass_report_records_reward_coherency_and_distance(problem, trained):
    setup, net, _ = problem
    model = setup.model
    with pytest.warns(UserWarning):
        casc = CascadeModel(model, net, trained, passes=3, refine_frac=FRAC)
    saved = model.meta
    model.meta = {"task": "nav1d/full", "dataset_kind": "full"}  # the evaluation's coherency
    try:
        rows = pass_metrics(setup, casc)
    finally:
        model.meta = saved
    assert [r["pass"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["val_reward"] == pytest.approx(validation_reward(setup, net=net)[0])
    assert rows[1]["val_reward"] == pytest.approx(cascade_validation(setup, net, trained, FRAC))
    assert rows[0]["distance"] == 0 and all(r["distance"] > 0 for r in rows[1:])
    assert all(0 <= r["coherency"] <= 1 for r in rows)
    assert pass_metrics(setup, casc)[0]["coherency"] is None  # no Nav1D meta: none


def test_align_trains_saves_and_reloads_the_cascade(problem, tmp_path):
    from diffalign.align.runner import AlignConfig, align, load_cascade, reuse_alignment
    from diffalign.align.sequence import SequenceConfig

    setup, _, _ = problem
    model = copy.deepcopy(setup.model)
    cfg = AlignConfig(
        sequence=SequenceConfig(methods=("sft",), passes=1, max_updates=1, eval_every=1),
        sft=SFTConfig(states_per_update=8, candidates=4, epochs=2, likelihood_source="current"),
        cascade=_cfg(methods=("sft",), rounds=2, states_per_update=8, passes=2),
        conditions=64, val_conditions=16, steps=5, pessimism=None)
    with pytest.warns(UserWarning, match="unstable"):
        res = align(model, setup.critic, setup.episodes, cfg, out_dir=tmp_path, progress=False)
    info = json.loads((tmp_path / "align.json").read_text())["cascade"]
    assert info["mode"] == "aligned" and info["passes"] == 2
    assert [r["pass"] for r in info["pass_metrics"]] == [0, 1, 2]
    assert info["refiner"] == (res.cascade.refiner is not None)
    obs = setup.val_states[:4]
    want = _draw(res.cascade, obs)
    with pytest.warns(UserWarning, match="unstable"):
        loaded = load_cascade(model, tmp_path)
    assert loaded.passes == 2 and loaded.mode == "aligned"
    torch.testing.assert_close(_draw(loaded, obs), want, atol=1e-5, rtol=1e-4)
    with pytest.warns(UserWarning, match="unstable"):
        casc = reuse_alignment(copy.deepcopy(setup.model), tmp_path)[2]
    torch.testing.assert_close(_draw(casc, obs), want, atol=1e-5, rtol=1e-4)


def test_cascade_passes_reach_the_config_from_the_flag_and_the_recipe(tmp_path):
    import dataclasses

    import tyro

    from diffalign.commands.align import AlignArgs
    from diffalign.recipes.base import Recipe

    for name in ("ref", "critic"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    base = [str(tmp_path / "ref"), "--critic", str(tmp_path / "critic"), "--out",
            str(tmp_path / "out")]
    assert tyro.cli(AlignArgs, args=base).cascade_passes == 1
    assert tyro.cli(AlignArgs, args=base + ["--cascade-passes", "3"]).cascade_passes == 3
    with pytest.raises(SystemExit):  # tyro reports the ValueError and exits
        tyro.cli(AlignArgs, args=base + ["--cascade-passes", "0"])
    recipe = dataclasses.replace(Recipe(), cascade_passes=3, cascade_mode="supervised")
    cfg = recipe.align_config(covered=False, methods=("sft",), seed=0).cascade
    assert (cfg.passes, cfg.mode) == (3, "supervised")
    assert Recipe().align_config(covered=False, methods=("sft",), seed=0).cascade.mode == "aligned"
