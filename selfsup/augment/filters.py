"""Gaussian blur (SimCLR Appendix A) and solarisation (BYOL Appendix B), per sample.

Both act on float ``(B, 3, H, W)`` in ``[0, 1]``; a sample that is not selected passes through
bit for bit (blur with sigma 0 is an exact identity kernel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .batch import bernoulli_mask, per_sample

__all__ = ["BLUR_DRAWS", "blur_kernel_size", "blur_sigmas", "gaussian_kernels", "gaussian_blur",
           "random_gaussian_blur", "solarize", "random_solarize"]

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
    u = torch.rand((x.shape[0], BLUR_DRAWS), generator=generator, device=x.device)  # (B, 2)
    return gaussian_blur(x, blur_sigmas(u, p, sigma), kernel_size)


#: Uniforms a random blur draws per sample: its sigma, then whether it applies.
BLUR_DRAWS = 2


def blur_sigmas(u: Tensor, p: float, sigma: tuple[float, float]) -> Tensor:
    """Each sample's sigma from the uniforms ``u`` (B, 2) of :func:`random_gaussian_blur`:
    U[sigma] with probability ``p``, else 0 (an exact identity kernel). (B,)"""
    s = u[:, 0] * (sigma[1] - sigma[0]) + sigma[0]
    return torch.where(u[:, 1] < p, s, torch.zeros_like(s))  # (B,)


def solarize(x: Tensor, threshold: Tensor | float = 0.5, mask: Tensor | None = None) -> Tensor:
    """Invert pixels at or above ``threshold`` (BYOL Appendix B); ``mask`` (B,) selects samples."""
    # below = 1.0 where x < threshold else 0.0, from sign() rather than a bool mask and a
    # per-pixel where(), which is several times slower on CPU; lerp is exact at 0 and 1.
    below = (per_sample(threshold) - x).sign_().clamp_(min=0.0)
    out = (1.0 - x).lerp_(x, below)
    if mask is not None:
        out = torch.where(per_sample(mask), out, x)
    return out


def random_solarize(x: Tensor, p: float, threshold: float = 0.5, generator: torch.Generator | None = None) -> Tensor:
    """Solarize each sample with probability ``p``."""
    return solarize(x, threshold, bernoulli_mask(x.shape[0], p, generator, x.device))
