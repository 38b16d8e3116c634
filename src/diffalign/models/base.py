"""The ``ControlModel`` protocol shared by every diffusion model for control (docs/design.md §3).

A control model owns one denoiser ``net`` (the only module alignment/LoRA touches), one
stateless diffusion ``process`` and the ``normalizers`` of its data. Everything that crosses
its public boundary from or to the environment is RAW (env space); samples ``x`` live in the
normalised space the net was trained in.

Batch convention of :meth:`ControlModel.sample`: ``n`` samples per row, row-major, so row
``b * n + j`` is candidate ``j`` of state ``b`` (``B * n`` rows in all).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..data.normalizer import NormalizerSet
from ..processes import PROCESSES, DiffusionProcess, Inpaint, SampleOutput, build_process

__all__ = ["KINDS", "REWARD_MODES", "Cond", "ControlModel", "ModelSpec"]

KINDS = ("diffuser", "dd", "dp")
"""Model kinds behind this protocol (SynthER is separate)."""
BACKBONE_NAMES = ("unet", "dit", "mlp")
"""Denoiser backbones (see :mod:`diffalign.nets`)."""
REWARD_MODES = ("mean", "discounted", "first")
"""How a plan's Q-values are reduced to one reward R(x0)."""
NORMALIZER_PREFIX = "normalizer."
"""Key prefix of the normaliser tensors inside ``model.safetensors``."""


