"""Compiled denoisers for fast decisions: :func:`compile_denoisers`.

Each denoising network of a model is replaced by a :class:`CompiledDenoiser`: the network
(an adapter folded into a frozen copy of it first) compiled with TorchInductor. On a CPU it
holds two compiled forms and picks one per call by the work of the batch (rows ×
parameters, :data:`WIDE_WORK`):

* ``narrow`` (one-candidate decisions of small networks): the network as it is, run from
  generated C++ (``cpp_wrapper``), which removes most of the per-operation overhead that
  dominates such calls; it reads the weights at each call;
* ``wide`` (many candidates, or a large network; only for a network with Conv1d layers,
  the U-Nets the forms were measured on): the Conv1d layers as channels-last Conv2d
  (:mod:`diffalign.nets.channels_last`) with the weights frozen into the graph as
  constants, so oneDNN runs its prepacked convolutions, optionally under bfloat16.

docs/results.md has the measured ratios behind the choice (benchmarks/speed.py). On a GPU
there is one form, the network compiled as it is. Shapes are fixed: each new batch size
compiles once more, at its first call (tens of seconds).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["WIDE_WORK", "CompiledDenoiser", "compile_denoisers"]

WIDE_WORK = 500_000
"""Rows × network parameters from which a CPU call takes the ``wide`` form. Measured on 2
cores (docs/results.md): the Nav1D U-Net (0.26M parameters) is faster in the narrow form for
one row and in the wide form from 2 rows up; the Hopper-sized U-Net (4M) in the wide form
from one row."""

RECOMPILE_LIMIT = 64
"""Dynamo's limit on compiled variants of one function (default 8), raised to at least this:
every network of one class shares its forward, and each network, batch size and form is a
variant; past the limit Dynamo would silently run the network eagerly."""


class _Bf16(nn.Module):
    """``net`` under bfloat16 autocast, returning float32: the convolutions and matmuls run
    in bfloat16, the sampler's chain around the net stays float32."""

    def __init__(self, net: nn.Module, device_type: str) -> None:
        super().__init__()
        self.net = net
        """The wrapped denoiser."""
        self.device_type = device_type
        """Autocast device type ("cpu" or "cuda")."""

    def forward(self, *args, **kwargs):
        """The net's output, computed in bfloat16 and returned as float32."""
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.net(*args, **kwargs).float()


class CompiledDenoiser(nn.Module):
    """Denoiser ``net`` compiled for inference (see the module's text); an adapter on ``net``
    is folded into a frozen copy first.

    ``channels_last``: give a CPU call the ``wide`` form when its work reaches
    :data:`WIDE_WORK` (False: always the ``narrow`` form). ``bf16``: the wide form (where
    there is none — a GPU, a network without Conv1d — the one form) runs under bfloat16
    autocast. Call without gradients."""

    def __init__(self, net: nn.Module, device: torch.device, bf16: bool = False,
                 channels_last: bool = True) -> None:
        super().__init__()
        from .align.lora import is_lora, merged_copy
        from .nets import count_parameters
        from .nets.channels_last import channels_last_convs, supported

        net = merged_copy(net) if is_lora(net) else net
        self._net = [net]  # a list keeps it out of this module's children (narrow holds it)
        self.params = count_parameters(net)
        """Parameter count of the network (the work per row)."""
        self.bf16 = bool(bf16)
        """Whether the wide form (where there is none, the one form) runs in bfloat16."""
        cpu = device.type == "cpu"
        self.wide = None
        """The channels-last, frozen, compiled form: on a CPU with ``channels_last``, for a
        network with Conv1d layers (the U-Nets; the forms were measured on those only)."""
        if cpu and channels_last and any(supported(m) for m in net.modules()):
            wide = channels_last_convs(net)
            if bf16:
                wide = _Bf16(wide, device.type)
            self.wide = torch.compile(wide, dynamic=False,
                                      options={"freezing": True, "cpp_wrapper": True})
        # The narrow form keeps the options of the compiled path before the wide form
        # existed; without Dynamo's prepare_freezing its "freezing" folds no weights.
        options = {"freezing": True, "cpp_wrapper": True} if cpu else {}
        narrow = _Bf16(net, device.type) if bf16 and self.wide is None else net
        self.narrow = torch.compile(narrow, dynamic=False, options=options)
        """The network compiled as it is."""
        limit = torch._dynamo.config.recompile_limit
        torch._dynamo.config.recompile_limit = max(limit, RECOMPILE_LIMIT)

    def __getattr__(self, name: str):
        """The network's own attributes (``x_dim``, ``extra_dim``, ...) read through."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_"):
                raise
            return getattr(self._net[0], name)

    def uses_wide(self, rows: int) -> bool:
        """Whether a call on ``rows`` rows takes the wide form."""
        return self.wide is not None and rows * self.params >= WIDE_WORK

    def forward(self, x, t, cond=None, extra=None):
        """The network's output for ``x: (B, H, D)``, ``t: (B,)``."""
        if torch.is_grad_enabled():
            raise RuntimeError("a compiled denoiser samples without gradients (its weights are "
                               "frozen copies); call it under torch.no_grad(), or train and "
                               "backpropagate through the model's own network")
        if self.uses_wide(x.shape[0]):
            # Freezing needs Dynamo to hand the parameters over as such (to fold them in as
            # constants and prepack them); without this flag Inductor sees plain inputs.
            with torch._dynamo.config.patch(prepare_freezing=True):
                return self.wide(x, t, cond=cond, extra=extra)
        return self.narrow(x, t, cond=cond, extra=extra)


def compile_denoisers(model, bf16: bool = False, channels_last: bool = True):
    """Replace ``model``'s denoising networks (also a cascade's aligned net and refiner) by
    :class:`CompiledDenoiser` copies, in place; returns ``model``.

    Decisions must run without gradients (as :meth:`~diffalign.policy.Policy.act` does); the
    samples equal the eager model's to float rounding (tests/test_use.py,
    tests/test_fast_paths.py). ``bf16``: many-candidate decisions run under bfloat16
    autocast on a device with bfloat16 kernels (docs/results.md has where it pays); where
    the device has none it falls back to float32 with a note on stderr. Samples stay within
    the bfloat16 bounds of tests/test_fast_paths.py. ``channels_last=False`` keeps the
    networks' own layout at every batch size."""
    from .align.cascade import CascadeModel
    from .train.trainer import bf16_if_fast

    device = model.device
    bf16 = bf16_if_fast(bf16, str(device), "compile_denoisers(bf16=True)")

    def fast(net):
        return CompiledDenoiser(net, device, bf16=bf16, channels_last=channels_last)

    if isinstance(model, CascadeModel):
        model._aligned = fast(model._aligned)
        if model._refiner is not None:
            model._refiner = fast(model._refiner)
    else:
        model.net = fast(model.net)
    return model
