"""A Conv2d that never trains on oneDNN's wrong bf16 weight gradients on the CPU.

oneDNN's ``avx512_core_bf16`` backward-weights kernel (torch 2.13, oneDNN 3.12) returns wrong
and often non-finite weight gradients for a strided k×k conv (k > 1) whose input is one pixel
wide. Measured on a Sapphire Rapids Xeon, 20–40 trials each: 3×3 stride 2 (and 3) on 1×1,
2×1, 4×1 and 8×1 (H×W) inputs was wrong in 5–100 % of trials depending on the channels and
the memory format (often non-finite, often finite but wrong); on 1×2, 1×4, 2×2, 3×2, 2×3 and
larger inputs, at stride 1 and with 1×1 kernels never; fp32 is always right. Small multi-crop views reach it: 4-pixel crops with
the CIFAR stem and 16-pixel crops with the standard stem leave layer4's first conv a 1×1 map.
:class:`Conv2d` runs such a conv in fp32 under CPU bf16 autocast, with a margin (either side
at most 2 pixels); the check reads only shapes, so it never waits for the device.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

#: inputs with a side at or below this many pixels count as affected (measured: width 1)
SMALLEST_SAFE_SIDE = 3


def bf16_kernel_unsafe(x: Tensor, conv: nn.Conv2d) -> bool:
    """Whether ``conv`` on ``x`` would take oneDNN's faulty bf16 backward-weights path."""
    return (x.device.type == "cpu" and max(conv.stride) > 1 and max(conv.kernel_size) > 1
            and min(x.shape[-2:]) < SMALLEST_SAFE_SIDE and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state dict) that computes a strided conv on a tiny
    map in fp32 when CPU bf16 autocast would hand it to the faulty kernel."""

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if bf16_kernel_unsafe(input, self):
            with torch.autocast("cpu", enabled=False):
                return super()._conv_forward(input.float(), weight.float(),
                                             None if bias is None else bias.float())
        return super()._conv_forward(input, weight, bias)
