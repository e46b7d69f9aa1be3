"""What every augmentation op shares: the float layout, per-sample draws and normalisation.

An op takes float images ``(B, 3, H, W)`` in ``[0, 1]`` and per-sample parameters of shape
``(B,)``; :func:`bernoulli_mask` draws "apply to this sample?" and :func:`per_sample` lets a
``(B,)`` parameter broadcast against the images. :func:`to_float_nchw` brings the uint8
``(B, H, W, 3)`` store into that layout without a copy, and :func:`normalize` ends a view.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = ["bernoulli_mask", "per_sample", "normalize_constants", "to_float_nchw", "normalize"]


def bernoulli_mask(n: int, p: float, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """(n,) bool, each True with probability ``p``: which samples an op applies to."""
    # rand < p gives exactly never for p=0 and always for p=1.
    return torch.rand(n, generator=generator, device=device) < p  # (B,) bool


def per_sample(v: Tensor | float) -> Tensor | float:
    """Reshape a (B,) parameter so that it broadcasts against (B, C, H, W)."""
    return v.view(-1, 1, 1, 1) if isinstance(v, Tensor) else v


@functools.lru_cache(maxsize=32)
def normalize_constants(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device, pixel_scale: float = 1.0
) -> tuple[Tensor, Tensor]:
    """(scale, shift), each (1, 3, 1, 1), with ``x * scale + shift == (x * pixel_scale - mean) / std``."""
    # Cached so a training step does not issue a small host->device copy per call.
    scale = torch.tensor([pixel_scale / s for s in std], dtype=torch.float32, device=device).view(1, 3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return scale, shift


def to_float_nchw(images: Tensor) -> Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [0, 255], without a layout copy.

    The permuted view is channels_last in memory; ops below are layout-agnostic.
    """
    if images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected (B, H, W, 3) images, got shape {tuple(images.shape)}")
    return images.permute(0, 3, 1, 2).to(torch.float32)  # (B, 3, H, W)


def normalize(x: Tensor, mean: tuple[float, float, float], std: tuple[float, float, float]) -> Tensor:
    """(x - mean) / std per channel, returned as float32 in channels_last memory format."""
    if torch.compiler.is_compiling():  # constants in the graph (uncached), and no out= of another layout,
        scale, shift = normalize_constants.__wrapped__(tuple(map(float, mean)), tuple(map(float, std)), x.device)
        return torch.addcmul(shift, x, scale).contiguous(memory_format=torch.channels_last)  # which Dynamo refuses
    scale, shift = normalize_constants(tuple(map(float, mean)), tuple(map(float, std)), x.device)
    out = torch.empty_like(x, memory_format=torch.channels_last)
    # One fused pass that also produces the layout the model wants.
    return torch.addcmul(shift, x, scale, out=out)  # (B, 3, H, W)
