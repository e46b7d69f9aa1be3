"""A 1-bit ResNet-18 in the style of ReActNet (Liu et al., 2020), the student of S2-BNN.

Every 3×3 convolution after the stem is binary: its input passes through RSign (sign of the
input minus a learnable per-channel shift, ReActNet §3.2) and, with ``binary_weights``, its
weights are sign(W) scaled per output channel by mean |W| (XNOR-Net's α). Each binary conv has
its own real-valued shortcut (Bi-Real Net), which carries the information the signs drop;
after the sum, RPReLU (PReLU with learnable shifts before and after) is the non-linearity.
The stem, the downsampling shortcuts (2×2 average pool + 1×1 real conv + BN) and whatever
classifier or head comes after the pooled features stay real-valued, as in ReActNet.

Gradients pass the signs by straight-through estimators: ApproxSign (Bi-Real Net eq. 6,
d sign(x)/dx ≈ 2 - 2|x| on |x| < 1) for activations, the clipped identity for weights
(ReActNet's HardBinaryConv; α is a constant in the backward pass).

S2-BNN trains in two steps (REFERENCE.md section 8): first binary activations with real
weights (``binary_weights=False``), then binary weights initialised from step one
(``model.init_from=RUN_DIR``); both steps share one parameter layout.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .conv import Conv2d


def sign(x: Tensor) -> Tensor:
    """±1 everywhere (torch.sign maps 0 to 0, which is not a binary value)."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


class ApproxSign(torch.autograd.Function):
    """sign(x) forward; Bi-Real Net's piecewise-quadratic approximation backward:
    d/dx = 2 - 2|x| for |x| < 1, else 0."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return sign(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * (2 - 2 * x.abs()).clamp_(min=0)


class BinarizeWeight(torch.autograd.Function):
    """α sign(W) with α = mean |W| per output channel (O, 1, 1, 1); the gradient reaches W
    where |W| ≤ 1 (clipped straight-through), α taken as a constant."""

    @staticmethod
    def forward(ctx, w: Tensor) -> Tensor:  # (O, I, k, k)
        ctx.save_for_backward(w)
        alpha = w.abs().mean(dim=(1, 2, 3), keepdim=True)  # (O, 1, 1, 1)
        return alpha * sign(w)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (w,) = ctx.saved_tensors
        return grad * (w.abs() <= 1).to(grad.dtype)


class RSign(nn.Module):
    """ReActNet's RSign: sign(x - β_c) with a learnable threshold β per channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> ±1, same shape
        return ApproxSign.apply(x - self.shift)


class RPReLU(nn.Module):
    """ReActNet's RPReLU: PReLU(x - γ_c) + ζ_c, slopes initialised at 0.25 as PReLU's."""

    def __init__(self, channels: int):
        super().__init__()
        self.shift_in = nn.Parameter(torch.zeros(1, channels, 1, 1))  # γ
        self.prelu = nn.PReLU(channels)
        self.shift_out = nn.Parameter(torch.zeros(1, channels, 1, 1))  # ζ

    def forward(self, x: Tensor) -> Tensor:
        return self.prelu(x - self.shift_in) + self.shift_out


class BinaryConv2d(Conv2d):
    """A 3×3 convolution whose weights are binarised (``binary_weights``) or real; its input
    is expected to be ±1 already (an RSign in front)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, *, binary_weights: bool = True):
        super().__init__(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.binary_weights = binary_weights

    def forward(self, x: Tensor) -> Tensor:
        w = BinarizeWeight.apply(self.weight) if self.binary_weights else self.weight
        return self._conv_forward(x, w, None)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, binary_weights={self.binary_weights}"


class BinaryUnit(nn.Module):
    """RSign -> binary 3×3 conv -> BN, plus a real shortcut of the input, then RPReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, *, binary_weights: bool = True):
        super().__init__()
        self.sign = RSign(in_ch)
        self.conv = BinaryConv2d(in_ch, out_ch, stride, binary_weights=binary_weights)
        self.bn = nn.BatchNorm2d(out_ch)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:  # real-valued: the information the signs would lose
            pool = nn.AvgPool2d(2, stride=2) if stride != 1 else nn.Identity()
            self.downsample = nn.Sequential(pool, Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch))
        self.act = RPReLU(out_ch)

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, H, W) -> (B, C_out, H/s, W/s)
        return self.act(self.bn(self.conv(self.sign(x))) + self.downsample(x))


