"""``diffalign align REF_DIR --critic DIR --methods rl,dpo,sft --out DIR``."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Literal

import tyro

__all__ = ["AlignArgs", "align_main"]


@dataclass
class AlignArgs:
    """Align a trained reference model to a critic with one LoRA adapter."""

    ref_dir: Annotated[Path, tyro.conf.Positional]
    """Directory of the reference model (from `diffalign train`)."""
    critic: Path
    """Directory of the IQL critic (from `diffalign critic`)."""
    out: Path
    """Output directory: adapter/, cascade/, align.json (and merged/ with --merge)."""
    methods: str = "rl,dpo,sft"
    """Alignment methods in order, comma-separated (rl, dpo, sft)."""
    passes: int = 2
    """Maximum passes over the methods."""
    max_updates: int = 24
    """Maximum updates of one method per pass (each stops earlier on a plateau)."""
    cascade: bool = True
    """Also train the cascaded refiner."""
    cascade_passes: int = 1
    """Refinement passes of the cascade at inference (align.json's "cascade" section records
    each pass's validation reward, coherency and distance from the aligned sample)."""
    merge: bool = False
    """Also save a plain checkpoint with the adapter merged into the weights."""
    lora_rank: int = 8
    """Rank of the LoRA adapter."""
    rl_algo: Literal["qvpg", "ppo", "reinforce"] = "qvpg"
    """RL: "qvpg" backpropagates the critic's reward through the last K denoising steps;
    "ppo" (clipped ratio) and "reinforce" take the policy gradient of the denoising MDP with
    each state's group of samples as the baseline (they need --rl-group >= 2)."""
    rl_grad_k: int | None = None
    """RL (QV-PG): backpropagate through the last K denoising steps (default 3); with
    --rl-grad-k-max, the lower end of K's range (default 1 there)."""
    rl_grad_k_max: int | None = None
    """RL (QV-PG): draw K uniformly from [--rl-grad-k, this] for each update (dynamic
    truncation); unset: K is fixed."""
    rl_credit: Literal["none", "decreasing", "x0_similarity"] = "none"
    """RL: credit of each denoising step: "decreasing" weights the steps γ^k (γ = 0.9, k
    steps left to the clean sample), "x0_similarity" by how close each step's x0-prediction
    is to the final sample (both mean 1). PPO/REINFORCE weight each step's loss term; QV-PG
    weights each gradient step's share of the reward gradient."""
    rl_entropy_coef: float = 0.0
    """RL: weight c of the entropy bonus E[R] + c·H, with H a nearest-neighbour
    (Kozachenko–Leonenko) estimate over each state's samples (needs --rl-group >= 2); 0
    disables it. (experimental: in a 10-update Nav1D test it kept more entropy but lowered the
    reward reached, QV-PG −0.004 → −0.028, PPO −0.010 → −0.117; no task gain measured)"""
    rl_kl: float = 0.005
    """RL: weight of the KL to the reference (0 disables it)."""
    rl_scale: Literal["none", "group"] = "none"
    """RL (QV-PG): "group" divides the reward by its spread over each state's samples, so
    --rl-kl means the same on any reward scale."""
    rl_lr: float = 1e-3
    """RL: adapter learning rate (run nav1d uses 1e-3 for RL after SFT)."""
    rl_states: int = 32
    """RL: states per update."""
    rl_group: int = 8
    """RL: samples per state (the group of PPO/REINFORCE's baseline; QV-PG can take 1)."""
    sft_likelihood: Literal["data", "current"] = "data"
    """SFT: the out-of-distribution guard drops winners less likely under the reference than
    the 10% quantile of the reference's likelihood of the dataset's windows ("data", the
    paper's), or of the round's own candidates ("current", a relative filter). (experimental for
    "current": with off-data winners in a test it let 3 of 4 through, "data" none)"""
    dpo_pairs: Literal["reference", "current", "dataset"] = "reference"
    """DPO: pairs from reference samples or current-model samples ranked by the critic, or
    from dataset windows ranked by their return. (experimental for "dataset": DPO alone
    with it reached 41.9% of the optimum on nav1d/full, below one reference sample's 45.5%)"""
    sft_proposals: int = 0
    """SFT: search the executed action among this many proposals spread over the data's action
    range (with the candidates' own), the critic's best in-painted into a new sample, and keep
    the last 4096 winners for training (``SFTConfig.action_proposals``). Only for a critic
    trained on data that tried every action (a random behaviour policy). 0: winners are the
    critic's best whole candidates."""
    rollout_conditions: float = 0.0
    """Share of the conditions (states) the methods train and validate on taken from
    rollouts of the critic's greedy policy through dynamics learned from the dataset
    (trained into OUT/dynamics/, ``AlignConfig.rollouts``); 0: dataset states only. Only for
    a critic trained on data that tried every action (a random behaviour policy): run nav1d
    uses 0.5 there."""
    online: bool = False
    """Online fine-tuning: every --online-every updates roll the current model out in the
    task's environment, add the steps to the critic's buffer, keep training the critic
    (saved to OUT/critic_online/) and add the visited states to the conditions.
    (experimental: on nav1d/full 64.0% of the optimum against 64.2% offline, in 6× the
    alignment time)"""
    online_every: int = 8
    """Alignment updates between online rounds."""
    online_episodes: int = 16
    """Environment episodes per online round."""
    online_critic_steps: int = 200
    """Critic updates per online round."""
    seed: int = 0
    """Seed."""
    device: str = "cpu"
    """Torch device."""
    progress: bool = True
    """Show progress bars."""

    def rl_overrides(self) -> dict:
        """The :class:`~diffalign.align.rl.RLConfig` fields these flags set."""
        out = dict(algo=self.rl_algo, credit=self.rl_credit, entropy_coef=self.rl_entropy_coef,
                   kl_coef=self.rl_kl, qvpg_scale=self.rl_scale, lr=self.rl_lr,
                   states_per_update=self.rl_states, group_size=self.rl_group)
        if self.rl_grad_k_max is not None:
            out.update(random_k=True, grad_last_k=self.rl_grad_k_max,
                       grad_k_min=1 if self.rl_grad_k is None else self.rl_grad_k)
        elif self.rl_grad_k is not None:
            out.update(grad_last_k=self.rl_grad_k)
        return out

    def __post_init__(self):
        from ..align.rl import RLConfig
        from ..align.sequence import METHODS

        methods = [m.strip() for m in self.methods.split(",") if m.strip()]
        bad = [m for m in methods if m not in METHODS]
        if bad or not methods:
            raise ValueError(f"unknown alignment method(s) {bad or self.methods!r}; choose from "
                             f"{', '.join(METHODS)}")
        if self.rl_algo not in ("qvpg", "ppo", "reinforce"):
            raise ValueError(f"rl_algo must be qvpg, ppo or reinforce, got rl_algo="
                             f"{self.rl_algo!r}")
        if not self.rl_kl >= 0:
            raise ValueError(f"rl_kl must be >= 0, got rl_kl={self.rl_kl}")
        if not self.rl_lr > 0 or self.rl_states < 1 or self.rl_group < 1:
            raise ValueError(f"need rl_lr > 0, rl_states >= 1 and rl_group >= 1, got rl_lr="
                             f"{self.rl_lr}, rl_states={self.rl_states}, rl_group="
                             f"{self.rl_group}")
        for name in ("rl_grad_k", "rl_grad_k_max"):
            k = getattr(self, name)
            if k is not None and k < 1:
                raise ValueError(f"{name} must be >= 1, got {name}={k}")
            if k is not None and self.rl_algo != "qvpg":
                raise ValueError(f"{name}={k} truncates QV-PG's gradient; rl_algo="
                                 f"{self.rl_algo!r} takes every step")
        if (self.rl_grad_k_max is not None and self.rl_grad_k is not None
                and self.rl_grad_k_max < self.rl_grad_k):
            raise ValueError(f"need rl_grad_k <= rl_grad_k_max, got rl_grad_k={self.rl_grad_k}, "
                             f"rl_grad_k_max={self.rl_grad_k_max}")
        if not self.rl_entropy_coef >= 0:
            raise ValueError(f"rl_entropy_coef must be >= 0, got rl_entropy_coef="
                             f"{self.rl_entropy_coef}")
        if self.rl_algo != "qvpg" and self.rl_group < 2:
            raise ValueError(f"rl_algo={self.rl_algo!r} needs rl_group >= 2 (the group "
                             f"baseline), got rl_group={self.rl_group}")
        if self.rl_entropy_coef > 0 and self.rl_group < 2:
            raise ValueError(f"rl_entropy_coef={self.rl_entropy_coef} estimates the entropy from "
                             f"each state's samples and needs rl_group >= 2, got rl_group="
                             f"{self.rl_group}")
        RLConfig(**self.rl_overrides())  # anything else RLConfig refuses, refused here
        if self.sft_likelihood not in ("data", "current"):
            raise ValueError(f"sft_likelihood must be data or current, got sft_likelihood="
                             f"{self.sft_likelihood!r}")
        for name in ("ref_dir", "critic"):
            p = Path(getattr(self, name))
            if not (p / "config.json").is_file():
                raise FileNotFoundError(f"{name} {str(p)!r} is not a checkpoint directory "
                                        "(no config.json)")
        if self.online_every < 1 or self.online_episodes < 1 or self.online_critic_steps < 0:
            raise ValueError(f"need online_every >= 1, online_episodes >= 1 and "
                             f"online_critic_steps >= 0, got {self.online_every}, "
                             f"{self.online_episodes}, {self.online_critic_steps}")
        if self.sft_proposals < 0:
            raise ValueError(f"sft_proposals must be >= 0, got sft_proposals="
                             f"{self.sft_proposals}")
        if not 0 <= self.rollout_conditions <= 1:
            raise ValueError(f"rollout_conditions must be in [0, 1], got rollout_conditions="
                             f"{self.rollout_conditions}")
        if (self.passes < 1 or self.max_updates < 1 or self.lora_rank < 1
                or self.cascade_passes < 1):
            raise ValueError(f"passes={self.passes}, max_updates={self.max_updates}, lora_rank="
                             f"{self.lora_rank}, cascade_passes={self.cascade_passes} must be "
                             ">= 1")


def align_main(args: AlignArgs) -> dict:
    from ..align.online import OnlineConfig
    from ..align.runner import AlignConfig, align
    from ..align.sequence import SequenceConfig
    from ..models.base import ControlModel
    from ..models.critic import load_critic
    from ..models.dynamics import DynamicsConfig
    from ..tasks import resolve_task

    model = ControlModel.load(args.ref_dir, device=args.device)
    critic = load_critic(args.critic, device=args.device)
    task_name = model.meta.get("task")
    if not task_name:
        raise ValueError(f"{args.ref_dir}/config.json does not record its task")
    task = resolve_task(task_name, layout_seed=int(model.meta.get("layout_seed", 0)))
    seq = SequenceConfig(methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
                         passes=args.passes, max_updates=args.max_updates)
    cfg = AlignConfig(sequence=seq, lora_rank=args.lora_rank, seed=args.seed)
    cfg.rl = replace(cfg.rl, **args.rl_overrides())
    cfg.dpo = replace(cfg.dpo, pair_source=args.dpo_pairs)
    cfg.sft = replace(cfg.sft, likelihood_source=args.sft_likelihood)
    if args.sft_proposals:
        cfg.sft = replace(cfg.sft, action_proposals=args.sft_proposals, replay=4096)
    if args.rollout_conditions > 0:
        from ..align.conditions import RolloutConditions

        cfg.rollouts = RolloutConditions(fraction=args.rollout_conditions,
                                         dynamics=DynamicsConfig(seed=args.seed,
                                                                 device=args.device))
    if args.online:
        cfg.online = OnlineConfig(every=args.online_every, episodes=args.online_episodes,
                                  critic_steps=args.online_critic_steps)
    if not args.cascade:
        cfg.cascade = None
    else:
        cfg.cascade = replace(cfg.cascade, passes=args.cascade_passes)
    res = align(model, critic, task.episodes, cfg, out_dir=args.out, progress=args.progress,
                merge=args.merge, make_env=task.make_env)
    summary = {"reference_val_reward": res.reference_reward,
               "stages": {s.name: s.val_reward for s in res.stages},
               "events": res.events, "out": str(args.out)}
    print(f"aligned {args.ref_dir} -> {args.out}: validation reward "
          f"{res.reference_reward:.3f} -> {res.stages[-1].val_reward:.3f} "
          f"({len(res.events)} events)")
    return summary
