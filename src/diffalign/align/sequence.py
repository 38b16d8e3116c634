"""The unified alignment sequence: RL → DPO → SFT, each until its validation reward
plateaus, for several passes until a pass gains too little (docs/design.md §4).

All methods train one LoRA adapter; a :class:`~diffalign.align.guards.Guard` keeps the best
adapter, and each method ends on its best validated adapter.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .common import (
    AlignSetup,
    fraction_below,
    reward_spread,
    support_floor,
    validation_draw,
    validation_reward,
)
from .dpo import DPOConfig, DPOMethod
from .guards import Guard, GuardConfig
from .lora import lora_parameters, reference
from .rl import RLConfig, RLMethod
from .sft import SFTConfig, SFTMethod

__all__ = ["METHODS", "SequenceConfig", "StageResult", "boundary_state", "build_method",
           "run_sequence"]

METHODS = ("rl", "dpo", "sft")


@dataclass
class SequenceConfig:
    """How the methods are run, stopped and repeated."""

    methods: tuple[str, ...] = ("rl", "dpo", "sft")
    """Methods in order (any of rl, dpo, sft)."""
    passes: int = 2
    """Maximum passes over the methods."""
    max_updates: int = 40
    """Maximum updates of one method in one pass (a method's own ``max_updates`` overrides
    it)."""
    eval_every: int = 4
    """Updates between validation evaluations (a method's own ``eval_every`` overrides
    it)."""
    patience: int = 3
    """Evaluations without a gain of ``min_delta`` before a method is stopped (plateau)."""
    min_delta: float = 0.02
    """Smallest validation gain that counts as progress, in units of the reward spread
    across samples of one state (:func:`~diffalign.align.common.reward_spread`)."""
    pass_min_gain: float = 0.05
    """Stop after a pass whose gain is below this (same unit)."""
    guard: GuardConfig = field(default_factory=GuardConfig)
    """Collapse guard thresholds."""

    def __post_init__(self):
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"unknown alignment method(s) {bad or self.methods}; choose from "
                             f"{METHODS}")
        if self.passes < 1 or self.max_updates < 1 or self.eval_every < 1 or self.patience < 1:
            raise ValueError(f"passes={self.passes}, max_updates={self.max_updates}, eval_every="
                             f"{self.eval_every}, patience={self.patience} must all be >= 1")


@dataclass
class StageResult:
    """One method run in one pass."""

    name: str
    method: str
    iterations: int
    val_reward: float
    wall_s: float
    history: list[dict] = field(default_factory=list)


def build_method(name: str, setup: AlignSetup, net, cfgs: dict, generator):
    """Instantiate the method ``name`` with its config from ``cfgs`` (or the defaults)."""
    if name == "rl":
        return RLMethod(setup, net, cfgs.get("rl") or RLConfig(), generator)
    if name == "dpo":
        return DPOMethod(setup, net, cfgs.get("dpo") or DPOConfig(), generator)
    if name == "sft":
        return SFTMethod(setup, net, cfgs.get("sft") or SFTConfig(), generator)
    raise ValueError(f"unknown alignment method {name!r}; choose from {METHODS}")


def run_sequence(setup: AlignSetup, net, seq: SequenceConfig, cfgs: dict | None = None,
                 seed: int = 0, on_stage_end: Callable[[StageResult], None] | None = None,
                 progress: bool = True, online=None,
                 on_update: Callable[[], None] | None = None,
                 checkpoint: Callable[[dict], None] | None = None,
                 resume: dict | None = None
                 ) -> tuple[list[StageResult], list[dict], Guard]:
    """Run the sequence on the LoRA-wrapped ``net``; returns (stages, events, guard).

    ``on_stage_end`` is called after each stage with the adapter set to that stage's best
    (e.g. to evaluate it in the environment). ``online`` (an
    :class:`~diffalign.align.online.OnlineTuner`) runs a round of rollouts and critic
    training every ``online.cfg.every`` updates; the guard is then re-based on the new
    critic and each round is recorded as an event. ``on_update()`` is called before every
    update (``run nav1d`` uses it to take back its second thread when its side process is
    idle).

    ``checkpoint(state)`` is called at every stage boundary with what the rest of the
    sequence depends on (see :func:`boundary_state`); ``resume`` is such a state, with the
    adapter already set to its stage's: the sequence then goes on after that stage and ends
    as an uninterrupted one would (CPU, same thread count).
    """
    cfgs = cfgs or {}
    gen = torch.Generator().manual_seed(seed)
    if resume is None:
        ref_reward, _ = validation_reward(setup, net=net)
        scale = max(reward_spread(setup, net=net), 1e-6)
        floor = support_floor(setup, net) if seq.guard.support_frac < 1 else None
    else:
        ref_reward, scale, floor = resume["reference_reward"], resume["scale"], resume["floor"]
    guard = Guard(lora_parameters(net), reference_reward=ref_reward, cfg=seq.guard, scale=scale)
    guard.observe(ref_reward)
    stages: list[StageResult] = []
    events: list[dict] = []
    pass_start = ref_reward
    updates = 0
    done = 0
    if resume is not None:
        if online is not None:
            raise ValueError("an alignment with online rounds cannot resume mid-sequence")
        gen.set_state(resume["generator"])
        torch.set_rng_state(resume["torch_rng"])
        guard.best_reward = resume["best_reward"]
        guard.best_state = guard.snapshot()
        stages = [StageResult(**st) for st in resume["stages"]]
        events = list(resume["events"])
        pass_start, updates, done = resume["pass_start"], resume["updates"], len(stages)
    k = 0  # stages of the sequence reached so far, done ones included

    def online_round(name: str) -> None:
        nonlocal pass_start
        guard.restore()  # roll out the best validated adapter
        event = {**online.round(net), "stage": name}
        val, _ = validation_reward(setup, net=net)
        with reference(net):
            ref_val, _ = validation_reward(setup, net=net)
        pass_start += val - guard.best_reward  # keep the pass gain in one critic's units
        guard.rebase(val, ref_val)
        event.update(val_reward=val, reference_val_reward=ref_val)
        events.append(event)

    for p in range(seq.passes):
        for m in seq.methods:
            k += 1
            if k <= done:
                continue
            name = m if p == 0 else f"{m}_p{p + 1}"
            method = build_method(m, setup, net, cfgs, gen)
            guard.new_stage()
            t0 = time.perf_counter()
            stage_best = guard.best_reward
            stale, history, it = 0, [], 0
            every = method.cfg.eval_every or seq.eval_every
            bar = tqdm(range(method.cfg.max_updates or seq.max_updates), desc=f"align/{name}",
                       disable=not progress, leave=False)
            for it in bar:
                if on_update is not None:
                    on_update()
                stats = method.step()
                reason = guard.loss_spiked(float(stats.get("loss", 0.0)))
                if reason is None and (it + 1) % every == 0:
                    val, _, x0 = validation_draw(setup, net=net)
                    stats["val_reward"] = val
                    reason = guard.reward_collapsed(val)
                    if reason is None and floor is not None:  # the same samples, off-data?
                        stats["outside_support"] = fraction_below(
                            setup, net, x0, setup.val_states.to(x0.device), floor)
                        reason = guard.support_left(stats["outside_support"])
                    if reason is None:
                        if guard.observe(val) and val - stage_best > seq.min_delta * scale:
                            stage_best, stale = val, 0
                        else:
                            stale += 1
                        bar.set_postfix(val=f"{val:.3f}", best=f"{guard.best_reward:.3f}")
                if reason is not None:
                    events.append(guard.handle_collapse(reason, method.optimizer, name, it))
                    stale += 1
                history.append({"iteration": it, **stats})
                updates += 1
                if online is not None and not online.done and updates % online.cfg.every == 0:
                    online_round(name)
                    stage_best = guard.best_reward  # gains count from here, in new units
                if stale >= seq.patience:
                    break
            guard.restore()  # end every stage on the best validated adapter
            stage = StageResult(name=name, method=m, iterations=it + 1,
                                val_reward=guard.best_reward,
                                wall_s=time.perf_counter() - t0, history=history)
            stages.append(stage)
            if on_stage_end is not None:
                on_stage_end(stage)
            if checkpoint is not None:
                checkpoint(boundary_state(gen, guard, stages, events, pass_start, updates,
                                          floor))
        gain = guard.best_reward - pass_start
        pass_start = guard.best_reward
        if p + 1 < seq.passes and gain < seq.pass_min_gain * scale:
            events.append({"kind": "passes_stopped", "after_pass": p + 1, "gain": gain})
            break
    return stages, events, guard


def boundary_state(gen: torch.Generator, guard: Guard, stages: list[StageResult],
                   events: list[dict], pass_start: float, updates: int,
                   floor: float | None) -> dict:
    """What the rest of a sequence depends on at a stage boundary, besides the adapter (the
    guard's best, which each stage ends on): RNG states, the guard's reward and units, the
    stages and events so far, and the pass's starting reward."""
    from dataclasses import asdict

    return {"generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
            "reference_reward": guard.reference_reward, "scale": guard.scale, "floor": floor,
            "best_reward": guard.best_reward, "pass_start": pass_start, "updates": updates,
            "stages": [asdict(s) for s in stages], "events": list(events)}
