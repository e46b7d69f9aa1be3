"""Backbone weights for use elsewhere: torchvision-layout ``.pt`` files and safetensors.

Our encoders already use torchvision's parameter names (``backbones.py``), so an export is the
backbone's ``state_dict`` as it is, plus a JSON description beside it (``<file>.json``; inside
the file's metadata for safetensors). It loads into ``torchvision.models.resnet18/50`` (and
timm's ``resnet18/50``, which share those names) with ``strict=False``, only ``fc.weight`` and
``fc.bias`` missing, because the encoder ends at the average pool.

CIFAR-stem models (``model.cifar_stem=true``) differ from those networks in two places: conv1
is a 3x3 stride-1 convolution instead of 7x7 stride 2, and there is no max-pool. Apply the same
change to the target network before loading (:func:`apply_cifar_stem`)::

    net = torchvision.models.resnet18()
    selfsup.export.apply_cifar_stem(net)
    net.load_state_dict(torch.load("backbone-torchvision.pt", weights_only=True), strict=False)

Width multipliers other than 1, and the 1-bit backbones (``binary-resnet18``: its convs hold
binarisation scales torchvision has no place for), have no torchvision counterpart, so
``torchvision`` refuses them; export those as safetensors and load them with
``selfsup.load_backbone``. Their description says ``"layout": "selfsup"`` (for ResNets at other
widths: torchvision's names, other shapes), never ``"torchvision"``.

ViTs (``vit_tiny``, ``vit_small``, ``vit_base``) have timm's names and shapes (``vit.py``), so
both formats write them as they are, described as ``"layout": "timm"`` (no ``stem``: the CIFAR
stem is a ResNet's). They load into timm's ``VisionTransformer`` with ``strict=True``: nothing
missing, since with ``num_classes=0`` its head is an identity and its features are the normed
[CLS] token, ours. Build it for the export's ``patch_size`` and ``image_size`` (the training
views' side, which the position embeddings are learned for)::

    net = timm.create_model("vit_small_patch16_224", num_classes=0)          # patch 16, 224 px
    net = timm.create_model("vit_tiny_patch16_224", num_classes=0,           # CIFAR: patch 4, 32 px
                            img_size=32, patch_size=4)
    net.load_state_dict(torch.load("backbone-torchvision.pt", weights_only=True), strict=True)

(or ``safetensors.torch.load_file("backbone.safetensors")``). timm then takes inputs of exactly
``image_size`` pixels; ``selfsup.load_backbone`` also takes other sides, resampling the position
embeddings.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from torch import nn

from . import checkpoint as ckpt
from .backbones import BACKBONES, is_vit
from .errors import ConfigError, TrainingError
from .runs import EXPORTS, META_KEY, load_backbone, require_safetensors, run_dir, save_backbone

FORMATS = tuple(EXPORTS)  # torchvision (ResNets), timm (ViTs), safetensors


def apply_cifar_stem(net: nn.Module) -> nn.Module:
    """Give a torchvision/timm-style ResNet the CIFAR stem: 3x3 stride-1 conv1, no max-pool
    (SimCLR appendix B.9). Modifies ``net`` in place and returns it."""
    old = net.conv1
    net.conv1 = nn.Conv2d(old.in_channels, old.out_channels, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


def export_backbone(run: str | Path, fmt: str = "torchvision", out: str | Path | None = None) -> Path:
    """Write the backbone of ``run`` (a run folder, checkpoint.pt or backbone.pt) as ``fmt``."""
    if fmt not in FORMATS:
        raise ConfigError(f"export format '{fmt}' unknown; choose {' or '.join(FORMATS)}")
    backbone, spec = load_backbone(run)
    vit = is_vit(spec.backbone)
    if vit and fmt == "torchvision":
        raise ConfigError(f"'{run}' is a {spec.backbone}, whose weights use timm's names (torchvision's ViTs name "
                          f"theirs otherwise); use --format timm or --format safetensors")
    if not vit and fmt == "timm":
        raise ConfigError(f"'{run}' is a {spec.backbone}: --format timm is for ViTs; a ResNet's --format "
                          f"torchvision file loads into timm's ResNets too (same names)")
    if spec.backbone not in BACKBONES and not vit:
        if fmt == "torchvision":
            raise ConfigError(f"'{run}' is a {spec.backbone}, which has no torchvision counterpart (its layers "
                              f"and parameter names are selfsup's own); use --format safetensors and "
                              f"selfsup.load_backbone")
    elif fmt == "torchvision" and spec.width != 1:
        raise ConfigError(f"'{run}' is a {spec.backbone} at width {spec.width:g}, which has no "
                          f"torchvision counterpart (only width 1 fits torchvision.models."
                          f"{spec.backbone}); use --format safetensors and selfsup.load_backbone")
    out = Path(out) if out else run_dir(run) / EXPORTS[fmt]
    if vit:
        layout, stem = "timm", None
    else:
        layout = "torchvision" if spec.backbone in BACKBONES and spec.width == 1 else "selfsup"
        stem = "cifar" if spec.cifar_stem else "standard"
    spec = dataclasses.replace(spec, format=fmt, layout=layout, stem=stem)
    weights = {k: v.contiguous() for k, v in backbone.state_dict().items()}
    try:
        if fmt in ("torchvision", "timm"):
            save_backbone(out, weights, spec)
        else:
            metadata = {META_KEY: json.dumps(spec.to_json())}
            ckpt.write_bytes_atomic(require_safetensors().save(weights, metadata=metadata), out)
    except OSError as e:
        raise TrainingError(f"could not write the export '{out}': {e.strerror or e}") from None
    return out
