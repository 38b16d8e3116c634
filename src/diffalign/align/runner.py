"""Align a saved reference model with a saved critic: the library side of ``diffalign align``.

Output directory::

    OUT/adapter/        adapter_model.safetensors + adapter_config.json (the LoRA adapter)
    OUT/cascade/        refiner.safetensors + config.json (when the cascade is trained; the
                        weights are empty when no refiner beat the aligned model)
    OUT/dynamics/       the learned dynamics model (with ``rollouts``, when not given)
    OUT/behavior/       the data's action band (with ``pessimism``, when not given)
    OUT/stages/<name>/adapter/   each stage's own adapter
    OUT/merged/         a plain model checkpoint with the adapter merged (``merge=True``)
    OUT/align.json      stages (validation reward, iterations, seconds), events, settings
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ..atomic import write_json
from ..train.checkpoint import CheckpointError, load_tensors, save_tensors
from .cascade import (
    CascadeConfig,
    CascadeModel,
    pass_metrics,
    ref_shape,
    refiner_skeleton,
    train_cascade,
)
from .common import AlignSetup, condition_pool, freeze, renamed_fields, validation_reward
from .conditions import RolloutConditions, mix_rollout_states
from .dpo import DPOConfig
from .final_stage import FinalStageConfig, choose_final, choose_from_table, heldout_rewards
from .lora import add_lora, load_adapter, merged_copy, save_adapter
from .online import OnlineConfig, OnlineTuner
from .pessimism import PessimismConfig, pessimistic_critic
from .rl import RLConfig
from .sequence import SequenceConfig, StageResult, run_sequence
from .sft import SFTConfig

__all__ = ["AlignConfig", "AlignResult", "align", "load_aligned", "load_cascade",
           "reuse_alignment", "save_cascade"]


@dataclass
class AlignConfig:
    """Everything an alignment run needs besides the reference and the critic."""

    sequence: SequenceConfig = field(default_factory=SequenceConfig)
    """Methods, passes, plateau and guard settings."""
    rl: RLConfig = field(default_factory=RLConfig)
    """RL settings."""
    dpo: DPOConfig = field(default_factory=DPOConfig)
    """DPO settings."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """SFT settings."""
    cascade: CascadeConfig | None = field(default_factory=CascadeConfig)
    """Cascade settings; None skips the cascade."""
    lora_rank: int = 8
    """Rank of the shared LoRA adapter."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator."""
    conditions: int = 512
    """Dataset states the alignment optimises on."""
    val_conditions: int = 128
    """Held-out dataset states for the validation reward."""
    rollouts: RolloutConditions | None = None
    """Replace a share of the training and validation conditions by states of the critic's
    greedy policy rolled out through dynamics learned from the dataset
    (:mod:`~diffalign.align.conditions`); None: dataset states only. Only for a critic
    that rates every action (random-policy data): elsewhere its greedy policy leaves the
    data."""
    steps: int | None = None
    """Denoising steps while aligning (None: the model's default)."""
    online: OnlineConfig | None = None
    """Online fine-tuning (rollouts join the critic's buffer and the critic keeps training);
    None = offline only. The fine-tuned critic is saved to ``OUT/critic_online/``."""
    pessimism: PessimismConfig | None = field(default_factory=PessimismConfig)
    """Lower the critic's reward off the data's support, with a weight set by the data's
    action coverage (:mod:`~diffalign.align.pessimism`); None trusts the critic everywhere."""
    final: FinalStageConfig = field(default_factory=FinalStageConfig)
    """How the final stage (the run's answer) is chosen on held-out states
    (:mod:`~diffalign.align.final_stage`)."""
    seed: int = 0
    """Seed of conditions, sampling and updates."""


@dataclass
class AlignResult:
    """What :func:`align` produced."""

    model: object
    """The reference model whose ``net`` now carries the trained adapter (in place)."""
    net: torch.nn.Module
    """The LoRA-wrapped denoiser."""
    stages: list[StageResult]
    events: list[dict]
    reference_reward: float
    cascade: CascadeModel | None = None
    cascade_wall_s: float = 0.0
    cascade_history: list[dict] = field(default_factory=list)
    """Validation reward of the cascade per validation (round 0: the aligned model)."""
    cascade_events: list[dict] = field(default_factory=list)
    """Collapse events of the refiner's training (aligned mode)."""
    cascade_passes: list[dict] = field(default_factory=list)
    """Per refinement pass 0..P on the validation states: ``val_reward``, ``coherency`` and
    ``distance`` from the aligned sample (:func:`~diffalign.align.cascade.pass_metrics`)."""
    final: dict = field(default_factory=dict)
    """``{"stage", "reason", "heldout"}``: the stage chosen as the answer (``"reference"``
    when none is reliably better), see :func:`~diffalign.align.final_stage.choose_final`."""
    pessimism: dict = field(default_factory=dict)
    """What the pessimism measured (coverage, weight, Q spread); empty when it is off."""


