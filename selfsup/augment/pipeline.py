"""Applying a view: ``Augment`` turns a uint8 batch into one normalised random view.

``Augment(cfg)(images, generator)`` runs the ops of :mod:`.crop`, :mod:`.color` and
:mod:`.filters` in SimCLR's order as its ``ViewConfig`` says; ``eval_view`` is the deterministic
view for evaluation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .batch import normalize, normalize_constants, to_float_nchw
from .color import color_jitter, random_grayscale
from .crop import random_resized_crop_flip
from .filters import blur_kernel_size, random_gaussian_blur, random_solarize
from .views import ViewConfig

__all__ = ["Augment", "eval_view"]


class Augment(torch.nn.Module):
    """One view of a contrastive pair (SimCLR Sec. 3, Appendix A), batched on device.

    uint8 (B, H, W, 3) -> float32 (B, 3, S, S), normalised, channels_last, same device.
    Op order: crop+flip, colour jitter, grayscale, blur, solarize, normalise.
    Call as ``aug(images, generator)``; the generator must live on ``images.device``
    (``None`` uses the global RNG). Ops whose probability is 0 are skipped, so they
    neither cost time nor consume random numbers.
    """

    def __init__(self, cfg: ViewConfig):
        super().__init__()
        self.cfg = cfg
        self.kernel_size = blur_kernel_size(cfg.size, cfg.blur_kernel_frac)

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        cfg = self.cfg
        # Branches below test the static config only, never tensor values.
        x = random_resized_crop_flip(images, cfg.size, cfg.scale, cfg.ratio, cfg.flip_p, generator)  # (B, 3, S, S)
        if cfg.jitter_p > 0:
            x = color_jitter(x, cfg.jitter_p, cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue, generator)
        if cfg.grayscale_p > 0:
            x = random_grayscale(x, cfg.grayscale_p, generator)
        if cfg.blur_p > 0:
            x = random_gaussian_blur(x, cfg.blur_p, cfg.blur_sigma, self.kernel_size, generator)
        if cfg.solarize_p > 0:
            x = random_solarize(x, cfg.solarize_p, cfg.solarize_threshold, generator)
        return normalize(x, cfg.mean, cfg.std)  # (B, 3, S, S) channels_last

    def extra_repr(self) -> str:
        return repr(self.cfg)


def eval_view(
    images: Tensor,
    size: int,
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
    std: tuple[float, float, float] = (0.5, 0.5, 0.5),
) -> Tensor:
    """Deterministic evaluation view: resize to (size, size) if needed, then normalise.

    uint8 (B, H, W, 3) -> float32 (B, 3, size, size), channels_last. Shrinking uses an
    antialiased bilinear filter (no randomness to hide aliasing here).
    """
    x = to_float_nchw(images)  # (B, 3, H, W) in [0, 255]
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    # Fold the 1/255 into the normalisation: a single pass from raw pixels to model input.
    scale, shift = normalize_constants(tuple(map(float, mean)), tuple(map(float, std)), x.device, 1.0 / 255.0)
    out = torch.empty_like(x, memory_format=torch.channels_last)
    return torch.addcmul(shift, x, scale, out=out)  # (B, 3, S, S)
