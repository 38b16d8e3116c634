"""Batched rollouts of a control model in its environment.

All running episodes are stepped in lock-step and every episode that needs a decision at a
step is served by ONE batched model call (``B`` states × ``N`` candidates rows), which is
what makes evaluation fast on a CPU. Environments are plain gymnasium envs built by
``make_env()``, batched by hand (so episodes of different lengths simply drop out).

Per episode: the return, the length, success (when the env's ``info`` reports it) and the
observation trajectory. Per decision (up to caps): the chosen plan (planners; RAW states and
actions with the number of its positions that lie inside the episode), the current state and
the N candidates' first actions (policy coherency, entropy), and the wall time of decisions.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from ..models.selection import resolve_selection, select_actions

__all__ = ["RolloutResult", "rollout"]

_SUCCESS_KEYS = ("success", "is_success", "goal_achieved")


@dataclass
class RolloutResult:
    """What :func:`rollout` records."""

    returns: np.ndarray
    """(E,) undiscounted episode returns."""
    lengths: np.ndarray
    """(E,) episode lengths in steps."""
    success: np.ndarray | None
    """(E,) bool, or None when the env never reported success."""
    trajectories: list[np.ndarray]
    """Per episode the observations ``(len + 1, obs_dim)``."""
    plan_states: np.ndarray | None
    """(P, H, obs_dim) RAW chosen plans (planners only)."""
    plan_actions: np.ndarray | None
    """(P, H, act_dim) RAW actions of those plans."""
    plan_valid: np.ndarray | None
    """(P,) how many leading plan positions lie inside the episode (the rest is padding)."""
    decision_states: np.ndarray
    """(M, obs_dim) the current observation at recorded decisions."""
    decision_candidates: np.ndarray
    """(M, N, act_dim) first action of each of the N candidates at those decisions."""
    entropy_samples: np.ndarray
    """(S, N', act_dim) first actions of N' >= 2 candidates per state, for the entropy."""
    decisions: int
    """Number of (state-level) decisions taken."""
    decision_seconds: float
    """Wall time spent in model calls for those decisions."""
    wall_seconds: float
    """Wall time of the whole rollout."""
    selection: str = ""
    """The selection rule used (``"auto"`` resolved)."""
    extra: dict = field(default_factory=dict)

    @property
    def decisions_per_s(self) -> float:
        return self.decisions / max(self.decision_seconds, 1e-9)


def _success_flag(info: dict) -> bool | None:
    for k in _SUCCESS_KEYS:
        if k in info:
            return bool(np.any(info[k]))
    return None


def rollout(model, make_env, episodes: int = 10, candidates: int = 1, steps: int | None = None,
            selection: str = "auto", critic=None, seed: int = 0, vectorised: bool = True,
            temperature: float = 1.0, max_plans: int = 1024, max_decision_records: int = 4096,
            entropy_states: int = 64, entropy_samples: int = 16, max_parallel: int | None = None,
            net=None, progress: bool = False, record_transitions: bool = False
            ) -> RolloutResult:
    """Run ``episodes`` episodes of ``model`` in envs from ``make_env()``.

    Args:
        candidates: N samples per decision, chosen among by ``selection``.
        steps: denoising steps (default: the process's).
        selection: see :mod:`diffalign.models.selection`.
        seed: env ``i`` is reset with ``seed + i``; the model's sampling generator is seeded
            with ``seed``.
        vectorised: step all episodes together with one model call per step (fast); False
            runs one episode at a time.
        max_parallel: cap on episodes run together (memory: ``max_parallel * N`` rows).
        entropy_states, entropy_samples: when ``candidates < 2`` the entropy is measured on
            the first ``entropy_states`` decision states with ``entropy_samples`` extra samples
            each (not timed as decisions).
        net: overrides the model's denoiser (e.g. a LoRA-wrapped one).
        record_transitions: keep every step as a transition in ``extra["transitions"]``
            (``observations, actions, rewards, next_observations, terminals, timeouts``;
            the layout of :func:`~diffalign.models.critic.transitions_from_episodes`'s input),
            for online fine-tuning.
    """
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got episodes={episodes}")
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got candidates={candidates}")
    sel_name = resolve_selection(model.kind, selection, critic)
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(int(seed))
    par = episodes if vectorised else 1
    if max_parallel is not None:
        par = max(1, min(par, int(max_parallel)))
    k = model.spec.obs_history
    planner = model.kind != "dp"

    returns = np.zeros(episodes)
    lengths = np.zeros(episodes, dtype=np.int64)
    success: list[bool | None] = [None] * episodes
    trajs: list[np.ndarray] = [None] * episodes  # type: ignore[list-item]
    plans_s, plans_a, plan_meta = [], [], []  # plan_meta: (episode, t)
    dec_states, dec_cands = [], []
    ent_hist: list[np.ndarray] = []
    ent_cands: list[np.ndarray] = []
    n_dec, dec_sec = 0, 0.0
    n_plans = n_rec = 0
    trans: dict[str, list] = {k: [] for k in ("observations", "actions", "rewards",
                                              "next_observations", "terminals", "timeouts")}
    t_start = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=episodes, desc="eval", dynamic_ncols=True)

    for c0 in range(0, episodes, par):
        ids = list(range(c0, min(episodes, c0 + par)))
        envs = [make_env() for _ in ids]
        obs = [np.asarray(env.reset(seed=seed + i)[0], dtype=np.float32)
               for env, i in zip(envs, ids)]
        hist = [deque([o] * k, maxlen=k) for o in obs]
        paths = [[o] for o in obs]
        queues: list[deque] = [deque() for _ in ids]
        tsteps = [0] * len(ids)
        active = [True] * len(ids)
        while any(active):
            need = [j for j in range(len(ids)) if active[j] and not queues[j]]
            if need:
                oh = torch.from_numpy(np.stack([np.stack(hist[j]) for j in need]))
                t0 = time.perf_counter()
                out = select_actions(model, oh, candidates=candidates, steps=steps,
                                     selection=sel_name, critic=critic, generator=gen,
                                     temperature=temperature, net=net)
                acts = out.actions.detach().cpu().numpy()
                dec_sec += time.perf_counter() - t0
                n_dec += len(need)
                for r, j in enumerate(need):
                    queues[j].extend(acts[r])
                first = out.candidates[:, :, 0].detach().cpu().numpy()  # (B, N, act)
                cur = oh[:, -1].numpy()
                take = min(len(need), max_decision_records - n_rec)
                if take > 0:
                    dec_states.append(cur[:take])
                    dec_cands.append(first[:take])
                    n_rec += take
                if candidates >= 2 and sum(len(e) for e in ent_cands) < entropy_states:
                    ent_cands.append(first)
                elif candidates < 2 and len(ent_hist) < entropy_states:
                    ent_hist.extend(oh.numpy()[: entropy_states - len(ent_hist)])
                if planner and n_plans < max_plans:
                    with torch.no_grad():
                        ps, pa = model.plan_states_actions(out.x)
                    take = min(len(need), max_plans - n_plans)
                    plans_s.append(ps[:take].detach().cpu().numpy())
                    plans_a.append(pa[:take].detach().cpu().numpy())
                    plan_meta.extend((ids[j], tsteps[j]) for j in need[:take])
                    n_plans += take
            for j in range(len(ids)):
                if not active[j]:
                    continue
                a = queues[j].popleft()
                o, r, term, trunc, info = envs[j].step(a)
                o = np.asarray(o, dtype=np.float32)
                if record_transitions:
                    for key, v in zip(trans, (paths[j][-1], np.asarray(a, dtype=np.float32),
                                              float(r), o, bool(term),
                                              bool(trunc and not term))):
                        trans[key].append(v)
                returns[ids[j]] += float(r)
                tsteps[j] += 1
                paths[j].append(o)
                hist[j].append(o)
                flag = _success_flag(info) if isinstance(info, dict) else None
                if flag is not None:
                    success[ids[j]] = bool(success[ids[j]]) or flag
                if term or trunc:
                    active[j] = False
                    queues[j].clear()
                    lengths[ids[j]] = tsteps[j]
                    trajs[ids[j]] = np.stack(paths[j])
                    if bar is not None:
                        bar.update(1)
        for env in envs:
            env.close()
    if bar is not None:
        bar.close()

    # entropy samples when fewer than 2 candidates were drawn per decision
    if candidates >= 2:
        ent = np.concatenate(ent_cands)[:entropy_states] if ent_cands else np.zeros((0, 2, 1))
    elif ent_hist:
        oh = torch.from_numpy(np.stack(ent_hist))
        with torch.no_grad():
            x = model.sample(oh, entropy_samples, generator=gen, steps=steps, net=net).x0
            a = model.actions_from_x(x, oh)[:, 0]
        ent = a.reshape(len(ent_hist), entropy_samples, -1).cpu().numpy()
    else:
        ent = np.zeros((0, 2, model.act_dim))

    plan_states = plan_actions = plan_valid = None
    if planner and plans_s:
        plan_states = np.concatenate(plans_s)
        plan_actions = np.concatenate(plans_a)
        h = plan_states.shape[1]
        # position p of a plan made at step t is time t + p - (K - 1); real up to len - 1
        plan_valid = np.array([min(h, int(lengths[e]) - t + (k - 1)) for e, t in plan_meta])
    if was_training:
        model.train()
    succ = None if all(s is None for s in success) else np.array([bool(s) for s in success])
    extra = {}
    if record_transitions:
        extra["transitions"] = {k: np.asarray(v, dtype=bool if k in ("terminals", "timeouts")
                                              else np.float32) for k, v in trans.items()}
    return RolloutResult(
        returns=returns, lengths=lengths, success=succ, trajectories=trajs,
        plan_states=plan_states, plan_actions=plan_actions, plan_valid=plan_valid,
        decision_states=np.concatenate(dec_states) if dec_states else np.zeros((0, 0)),
        decision_candidates=np.concatenate(dec_cands) if dec_cands else np.zeros((0, 0, 0)),
        entropy_samples=ent, decisions=n_dec, decision_seconds=dec_sec,
        wall_seconds=time.perf_counter() - t_start, selection=sel_name, extra=extra)
