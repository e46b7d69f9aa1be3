"""Colour: torchvision-style ColorJitter with a per-sample random op order, and grayscale.

SimCLR (Appendix A) applies brightness, contrast, saturation and hue jitter with p=0.8 in a
random order per image, then grayscale with p=0.2; BYOL uses the same ops with other strengths.
All ops act on float ``(B, 3, H, W)`` in ``[0, 1]`` with per-sample ``(B,)`` parameters.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .batch import bernoulli_mask, per_sample

# ITU-R BT.601 luma weights, the ones torchvision's grayscale uses.
_LUMA = (0.299, 0.587, 0.114)

# Colour-jitter op codes; a sample's op order is a permutation of these.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3


def _factor_range(v: float | tuple[float, float]) -> tuple[float, float]:
    # torchvision semantics: a scalar v means factors in [max(0, 1 - v), 1 + v].
    if isinstance(v, (tuple, list)):
        return float(v[0]), float(v[1])
    return max(0.0, 1.0 - v), 1.0 + v


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


#: Uniforms colour jitter draws per sample: apply?, the four strengths, the four sort keys of the order.
JITTER_DRAWS = 9


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
    u = torch.rand((batch, JITTER_DRAWS), generator=generator, device=device)  # one draw for all params
    return jitter_params(u, p, brightness, contrast, saturation, hue)


def jitter_params(
    u: Tensor,
    p: float,
    brightness: float | tuple[float, float],
    contrast: float | tuple[float, float],
    saturation: float | tuple[float, float],
    hue: float | tuple[float, float],
) -> JitterParams:
    """The parameters of :func:`sample_jitter_params` from its uniforms ``u`` (B, 9): a pure function."""
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
    return out.lerp_(x, per_sample((~active).to(x.dtype)))  # (B, 3, H, W)


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
    return apply_color_jitter(x, params, with_hue=has_hue(hue))


def has_hue(hue: float | tuple[float, float]) -> bool:
    """Whether a jitter's hue range moves the hue at all (else its rotation is skipped)."""
    return any(v != 0 for v in (hue if isinstance(hue, (tuple, list)) else (hue,)))


def random_grayscale(x: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Replace each sample by its luma, replicated to 3 channels, with probability ``p``."""
    return grayscale(x, bernoulli_mask(x.shape[0], p, generator, x.device))


def grayscale(x: Tensor, mask: Tensor) -> Tensor:
    """Each sample of ``mask`` (B,) replaced by its luma, replicated to 3 channels."""
    return torch.where(per_sample(mask), rgb_to_grayscale(x), x)  # (B, 3, H, W)
