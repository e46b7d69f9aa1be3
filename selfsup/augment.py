"""Batched, on-device image augmentation for contrastive learning.

Every transform here acts on a whole batch at once with per-sample random
parameters drawn from an explicit ``torch.Generator``: there is no Python loop
over images and no host synchronisation, so the data path runs at device speed
on CPU or CUDA and seeded runs are reproducible.

The SimCLR recipe (Chen et al. 2020, Sec. 3 and Appendix A) is::

    random resized crop + horizontal flip    -> one bilinear resampling
    colour jitter (p=0.8, random op order)   -> brightness/contrast/saturation/hue
    random grayscale (p=0.2)
    Gaussian blur (p=0.5, kernel 10% of size)
    [solarize, used by BYOL's second view]
    normalise                                -> float32 (B, 3, S, S), channels_last

Building blocks take float images ``(B, 3, H, W)`` in ``[0, 1]`` and
per-sample parameter tensors of shape ``(B,)`` so that other recipes (BYOL's
asymmetric views, multi-crop) can be composed from them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "BRIGHTNESS",
    "CONTRAST",
    "SATURATION",
    "HUE",
    "ViewConfig",
    "simclr_view",
    "crop_flip_view",
    "byol_view",
    "multi_crop_views",
    "Augment",
    "eval_view",
    "JitterParams",
    "sample_crop_boxes",
    "boxes_to_theta",
    "resized_crop",
    "random_resized_crop_flip",
    "rgb_to_grayscale",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "adjust_hue",
    "sample_jitter_params",
    "apply_color_jitter",
    "color_jitter",
    "random_grayscale",
    "blur_kernel_size",
    "gaussian_kernels",
    "gaussian_blur",
    "random_gaussian_blur",
    "solarize",
    "random_solarize",
    "normalize",
    "to_float_nchw",
]

# ITU-R BT.601 luma weights, the ones torchvision's grayscale uses.
_LUMA = (0.299, 0.587, 0.114)

# Colour-jitter op codes; a sample's op order is a permutation of these.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3

# Candidates tried per sample before falling back to the central crop; the
# reference RandomResizedCrop retries 10 times.
_CROP_TRIES = 10


# --------------------------------------------------------------------------- config


@dataclass
class ViewConfig:
    """One view's recipe. Probabilities are per sample."""

    size: int = 32
    scale: tuple[float, float] = (0.08, 1.0)  # random-resized-crop area fraction
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio range (log-uniform)
    flip_p: float = 0.5
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
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
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


# --------------------------------------------------------------------------- helpers


def _bernoulli(n: int, p: float, generator: torch.Generator | None, device: torch.device) -> Tensor:
    # rand < p gives exactly never for p=0 and always for p=1.
    return torch.rand(n, generator=generator, device=device) < p  # (B,) bool


def _per_sample(v: Tensor | float) -> Tensor | float:
    """Reshape a (B,) parameter so that it broadcasts against (B, C, H, W)."""
    return v.view(-1, 1, 1, 1) if isinstance(v, Tensor) else v


def _factor_range(v: float | tuple[float, float]) -> tuple[float, float]:
    # torchvision semantics: a scalar v means factors in [max(0, 1 - v), 1 + v].
    if isinstance(v, (tuple, list)):
        return float(v[0]), float(v[1])
    return max(0.0, 1.0 - v), 1.0 + v


