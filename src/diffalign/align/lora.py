"""One LoRA adapter (peft) on a denoiser: the frozen base is the reference model.

``add_lora(net)`` injects low-rank adapters into every ``nn.Linear`` and ``nn.Conv1d`` of the
backbone (the backbones use no ConvTranspose, which peft cannot wrap) and freezes the rest.
The reference model is the same network with the adapter switched off
(:func:`reference`), so no second copy of the weights is needed. Adapters are saved as
``adapter_model.safetensors`` + ``adapter_config.json`` beside the reference checkpoint.

peft runs an adapted layer as the base layer plus ``B(A(x))``: three calls where there was
one, and for a Conv1d two more convolutions. On a CPU those extra calls on small tensors cost
more than the arithmetic, so :func:`add_lora` gives the wrapped layers a forward that applies
one layer with the effective weight ``W + scaling * B @ A`` (:class:`FusedLoraConv1d`,
:class:`FusedLoraLinear`): the same function and the same gradients for A and B, one call per
layer. peft still injects, saves, loads, disables and merges the adapter.
"""

from __future__ import annotations

import contextlib
import json
import weakref
from pathlib import Path

import torch
from torch import nn

from ..atomic import write_json
from ..train.checkpoint import CheckpointError, load_tensors, save_tensors

__all__ = ["FusedLoraConv1d", "FusedLoraLinear", "ReferenceView", "adapter_fixed", "add_lora",
           "fuse_lora_forward", "is_lora", "load_adapter", "lora_parameters",
           "lora_target_modules", "merge_lora", "merged_copy", "merged_view", "reference",
           "reference_copy",
           "refresh_merged", "remove_lora", "save_adapter"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def lora_target_modules(net: nn.Module) -> list[str]:
    """Qualified names of the Linear and Conv1d layers of ``net`` (what LoRA wraps)."""
    return [name for name, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d))]


def add_lora(net: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             targets: list[str] | None = None) -> nn.Module:
    """Wrap ``net`` with a fresh LoRA adapter; only adapter parameters stay trainable.

    The adapter's B matrices start at zero, so the wrapped net equals ``net`` at first.
    """
    from peft import LoraConfig, get_peft_model

    if r < 1:
        raise ValueError(f"LoRA rank must be >= 1, got r={r}")
    targets = targets if targets is not None else lora_target_modules(net)
    if not targets:
        raise ValueError(f"{type(net).__name__} has no Linear/Conv1d layer for LoRA")
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                     bias="none")
    return fuse_lora_forward(get_peft_model(net, cfg))


def _delta_weight(layer) -> torch.Tensor | None:
    """``sum scaling * B @ A`` over ``layer``'s active adapters, shaped as its base weight, as
    a differentiable product of the adapter's weights (None if no adapter is active).

    peft's own ``get_delta_weight`` gives the same matrix (``refresh_merged`` uses it), but
    for a convolution it composes A and B with another convolution; on every training
    forward that extra call cost most of what fusing saves, so this is one matmul."""
    shape = layer.base_layer.weight.shape
    delta = None
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        d = (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)).view(shape)
        d = d * layer.scaling[name]
        delta = d if delta is None else delta + d
    return delta


def _effective_weight(layer) -> torch.Tensor:
    """``W + Σ scaling · B A`` of a fused layer; inside :func:`adapter_fixed`, computed once
    per grad mode and reused (a result made under no_grad carries no gradient, so the two
    modes are kept apart)."""
    fixed, grad = layer._fixed, torch.is_grad_enabled()
    if fixed is not None and grad in fixed:
        return fixed[grad]
    delta = _delta_weight(layer)
    weight = layer.base_layer.weight if delta is None else layer.base_layer.weight + delta
    if fixed is not None:
        fixed[grad] = weight
    return weight


@contextlib.contextmanager
def adapter_fixed(net: nn.Module):
    """Inside this block ``net``'s fused LoRA layers fold their adapter into the weight once
    and reuse it, for blocks in which the adapter does not change (the forward passes of one
    update; the backward may come after the block).

    A chain of S sampling steps otherwise folds every layer S times, and backpropagates
    through each fold: on the 2-D toy's MLP that was a third of a QV-PG update.
    """
    layers = [m for m in net.modules()
              if isinstance(m, (FusedLoraConv1d, FusedLoraLinear)) and m._fixed is None]
    for m in layers:
        m._fixed = {}
    try:
        yield net
    finally:
        for m in layers:
            del m._fixed


