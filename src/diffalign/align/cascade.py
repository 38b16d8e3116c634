"""Cascaded refiner (Ho et al. 2022), docs/design.md §4.

A second model ``p_φ(x_hi | x_lo, c)``: the reference denoiser rebuilt with an extra
per-position input for ``x_lo`` whose projection starts at zero, warm-started from the
reference weights, so at step 0 it *equals* the model it starts from; always conditional on
``x_lo``. By default it starts from the *aligned* weights (the reference with the adapter
merged): the refiner runs after the aligned model, and starting from the plain reference
throws the alignment away at step 0 (on Nav1D the cascade then fell back to the reference's
return). ``warm_start="reference"`` starts from the frozen reference instead.

Training pairs are consistent: both members branch from one shared latent ``x_k`` of the
aligned model's chain (``x_lo`` a random continuation, ``x_hi`` the best of ``branches``
continuations by the critic), or ``x_hi`` shares an in-painted contiguous part with ``x_lo``
(the first ``inpaint_frac`` of the horizon). At inference the refiner is appended after the
aligned model: ``x_lo ~ aligned``, then ``x ~ refiner(· | x_lo)``. More than one refinement
pass is known to be unstable: a warning is given.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ..nets import build_backbone
from ..processes import Inpaint
from ..train.trainer import adam
from .common import AlignSetup, expand_condition, validation_reward

__all__ = ["CascadeConfig", "CascadeModel", "build_refiner", "cascade_pairs",
           "cascade_validation", "train_cascade"]


@dataclass
class CascadeConfig:
    """Training of the cascaded refiner."""

    pairs: Literal["branch", "inpaint"] = "branch"
    """How (x_lo, x_hi) pairs are made consistent: branching from a shared latent, or an
    in-painted shared prefix."""
    branch_frac: float = 0.5
    """Branch point as a fraction of the denoising steps already taken."""
    inpaint_frac: float = 0.25
    """Shared prefix of the horizon for "inpaint" pairs."""
    branches: int = 8
    """Continuations per shared latent; the best by R is x_hi."""
    states_per_update: int = 32
    """Conditions per update (one round of pair generation)."""
    rounds: int = 6
    """Rounds of pair generation."""
    steps_per_round: int = 25
    """Gradient steps per round."""
    batch_size: int = 64
    """Pairs per gradient step."""
    lr: float = 1e-4
    """Refiner learning rate (full fine-tuning of the warm-started copy)."""
    warm_start: Literal["aligned", "reference"] = "aligned"
    """Weights the refiner starts from: the aligned model (reference + merged adapter) or the
    plain reference. Either way its ``x_lo`` input starts at zero, so at step 0 it equals
    that model."""
    keep_best: bool = True
    """Score the cascade on the validation states before training and after every round
    (one sample per state, fixed seed) and keep the best refiner. Its step-0 refiner equals
    the model it starts from, so the cascade then never validates below that model (on
    Nav1D the last round's refiner lowered the return from 63.6% to 58.7%)."""

    def __post_init__(self):
        if self.branches < 2:
            raise ValueError(f"branches must be >= 2, got {self.branches}")
        if self.warm_start not in ("aligned", "reference"):
            raise ValueError(f"warm_start must be 'aligned' or 'reference', got "
                             f"{self.warm_start!r}")
        if not 0 < self.branch_frac < 1 or not 0 < self.inpaint_frac < 1:
            raise ValueError(f"branch_frac={self.branch_frac} and inpaint_frac="
                             f"{self.inpaint_frac} must be in (0, 1)")


def _base_net(net: nn.Module) -> nn.Module:
    return net.get_base_model() if hasattr(net, "get_base_model") else net


def build_refiner(model, reference_net: nn.Module | None = None,
                  warm_start: str = "reference") -> nn.Module:
    """The reference backbone plus a zero-initialised ``x_lo`` input, warm-started.

    ``reference_net`` defaults to ``model.net``. If it carries a LoRA adapter, the refiner
    starts from the frozen reference (``warm_start="reference"``) or from the reference with
    the adapter merged in (``"aligned"``).
    """
    ref = reference_net if reference_net is not None else model.net
    spec = model.spec
    x_dim, horizon = ref_shape(model)
    cond_dim = getattr(_base_net(ref), "cond_dim", 0) or 0
    refiner = build_backbone(spec.backbone, x_dim=x_dim, horizon=horizon, cond_dim=cond_dim,
                             extra_dim=x_dim, **spec.backbone_kwargs)
    weights = aligned_state_dict(ref) if warm_start == "aligned" else reference_state_dict(ref)
    missing, unexpected = refiner.load_state_dict(weights, strict=False)
    if unexpected or any("extra" not in k for k in missing):
        raise ValueError(f"refiner does not match the reference: missing {missing}, "
                         f"unexpected {unexpected}")
    return refiner.to(model.device)


def aligned_state_dict(net: nn.Module) -> dict[str, Tensor]:
    """The weights of a LoRA-wrapped net with its adapter merged (the net is not changed)."""
    from .lora import is_lora, merged_copy

    if not is_lora(net):
        return reference_state_dict(net)
    return {k: v.detach() for k, v in merged_copy(net).state_dict().items()}


def ref_shape(model) -> tuple[int, int]:
    """``(D, H)`` of one sample of ``model``."""
    c = model.condition(torch.zeros(1, model.spec.obs_history, model.obs_dim,
                                    device=model.device))
    h, d = c.shape
    return d, h


def reference_state_dict(net: nn.Module) -> dict[str, Tensor]:
    """The reference weights of a (possibly LoRA-wrapped) net under their plain names."""
    return {k.replace(".base_layer", ""): v for k, v in _base_net(net).state_dict().items()
            if "lora_" not in k}


@torch.no_grad()
def cascade_pairs(setup: AlignSetup, net: nn.Module, cfg: CascadeConfig,
                  generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Consistent pairs ``(x_lo, x_hi, obs)`` from the aligned ``net``."""
    model = setup.model
    proc = model.process.stochastic_variant()
    obs = setup.draw_states(cfg.states_per_update, generator)
    steps = setup.steps or model.process.default_steps
    n = cfg.branches
    cond, inpaint, shape = expand_condition(model, obs, 1)
    if cfg.pairs == "branch":
        out = proc.sample(net, shape, cond=cond, steps=steps, inpaint=inpaint,
                          generator=generator, return_chain=True, device=model.device)
        k = max(1, min(steps - 1, int(round(cfg.branch_frac * steps))))
        latent = out.chain[k].repeat_interleave(n, 0)
        cond_n, inp_n, shape_n = expand_condition(model, obs, n)
        x = latent
        times = out.times
        for i in range(k, steps):
            t, tp = float(times[i]), float(times[i + 1])
            x = proc.impose(proc.step(net, x, t, tp, cond=cond_n, generator=generator).prev,
                            tp, inp_n, generator)
    else:
        first = model.sample(obs, n=1, generator=generator, steps=setup.steps, net=net).x0
        h = shape[1]
        p = max(1, int(round(cfg.inpaint_frac * h)))
        cond_n, inp_n, shape_n = expand_condition(model, obs, n)
        mask = torch.zeros(1, h, shape[2], dtype=torch.bool, device=first.device)
        mask[:, :p] = True
        value = first.repeat_interleave(n, 0)
        noised = mask.expand(shape_n)  # the sample's own prefix: RePaint-style
        if inp_n is not None:
            value = torch.where(inp_n.mask.expand(shape_n), inp_n.value, value)
            noised = noised & ~inp_n.mask.expand(shape_n)
            mask = mask | inp_n.mask
        x = proc.sample(net, shape_n, cond=cond_n, steps=steps,
                        inpaint=Inpaint(value, mask, noised=noised), generator=generator,
                        device=model.device).x0
    rows = obs.repeat_interleave(n, 0)
    r = setup.reward(x, rows).view(-1, n)
    xs = x.view(-1, n, *x.shape[1:])
    ar = torch.arange(xs.shape[0], device=x.device)
    best = r.argmax(1)
    other = (best + 1 + torch.randint(0, n - 1, best.shape, generator=generator)
             .to(best.device)) % n
    return xs[ar, other], xs[ar, best], obs


def cascade_validation(setup: AlignSetup, net: nn.Module, refiner: nn.Module) -> float:
    """:func:`~diffalign.align.common.validation_reward` of the cascade (the aligned ``net``
    followed by ``refiner``): mean R of one sample per validation state, fixed seed."""
    casc = CascadeModel(setup.model, net, refiner)
    return validation_reward(dataclasses.replace(setup, model=casc))[0]


def train_cascade(setup: AlignSetup, net: nn.Module, cfg: CascadeConfig, seed: int = 0,
                  progress: bool = True, history: list | None = None) -> nn.Module:
    """Train a refiner on consistent pairs from the aligned ``net``; returns the refiner
    (with ``cfg.keep_best``, the best validated one). ``history`` (a list) receives
    ``{"round", "val_reward"}`` per validation, round 0 being the untrained refiner."""
    import copy

    from tqdm.auto import tqdm

    model = setup.model
    gen = torch.Generator().manual_seed(seed)
    refiner = build_refiner(model, net, warm_start=cfg.warm_start)
    opt = adam(refiner.parameters(), lr=cfg.lr)
    best, best_state = -float("inf"), None

    def validate(r: int) -> None:
        nonlocal best, best_state
        val = cascade_validation(setup, net, refiner.eval())
        refiner.train()
        if history is not None:
            history.append({"round": r, "val_reward": val})
        if val > best:
            best, best_state = val, copy.deepcopy(refiner.state_dict())

    if cfg.keep_best:
        validate(0)
    for r in tqdm(range(cfg.rounds), desc="align/cascade", disable=not progress, leave=False):
        x_lo, x_hi, obs = cascade_pairs(setup, net, cfg, gen)
        for _ in range(cfg.steps_per_round):
            idx = torch.randint(0, len(x_hi), (min(cfg.batch_size, len(x_hi)),), generator=gen)
            cond, inpaint, shape = expand_condition(model, obs[idx], 1)
            known = None if inpaint is None else inpaint.mask.expand(shape)
            loss = model.process.loss(refiner, x_hi[idx], cond=cond, known=known,
                                      extra=x_lo[idx], generator=gen)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(refiner.parameters(), 1.0)
            opt.step()
        if cfg.keep_best:
            validate(r + 1)
    if best_state is not None:
        refiner.load_state_dict(best_state)
    return refiner.eval()


class CascadeModel:
    """An aligned model followed by its refiner; behaves like the model for sampling.

    Every attribute not defined here is the base model's, so rollouts, rewards and metrics
    work unchanged; :meth:`sample` draws ``x_lo`` from the aligned net and refines it.
    """

    def __init__(self, model, aligned_net: nn.Module, refiner: nn.Module, passes: int = 1):
        if passes < 1:
            raise ValueError(f"passes must be >= 1, got {passes}")
        if passes > 1:
            warnings.warn(f"cascade passes={passes}: more than one refinement pass is known to "
                          "be unstable (samples drift out of distribution)", stacklevel=2)
        self._model, self._aligned, self._refiner, self._passes = (model, aligned_net,
                                                                   refiner, passes)

    def __getattr__(self, name):
        return getattr(self._model, name)

    def merged(self) -> CascadeModel:
        """The same cascade with the aligned net's adapter folded into a frozen copy (faster
        sampling; see :func:`~diffalign.align.lora.merged_copy`)."""
        from .lora import merged_copy

        return CascadeModel(self._model, merged_copy(self._aligned), self._refiner,
                            self._passes)

    def sample(self, obs_hist, n: int = 1, generator=None, steps=None, grad_last_k=None,
               return_chain: bool = False, net=None):
        model = self._model
        out = model.sample(obs_hist, n=n, generator=generator, steps=steps, net=self._aligned)
        obs_hist = model._check_hist(obs_hist)
        cond, inpaint, shape = expand_condition(model, obs_hist, n)
        x_lo = out.x0
        for _ in range(self._passes):
            refined = model.process.sample(
                self._refiner, shape, cond=cond, steps=steps, inpaint=inpaint,
                generator=generator, return_chain=return_chain, grad_last_k=grad_last_k,
                extra=x_lo, device=model.device)
            x_lo = refined.x0
        return refined
