"""Random resized crop, flips and quarter turns, as one bilinear resampling of the batch.

The boxes are drawn as the reference RandomResizedCrop draws them (Szegedy et al. 2015; SimCLR
Appendix A), vectorised over the batch; :mod:`selfsup.stream` draws the boxes of its decoded
crops with :func:`sample_crop_boxes` too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .batch import bernoulli_mask, to_float_nchw

__all__ = ["CROP_DRAWS", "ROT90_DRAWS", "sample_crop_boxes", "crop_boxes", "quarter_turns", "boxes_to_theta",
           "resized_crop", "random_resized_crop_flip"]

# Candidates tried per sample before falling back to the central crop; the
# reference RandomResizedCrop retries 10 times.
_CROP_TRIES = 10


def sample_crop_boxes(
    batch: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Random-resized-crop boxes (Szegedy et al. 2015; SimCLR Appendix A), vectorised: the
    uniforms of :data:`CROP_DRAWS` drawn from ``generator``, then :func:`crop_boxes`.

    Returns float32 (B, 4) boxes ``(x0, y0, w, h)`` in source pixels, integer-valued.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    tries = torch.rand((batch, _CROP_TRIES, 2), generator=generator, device=device)  # (B, T, 2)
    pos = torch.rand((batch, 2), generator=generator, device=device)  # (B, 2)
    return crop_boxes(tries, pos, height, width, scale, ratio)


#: Uniforms a crop draws per sample, in the order they are drawn: the tries (area, aspect), then
#: the position.
CROP_DRAWS = (2 * _CROP_TRIES, 2)


def crop_boxes(
    tries: Tensor,
    pos: Tensor,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Tensor:
    """The boxes of :func:`sample_crop_boxes` from its uniforms: a pure function.

    ``tries`` (B, T, 2): per try, the area fraction (uniform in ``scale``) and the log-aspect
    (uniform in log ``ratio``); the first try that fits is kept, and samples with none fall back
    to the central crop with the aspect clamped to ``ratio``. ``pos`` (B, 2): the integer offset,
    uniform over all positions where the box fits. Returns float32 (B, 4) ``(x0, y0, w, h)``.
    """
    area = float(height * width)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    target = area * (tries[..., 0] * (scale[1] - scale[0]) + scale[0])  # (B, T) pixels^2
    aspect = torch.exp(tries[..., 1] * (log_hi - log_lo) + log_lo)  # (B, T)
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
    x0 = torch.minimum(torch.floor(pos[:, 0] * (width - w + 1)), width - w)
    y0 = torch.minimum(torch.floor(pos[:, 1] * (height - h + 1)), height - h)
    x0 = torch.where(any_valid, x0, float((width - fw) // 2))
    y0 = torch.where(any_valid, y0, float((height - fh) // 2))
    return torch.stack([x0, y0, w, h], dim=1)  # (B, 4)


#: Uniforms a random quarter turn draws per sample: whether it turns, then by how much.
ROT90_DRAWS = 2


def quarter_turns(u: Tensor, p: float) -> Tensor:
    """Each sample's counter-clockwise quarter turns from its uniforms ``u`` (B, 2): with
    probability ``p`` one of 1, 2, 3 (uniformly), else 0. (B,) int64, a pure function.

    ``p = 0.75`` makes the turn uniform over 0..3; with a horizontal flip of p 0.5 that is every
    symmetry of the square equally often (microscopy, satellite and medical images have no "up").
    """
    k = (u[:, 1] * 3).floor().clamp(max=2).long() + 1  # (B,) in {1, 2, 3}
    return torch.where(u[:, 0] < p, k, torch.zeros_like(k))


def boxes_to_theta(boxes: Tensor, height: int, width: int, flip: Tensor | None = None,
                   vflip: Tensor | None = None, turns: Tensor | None = None) -> Tensor:
    """Affine matrices (B, 2, 3) for ``F.affine_grid(align_corners=False)`` that map the
    output square onto each crop box, mirrored in x where ``flip`` is set, in y where ``vflip``
    is set, then turned by ``turns`` (B,) quarter turns counter-clockwise (as ``torch.rot90``).

    With ``align_corners=False`` normalised coordinates refer to pixel *edges*, so a box
    ``[x0, x0 + w]`` maps to ``x_src = (w / W) * x_out + (2 x0 + w) / W - 1`` and the full
    box is exactly the identity: output pixel centres land on source pixel centres.
    Mirroring negates the x scale about the box centre. On the square output a flip or turn is
    a sign or a swap of the output coordinates, ``p -> H V R^k p``, folded into the 2x2 part:
    no extra pass over the pixels.
    """
    x0, y0, w, h = boxes.unbind(1)  # (B,) each
    sx, sy = w / width, h / height  # (B,) each
    if flip is not None:
        sx = torch.where(flip, -sx, sx)
    zero = torch.zeros_like(sx)
    tx, ty = (2 * x0 + w) / width - 1, (2 * y0 + h) / height - 1  # (B,) each
    if vflip is None and turns is None:
        row_x = torch.stack([sx, zero, tx], dim=1)  # (B, 3)
        row_y = torch.stack([zero, sy, ty], dim=1)  # (B, 3)
        return torch.stack([row_x, row_y], dim=1)  # (B, 2, 3)
    if vflip is not None:
        sy = torch.where(vflip, -sy, sy)
    if turns is None:
        cos, sin = torch.ones_like(sx), zero
    else:
        # cos and sin of k quarter turns: exact 0 and +-1, so a turn only swaps and negates
        cos = (turns == 0).to(sx.dtype) - (turns == 2).to(sx.dtype)  # (B,)
        sin = (turns == 1).to(sx.dtype) - (turns == 3).to(sx.dtype)  # (B,)
    row_x = torch.stack([sx * cos, -(sx * sin), tx], dim=1)  # (B, 3)
    row_y = torch.stack([sy * sin, sy * cos, ty], dim=1)  # (B, 3)
    return torch.stack([row_x, row_y], dim=1)  # (B, 2, 3)


def resized_crop(x: Tensor, boxes: Tensor, size: int, flip: Tensor | None = None,
                 vflip: Tensor | None = None, turns: Tensor | None = None) -> Tensor:
    """Crop each image to its box, resize to (size, size) and optionally mirror (``flip`` in x,
    ``vflip`` in y, (B,) bool) and turn (``turns``, (B,) quarter turns), all in a single
    bilinear ``grid_sample`` (float (B, C, H, W) -> (B, C, size, size)).

    No antialiasing: shrinking a large crop aliases a little, which is harmless at
    CIFAR/STL scale and costs nothing; the random crop is itself a strong perturbation.
    """
    b, c, height, width = x.shape
    theta = boxes_to_theta(boxes.to(x.dtype), height, width, flip, vflip, turns)  # (B, 2, 3)
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
    flip = bernoulli_mask(b, flip_p, generator, images.device) if flip_p > 0 else None  # (B,)
    x = resized_crop(to_float_nchw(images), boxes, size, flip)  # (B, 3, S, S) in [0, 255]
    # Scaling after the resample touches S*S rather than H*W pixels per image.
    return x.mul_(1.0 / 255.0)
