"""The Python API for notebooks and scripts: pre-train, load a backbone, extract features, embed a source.

``import selfsup`` stays light: it imports this module, and with it torch and the rest, on the
first use of one of these names. They wrap the library's single implementations
(``train.pretrain``, ``runs.load_backbone``, ``evaluate.extract_features``, ``embeddings.embed``) and add only the
conversions a user needs at the boundary.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import evaluate, runs, train
from .config import Config, resolve
from .data import DataError, decode_image, is_image_name
from .embeddings import Embeddings, embed  # noqa: F401 (the API's: selfsup.embed(run, source))
from .runs import BackboneSpec


def pretrain(config: Config | dict[str, Any] | None = None, *, resume: bool = False,
             data_changed_ok: bool = False) -> dict:
    """Pre-train from a :class:`Config` or a nested dict and return the last epoch's metrics.

    A dict may name a ``preset`` and override any setting, as ``--preset`` and ``--set`` do::

        selfsup.pretrain({"preset": "digits-simclr", "out": "runs/nb", "train": {"epochs": 2}})
    """
    if config is None or isinstance(config, dict):
        overrides = dict(config or {})
        config = resolve(preset_name=overrides.pop("preset", None), overrides=overrides)
    return train.pretrain(config, resume=resume, data_changed_ok=data_changed_ok)


class Backbone(nn.Module):
    """A pre-trained encoder with what feeding it needs: ``spec`` holds the architecture, the
    input size and the normalisation of its training run; ``meta`` is the same as a dict, as
    ``backbone.json`` holds it."""

    def __init__(self, encoder: nn.Module, spec: BackboneSpec):
        super().__init__()
        self.encoder = encoder
        self.spec = spec
        self.meta: dict[str, Any] = spec.to_json()
        self.num_features: int = encoder.num_features

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(x)  # (B, num_features)


def load_backbone(path: str | Path, *, device: str | torch.device = "cpu") -> Backbone:
    """A run folder, ``checkpoint.pt``, ``backbone.pt`` or an export -> an eval-mode backbone."""
    encoder, spec = runs.load_backbone(path)
    return Backbone(encoder, spec).to(device).eval()


def _as_uint8_images(images: Any, size: int) -> np.ndarray:
    """uint8 (N, H, W, 3) from an array/tensor (HWC or CHW, one image or many) or an image folder."""
    if isinstance(images, (str, Path)):
        return _read_folder(Path(images), size)
    x = torch.as_tensor(images) if isinstance(images, Tensor) else torch.from_numpy(np.asarray(images))
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4 or 3 not in (x.shape[1], x.shape[-1]):
        raise DataError(f"images must be (N, H, W, 3) or (N, 3, H, W), got shape {tuple(x.shape)}")
    if x.shape[-1] != 3:
        x = x.permute(0, 2, 3, 1)  # (N, H, W, 3)
    if x.dtype.is_floating_point:  # documented: floats are pixels in [0, 1]
        x = (x.clamp(0, 1) * 255).round()
    elif x.dtype != torch.uint8:
        raise DataError(f"images must be uint8 pixels or floats in [0, 1], got {x.dtype}")
    return x.to(torch.uint8).contiguous().numpy()  # (N, H, W, 3)


def _read_folder(folder: Path, size: int) -> np.ndarray:
    if not folder.is_dir():
        raise DataError(f"'{folder}' is not a folder of images")
    files = image_files(folder)
    if not files:
        raise DataError(f"no images in '{folder}' (searched recursively; e.g. .png, .jpg)")
    try:
        return np.stack([decode_image(str(p), size) for p in files])  # converted to RGB, resized
    except OSError as e:
        raise DataError(f"could not decode an image in '{folder}': {e}") from None


def image_files(folder: str | Path) -> list[Path]:
    """The images :func:`extract_features` reads from ``folder``, in the order of its rows."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and is_image_name(p.name))


def extract_features(backbone: Backbone, images: Any, *, batch_size: int = 256) -> Tensor:
    """Pooled features (N, D) float32 of ``images``: a uint8 array or tensor, (N, H, W, 3) or
    (N, 3, H, W) (floats are read as pixels in [0, 1]), or a folder path (every image in it,
    recursively, in :func:`image_files` order; converted to RGB and resized to the training
    size). Uses the run's own input size and normalisation, as the kNN monitor does."""
    spec = backbone.spec
    x = _as_uint8_images(images, spec.data_image_size or spec.image_size)
    device = next(backbone.parameters()).device
    return evaluate.extract_features(backbone.encoder, x, size=spec.image_size, mean=spec.mean,
                                     std=spec.std, device=device, batch_size=batch_size)
