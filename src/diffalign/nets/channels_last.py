"""Conv1d layers run as channels-last Conv2d, for compiled inference on a CPU.

A ``(B, C, L)`` tensor is viewed as an image of height 1, ``(B, C, 1, L)``, stored
channels-last (NHWC: the C values of one position side by side). oneDNN's convolutions are
faster on that layout, and the normalisations and activations TorchInductor fuses between
them then run along C, which is long (16-512), instead of along L, which in a U-Net's
deepest level is as short as 4 positions — most of a 16-lane vector left empty.

The function is the same Conv1d (same weights, stride, padding, dilation); only the memory
order of the tensors between layers changes. :func:`~diffalign.compiled.compile_denoisers`
applies it to a frozen copy of the network; eager training is slower on this layout (2
cores, Hopper-sized U-Net: 1.3-1.5× the time per step), so the networks keep Conv1d.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ChannelsLastConv1d", "channels_last_convs"]


class ChannelsLastConv1d(nn.Module):
    """``conv`` (an ``nn.Conv1d`` with numeric zero padding and one group) as a height-1
    Conv2d over channels-last tensors; ``(B, C_in, L) -> (B, C_out, L_out)``, the output
    strided channels-last. The weights are a frozen copy of ``conv``'s."""

    def __init__(self, conv: nn.Conv1d) -> None:
        super().__init__()
        if not supported(conv):
            raise ValueError(f"ChannelsLastConv1d needs numeric zero padding and groups=1, "
                             f"got {conv}")
        self.weight = nn.Parameter(conv.weight.detach().clone().unsqueeze(2),
                                   requires_grad=False)
        """``(C_out, C_in, 1, k)``."""
        self.bias = (None if conv.bias is None
                     else nn.Parameter(conv.bias.detach().clone(), requires_grad=False))
        """``(C_out,)`` or None."""
        self.stride = (1, conv.stride[0])
        self.padding = (0, conv.padding[0])
        self.dilation = (1, conv.dilation[0])

    def forward(self, x: Tensor) -> Tensor:
        """The Conv1d's output for ``x: (B, C_in, L)``."""
        x4 = x.unsqueeze(2).contiguous(memory_format=torch.channels_last)
        return F.conv2d(x4, self.weight, self.bias, self.stride, self.padding,
                        self.dilation).squeeze(2)


def supported(conv: nn.Module) -> bool:
    """Whether ``conv`` is an ``nn.Conv1d`` that :class:`ChannelsLastConv1d` can replace."""
    return (type(conv) is nn.Conv1d and conv.groups == 1 and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str))


def channels_last_convs(net: nn.Module) -> nn.Module:
    """A frozen copy of ``net`` with each supported ``nn.Conv1d`` replaced by a
    :class:`ChannelsLastConv1d` (``net`` is unchanged). Layers inside an adapter wrapper
    (a module with a ``base_layer``, as peft's) are left alone: merge the adapter first."""
    out = copy.deepcopy(net)
    out.requires_grad_(False)

    def swap(module: nn.Module) -> None:
        for name, child in module.named_children():
            if supported(child):
                setattr(module, name, ChannelsLastConv1d(child))
            elif not hasattr(child, "base_layer"):
                swap(child)

    if supported(out):
        return ChannelsLastConv1d(out)
    swap(out)
    return out