def align(model, critic, episodes, cfg: AlignConfig, out_dir: str | Path | None = None,
          on_stage_end=None, progress: bool = True, merge: bool = False,
          make_env=None, on_update=None, dynamics=None, behavior=None) -> AlignResult:
    """Run the alignment sequence (and the cascade) on ``model`` against ``critic``.

    With ``cfg.online`` the critic is fine-tuned in place on rollouts in ``make_env()``
    environments (default: the environment of the model's task). ``on_stage_end(stage, net)``
    is called after each stage with the LoRA-wrapped net set to that stage's best adapter,
    ``on_update()`` before every update of the sequence. With ``cfg.rollouts`` the
    ``dynamics`` model (:class:`~diffalign.models.dynamics.DynamicsModel`) gives the
    rollouts; without it one is loaded from ``out_dir/dynamics`` or trained there. With
    ``cfg.pessimism`` the ``behavior`` band (:class:`~diffalign.models.behavior.BehaviorModel`)
    is loaded from ``out_dir/behavior`` or trained there when not given.
    """
    freeze(model)
    freeze(critic)
    pess_info: dict = {}
    if cfg.pessimism is not None:
        if behavior is None:
            behavior = _load_or_train("behavior", episodes, cfg.pessimism.behavior, out_dir,
                                      progress, model.device)
        critic, pess_info = pessimistic_critic(critic, episodes, cfg.pessimism,
                                               behavior=behavior, seed=cfg.seed)
    states = condition_pool(episodes, model.spec.obs_history, cfg.conditions, seed=cfg.seed)
    val = condition_pool(episodes, model.spec.obs_history, cfg.val_conditions,
                         seed=cfg.seed + 1)
    conditions_info: dict = {}
    if cfg.rollouts is not None:
        if dynamics is None:
            dynamics = _load_or_train("dynamics", episodes, cfg.rollouts.dynamics, out_dir,
                                      progress, model.device)
        hist = model.spec.obs_history
        states, conditions_info = mix_rollout_states(states, critic, dynamics, episodes, hist,
                                                     cfg.rollouts, seed=cfg.seed)
        val, _ = mix_rollout_states(val, critic, dynamics, episodes, hist, cfg.rollouts,
                                    seed=cfg.seed + 1)
    setup = AlignSetup(model=model, critic=critic, states=states.to(model.device),
                       val_states=val.to(model.device), steps=cfg.steps, episodes=episodes)
    torch.manual_seed(cfg.seed)
    net = add_lora(model.net, r=cfg.lora_rank, alpha=cfg.lora_alpha)
    ref_reward, _ = validation_reward(setup, net=net)
    heldout = condition_pool(episodes, model.spec.obs_history, cfg.final.states,
                             seed=cfg.seed + 2)
    ref_heldout = heldout_rewards(setup, heldout, net=net, seed=cfg.final.seed)
    stage_heldout: dict[str, torch.Tensor] = {}
    online = None
    if cfg.online is not None:
        if make_env is None:
            from ..eval.evaluate import task_env

            make_env = task_env(dict(model.meta))[0]
        online = OnlineTuner(setup, episodes, make_env, cfg.online)

    def stage_end(st: StageResult) -> None:
        stage_heldout[st.name] = heldout_rewards(setup, heldout, net=net, seed=cfg.final.seed)
        if out_dir is not None:
            save_adapter(net, Path(out_dir) / "stages" / st.name / "adapter",
                         extra={"reference_spec": model.spec.to_dict()})
        if on_stage_end is not None:
            on_stage_end(st, net)

    progress_dir = None if out_dir is None or online is not None else Path(out_dir) / "progress"
    fingerprint = _fingerprint(cfg, model)
    resume = None if progress_dir is None else _load_boundary(
        progress_dir, fingerprint, _fingerprint(cfg, model, old_names=True))
    if resume is not None:  # the finished stages again, for their callbacks, in order; the
        # adapter ends as the last one's
        for st in resume["stages"]:
            stage_heldout[st["name"]] = torch.tensor(resume["heldout"][st["name"]])
            if on_stage_end is not None:
                _set_adapter(net, Path(out_dir) / "stages" / st["name"] / "adapter")
                on_stage_end(StageResult(**st), net)
        _set_adapter(net, Path(out_dir) / "stages" / resume["stages"][-1]["name"] / "adapter")

    def save_boundary(state: dict) -> None:
        state["heldout"] = {k: v.tolist() for k, v in stage_heldout.items()}
        _save_boundary(progress_dir, state, fingerprint)

    stages, events, _ = run_sequence(setup, net, cfg.sequence,
                                     {"rl": cfg.rl, "dpo": cfg.dpo, "sft": cfg.sft},
                                     seed=cfg.seed, on_stage_end=stage_end,
                                     progress=progress, online=online, on_update=on_update,
                                     checkpoint=None if progress_dir is None else save_boundary,
                                     resume=resume)
    result = AlignResult(model=model, net=net, stages=stages, events=events,
                         reference_reward=ref_reward, pessimism=pess_info)
    if out_dir is not None:  # the adapter first: align.json below marks the run complete
        save_adapter(net, Path(out_dir) / "adapter",
                     extra={"reference_spec": model.spec.to_dict()})
    refiner = None
    if cfg.cascade is not None:
        t0 = time.perf_counter()
        refiner = train_cascade(setup, net, cfg.cascade, seed=cfg.seed, progress=progress,
                                history=result.cascade_history, events=result.cascade_events,
                                guard=cfg.sequence.guard)
        result.cascade_wall_s = time.perf_counter() - t0
        result.cascade = CascadeModel(
            model, net, refiner, passes=cfg.cascade.passes,
            refine_frac=cfg.cascade.refine_frac if cfg.cascade.mode == "aligned" else None)
        fast = result.cascade.merged()
        result.cascade_passes = pass_metrics(setup, fast)
        stage_heldout["cascade"] = heldout_rewards(setup, heldout, model=fast,
                                                   seed=cfg.final.seed)
    name, reason, table = choose_final(ref_heldout, stage_heldout, cfg.final.z,
                                       weight=pess_info.get("weight", 0.0))
    result.final = {"stage": name, "reason": reason, "heldout": table}
    if out_dir is not None:
        out = Path(out_dir)
        if online is not None:
            critic.save(out / "critic_online")
        if result.cascade is not None:
            save_cascade(result.cascade, out / "cascade")
        write_json(out / "align.json", {
            "reference_val_reward": ref_reward,
            "conditions": {"train": len(states), "val": len(val), **conditions_info},
            "stages": [{**{k: v for k, v in asdict(s).items() if k != "history"},
                        "validations": [{"iteration": h["iteration"],
                                         "val_reward": h["val_reward"]}
                                        for h in s.history if "val_reward" in h]}
                       for s in stages],
            "cascade_wall_s": result.cascade_wall_s,
            "cascade_history": result.cascade_history,
            "cascade": None if result.cascade is None else {
                "mode": result.cascade.mode, "passes": result.cascade.passes,
                "refine_frac": result.cascade.refine_frac,
                "refiner": result.cascade.refiner is not None,
                "pass_metrics": result.cascade_passes, "events": result.cascade_events},
            "events": events,
            "final": result.final,
            "pessimism": pess_info,
            "config": json.loads(json.dumps(asdict(cfg), default=str)),
        })
        if merge:
            merged_model = _merged_copy(model, net)
            merged_model.save(out / "merged")
    return result


