"""What a view is: ``ViewConfig``, and the recipes of the papers built from it.

A ``ViewConfig`` is plain data (sizes, probabilities, strengths); :class:`selfsup.augment.Augment`
applies one. The recipes state each paper's values and where they come from: SimCLR (Appendix A),
the crop-and-flip view of linear evaluation (SimCLR Appendix B.5), BYOL's asymmetric pair (BYOL
Appendix B, Table 6) and SwAV's multi-crop (SwAV Sec. 3.2).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["ViewConfig", "simclr_view", "crop_flip_view", "byol_view", "multi_crop_views"]


@dataclass
class ViewConfig:
    """One view's recipe. Probabilities are per sample; the view is square (size x size), so a
    quarter turn keeps its shape."""

    size: int = 32
    scale: tuple[float, float] = (0.08, 1.0)  # random-resized-crop area fraction
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio range (log-uniform)
    flip_p: float = 0.5  # horizontal flip
    vflip_p: float = 0.0  # vertical flip: off in every paper's recipe (images with no "up": microscopy, satellite)
    rot90_p: float = 0.0  # a turn by 1, 2 or 3 quarter turns (uniformly); 0.75 makes all four turns equally likely
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_frac: float = 0.1  # kernel size = 10% of the output size (SimCLR), made odd, >= 3
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        # Fail at construction rather than deep inside a training step.
        if self.size < 1:
            raise ValueError(f"size must be >= 1, got {self.size}")
        lo, hi = self.scale
        if not 0.0 < lo <= hi:
            raise ValueError(f"scale must satisfy 0 < lo <= hi, got {self.scale}")
        lo, hi = self.ratio
        if not 0.0 < lo <= hi:
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {self.ratio}")
        for name in ("flip_p", "vflip_p", "rot90_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {self.hue}")
        lo, hi = self.blur_sigma
        if not 0.0 < lo <= hi:
            raise ValueError(f"blur_sigma must satisfy 0 < lo <= hi, got {self.blur_sigma}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std must have 3 entries, std > 0")


def simclr_view(size: int, strength: float = 1.0, blur: bool = True, **overrides) -> ViewConfig:
    """SimCLR's augmentation (Appendix A): crop, flip, jitter(0.8s, 0.8s, 0.8s, 0.2s) p=0.8,
    grayscale p=0.2 and, for ImageNet-scale images, blur p=0.5 with a 10%-of-size kernel.

    The paper drops blur on CIFAR-10 (Appendix B.9) and uses strength 0.5 there.
    """
    cfg = ViewConfig(
        size=size,
        scale=(0.08, 1.0),
        ratio=(3 / 4, 4 / 3),
        flip_p=0.5,
        jitter_p=0.8,
        brightness=0.8 * strength,
        contrast=0.8 * strength,
        saturation=0.8 * strength,
        hue=0.2 * strength,
        grayscale_p=0.2,
        blur_p=0.5 if blur else 0.0,
        blur_sigma=(0.1, 2.0),
        blur_kernel_frac=0.1,
        solarize_p=0.0,
    )
    return dataclasses.replace(cfg, **overrides)


def crop_flip_view(size: int, **overrides) -> ViewConfig:
    """Random resized crop + flip only: the training view for linear evaluation and
    fine-tuning (SimCLR Appendix B.5)."""
    cfg = ViewConfig(
        size=size,
        flip_p=0.5,
        jitter_p=0.0,
        grayscale_p=0.0,
        blur_p=0.0,
        solarize_p=0.0,
    )
    return dataclasses.replace(cfg, **overrides)


def byol_view(size: int, view: int, blur: bool = True, **overrides) -> ViewConfig:
    """BYOL's asymmetric pair (BYOL Appendix B, Table 6): both views crop, flip, jitter
    (0.4, 0.4, 0.2, 0.1) p=0.8, grayscale p=0.2; view 1 blurs always and never solarises,
    view 2 blurs with p=0.1 and solarises with p=0.2. ``blur=False`` drops the blur of both
    (32x32 images, as SimCLR does on CIFAR-10)."""
    if view not in (1, 2):
        raise ValueError(f"BYOL has views 1 and 2, got {view}")
    cfg = ViewConfig(
        size=size,
        flip_p=0.5,
        jitter_p=0.8,
        brightness=0.4,
        contrast=0.4,
        saturation=0.2,
        hue=0.1,
        grayscale_p=0.2,
        blur_p=(1.0 if view == 1 else 0.1) if blur else 0.0,
        solarize_p=0.0 if view == 1 else 0.2,
    )
    return dataclasses.replace(cfg, **overrides)


def multi_crop_views(
    global_views: list[ViewConfig],
    local_crops: int,
    local_size: int,
    local_scale: tuple[float, float] = (0.05, 0.14),
    local_from: ViewConfig | None = None,
) -> list[ViewConfig]:
    """SwAV's multi-crop (SwAV §3.2): the global views at full resolution, then ``local_crops``
    low-resolution views that cover small parts of the image (SwAV: 2 x 224 with scale
    (0.14, 1) + 6 x 96 with scale (0.05, 0.14)).

    A local view is ``local_from`` (default: the first global view) with ``local_size`` and
    ``local_scale``; its blur kernel follows its own size. Globals come first, so a method
    finds them at ``views[:len(global_views)]``.
    """
    local = dataclasses.replace(local_from or global_views[0], size=local_size, scale=local_scale)
    return list(global_views) + [local] * local_crops
