"""Collapse monitors that every method shares, computed on the pooled backbone features (what a
user keeps), not on a method's embedding: SimSiam's embedding ends in BN without affine, so any
collapse of it, rank 1 included, still has unit variance per dimension and its normalised
per-dimension std reads 1/√D, the "perfect spread" (issue 13).

- :func:`feature_std`: mean per-dimension std of the L2-normalised features (the spread
  monitor of SimSiam §4.1 / Fig. 2, here on the backbone): ≈ 0 when every image maps to the
  same direction. For spread-out zero-mean features it is ≈ 1/√D; ReLU features share a large
  common mean direction, so a healthy backbone reads √(1 - mean cosine) / √D, below 1/√D.
- :func:`effective_rank`: RankMe (Garrido et al., 2023, eq. 1), the effective rank of Roy &
  Vetterli (2007): exp of the entropy of the singular values normalised to sum 1,
  p_k = σ_k / ‖σ‖₁ + ε. 1 for a rank-1 (or constant) feature matrix, D for D equal singular
  values. Computed, as RankMe, on the *un-centred* features: centring would turn "one constant
  vector plus tiny noise" (a collapse) into the full rank of the noise.
- :func:`alignment` and :func:`uniformity` (Wang & Isola, 2020, eqs. 4 and 5) of the
  L2-normalised features: how far two augmented views of one image land from each other (0:
  invariant; 4: opposite), and how evenly the images spread over the sphere (log of the mean
  Gaussian potential over pairs, t = 2: 0 when every image maps to one point, about -4 for a
  well spread 128-D embedding of a few thousand images). Neither needs labels.
- :func:`code_entropy`: mean entropy of soft assignments (SwAV's Sinkhorn codes); ln K for
  uniform codes, SwAV's collapse to uniform codes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

#: Below this effective rank the features span (almost) one or two directions: collapsed. A
#: rank-1 or constant matrix reads 1.0, a lr-too-high SimSiam run on digits 1.2-2.0; healthy
#: random-init and trained backbones read 12-17 of D = 64 and 24-85 of D = 128 (measured on
#: digits, see docs/results.md).
COLLAPSED_RANK = 3.0
#: Below this fraction of 1/√D the normalised features barely vary between images: collapsed.
#: Identical features read 0, the lr-too-high SimSiam run 0.003-0.03; healthy backbones read
#: 0.14-0.47 (measured on digits). Feature std alone misses a rank-1 matrix whose scale changes
#: sign (normalised rows ±c look spread out), which the effective rank sees.
COLLAPSED_STD_FRACTION = 0.02
#: A loss (or code entropy) within this fraction of its chance value (ln K, ...) is "at chance".
CHANCE_TOLERANCE = 0.01


@torch.no_grad()
def feature_std(features: Tensor) -> float:
    """Mean over dimensions of the std over samples of the L2-normalised ``features`` (N, D)."""
    z = F.normalize(features.float(), dim=1)  # (N, D)
    return z.std(0).mean().item()


@torch.no_grad()
def effective_rank(features: Tensor, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al., 2023): exp(-Σ_k p_k log p_k), p_k = σ_k / ‖σ‖₁ + ε, with σ the
    singular values of the un-centred ``features`` (N, D). In [1, min(N, D)]."""
    sigma = torch.linalg.svdvals(features.double())  # (min(N, D),)
    p = sigma / sigma.sum().clamp_min(1e-300) + eps
    return math.exp(-(p * p.log()).sum().item())


@torch.no_grad()
def alignment(z1: Tensor, z2: Tensor, alpha: float = 2.0) -> float:
    """L_align (Wang & Isola, 2020, eq. 4): E ||f(x) - f(x+)||^α over positive pairs, rows of
    the (N, D) features of two views of the same N images, L2-normalised here."""
    return (F.normalize(z1.float(), dim=1) - F.normalize(z2.float(), dim=1)).norm(dim=1).pow(alpha).mean().item()


@torch.no_grad()
def uniformity(features: Tensor, t: float = 2.0) -> float:
    """L_uniform (Wang & Isola, 2020, eq. 5): log E exp(-t ||f(x) - f(y)||²) over the pairs of
    distinct rows of ``features`` (N, D), L2-normalised here. In [-4t, 0]; 0 when collapsed."""
    z = F.normalize(features.double(), dim=1)  # (N, D)
    sq = torch.pdist(z).pow(2)  # (N(N-1)/2,)
    return (torch.logsumexp(-t * sq, dim=0) - math.log(len(sq))).item()


def code_entropy(codes: Tensor) -> Tensor:
    """Mean over samples of the entropy (nats) of each row of ``codes`` (N, K), rows summing to 1.
    Uniform rows give ln K, one-hot rows 0. Returns a 0-dim tensor (no host read)."""
    q = codes.float()
    return -(q * q.clamp_min(1e-30).log()).sum(1).mean()


def collapse_warning(std: float, rank: float, dim: int) -> str | None:
    """The reason the backbone looks collapsed, or None when it does not."""
    reasons = []
    if rank < COLLAPSED_RANK:
        reasons.append(f"effective rank {rank:.2f} < {COLLAPSED_RANK:g}")
    if std < COLLAPSED_STD_FRACTION / math.sqrt(dim):
        reasons.append(f"feature std {std:.2e} < {COLLAPSED_STD_FRACTION:g}/√D = "
                       f"{COLLAPSED_STD_FRACTION / math.sqrt(dim):.2e}")
    return ", ".join(reasons) or None