def _fusable(layer, args, kwargs) -> bool:
    """Whether the fused forward computes what peft's would: plain LoRA (no dropout, no DoRA or
    other variant) in the base layer's dtype, adapter on and not merged, no extra call
    arguments."""
    if layer.disable_adapters or layer.merged or args or kwargs:
        return False
    dtype = layer.base_layer.weight.dtype
    for name in layer.active_adapters:
        if name in layer.lora_A and (name in layer.lora_variant
                                     or not isinstance(layer.lora_dropout[name], nn.Identity)
                                     or layer.lora_A[name].weight.dtype != dtype
                                     or layer.lora_B[name].weight.dtype != dtype):
            return False
    return True


def _peft_layer_classes():
    from peft.tuners.lora import layer as peft_layer

    return peft_layer.Conv1d, peft_layer.Linear


class FusedLoraConv1d(_peft_layer_classes()[0]):
    """peft's LoRA Conv1d, run as one convolution with the effective weight (see the module
    docstring); peft's own forward where that would differ."""

    _fixed: dict | None = None  # the effective weights inside adapter_fixed, by grad mode

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.base_layer
        lora_b = [self.lora_B[n].weight for n in self.active_adapters if n in self.lora_B]
        if (not _fusable(self, args, kwargs) or base.groups != 1
                or any(w.shape[2:].numel() != 1 for w in lora_b)):
            return super().forward(x, *args, **kwargs)
        return base._conv_forward(x, _effective_weight(self), base.bias)


class FusedLoraLinear(_peft_layer_classes()[1]):
    """peft's LoRA Linear, run as one linear map with the effective weight."""

    _fixed: dict | None = None  # the effective weights inside adapter_fixed, by grad mode

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not _fusable(self, args, kwargs) or self.fan_in_fan_out:
            return super().forward(x, *args, **kwargs)
        return nn.functional.linear(x, _effective_weight(self), self.base_layer.bias)


def fuse_lora_forward(net: nn.Module) -> nn.Module:
    """Give ``net``'s peft LoRA Conv1d and Linear layers the fused forward, in place (their
    class becomes the subclass above; parameters, state dict and peft's methods are unchanged).

    A training step of the run's foundation U-Net with the adapter (batch 64, one thread, AVX2
    CPU; ``benchmarks/main_job_parts.py``) took 75-110 ms with peft's forward and 57-85 ms
    fused; the forward alone 50 ms and 33 ms (24 ms without an adapter)."""
    conv, linear = _peft_layer_classes()
    for m in net.modules():
        if type(m) is conv:
            m.__class__ = FusedLoraConv1d
        elif type(m) is linear:
            m.__class__ = FusedLoraLinear
    return net


def is_lora(net: nn.Module) -> bool:
    """Whether ``net`` carries a peft adapter."""
    return hasattr(net, "peft_config")


