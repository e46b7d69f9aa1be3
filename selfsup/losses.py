"""Self-supervised losses as pure functions of tensors.

Inputs are projections that are *not yet* normalised. Every loss computes in float32 (the
exponentials at low temperature are where bf16 goes wrong) and, when a process group exists,
takes its negatives from the global batch via a gather that keeps gradients.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from . import distributed as D


def float32(loss_fn):
    """Run a loss in float32 with autocast off: under bf16 autocast the similarity matmul would
    otherwise drop to bf16 (8 bits of mantissa), which low temperatures amplify."""
    @functools.wraps(loss_fn)
    def wrapper(*args, **kwargs):
        device = next(a.device.type for a in args if isinstance(a, Tensor))
        args = [a.float() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args]
        with torch.autocast(device_type=device, enabled=False):
            return loss_fn(*args, **kwargs)
    return wrapper


def _global_pairs(z1: Tensor, z2: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
    """Normalise two views and gather them across ranks.

    Returns the local anchors (2N, D), the global candidates (2M, D) laid out as
    [all view-1 ; all view-2], the index of each local anchor in the candidates (2N,),
    and M, the global batch size.
    """
    z1 = F.normalize(z1, dim=1)  # (N, D)
    z2 = F.normalize(z2, dim=1)  # (N, D)
    n = z1.shape[0]
    z1_all, z2_all = D.gather_with_grad(z1), D.gather_with_grad(z2)  # (M, D) each
    m = z1_all.shape[0]
    local = torch.arange(n, device=z1.device) + D.rank() * n  # this rank's rows in (M,)
    anchors = torch.cat([z1, z2])  # (2N, D)
    candidates = torch.cat([z1_all, z2_all])  # (2M, D)
    self_index = torch.cat([local, local + m])  # (2N,)
    return anchors, candidates, self_index, m


@float32
def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.5) -> Tensor:
    """NT-Xent, SimCLR eq. (1): mean over all 2N anchors of -log softmax of the positive.

    z1, z2: (N, D) projections of two views of the same N images. Each anchor's candidates are
    the other 2N-1 embeddings (2M-1 when distributed); cosine similarity / temperature; the
    self-similarity is excluded. Both directions (i->j and j->i) are included, and the value is
    the paper's L (the official TF code returns twice this: the sum of the two directions' means).
    """
    anchors, candidates, self_index, m = _global_pairs(z1, z2)
    logits = anchors @ candidates.T / temperature  # (2N, 2M)
    rows = torch.arange(len(anchors), device=logits.device)
    logits[rows, self_index] = float("-inf")  # an anchor is not its own candidate
    positive = (self_index + m) % (2 * m)  # view 1 of image i <-> view 2 of image i
    return F.cross_entropy(logits, positive)


#: Losses of two views' projections, selectable with ``--set loss=NAME``.
CONTRASTIVE_LOSSES = {"nt_xent": nt_xent}
