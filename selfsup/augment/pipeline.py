"""Applying a view: ``Augment`` turns a uint8 batch into one normalised random view.

``Augment(cfg)(images, generator)`` runs the ops of :mod:`.crop`, :mod:`.color` and
:mod:`.filters` in SimCLR's order as its ``ViewConfig`` says; ``eval_view`` is the deterministic
view for evaluation.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from .batch import normalize, normalize_constants, to_float_nchw
from .color import JITTER_DRAWS, apply_color_jitter, grayscale, has_hue, jitter_params
from .crop import CROP_DRAWS, ROT90_DRAWS, crop_boxes, quarter_turns, resized_crop
from .filters import BLUR_DRAWS, blur_sigmas, blur_kernel_size, gaussian_blur, solarize
from .views import ViewConfig

__all__ = ["Augment", "eval_view"]


class Augment(torch.nn.Module):
    """One view of a contrastive pair (SimCLR Sec. 3, Appendix A), batched on device.

    uint8 (B, H, W, 3) -> float32 (B, 3, S, S), normalised, channels_last, same device.
    Op order: crop + flips + quarter turn (one resampling), colour jitter, grayscale, blur,
    solarize, normalise.
    Call as ``aug(images, generator)``; the generator must live on ``images.device``
    (``None`` uses the global RNG).

    A call is two parts: :meth:`draw` takes every random number of the view from the generator
    in one eager call, and :meth:`apply` is a pure function of (images, those numbers) that a
    compiler can fuse into a few kernels (:meth:`compile_apply`). On the CPU the numbers are exactly the
    ones the ops would draw one after another (the uniforms come out of the generator in the same
    order), so a seeded view is bit-identical to drawing op by op. Ops whose probability is 0 are
    skipped, so they neither cost time nor consume random numbers.
    """

    def __init__(self, cfg: ViewConfig):
        super().__init__()
        self.cfg = cfg
        self.kernel_size = blur_kernel_size(cfg.size, cfg.blur_kernel_frac)
        self.with_hue = has_hue(cfg.hue)
        # (op, uniforms per sample) in the order the ops consume them; branches on the static config only
        draws = [("crop_tries", CROP_DRAWS[0]), ("crop_pos", CROP_DRAWS[1])]
        draws += [("flip", 1)] if cfg.flip_p > 0 else []
        draws += [("jitter", JITTER_DRAWS)] if cfg.jitter_p > 0 else []
        draws += [("grayscale", 1)] if cfg.grayscale_p > 0 else []
        draws += [("blur", BLUR_DRAWS)] if cfg.blur_p > 0 else []
        draws += [("solarize", 1)] if cfg.solarize_p > 0 else []
        # issue 25's ops draw after the others (each recipe without them draws exactly as before),
        # though they act in the crop's resampling
        draws += [("vflip", 1)] if cfg.vflip_p > 0 else []
        draws += [("rot90", ROT90_DRAWS)] if cfg.rot90_p > 0 else []
        self.draws = draws
        self.per_sample = sum(n for _, n in draws)
        self.compiled = None  # apply, compiled (:meth:`compile_apply`)

    def draw(self, batch: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
        """Every uniform the view of a batch uses, in one call: (B * per_sample,)."""
        return torch.rand(batch * self.per_sample, generator=generator, device=device)

    def apply(self, images: Tensor, u: Tensor) -> Tensor:
        """The view of ``images`` (B, H, W, 3) uint8 made with the uniforms ``u`` of :meth:`draw`:
        a pure function, (B, 3, S, S) float32 channels_last."""
        cfg = self.cfg
        b, height, width, _ = images.shape
        # op by op, as they were drawn: each op's block is (B, n) in the flat stream
        r = dict(zip([name for name, _ in self.draws], u.split([b * n for _, n in self.draws])))
        boxes = crop_boxes(r["crop_tries"].view(b, -1, 2), r["crop_pos"].view(b, 2), height, width,
                           cfg.scale, cfg.ratio)  # (B, 4)
        flip = r["flip"] < cfg.flip_p if "flip" in r else None  # (B,)
        vflip = r["vflip"] < cfg.vflip_p if "vflip" in r else None  # (B,)
        turns = quarter_turns(r["rot90"].view(b, ROT90_DRAWS), cfg.rot90_p) if "rot90" in r else None  # (B,)
        x = resized_crop(to_float_nchw(images), boxes, cfg.size, flip, vflip, turns).mul_(1.0 / 255.0)  # (B, 3, S, S)
        if "jitter" in r:
            params = jitter_params(r["jitter"].view(b, JITTER_DRAWS), cfg.jitter_p, cfg.brightness, cfg.contrast,
                                   cfg.saturation, cfg.hue)
            x = apply_color_jitter(x, params, with_hue=self.with_hue)
        if "grayscale" in r:
            x = grayscale(x, r["grayscale"] < cfg.grayscale_p)
        if "blur" in r:
            x = gaussian_blur(x, blur_sigmas(r["blur"].view(b, BLUR_DRAWS), cfg.blur_p, cfg.blur_sigma),
                              self.kernel_size)
        if "solarize" in r:
            x = solarize(x, cfg.solarize_threshold, r["solarize"] < cfg.solarize_p)
        return normalize(x, cfg.mean, cfg.std)  # (B, 3, S, S) channels_last

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        u = self.draw(len(images), generator, images.device)  # eager: the generator's state moves here
        return self.apply(images, u) if self.compiled is None else self.compiled(self, images, u)

    def compile_apply(self, mode: str = "default") -> Augment:
        """Compile :meth:`apply` (``torch.compile`` ``mode``); drawing stays eager. Returns self."""
        self.compiled = compiled_apply(mode)
        return self

    def extra_repr(self) -> str:
        return repr(self.cfg)


@functools.cache
def compiled_apply(mode: str):
    """:meth:`Augment.apply` compiled once per process and mode: every view shares it, and views
    of equal settings and batch share its compiled graphs (Dynamo guards on the settings'
    values), so a multi-crop recipe compiles once per kind of view, not once per crop."""
    return torch.compile(Augment.apply, mode=mode, dynamic=False)


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