@dataclass
class ModelSpec:
    """Everything needed to rebuild a control model (JSON-serialisable)."""

    kind: str
    """Model kind: "diffuser" (state-action plans), "dd" (Decision Diffuser: state plans +
    inverse dynamics) or "dp" (Diffusion Policy: action chunks)."""
    process: str
    """Diffusion process: "ddpm", "ddim", "sm" or "fm"."""
    backbone: str
    """Denoiser backbone: "unet", "dit" or "mlp"."""
    horizon: int
    """Planning horizon H (diffuser/dd) or prediction horizon T_p (dp)."""
    obs_history: int
    """T_o: observations conditioned on (dp) / context states in-painted (planners)."""
    action_horizon: int
    """T_a: actions executed per decision (dp); planners use 1 (replan every step)."""
    backbone_kwargs: dict = field(default_factory=dict)
    """Size arguments of the backbone (x_dim/horizon/cond_dim are derived)."""
    process_kwargs: dict = field(default_factory=dict)
    """Constructor arguments of the process (e.g. num_train_steps, clip_x0, eta)."""
    normalizer: str = "minmax"
    """Normaliser kind of observations and actions: "minmax" ([-1, 1]) or "gaussian"."""
    prefix_masks: bool = True
    """Planners: train with random causal prefix masks of known states (in-painting)."""
    state_cond: bool = False
    """Planners: also give the denoiser the ``obs_history`` context states as a global
    condition (the backbone's FiLM path, as Diffusion Policy's observations), besides
    in-painting them. In-painting alone reaches the plan's first action only through the
    convolutions' receptive field; the condition gives every block the present state."""
    cond_fourier: int = 0
    """Fourier frequencies F of the global condition (dp's observations, the planners'
    ``state_cond``): each normalised value v is also given as sin(kπv), cos(kπv) for
    k = 1..F. 0 = the raw values. On Nav1D, whose rewards change independently from one time
    step to the next, a policy MLP regressed on the critic's argmax reached 76.8% of the
    optimum from [x, t] and 88.9% with F = 16."""
    reward_mode: str = "first"
    """Planners' R(x0): "mean" Q along the plan, "discounted" sum, or "first": Q(s, a) of the
    executed step only (the current state is in-painted, so it cannot be hallucinated)."""
    discount: float = 0.99
    """Discount of reward_mode="discounted"."""
    inv_dyn_hidden: int = 128
    """Decision Diffuser: hidden width of the inverse-dynamics MLP."""
    fixed_known: bool = False
    """Planners: features that are constant in the training data (25 of the 39 features of a
    MetaWorld button-press observation: a second object's pose padded with zeros, a fixed
    orientation, the goal's height) are known entries at
    every position, in training and in sampling, instead of noise the denoiser must learn
    to reproduce (docs/design.md §3). New planners set it; a saved model without it loads as
    it was trained."""
    action_weight: float = 1.0
    """Diffuser: weight of the executed action's entries in the training loss (Janner et
    al. weight the first action 10 times). 1 = every entry alike."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown model kind {self.kind!r}; choose one of {KINDS}")
        if self.process not in PROCESSES:
            raise ValueError(f"unknown process {self.process!r}; choose one of "
                             f"{tuple(sorted(PROCESSES))}")
        if self.backbone not in BACKBONE_NAMES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of "
                             f"{BACKBONE_NAMES}")
        for name in ("horizon", "obs_history", "action_horizon"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {name}={v!r}")
        if self.kind == "dp":
            if self.action_horizon > self.horizon:
                raise ValueError(f"action_horizon={self.action_horizon} must be <= horizon="
                                 f"{self.horizon} (T_a <= T_p) for kind='dp'")
        else:
            # context states at 0..K-1, executed actions at K-1..K-2+T_a; DD needs s_{t+1}
            need = self.obs_history + self.action_horizon - (1 if self.kind == "diffuser" else 0)
            if need > self.horizon:
                raise ValueError(
                    f"kind={self.kind!r} needs horizon >= {need} for obs_history="
                    f"{self.obs_history} and action_horizon={self.action_horizon}, "
                    f"got horizon={self.horizon}")
        if self.state_cond and self.kind not in ("diffuser", "dd"):
            raise ValueError(f"state_cond is for the planners (diffuser, dd), got "
                             f"kind={self.kind!r}")
        if isinstance(self.cond_fourier, bool) or not isinstance(self.cond_fourier, int) \
                or self.cond_fourier < 0:
            raise ValueError(f"cond_fourier must be an integer >= 0, got "
                             f"cond_fourier={self.cond_fourier!r}")
        if self.cond_fourier and self.kind != "dp" and not self.state_cond:
            raise ValueError(f"cond_fourier={self.cond_fourier} needs a global condition: "
                             f"set state_cond for kind={self.kind!r}")
        if self.normalizer not in ("minmax", "gaussian"):
            raise ValueError(f"normalizer must be 'minmax' or 'gaussian', got "
                             f"normalizer={self.normalizer!r}")
        if self.reward_mode not in REWARD_MODES:
            raise ValueError(f"reward_mode must be one of {REWARD_MODES}, got "
                             f"reward_mode={self.reward_mode!r}")
        if not 0.0 < self.discount <= 1.0:
            raise ValueError(f"discount must be in (0, 1], got discount={self.discount}")
        if not (isinstance(self.action_weight, (int, float)) and 0 < self.action_weight < 1e6):
            raise ValueError(f"action_weight must be a number > 0, got "
                             f"action_weight={self.action_weight!r}")
        if self.action_weight != 1 and self.kind != "diffuser":
            raise ValueError(f"action_weight is for the diffuser, got kind={self.kind!r}")
        if self.inv_dyn_hidden < 1:
            raise ValueError(f"inv_dyn_hidden must be >= 1, got {self.inv_dyn_hidden}")
        self.backbone_kwargs = _jsonable(dict(self.backbone_kwargs))
        self.process_kwargs = _jsonable(dict(self.process_kwargs))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelSpec fields {unknown}")
        return cls(**d)


def _jsonable(d: dict) -> dict:
    """Tuples -> lists so that a spec equals its JSON round trip."""
    return json.loads(json.dumps(d))


@dataclass
class Cond:
    """How a model is conditioned on one batch of observation histories."""

    cond: Tensor | None
    """Global condition vector ``(B, cond_dim)`` fed to the backbone (dp), else None."""
    inpaint: Inpaint | None
    """Known entries re-imposed while sampling (planners), else None."""
    shape: tuple[int, int]
    """``(H, D)`` of one sample."""


class ControlModel(nn.Module):
    """Base class of the diffusion models for control; see the module docstring."""

    kind: ClassVar[str] = ""

    def __init__(self, spec: ModelSpec, obs_dim: int, act_dim: int,
                 normalizers: NormalizerSet | None = None, meta: dict | None = None) -> None:
        super().__init__()
        if spec.kind != self.kind:
            raise ValueError(f"{type(self).__name__} needs spec.kind={self.kind!r}, "
                             f"got {spec.kind!r}")
        if obs_dim < 1 or act_dim < 1:
            raise ValueError(f"obs_dim and act_dim must be >= 1, got obs_dim={obs_dim}, "
                             f"act_dim={act_dim}")
        self.spec = spec
        self.obs_dim = int(obs_dim)
        self.act_dim = int(act_dim)
        self.process: DiffusionProcess = build_process(spec.process, **spec.process_kwargs)
        self.normalizers = normalizers if normalizers is not None else NormalizerSet()
        self.meta: dict = dict(meta or {})
        """Task information (task string, dataset kind, layout seed, env id)."""
        self.net: nn.Module = self._build_net()

    # ------------------------------------------------------------------ to implement
    def _build_net(self) -> nn.Module:
        raise NotImplementedError

    def make_dataset(self, episodes) -> Any:
        """Training windows (normalisers are fitted here if they are not yet)."""
        raise NotImplementedError

    def loss(self, batch: dict[str, Tensor], generator: torch.Generator | None = None
             ) -> dict[str, Tensor]:
        raise NotImplementedError

    def diffused(self, batch: dict[str, Tensor]) -> Tensor:
        """What the network denoises, of a batch of :meth:`make_dataset`'s windows
        (normalised, ``(B, H, x_dim)``): its ``x``."""
        return batch["x"]

    def condition(self, obs_hist: Tensor) -> Cond:
        raise NotImplementedError

    def actions_from_x(self, x: Tensor, obs_hist: Tensor) -> Tensor:
        raise NotImplementedError

    def plan_states_actions(self, x: Tensor) -> tuple[Tensor | None, Tensor | None]:
        return None, None

    def executed_mask(self, shape: tuple[int, int, int]) -> Tensor:
        """Bool ``(1, H, D)``: the entries of a sample that decide the executed actions."""
        raise NotImplementedError

    samples_actions = True
    """Whether the samples hold the actions (False: they are inferred from sampled states)."""

    def first_action_mask(self, shape: tuple[int, int, int]) -> Tensor | None:
        """Bool ``(1, H, D)``: the entries of a sample holding the first executed action, or
        None for a model that infers its actions from the sampled states."""
        return None

    def _entry_mask(self, shape: tuple[int, int, int], rows: slice,
                    dims: slice = slice(None)) -> Tensor:
        """Bool ``(1, H, D)`` that is True on ``[rows, dims]`` of a sample of ``shape``."""
        m = torch.zeros(1, *shape[-2:], dtype=torch.bool, device=self.device)
        m[:, rows, dims] = True
        return m

    def reward(self, x: Tensor, obs_hist: Tensor, critic) -> Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ shared
    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    def _fit_normalizers(self, episodes) -> None:
        """Check the dataset's dims against the model; fit normalisers on first use."""
        if episodes.obs_dim != self.obs_dim or episodes.act_dim != self.act_dim:
            raise ValueError(
                f"dataset dims (obs_dim={episodes.obs_dim}, act_dim={episodes.act_dim}) do not "
                f"match the model (obs_dim={self.obs_dim}, act_dim={self.act_dim})")
        if "observations" not in self.normalizers or "actions" not in self.normalizers:
            self.normalizers = NormalizerSet.fit_episodes(
                episodes, ("observations", "actions"), kind=self.spec.normalizer)

    def norm(self, field_name: str, x: Tensor) -> Tensor:
        return self.normalizers.normalize(field_name, x)

    def in_data_range(self, field_name: str, x: Tensor) -> Tensor:
        """RAW ``x`` clamped to the range the data's ``field_name`` spanned (where its
        normaliser keeps it, the default min-max one does): what the alignment's reward scores.
        A critic has seen nothing outside that range and extrapolates there; an environment
        clips its actions to its box. (docs/design.md §4, "the reward")"""
        b = self.normalizers[field_name].bounds()
        if b is None:
            return x
        return torch.minimum(torch.maximum(x, b[0].to(x)), b[1].to(x))

    def unnorm(self, field_name: str, x: Tensor) -> Tensor:
        return self.normalizers.unnormalize(field_name, x)

    def _check_hist(self, obs_hist: Tensor) -> Tensor:
        obs_hist = torch.as_tensor(obs_hist, dtype=torch.float32, device=self.device)
        if obs_hist.dim() == 2:
            obs_hist = obs_hist[:, None]
        k = self.spec.obs_history
        if obs_hist.dim() != 3 or obs_hist.shape[-1] != self.obs_dim or obs_hist.shape[1] < 1:
            raise ValueError(f"obs_hist must have shape (B, {k}, {self.obs_dim}), got "
                             f"{tuple(obs_hist.shape)}")
        if obs_hist.shape[1] < k:  # pad the front by repeating the oldest observation
            pad = obs_hist[:, :1].expand(-1, k - obs_hist.shape[1], -1)
            obs_hist = torch.cat([pad, obs_hist], 1)
        return obs_hist[:, -k:]

    @staticmethod
    def _match_rows(t: Tensor, rows: int) -> Tensor:
        """Repeat ``t`` (B, ...) row-major to ``rows = B * n`` rows when needed."""
        if t.shape[0] == rows:
            return t
        if rows % t.shape[0]:
            raise ValueError(f"cannot match {t.shape[0]} observation rows to {rows} samples")
        return t.repeat_interleave(rows // t.shape[0], 0)

    def expanded_condition(self, obs_hist: Tensor, n: int = 1
                           ) -> tuple[Tensor | None, Inpaint | None, tuple[int, int, int]]:
        """The condition for ``n`` samples per row, row-major, and the batch's sample shape."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got n={n}")
        c = self.condition(obs_hist)
        b = (c.cond if c.cond is not None else c.inpaint.value).shape[0]
        cond = None if c.cond is None else c.cond.repeat_interleave(n, 0)
        inpaint = None
        if c.inpaint is not None:
            mask = c.inpaint.mask
            if mask.shape[0] != 1:
                mask = mask.repeat_interleave(n, 0)
            inpaint = Inpaint(value=c.inpaint.value.repeat_interleave(n, 0), mask=mask,
                              noised=c.inpaint.noised)
        return cond, inpaint, (b * n, *c.shape)

    def sample(self, obs_hist: Tensor, n: int = 1, generator: torch.Generator | None = None,
               steps: int | None = None, grad_last_k: int | None = None,
               return_chain: bool = False, net: nn.Module | None = None) -> SampleOutput:
        """``n`` samples per row of ``obs_hist`` (B, T_o, obs_dim), RAW; ``x`` normalised."""
        cond, inpaint, shape = self.expanded_condition(obs_hist, n)
        return self.process.sample(
            self.net if net is None else net, shape, cond=cond, steps=steps,
            inpaint=inpaint, generator=generator, return_chain=return_chain,
            grad_last_k=grad_last_k, device=self.device)

    def _batch_to_device(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        dev = self.device
        return {k: (v.to(dev) if isinstance(v, Tensor) else v) for k, v in batch.items()}

    # ------------------------------------------------------------------ persistence
    def config_dict(self) -> dict:
        return {"format": "diffalign.control_model", "version": 1, "kind": self.kind,
                "spec": self.spec.to_dict(), "obs_dim": self.obs_dim, "act_dim": self.act_dim,
                "meta": self.meta}

    def set_default_steps(self, steps: int) -> None:
        """Sample with ``steps`` denoising steps when not told otherwise (the process's
        ``default_steps``). Training does not depend on it, so a trained model can take any
        count its process allows; raises ValueError where it does not."""
        kwargs = {**self.spec.process_kwargs, "default_steps": int(steps)}
        build_process(self.spec.process, **kwargs)  # the process's own check
        self.spec.process_kwargs = kwargs
        self.process.default_steps = int(steps)

    def save(self, directory: str | Path, extra_config: dict | None = None) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (weights and normalisers)."""
        from ..train.checkpoint import save_model

        if "observations" not in self.normalizers:
            raise ValueError("cannot save a model whose normalisers are not fitted "
                             "(call make_dataset(episodes) first)")
        cfg = self.config_dict()
        if extra_config:
            cfg.update(extra_config)
        return save_model(directory, self, cfg,
                          extra_tensors=self.normalizers.to_tensors(NORMALIZER_PREFIX))

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> ControlModel:
        """Rebuild a saved model; on the base class the kind is read from ``config.json``."""
        from ..train.checkpoint import CheckpointError, load_model_files
        from .registry import KINDS, model_class

        config, tensors = load_model_files(directory, device="cpu",
                                           kind=[cls.kind] if cls.kind else list(KINDS))
        try:
            spec = ModelSpec.from_dict(config["spec"])
            obs_dim, act_dim = int(config["obs_dim"]), int(config["act_dim"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{directory}/config.json is not a control-model config: "
                                  f"{e!r}") from e
        klass = model_class(spec.kind)
        if cls is not ControlModel and not issubclass(klass, cls):
            raise CheckpointError(f"{directory} holds a {spec.kind!r} model, not a "
                                  f"{cls.kind!r} model")
        normalizers = NormalizerSet.from_tensors(tensors, NORMALIZER_PREFIX)
        if "observations" not in normalizers or "actions" not in normalizers:
            raise CheckpointError(f"{directory}/model.safetensors has no normalisers")
        model = klass(spec, obs_dim, act_dim, normalizers=normalizers,
                      meta=config.get("meta") or {})
        state = {k: v for k, v in tensors.items() if not k.startswith(NORMALIZER_PREFIX)}
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{directory}/model.safetensors does not match its config: "
                                  f"{e}") from e
        return model.to(device).eval()