class BinaryBlock(nn.Module):
    """ResNet's BasicBlock with a shortcut around each of its two binary convs (Bi-Real Net)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, *, binary_weights: bool = True):
        super().__init__()
        self.unit1 = BinaryUnit(in_ch, out_ch, stride, binary_weights=binary_weights)
        self.unit2 = BinaryUnit(out_ch, out_ch, binary_weights=binary_weights)

    def forward(self, x: Tensor) -> Tensor:
        return self.unit2(self.unit1(x))


class BinaryResNet(nn.Module):
    """ResNet-18's layout (2, 2, 2, 2 blocks of 64w..512w channels) with binary 3×3 convs;
    ``forward`` maps (B, 3, H, W) to pooled features (B, num_features)."""

    def __init__(self, layers: tuple[int, ...] = (2, 2, 2, 2), *, width: float = 1.0,
                 cifar_stem: bool = False, binary_weights: bool = True):
        super().__init__()
        widths = [max(1, int(base * width)) for base in (64, 128, 256, 512)]
        if cifar_stem:
            self.conv1 = Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = Conv2d(3, widths[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        # no ReLU after the stem: the first RSign needs values on both sides of its threshold
        self.maxpool = nn.Identity() if cifar_stem else nn.MaxPool2d(3, stride=2, padding=1)
        stages, in_ch = [], widths[0]
        for i, (out_ch, n) in enumerate(zip(widths, layers)):
            blocks = [BinaryBlock(in_ch if j == 0 else out_ch, out_ch, 2 if i and j == 0 else 1,
                                  binary_weights=binary_weights) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            in_ch = out_ch
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features: int = widths[3]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @property
    def binary_weights(self) -> bool:
        return all(m.binary_weights for m in self.modules() if isinstance(m, BinaryConv2d))

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.bn1(self.conv1(x)))  # (B, 64w, H', W'), real-valued
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 512w, h, w)
        return torch.flatten(self.avgpool(x), 1)  # (B, num_features)


def binary_resnet18(*, width: float = 1.0, cifar_stem: bool = False, binary_weights: bool = True) -> BinaryResNet:
    return BinaryResNet((2, 2, 2, 2), width=width, cifar_stem=cifar_stem, binary_weights=binary_weights)


def weight_memory(model: nn.Module) -> dict[str, float]:
    """Weight storage in bytes if binary conv weights were packed to 1 bit per weight (plus
    one 32-bit α per output channel) and every other parameter kept 32 bits; ``fp32_bytes``
    is the same network stored entirely in 32 bits. Parameters only: BN running statistics
    fold into the BN affine at inference."""
    bits = fp32_bits = 0
    binary = {id(m.weight) for m in model.modules() if isinstance(m, BinaryConv2d) and m.binary_weights}
    out_channels = sum(m.out_channels for m in model.modules()
                       if isinstance(m, BinaryConv2d) and m.binary_weights)
    for p in model.parameters():
        fp32_bits += 32 * p.numel()
        bits += p.numel() if id(p) in binary else 32 * p.numel()
    bits += 32 * out_channels  # α
    return {"packed_bytes": bits / 8, "fp32_bytes": fp32_bits / 8,
            "binary_weights": sum(p.numel() for p in model.parameters() if id(p) in binary)}


__all__ = ["ApproxSign", "BinarizeWeight", "BinaryConv2d", "BinaryResNet", "RPReLU", "RSign",
           "binary_resnet18", "sign", "weight_memory"]