def lora_parameters(net: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter parameters."""
    return [p for n, p in net.named_parameters() if "lora_" in n and p.requires_grad]


@contextlib.contextmanager
def reference(net: nn.Module):
    """Inside this context ``net`` computes the frozen reference (adapter disabled).

    Use under ``torch.no_grad()``: the reference never receives gradients.
    """
    if not is_lora(net):
        yield net
        return
    with net.disable_adapter():
        yield net


class ReferenceView(nn.Module):
    """Callable view of the reference model: ``net`` with its adapter disabled.

    Calls run under ``torch.no_grad()``; the reference never receives a gradient.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self._net = [net]  # a list keeps it out of this module's parameters

    def forward(self, *args, **kwargs):
        net = self._net[0]
        with torch.no_grad(), reference(net):
            return net(*args, **kwargs)


def save_adapter(net: nn.Module, directory: str | Path, extra: dict | None = None) -> Path:
    """Write the adapter weights (safetensors) and its config (JSON) into ``directory``."""
    from peft import get_peft_model_state_dict

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = net.peft_config["default"]
    save_tensors(directory / ADAPTER_WEIGHTS, get_peft_model_state_dict(net))
    write_json(directory / ADAPTER_CONFIG, {
        "r": cfg.r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
        "target_modules": sorted(cfg.target_modules), **(extra or {})})
    return directory


def load_adapter(net: nn.Module, directory: str | Path) -> nn.Module:
    """Wrap a (reference) ``net`` with the adapter saved in ``directory``.

    The file must hold every LoRA tensor the config's targets give this network, and no
    other: a partial adapter would leave the missing layers at their fresh initialisation
    (B = 0, the reference) without a word. Anything else wrong raises CheckpointError.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    directory = Path(directory)
    cfg_path = directory / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise CheckpointError(f"{directory} has no {ADAPTER_CONFIG}: not a LoRA adapter")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupted {cfg_path}: {e}") from e
    try:
        r, alpha, dropout = cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]
        targets = list(cfg["target_modules"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{cfg_path} is not a LoRA adapter config: lacks {e}") from e
    tensors = load_tensors(directory / ADAPTER_WEIGHTS, device=_device(net))
    try:
        wrapped = add_lora(net, r=r, alpha=alpha, dropout=dropout, targets=targets)
    except ValueError as e:  # peft: a target module this network does not have
        raise CheckpointError(f"adapter in {directory} does not fit this network: {e}") from e
    expected = set(get_peft_model_state_dict(wrapped))
    missing = sorted(expected - set(tensors))
    if missing:
        raise CheckpointError(f"adapter in {directory} is incomplete: {len(missing)} of "
                              f"{len(expected)} LoRA tensors are missing from "
                              f"{ADAPTER_WEIGHTS} (e.g. {missing[0]!r})")
    try:
        result = set_peft_model_state_dict(wrapped, tensors)
    except RuntimeError as e:  # shapes: another rank or another network
        raise CheckpointError(f"adapter in {directory} does not fit this network: {e}") from e
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise CheckpointError(f"adapter in {directory} does not fit this network: unexpected "
                              f"keys {unexpected[:3]}")
    return wrapped


def merge_lora(net: nn.Module) -> nn.Module:
    """Fold the adapter into the base weights and return the plain network (a copy-free merge)."""
    if not is_lora(net):
        return net
    merged = net.merge_and_unload()
    for p in merged.parameters():  # peft leaves the base frozen after merging
        p.requires_grad_(True)
    return merged


def merged_copy(net: nn.Module) -> nn.Module:
    """A frozen copy of ``net`` with its adapter folded in, for sampling without gradients
    (``net`` itself is not changed). Inside :func:`reference` (adapter disabled) the copy is
    the plain reference, without the adapter.

    The LoRA wrappers' extra calls are most of a small batch's forward time on a CPU: 256
    Nav1D plans of 20 DDPM steps took 0.51 s through the adapter and 0.30 s merged (2 cores).
    """
    import copy

    if not is_lora(net):
        return net
    plain = copy.deepcopy(net).unload()  # the base layers, unwrapped; weights set below
    for p in plain.parameters():
        p.requires_grad_(False)
    return refresh_merged(plain, net)


_VIEWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def merged_view(net: nn.Module) -> nn.Module:
    """:func:`merged_copy` for sampling that is done before the adapter changes again (a
    validation, a round's candidates): one frozen copy per ``net``, kept and brought up to
    date in place (:func:`refresh_merged`) on each call instead of copied anew, so a later
    call changes what an earlier one returned. A caller that keeps the copy while the adapter
    trains takes :func:`merged_copy`.

    The copy is rebuilt when a parameter outside the adapter changed (its version counter),
    or the network moved to another device. A new copy of the Nav1D U-Net with a rank-16
    adapter took 63 ms on one CPU thread, the refresh 10 ms.
    """
    if not is_lora(net):
        return net
    base = tuple((p._version, p.device) for n, p in net.named_parameters() if "lora_" not in n)
    hit = _VIEWS.get(net)
    if hit is None or hit[1] != base:
        _VIEWS[net] = (merged_copy(net), base)
        return _VIEWS[net][0]
    return refresh_merged(hit[0], net)


def reference_copy(net: nn.Module) -> nn.Module:
    """A frozen plain copy of ``net``'s reference (the base weights, adapter disabled): the
    same function as ``net`` inside :func:`reference`, without peft's switching of every
    layer on each call (most of a small network's reference call)."""
    with reference(net):
        return merged_copy(net)


@torch.no_grad()
def refresh_merged(plain: nn.Module, net: nn.Module) -> nn.Module:
    """Bring a :func:`merged_copy` of ``net`` up to date with ``net``'s current adapter, in
    place (base weight + the adapter's delta for every wrapped layer), and return it.

    Cheaper than a new copy when the adapter changes often (an update of RL): it writes only
    the wrapped layers' weights.
    """
    from peft.tuners.lora import LoraLayer

    if not is_lora(net):
        return plain
    off = _adapter_disabled(net)
    for name, module in net.get_base_model().named_modules():
        if isinstance(module, LoraLayer):
            weight = module.base_layer.weight
            if not off:
                weight = weight + sum(module.get_delta_weight(a) for a in module.active_adapters)
            plain.get_submodule(name).weight.copy_(weight)
    return plain


def _adapter_disabled(net: nn.Module) -> bool:
    """Whether ``net``'s adapter is switched off (inside :func:`reference`)."""
    from peft.tuners.lora import LoraLayer

    return any(m.disable_adapters for m in net.modules() if isinstance(m, LoraLayer))


def remove_lora(net: nn.Module) -> nn.Module:
    """Take the adapter out again (in place) and return the plain reference network."""
    return net.unload() if is_lora(net) else net


def _device(net: nn.Module) -> torch.device:
    for p in net.parameters():
        return p.device
    return torch.device("cpu")