def _load_or_train(name: str, episodes, train_cfg, out_dir, progress: bool, device):
    """The dynamics model or behaviour band (``name``) of ``out_dir/<name>`` if it is there,
    else trained with ``train_cfg`` on ``device`` (and saved there)."""
    from ..models.behavior import BehaviorModel, train_behavior
    from ..models.dynamics import DynamicsModel, train_dynamics

    cls, train = {"dynamics": (DynamicsModel, train_dynamics),
                  "behavior": (BehaviorModel, train_behavior)}[name]
    where = None if out_dir is None else Path(out_dir) / name
    if where is not None and (where / "config.json").exists():
        return cls.load(where, device=device)
    return train(episodes, replace(train_cfg, device=str(device)), out_dir=where,
                 progress=progress)


def _fingerprint(cfg: AlignConfig, model, old_names: bool = False) -> str:
    """A hash of the settings a resumed sequence must share with the one it continues;
    ``old_names``: with the renamed fields under their old names
    (:func:`~diffalign.align.common.renamed_fields`), as a boundary saved by an earlier
    version recorded it."""
    import hashlib

    config = renamed_fields(asdict(cfg), to_old=True) if old_names else asdict(cfg)
    text = json.dumps({"config": config, "spec": model.spec.to_dict()}, sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _save_boundary(where: Path, state: dict, fingerprint: str) -> None:
    """Write a stage boundary's state: RNG tensors first, then ``state.json``, which marks
    it. The adapter is not repeated here: it is the last stage's ``stages/<name>/adapter``,
    saved before this."""
    tensors = {"rng/generator": state.pop("generator"), "rng/torch": state.pop("torch_rng")}
    save_tensors(where / "state.safetensors", tensors)
    write_json(where / "state.json", {**state, "fingerprint": fingerprint})


def _load_boundary(where: Path, fingerprint: str, *also: str) -> dict | None:
    """The last stage boundary saved in ``where``, or None; its fingerprint must be
    ``fingerprint`` or one of ``also``."""
    from ..errors import UserError

    if not (where / "state.json").exists():
        return None
    state = json.loads((where / "state.json").read_text())
    if state.pop("fingerprint", None) not in (fingerprint, *also):
        raise UserError(f"{where.parent} holds an unfinished alignment with other settings: "
                        f"it cannot be resumed; use a new output directory or delete "
                        f"{where.parent}")
    tensors = load_tensors(where / "state.safetensors")
    state["generator"], state["torch_rng"] = tensors["rng/generator"], tensors["rng/torch"]
    return state


def _set_adapter(net, directory: Path) -> None:
    """Set the LoRA-wrapped ``net``'s adapter weights to those saved in ``directory``."""
    from peft import set_peft_model_state_dict

    from .lora import ADAPTER_WEIGHTS

    set_peft_model_state_dict(net, load_tensors(directory / ADAPTER_WEIGHTS))


def _merged_copy(model, net):
    """A copy of ``model`` whose net has the adapter folded into its weights."""
    import copy

    clone = copy.deepcopy(model)
    clone.net = merged_copy(net)
    return clone


def load_aligned(ref_dir: str | Path, align_dir: str | Path, device: str = "cpu"):
    """The reference model from ``ref_dir`` with the adapter of ``align_dir`` (in place)."""
    from ..models.base import ControlModel

    model = ControlModel.load(ref_dir, device=device)
    freeze(model)
    load_adapter(model.net, Path(align_dir) / "adapter")
    return model


def save_cascade(casc: CascadeModel, directory: str | Path) -> Path:
    """Write ``casc``'s refiner (``refiner.safetensors``; no tensors when the cascade is the
    aligned model itself) and how it is applied (``config.json``) into ``directory``."""
    directory = Path(directory)
    refiner = casc.refiner
    save_tensors(directory / "refiner.safetensors",
                 {} if refiner is None else refiner.state_dict())
    write_json(directory / "config.json", {
        "kind": "cascade_refiner", "mode": casc.mode, "refiner": refiner is not None,
        "extra_dim": 0 if refiner is None else int(refiner.extra_dim),
        "refine_frac": casc.refine_frac, "passes": casc.passes})
    return directory


def load_cascade(model, align_dir: str | Path, passes: int | None = None) -> CascadeModel:
    """The cascade of ``align_dir`` appended after an aligned ``model``, applied ``passes``
    times (default: as it was trained)."""
    path = Path(align_dir) / "cascade" / "refiner.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{align_dir} has no trained cascade ({path} is missing)")
    cfg_path = path.parent / "config.json"
    info = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    aligned = info.get("mode", "supervised") == "aligned"  # earlier runs: supervised
    refiner = None
    if info.get("refiner", True):
        extra = int(info.get("extra_dim", 0 if aligned else ref_shape(model)[0]))
        refiner = refiner_skeleton(model, extra)
        try:
            refiner.load_state_dict(load_tensors(path, device=model.device))
        except RuntimeError as e:
            raise CheckpointError(f"the refiner in {path} does not fit this model: {e}") from e
        refiner = freeze(refiner)
    return CascadeModel(model, model.net, refiner, passes=passes or int(info.get("passes", 1)),
                        refine_frac=info.get("refine_frac", 0.3) if aligned else None)


def reuse_alignment(model, align_dir: str | Path, cascade: bool = True):
    """Load a finished alignment run into ``model`` (adapter in place) for re-evaluation.

    Returns ``(events, [(stage name, wall_s)], cascade model or None, cascade wall_s,
    final)`` with ``final`` the run's chosen stage (:attr:`AlignResult.final`).
    """
    align_dir = Path(align_dir)
    info = json.loads((align_dir / "align.json").read_text())
    freeze(model)
    load_adapter(model.net, align_dir / "adapter")
    casc = None
    if cascade and (align_dir / "cascade" / "refiner.safetensors").exists():
        casc = load_cascade(model, align_dir)
    walls = [(s["name"], float(s["wall_s"])) for s in info["stages"]]
    final = dict(info.get("final") or {})
    if final.get("heldout"):  # the rule of this version, on the run's recorded gains
        z = float(((info.get("config") or {}).get("final") or {}).get("z", 2.0))
        weight = float((info.get("pessimism") or {}).get("weight", 0.0))
        final["stage"], final["reason"] = choose_from_table(final["heldout"], z, weight)
    return (info["events"], walls, casc, float(info.get("cascade_wall_s", 0.0)), final)