@functools.lru_cache(maxsize=32)
def _norm_consts(
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
    scale, shift = _norm_consts(tuple(map(float, mean)), tuple(map(float, std)), x.device)
    out = torch.empty_like(x, memory_format=torch.channels_last)
    # One fused pass that also produces the layout the model wants.
    return torch.addcmul(shift, x, scale, out=out)  # (B, 3, H, W)


# --------------------------------------------------------------------------- crop + flip


def sample_crop_boxes(
    batch: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Random-resized-crop boxes (Szegedy et al. 2015; SimCLR Appendix A), vectorised.

    Returns float32 (B, 4) boxes ``(x0, y0, w, h)`` in source pixels, integer-valued.
    Each sample draws ``_CROP_TRIES`` candidates at once (area fraction uniform in
    ``scale``, aspect log-uniform in ``ratio``) and keeps the first that fits; samples
    with none fall back to the central crop with the aspect clamped to ``ratio``.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    area = float(height * width)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])

    u = torch.rand((batch, _CROP_TRIES, 2), generator=generator, device=device)
    target = area * (u[..., 0] * (scale[1] - scale[0]) + scale[0])  # (B, T) pixels^2
    aspect = torch.exp(u[..., 1] * (log_hi - log_lo) + log_lo)  # (B, T)
    w = torch.round(torch.sqrt(target * aspect))  # (B, T)
    h = torch.round(torch.sqrt(target / aspect))  # (B, T)
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # (B, T)

    # argmax returns the first maximal index, i.e. the first valid try.
    first = valid.to(torch.uint8).argmax(dim=1, keepdim=True)  # (B, 1)
    any_valid = valid.any(dim=1)  # (B,)
    w = w.gather(1, first).squeeze(1)  # (B,)
    h = h.gather(1, first).squeeze(1)  # (B,)

    # Fallback: the whole image with its aspect clamped into the ratio range.
    # Shapes are Python ints, so this costs no device work.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fw, fh = int(round(height * ratio[1])), height
    else:
        fw, fh = width, height
    w = torch.where(any_valid, w, float(fw))
    h = torch.where(any_valid, h, float(fh))

    # Integer offset uniform over all positions where the box fits; the fallback is centred.
    pos = torch.rand((batch, 2), generator=generator, device=device)  # (B, 2)
    x0 = torch.minimum(torch.floor(pos[:, 0] * (width - w + 1)), width - w)
    y0 = torch.minimum(torch.floor(pos[:, 1] * (height - h + 1)), height - h)
    x0 = torch.where(any_valid, x0, float((width - fw) // 2))
    y0 = torch.where(any_valid, y0, float((height - fh) // 2))
    return torch.stack([x0, y0, w, h], dim=1)  # (B, 4)


def boxes_to_theta(boxes: Tensor, height: int, width: int, flip: Tensor | None = None) -> Tensor:
    """Affine matrices (B, 2, 3) for ``F.affine_grid(align_corners=False)`` that map the
    output square onto each crop box, mirrored in x where ``flip`` is set.

    With ``align_corners=False`` normalised coordinates refer to pixel *edges*, so a box
    ``[x0, x0 + w]`` maps to ``x_src = (w / W) * x_out + (2 x0 + w) / W - 1`` and the full
    box is exactly the identity: output pixel centres land on source pixel centres.
    Mirroring negates the x scale about the box centre.
    """
    x0, y0, w, h = boxes.unbind(1)  # (B,) each
    sx = w / width
    if flip is not None:
        sx = torch.where(flip, -sx, sx)
    zero = torch.zeros_like(sx)
    row_x = torch.stack([sx, zero, (2 * x0 + w) / width - 1], dim=1)  # (B, 3)
    row_y = torch.stack([zero, h / height, (2 * y0 + h) / height - 1], dim=1)  # (B, 3)
    return torch.stack([row_x, row_y], dim=1)  # (B, 2, 3)


def resized_crop(x: Tensor, boxes: Tensor, size: int, flip: Tensor | None = None) -> Tensor:
    """Crop each image to its box, resize to (size, size) and optionally mirror, all in a
    single bilinear ``grid_sample`` (float (B, C, H, W) -> (B, C, size, size)).

    No antialiasing: shrinking a large crop aliases a little, which is harmless at
    CIFAR/STL scale and costs nothing; the random crop is itself a strong perturbation.
    """
    b, c, height, width = x.shape
    theta = boxes_to_theta(boxes.to(x.dtype), height, width, flip)  # (B, 2, 3)
    grid = F.affine_grid(theta, [b, c, size, size], align_corners=False)  # (B, S, S, 2)
    # Boxes lie inside the image, but upsampling puts the outermost sample points up to half
    # a source pixel beyond the outer pixel centres; "border" clamps there (as a resize
    # does) instead of blending in zeros.
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_resized_crop_flip(
    images: Tensor,
    size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_p: float = 0.5,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Random resized crop + horizontal flip in one resampling step (SimCLR Appendix A).

    uint8 (B, H, W, 3) -> float32 (B, 3, size, size) in [0, 1].
    """
    b, height, width, _ = images.shape
    boxes = sample_crop_boxes(b, height, width, scale, ratio, generator, images.device)  # (B, 4)
    flip = _bernoulli(b, flip_p, generator, images.device) if flip_p > 0 else None  # (B,)
    x = resized_crop(to_float_nchw(images), boxes, size, flip)  # (B, 3, S, S) in [0, 255]
    # Scaling after the resample touches S*S rather than H*W pixels per image.
    return x.mul_(1.0 / 255.0)


# --------------------------------------------------------------------------- colour


def rgb_to_grayscale(x: Tensor) -> Tensor:
    """Luma (ITU-R BT.601): (B, 3, H, W) -> (B, 1, H, W)."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return (r * _LUMA[0]).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2])  # (B, 1, H, W)


def _as_factor(factor: Tensor | float, x: Tensor) -> Tensor:
    """A scalar or (B,) factor as a (B or 1, 1, 1, 1) tensor on x's device."""
    if not isinstance(factor, Tensor):
        # full() fills on the device; torch.tensor() would be a host->device copy.
        factor = torch.full((1,), float(factor), dtype=x.dtype, device=x.device)
    return factor.to(x.dtype).view(-1, 1, 1, 1)


def _blend(x: Tensor, ref: Tensor | None, factor: Tensor | float) -> Tensor:
    """clamp(f * x + (1 - f) * ref, 0, 1), torchvision's blend for float images; ref None is 0.

    Written as f * x + ((1 - f) * ref) so that f = 1 returns x bit-exactly.
    """
    f = _as_factor(factor, x)  # (B, 1, 1, 1)
    out = x * f
    if ref is not None:
        out.add_(ref * (1.0 - f))  # ref is (B, 1, ...): the small operand carries the product
    return out.clamp_(0.0, 1.0)


def adjust_brightness(x: Tensor, factor: Tensor | float) -> Tensor:
    """Multiply by ``factor`` (B,), then clamp."""
    return _blend(x, None, factor)


def adjust_contrast(x: Tensor, factor: Tensor | float) -> Tensor:
    """Blend with each image's mean luma by ``factor`` (B,), then clamp."""
    mean = rgb_to_grayscale(x).mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    return _blend(x, mean, factor)


def adjust_saturation(x: Tensor, factor: Tensor | float) -> Tensor:
    """Blend with the image's own grayscale by ``factor`` (B,), then clamp."""
    return _blend(x, rgb_to_grayscale(x), factor)


def adjust_hue(x: Tensor, shift: Tensor | float) -> Tensor:
    """Rotate hue in HSV space by ``shift`` (B,) turns, keeping S and V (torchvision semantics).

    Value (max) and chroma (max - min) are unchanged by the rotation, so only the hue angle
    is computed, and the way back is the closed form ``c = V - C * ramp(H + offset_c)``
    with a triangular ramp per channel instead of a six-way sector switch.

    Everything is plain float arithmetic: on CPU, per-pixel bool masks and ``where`` cost
    several times more than the arithmetic they would replace.
    """
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]  # (B, 1, H, W) each
    # In-place chains below keep fresh allocations (page faults on CPU) to a minimum.
    vmax = x.amax(dim=1, keepdim=True)  # (B, 1, H, W)
    chroma = x.amin(dim=1, keepdim=True).neg_().add_(vmax)
    # One-hot of the max channel, R winning ties, then G: sign() of a difference that is
    # never positive is exactly 0 at the max and -1 elsewhere.
    is_r = (r - vmax).sign_().add_(1.0)
    is_g = (g - vmax).sign_().add_(1.0)
    is_g.addcmul_(is_g, is_r, value=-1.0)  # G counts only where R is not the max
    # Hue in sixths of a turn: (g - b) / C, 2 + (b - r) / C or 4 + (r - g) / C by max
    # channel; the products with a 0/1 one-hot select exactly.
    num = (g - b).mul_(is_r)
    num.addcmul_((b - r).add_(chroma, alpha=2.0), is_g)
    is_b = is_r.add_(is_g).neg_().add_(1.0)
    num.addcmul_((r - g).add_(chroma, alpha=4.0), is_b)
    # Gray pixels (C = 0) have num = 0 exactly, hence hue 0; the floor only avoids 0 / 0.
    hue6 = num.div_(chroma.clamp(min=1e-12)).add_(_as_factor(shift, x), alpha=6.0)
    hue6.sub_((hue6 + 3.0).div_(6.0).floor_().mul_(6.0))  # wrap into [-3, 3)
    # a = hue relative to the hue opposite each channel (R, G, B sit at 0, 2, 4 sixths, so
    # the offsets are 3, 1, -1) with |a| <= 6, where 3 - |3 - |a|| is the distance around
    # the circle. The ramp is 1 within one sixth of the opposite hue (channel = min), 0
    # from two sixths away (channel = max) and linear in between.
    offset = (3.0 - 2.0 * torch.arange(3, dtype=x.dtype, device=x.device)).view(1, 3, 1, 1)
    out = (hue6 + offset).abs_()  # (B, 3, H, W), in [0, 6]
    out.sub_(3.0).abs_().sub_(1.0).clamp_(0.0, 1.0)  # ramp = clamp(2 - distance, 0, 1)
    return out.mul_(chroma).sub_(vmax).neg_().clamp_(0.0, 1.0)  # V - C * ramp, (B, 3, H, W)


class JitterParams(NamedTuple):
    """Per-sample colour-jitter parameters; unused ops hold their identity value."""

    apply: Tensor  # (B,) bool: whether the sample is jittered at all
    brightness: Tensor  # (B,) multiplicative factor
    contrast: Tensor  # (B,) blend factor
    saturation: Tensor  # (B,) blend factor
    hue: Tensor  # (B,) shift in turns
    order: Tensor  # (B, 4) int64 permutation of (BRIGHTNESS, CONTRAST, SATURATION, HUE)


def sample_jitter_params(
    batch: int,
    p: float,
    brightness: float | tuple[float, float],
    contrast: float | tuple[float, float],
    saturation: float | tuple[float, float],
    hue: float | tuple[float, float],
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> JitterParams:
    """Draw ColorJitter parameters for a batch; each sample gets its own random op order."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    u = torch.rand((batch, 9), generator=generator, device=device)  # one draw for all params
    apply = u[:, 0] < p
    ranges = [_factor_range(brightness), _factor_range(contrast), _factor_range(saturation)]
    hue_lo, hue_hi = (float(hue[0]), float(hue[1])) if isinstance(hue, (tuple, list)) else (-hue, hue)
    ranges.append((hue_lo, hue_hi))
    values = [u[:, 1 + i] * (hi - lo) + lo for i, (lo, hi) in enumerate(ranges)]
    # Sorting i.i.d. uniforms gives a uniformly random permutation per row.
    order = torch.argsort(u[:, 5:9], dim=1)  # (B, 4)
    return JitterParams(apply, *values, order=order)


def _blend_slot_(x: Tensor, op: Tensor, factors: Tensor, active: Tensor) -> Tensor:
    """In place, per sample, one of brightness/contrast/saturation (op code (B,)) with its
    factor from ``factors`` (B, 3); inactive samples get factor 1, i.e. stay bit-exact.

    All three ops are ``blend(x, ref, f)`` and differ only in ``ref`` (0, mean luma, luma),
    so one pass serves a batch that mixes them: ``(1 - f) * ref`` is built from per-sample
    weights on the luma plane and its mean.
    """
    f = factors.gather(1, op.unsqueeze(1)).squeeze(1)  # (B,)
    f = torch.where(active, f, torch.ones_like(f)).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    keep = 1.0 - f
    w_gray = (op == SATURATION).to(x.dtype).view(-1, 1, 1, 1) * keep  # (B, 1, 1, 1)
    w_mean = (op == CONTRAST).to(x.dtype).view(-1, 1, 1, 1) * keep
    gray = rgb_to_grayscale(x)  # (B, 1, H, W)
    mean = gray.mean(dim=(2, 3), keepdim=True)  # (B, 1, 1, 1)
    base = gray.mul_(w_gray).add_(mean * w_mean)  # (B, 1, H, W) = (1 - f) * ref
    return x.mul_(f).add_(base).clamp_(0.0, 1.0)  # (B, 3, H, W)


def apply_color_jitter(x: Tensor, params: JitterParams, with_hue: bool = True) -> Tensor:
    """Apply sampled jitter, each sample in its own op order (SimCLR Appendix A).

    Rather than evaluating all four ops at each of the four positions, the ops are
    arranged around a single hue step: brightness, contrast and saturation are all blends
    and share one "slot" kernel, so three slots before hue and three after cover every
    order (a sample uses the slots for the ops it has before / after hue; the others leave
    it untouched). The costly HSV rotation then runs once per batch, not four times.

    ``with_hue=False`` skips the rotation (for when every shift is 0): only the relative
    order of the blends matters then, and three slots suffice.
    """
    factors = torch.stack([params.brightness, params.contrast, params.saturation], dim=1)  # (B, 3)
    is_hue = params.order == HUE  # (B, 4)
    hue_pos = is_hue.to(torch.uint8).argmax(dim=1)  # (B,) position of hue in each order
    # The blends in their drawn order: a stable sort moves hue to the end without a host
    # sync (boolean-mask indexing would need the count on the host).
    moved = torch.sort(is_hue.to(torch.uint8), dim=1, stable=True).indices  # (B, 4)
    blend_ops = params.order.gather(1, moved)[:, :3]  # (B, 3)

    active = params.apply  # (B,)
    out = x.clone()  # the slots work in place on this one buffer
    if with_hue:
        for slot in range(3):  # blends drawn before hue
            _blend_slot_(out, blend_ops[:, slot], factors, active & (slot < hue_pos))
        out = adjust_hue(out, torch.where(active, params.hue, torch.zeros_like(params.hue)))
        for slot in range(3):  # blends drawn after hue
            _blend_slot_(out, blend_ops[:, slot], factors, active & (slot >= hue_pos))
    else:
        for slot in range(3):
            _blend_slot_(out, blend_ops[:, slot], factors, active)
    # A zero hue shift is the identity only up to rounding; put unselected samples back
    # exactly (lerp with weight 1 returns x bit for bit, with weight 0 leaves out alone).
    return out.lerp_(x, _per_sample((~active).to(x.dtype)))  # (B, 3, H, W)


def color_jitter(
    x: Tensor,
    p: float,
    brightness: float | tuple[float, float],
    contrast: float | tuple[float, float],
    saturation: float | tuple[float, float],
    hue: float | tuple[float, float],
    generator: torch.Generator | None = None,
) -> Tensor:
    """torchvision-style ColorJitter applied with probability ``p`` per sample, with a
    per-sample random order of the four ops (SimCLR Appendix A)."""
    params = sample_jitter_params(x.shape[0], p, brightness, contrast, saturation, hue, generator, x.device)
    no_hue = all(v == 0 for v in (hue if isinstance(hue, (tuple, list)) else (hue,)))
    return apply_color_jitter(x, params, with_hue=not no_hue)


def random_grayscale(x: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Replace each sample by its luma, replicated to 3 channels, with probability ``p``."""
    mask = _bernoulli(x.shape[0], p, generator, x.device)  # (B,)
    return torch.where(_per_sample(mask), rgb_to_grayscale(x), x)  # (B, 3, H, W)


# --------------------------------------------------------------------------- blur, solarize


def blur_kernel_size(size: int, frac: float = 0.1) -> int:
    """SimCLR's kernel: ``frac`` of the image side, made odd, at least 3 (224 -> 23)."""
    k = int(round(frac * size))
    k += 1 - k % 2
    return max(k, 3)


def gaussian_kernels(sigma: Tensor, kernel_size: int) -> Tensor:
    """Normalised 1-D Gaussians (B, k), one per sample. sigma 0 gives a unit impulse."""
    half = kernel_size // 2
    t = torch.arange(-half, half + 1, dtype=sigma.dtype, device=sigma.device)  # (k,)
    # A tiny floor turns sigma=0 into an exact delta (exp underflows to 0 off-centre)
    # rather than 0/0.
    s = sigma.clamp(min=1e-3).unsqueeze(1)  # (B, 1)
    kern = torch.exp(-(t * t) / (2.0 * s * s))  # (B, k)
    return kern / kern.sum(dim=1, keepdim=True)


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Separable Gaussian blur with a per-sample ``sigma`` (B,), reflect padding.

    The batch is folded into channels so a grouped convolution applies each sample's own
    kernel in one call per axis.
    """
    b, c, h, w = x.shape
    if kernel_size % 2 != 1:
        raise ValueError(f"kernel_size must be odd, got {kernel_size}")
    half = kernel_size // 2
    kern = gaussian_kernels(sigma.to(x.dtype), kernel_size).repeat_interleave(c, dim=0)  # (B*C, k)
    # Padding both axes up front equals padding before each pass (the horizontal pass acts
    # on rows independently, and vertical reflection only permutes rows) and saves a copy.
    y = F.pad(x.reshape(1, b * c, h, w), (half, half, half, half), mode="reflect")  # (1, B*C, H+2p, W+2p)
    y = F.conv2d(y, kern.view(b * c, 1, 1, kernel_size), groups=b * c)  # (1, B*C, H+2p, W)
    y = F.conv2d(y, kern.view(b * c, 1, kernel_size, 1), groups=b * c)  # (1, B*C, H, W)
    return y.view(b, c, h, w)


def random_gaussian_blur(
    x: Tensor,
    p: float,
    sigma: tuple[float, float] = (0.1, 2.0),
    kernel_size: int = 3,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Blur each sample with probability ``p``, sigma ~ U[sigma] (SimCLR Appendix A).

    Unselected samples get sigma 0, an exact identity kernel, so no select is needed.
    """
    u = torch.rand((x.shape[0], 2), generator=generator, device=x.device)  # (B, 2)
    s = u[:, 0] * (sigma[1] - sigma[0]) + sigma[0]
    s = torch.where(u[:, 1] < p, s, torch.zeros_like(s))  # (B,)
    return gaussian_blur(x, s, kernel_size)


def solarize(x: Tensor, threshold: Tensor | float = 0.5, mask: Tensor | None = None) -> Tensor:
    """Invert pixels at or above ``threshold`` (BYOL Appendix B); ``mask`` (B,) selects samples."""
    # below = 1.0 where x < threshold else 0.0, from sign() rather than a bool mask and a
    # per-pixel where(), which is several times slower on CPU; lerp is exact at 0 and 1.
    below = (_per_sample(threshold) - x).sign_().clamp_(min=0.0)
    out = (1.0 - x).lerp_(x, below)
    if mask is not None:
        out = torch.where(_per_sample(mask), out, x)
    return out


def random_solarize(x: Tensor, p: float, threshold: float = 0.5, generator: torch.Generator | None = None) -> Tensor:
    """Solarize each sample with probability ``p``."""
    return solarize(x, threshold, _bernoulli(x.shape[0], p, generator, x.device))


# --------------------------------------------------------------------------- pipelines


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
    scale, shift = _norm_consts(tuple(map(float, mean)), tuple(map(float, std)), x.device, 1.0 / 255.0)
    out = torch.empty_like(x, memory_format=torch.channels_last)
    return torch.addcmul(shift, x, scale, out=out)  # (B, 3, S, S)
