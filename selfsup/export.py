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
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from . import checkpoint as ckpt
from .backbones import BACKBONES
from .config import ConfigError

FORMATS = ("torchvision", "safetensors")
META_KEY = "selfsup"  # the safetensors metadata entry holding the backbone description


def apply_cifar_stem(net: nn.Module) -> nn.Module:
    """Give a torchvision/timm-style ResNet the CIFAR stem: 3x3 stride-1 conv1, no max-pool
    (SimCLR appendix B.9). Modifies ``net`` in place and returns it."""
    old = net.conv1
    net.conv1 = nn.Conv2d(old.in_channels, old.out_channels, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise ConfigError("--format safetensors needs the safetensors package: pip install safetensors "
                          "(or pip install 'selfsup[export]')") from None
    return safetensors.torch


def export_backbone(run: str | Path, fmt: str = "torchvision", out: str | Path | None = None) -> Path:
    """Write the backbone of ``run`` (a run folder, checkpoint.pt or backbone.pt) as ``fmt``."""
    from .evaluate import load_backbone

    if fmt not in FORMATS:
        raise ConfigError(f"export format '{fmt}' unknown; choose {' or '.join(FORMATS)}")
    backbone, meta = load_backbone(run)
    if meta["backbone"] not in BACKBONES:
        if fmt == "torchvision":
            raise ConfigError(f"'{run}' is a {meta['backbone']}, which has no torchvision counterpart (its layers "
                              f"and parameter names are selfsup's own); use --format safetensors and "
                              f"selfsup.load_backbone")
    elif fmt == "torchvision" and meta["width"] != 1:
        raise ConfigError(f"'{run}' is a {meta['backbone']} at width {meta['width']:g}, which has no "
                          f"torchvision counterpart (only width 1 fits torchvision.models."
                          f"{meta['backbone']}); use --format safetensors and selfsup.load_backbone")
    run_dir = Path(run) if Path(run).is_dir() else Path(run).parent
    out = Path(out) if out else run_dir / ("backbone-torchvision.pt" if fmt == "torchvision" else "backbone.safetensors")
    layout = "torchvision" if meta["backbone"] in BACKBONES and meta["width"] == 1 else "selfsup"
    meta = {**meta, "format": fmt, "layout": layout, "stem": "cifar" if meta["cifar_stem"] else "standard"}
    weights = {k: v.contiguous() for k, v in backbone.state_dict().items()}
    try:
        if fmt == "torchvision":
            ckpt.save_atomic(weights, out)
            ckpt.write_text_atomic(json.dumps(meta, indent=1), out.with_suffix(".json"))
        else:
            ckpt.write_bytes_atomic(_safetensors().save(weights, metadata={META_KEY: json.dumps(meta)}), out)
    except OSError as e:
        raise ckpt.CheckpointError(f"could not write the export '{out}': {e.strerror or e}") from None
    return out


def load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Weights and description of a safetensors export (never executes code: plain tensors)."""
    st = _safetensors()
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(META_KEY, "null"))
        weights = st.load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise ckpt.CheckpointError(f"'{path}' is not a readable safetensors file: {str(e)[:200]}") from None
    if not isinstance(meta, dict):
        raise ckpt.CheckpointError(f"'{path}' has no '{META_KEY}' metadata describing the backbone; "
                                   f"export it with selfsup export --format safetensors")
    return weights, meta
