"""Encoders f(·) that return pooled features (SimCLR §2.1: h = f(x) after average pooling):
the ResNets here, the 1-bit ResNet of ``binary.py`` and the ViTs of ``vit.py`` (their [CLS]
token), all built by name with :func:`build_backbone`.

The ResNets' parameter and buffer names and shapes follow torchvision's ``resnet18/34/50`` (v1.5: the
Bottleneck's stride sits on its 3×3 conv), so ``state_dict()`` loads into the torchvision model
with ``strict=False`` and only ``fc.weight``/``fc.bias`` missing. There is no ``fc``: the
encoder ends at the global average pool.

``width`` multiplies *every* channel count, the stem included, as in SimCLR's ResNet-50 (2×)
and (4×). torchvision's ``wide_resnet50_2`` is a different network: it widens only the inner
3×3 conv of each Bottleneck, so its weights do not fit ``resnet50`` at ``width=2``.

Every conv is a :class:`conv.Conv2d`: a strided conv on a map one or two pixels wide runs in
fp32 under CPU bf16 autocast, where oneDNN's kernel returns wrong weight gradients.

The ViTs (``vit_tiny``, ``vit_small``, ``vit_base``) use timm's names instead (``vit.py``). Each
argument of :func:`build_backbone` belongs to one family: ``width``, ``cifar_stem`` and
``zero_init_residual`` to the ResNets; ``patch_size``, ``image_size``, ``drop_path``,
``drop_path_subset``, ``freeze_patch_embed`` and ``grad_checkpointing`` to the ViTs. A ViT refuses
a width other than 1, and ignores ``cifar_stem`` and ``zero_init_residual`` (the config's defaults
and the method recipes set them for every backbone; a ViT has no stem to change and no residual
BN); a ResNet refuses a non-default ``patch_size``, ``drop_path``, ``drop_path_subset``,
``freeze_patch_embed`` or ``grad_checkpointing``, and ignores ``image_size`` (it takes any input size).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .binary import binary_resnet18
from .conv import Conv2d
from .errors import ConfigError
from .vit import VIT_SIZES, vision_transformer


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3×3 convs with an identity shortcut (He et al. 2016, ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(in_ch, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (strided), 1×1 expand ×4 (ResNet-50; stride on the 3×3 as in v1.5)."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv1x1(in_ch, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


class ResNet(nn.Module):
    """ResNet trunk without the classifier; ``forward`` maps (B, 3, H, W) to (B, num_features).

    ``cifar_stem``: 3×3 stride-1 conv1 and no max-pool, for 32×32 images (SimCLR App. B.9).
    ``zero_init_residual``: the last BN of each residual branch starts with γ = 0, so each
    branch starts at zero (Goyal et al. 2017); SimCLR's TF ResNet always does this,
    torchvision only on request.
    """

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: tuple[int, int, int, int], *,
                 width: float = 1.0, cifar_stem: bool = False, zero_init_residual: bool = False):
        super().__init__()
        widths = [max(1, int(base * width)) for base in (64, 128, 256, 512)]
        self.in_ch = widths[0]
        if cifar_stem:
            self.conv1 = Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = Conv2d(3, widths[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        # downsampling 32x32 images 4x in the stem leaves too little resolution for the trunk
        self.maxpool = nn.Identity() if cifar_stem else nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, widths[0], layers[0], stride=1)
        self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features: int = widths[3] * block.expansion

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int,
                    stride: int) -> nn.Sequential:
        out_ch = planes * block.expansion
        downsample = None
        if stride != 1 or self.in_ch != out_ch:
            downsample = nn.Sequential(_conv1x1(self.in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))
        layers = [block(self.in_ch, planes, stride, downsample)]
        self.in_ch = out_ch
        layers += [block(out_ch, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, 64w, H/4, W/4); (B, 64w, H, W) for CIFAR
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, C, h, w)
        return torch.flatten(self.avgpool(x), 1)  # (B, num_features)


BACKBONES: dict[str, tuple[type[BasicBlock | Bottleneck], tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}

#: 1-bit backbones (binary.py), built as ``fn(width=, cifar_stem=, binary_weights=)``.
BINARY_BACKBONES: dict[str, Callable[..., nn.Module]] = {"binary-resnet18": binary_resnet18}

#: every name :func:`build_backbone` builds: the ResNets, the binary ResNets, the ViTs (vit.VIT_SIZES)
NAMES: tuple[str, ...] = (*BACKBONES, *BINARY_BACKBONES, *VIT_SIZES)

VIT_IMAGE_SIZE = 224  # the side a ViT's position embeddings are learned for when none is given


def is_vit(name: str) -> bool:
    """Whether the backbone ``name`` is a Vision Transformer (patches, position embeddings)."""
    return name in VIT_SIZES


def build_backbone(name: str, *, width: float = 1.0, cifar_stem: bool = False,
                   zero_init_residual: bool = False, binary_weights: bool = True, patch_size: int = 16,
                   image_size: int | None = None, drop_path: float = 0.0, drop_path_subset: bool = False,
                   freeze_patch_embed: bool = False, grad_checkpointing: bool = False) -> nn.Module:
    """Build an encoder by name; ``width=0.25`` gives a 16-channel stem for CPU runs.

    ``binary_weights`` is for binary backbones only: False keeps real weights behind the
    binary activations (S2-BNN's step one). ViTs: ``patch_size`` p, ``image_size`` the input side
    the position embeddings are learned for (None: 224; a multiple of p), ``drop_path`` the
    last block's stochastic depth (``drop_path_subset``: on a fixed-size subset of the batch,
    :class:`vit.DropPath`), ``freeze_patch_embed`` MoCo v3's fixed patch projection,
    ``grad_checkpointing`` recomputing each block in backward (``model.grad_checkpointing``).
    Which arguments each family refuses or ignores: the module docstring.
    """
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    if name in VIT_SIZES:
        if width != 1:
            raise ValueError(f"width {width:g} applies to ResNets only; a {name} has a fixed width "
                             f"(choose vit_tiny, vit_small or vit_base instead)")
        if not binary_weights:
            raise ValueError(f"binary_weights=False applies to binary backbones only, not {name!r}")
        return vision_transformer(name, img_size=VIT_IMAGE_SIZE if image_size is None else image_size,
                                  patch_size=patch_size, drop_path=drop_path, drop_path_subset=drop_path_subset,
                                  freeze_patch_embed=freeze_patch_embed, grad_checkpointing=grad_checkpointing)
    if grad_checkpointing:  # a config key that only ViTs read: say which one, rather than ignore it
        raise ConfigError(f"model.grad_checkpointing=true applies to ViTs only ({', '.join(VIT_SIZES)}), not "
                          f"{name!r}; set model.grad_checkpointing=false (or pick a ViT backbone)")
    vit_only = {"patch_size": (patch_size, 16), "drop_path": (drop_path, 0.0),
                "drop_path_subset": (drop_path_subset, False), "freeze_patch_embed": (freeze_patch_embed, False)}
    for arg, (value, default) in vit_only.items():
        if value != default:
            raise ValueError(f"{arg}={value} applies to ViTs only ({', '.join(VIT_SIZES)}), not {name!r}; "
                             f"leave it at {default}")
    if name in BINARY_BACKBONES:
        return BINARY_BACKBONES[name](width=width, cifar_stem=cifar_stem, binary_weights=binary_weights)
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose from {', '.join(NAMES)}")
    if not binary_weights:
        raise ValueError(f"binary_weights=False applies to binary backbones only, not {name!r}")
    block, layers = BACKBONES[name]
    return ResNet(block, layers, width=width, cifar_stem=cifar_stem, zero_init_residual=zero_init_residual)
