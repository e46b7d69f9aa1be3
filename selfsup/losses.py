"""Self-supervised losses as pure functions of tensors.

Inputs are projections that are *not yet* normalised. Every loss computes in float32 (the
exponentials at low temperature are where bf16 goes wrong) and, when a process group exists,
takes its negatives from the global batch via a gather that keeps gradients (InfoNCE's come from
a queue of keys, which already holds every rank's).
"""
from __future__ import annotations

import functools
import math

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
        args = [_as_float(a) for a in args]
        kwargs = {k: _as_float(v) for k, v in kwargs.items()}
        with torch.autocast(device_type=device, enabled=False):
            return loss_fn(*args, **kwargs)
    return wrapper


def _as_float(a):
    return a.float() if isinstance(a, Tensor) and a.is_floating_point() else a


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


def _pair_logits(z1: Tensor, z2: Tensor, temperature: float,
                 negatives: Tensor | None) -> tuple[Tensor, Tensor, Tensor, int]:
    """The logits of SimCLR's 2N anchors against their candidates, self-similarity masked.

    Returns the logits (2N, 2M + K): columns [all view-1 ; all view-2] of the global batch, then
    the K extra ``negatives`` if given; each anchor's positive column (2N,); the global
    candidates (2M, D); and M.
    """
    anchors, candidates, self_index, m = _global_pairs(z1, z2)
    logits = anchors @ candidates.T  # (2N, 2M)
    if negatives is not None:
        logits = torch.cat([logits, anchors @ negatives.T], dim=1)  # (2N, 2M + K)
    logits = logits / temperature
    rows = torch.arange(len(anchors), device=logits.device)
    logits[rows, self_index] = float("-inf")  # an anchor is not its own candidate
    positive = (self_index + m) % (2 * m)  # view 1 of image i <-> view 2 of image i
    return logits, positive, candidates, m


def _contrastive(logits: Tensor, positive: Tensor, *, decoupled: bool = False,
                 weight: Tensor | None = None) -> Tensor:
    """Mean over rows of  -w * logits[positive] + logsumexp(logits).

    Without ``decoupled`` and ``weight`` this is the cross-entropy of the positive; ``decoupled``
    drops the positive from the logsumexp (DCL); ``weight`` (R,) scales each positive term (DCLW).
    """
    pos = logits.gather(1, positive[:, None]).squeeze(1)  # (R,)
    if decoupled:
        logits = logits.scatter(1, positive[:, None], float("-inf"))  # negatives only
    if weight is not None:
        pos = weight * pos
    return (torch.logsumexp(logits, dim=1) - pos).mean()


def _dclw_weights(positive_sim: Tensor, sigma: float) -> Tensor:
    """DCLW's w_i = 2 - M softmax_i(s / sigma) over the M positive similarities s (mean 1;
    harder positives weigh more). A weight, not a path for gradients."""
    s = positive_sim.detach()  # (M,)
    return 2 - len(s) * torch.softmax(s / sigma, dim=0)


# ---------------------------------------------------------------------------------------------
# Large batches: the (2N, 2M) logits grow with the square of the batch. Above DENSE_LOGITS_MAX
# entries the contrastive losses take their logsumexp chunk by chunk of anchors and recompute
# each chunk in the backward, so peak memory is linear in the batch (the chunk's rows times
# the candidates), never the whole matrix. Same value and gradients as the dense path.

#: Logits entries (rows x candidates) up to which the dense path is used; ``chunk`` overrides.
DENSE_LOGITS_MAX = 2**24  # 64 MiB of float32 logits


def _chunk_rows(rows: int, cols: int, chunk: int | None) -> int | None:
    """Anchors per chunk, or None for the dense path. ``chunk``: 0 forces dense, N > 0 chunks of N."""
    if chunk is not None:
        return min(chunk, rows) if chunk > 0 else None
    if rows * cols <= DENSE_LOGITS_MAX:
        return None
    return max(1, DENSE_LOGITS_MAX // cols)


def _pair_columns(z1: Tensor, negatives: Tensor | None) -> int:
    """Candidates per anchor of the pair losses: 2M, plus the K extra negatives."""
    return 2 * len(z1) * D.world_size() + (0 if negatives is None else len(negatives))


class _MaskedLogSumExp(torch.autograd.Function):
    """lse_r = log( exp(extra_r) + sum_{j not masked in row r} exp(<a_r, c_j> / T) ), chunked.

    anchors (R, D), candidates (C, D), extra (R,) or None, masked (R, k) column indices per row
    (or None) -> (R,). The backward recomputes each chunk's logits: dL/dlogits = g * softmax.
    """

    @staticmethod
    def forward(ctx, anchors, candidates, extra, masked, temperature, rows):  # noqa: D102
        lse = anchors.new_empty(len(anchors))  # (R,)
        for lo in range(0, len(anchors), rows):
            logits = _masked_chunk(anchors, candidates, masked, temperature, lo, rows)  # (c, C)
            lse[lo:lo + rows] = torch.logsumexp(logits, dim=1)
        if extra is not None:
            lse = torch.logaddexp(lse, extra)
        ctx.save_for_backward(anchors, candidates, extra, masked, lse)
        ctx.temperature, ctx.rows = temperature, rows
        return lse

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        anchors, candidates, extra, masked, lse = ctx.saved_tensors
        t, rows = ctx.temperature, ctx.rows
        grad_a = torch.empty_like(anchors) if ctx.needs_input_grad[0] else None
        grad_c = torch.zeros_like(candidates) if ctx.needs_input_grad[1] else None
        for lo in range(0, len(anchors), rows):
            logits = _masked_chunk(anchors, candidates, masked, temperature=t, lo=lo, rows=rows)  # (c, C)
            p = logits.sub_(lse[lo:lo + rows, None]).exp_().mul_(grad[lo:lo + rows, None] / t)  # (c, C) in place
            if grad_a is not None:
                grad_a[lo:lo + rows] = p @ candidates  # (c, D)
            if grad_c is not None:
                grad_c.addmm_(p.T, anchors[lo:lo + rows])  # (C, D)
        grad_extra = grad * torch.exp(extra - lse) if extra is not None and ctx.needs_input_grad[2] else None
        return grad_a, grad_c, grad_extra, None, None, None


def _masked_chunk(anchors: Tensor, candidates: Tensor, masked: Tensor | None, temperature: float,
                  lo: int, rows: int) -> Tensor:
    """Rows lo:lo+rows of anchors @ candidates.T / T with each row's masked columns at -inf."""
    logits = (anchors[lo:lo + rows] / temperature) @ candidates.T  # (c, C), the only (c, C) buffer
    if masked is not None:
        logits.scatter_(1, masked[lo:lo + rows], float("-inf"))
    return logits


def _chunked_pairs(z1: Tensor, z2: Tensor, temperature: float, negatives: Tensor | None, rows: int, *,
                   decoupled: bool = False, sigma: float | None = None) -> Tensor:
    """NT-Xent / DCL / DCLW of :func:`_pair_logits`' layout without materialising the logits."""
    anchors, candidates, self_index, m = _global_pairs(z1, z2)
    positive = (self_index + m) % (2 * m)  # (2N,)
    pos = (anchors * candidates[positive]).sum(1) / temperature  # (2N,) positive logits
    if negatives is not None:
        candidates = torch.cat([candidates, negatives])  # (2M + K, D)
    masked = torch.stack([self_index, positive], dim=1)  # (2N, 2): the positive enters as `extra`
    lse = _MaskedLogSumExp.apply(anchors, candidates, None if decoupled else pos, masked, temperature, rows)
    weight = None
    if sigma is not None:
        w = _dclw_weights((candidates[:m] * candidates[m:2 * m]).sum(1), sigma)  # (M,)
        weight = w[positive % m]
    return (lse - (pos if weight is None else weight * pos)).mean()


@float32
def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.5, *, negatives: Tensor | None = None,
            chunk: int | None = None) -> Tensor:
    """NT-Xent, SimCLR eq. (1): mean over all 2N anchors of -log softmax of the positive.

    z1, z2: (N, D) projections of two views of the same N images. Each anchor's candidates are
    the other 2N-1 embeddings (2M-1 when distributed); cosine similarity / temperature; the
    self-similarity is excluded. Both directions (i->j and j->i) are included, and the value is
    the paper's L (the official TF code returns twice this: the sum of the two directions' means).
    ``negatives`` (K, D), already normalised, join every anchor's candidates (SimCLRv2's memory).
    ``chunk``: anchors per chunk of logits (None: chunked above DENSE_LOGITS_MAX; 0: dense).
    """
    if rows := _chunk_rows(2 * len(z1), _pair_columns(z1, negatives), chunk):
        return _chunked_pairs(z1, z2, temperature, negatives, rows)
    logits, positive, _, _ = _pair_logits(z1, z2, temperature, negatives)
    return _contrastive(logits, positive)


def memory_collapse_size(batch: int, temperature: float, alignment: float = 0.5) -> float:
    """The memory size above which NT-Xent with SimCLRv2's memory is lower for a collapsed online
    embedding than for a spread one whose two views have cosine ``alignment`` (global ``batch``).

    Collapsed (every online z the same unit u, the memory's stale keys spread, u·k ≈ 0):
    L_c = log(2N - 1 + M e^{-1/T}). Spread (negatives at cosine ≈ 0, positives at a):
    L_s = log(1 + (2N - 2 + M) e^{-a/T}). L_c < L_s once
    M > (2N - 2)(1 - e^{-a/T}) / (e^{-a/T} - e^{-1/T}): about 5.4 N at T 0.5, 11 N at 0.3,
    24 N at 0.2 and 300 N at 0.1 (a = 0.5).
    """
    ea, e1 = math.exp(-alignment / temperature), math.exp(-1.0 / temperature)
    return (2 * batch - 2) * (1 - ea) / (ea - e1)


@float32
def dcl(z1: Tensor, z2: Tensor, temperature: float = 0.1, *, negatives: Tensor | None = None,
        chunk: int | None = None) -> Tensor:
    """Decoupled contrastive loss (Yeh et al., 2022): NT-Xent without the positive in the
    denominator, L_i = -<z1_i, z2_i>/T + log sum_{j != i, both views} exp(<z_i, z_j>/T).

    Symmetric over both views, mean over the 2N anchors; each anchor has 2N-2 negatives (2M-2
    when distributed) plus the K ``negatives`` if given. Inputs as :func:`nt_xent`.
    """
    if rows := _chunk_rows(2 * len(z1), _pair_columns(z1, negatives), chunk):
        return _chunked_pairs(z1, z2, temperature, negatives, rows, decoupled=True)
    logits, positive, _, _ = _pair_logits(z1, z2, temperature, negatives)
    return _contrastive(logits, positive, decoupled=True)


@float32
def dclw(z1: Tensor, z2: Tensor, temperature: float = 0.1, sigma: float = 0.5, *,
         negatives: Tensor | None = None, chunk: int | None = None) -> Tensor:
    """DCL with the positive term of image i weighted by w_i = 2 - M softmax_i(<z1, z2>/sigma)
    over the M images of the global batch (computed without gradient; mean weight 1). Both
    views of image i share w_i. Inputs as :func:`nt_xent`."""
    if rows := _chunk_rows(2 * len(z1), _pair_columns(z1, negatives), chunk):
        return _chunked_pairs(z1, z2, temperature, negatives, rows, decoupled=True, sigma=sigma)
    logits, positive, candidates, m = _pair_logits(z1, z2, temperature, negatives)
    w = _dclw_weights((candidates[:m] * candidates[m:]).sum(1), sigma)  # (M,) from the cosines
    return _contrastive(logits, positive, decoupled=True, weight=w[positive % m])


@float32
def info_nce(q: Tensor, k: Tensor, queue: Tensor, temperature: float = 0.2, *,
             decoupled: bool = False, sigma: float | None = None, chunk: int | None = None) -> Tensor:
    """InfoNCE against a queue, MoCo eq. (1): mean over the N queries of
    -log exp(q.k+/T) / (exp(q.k+/T) + sum_K exp(q.k-/T)), the positive at logit index 0.

    q, k: (N, D) queries and their keys (normalised here); queue: (K, D) keys, already
    normalised (pass a snapshot: the caller enqueues after this). ``decoupled`` drops the
    positive from the denominator (DCL); ``sigma`` adds DCLW's positive weights over the
    global batch of pairs. ``chunk`` as in :func:`nt_xent`.
    """
    q = F.normalize(q, dim=1)  # (N, D)
    k = F.normalize(k, dim=1)  # (N, D)
    l_pos = (q * k).sum(1, keepdim=True)  # (N, 1)
    if rows := _chunk_rows(len(q), len(queue), chunk):
        return _chunked_info_nce(q, l_pos.squeeze(1), queue, temperature, rows, decoupled, sigma)
    l_neg = q @ queue.T  # (N, K)
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature  # (N, 1 + K)
    positive = torch.zeros(len(q), dtype=torch.long, device=q.device)
    weight = None
    if sigma is not None:
        n = len(q)
        weight = _dclw_weights(D.gather(l_pos.squeeze(1).detach()), sigma)  # (M,)
        weight = weight[D.rank() * n:(D.rank() + 1) * n]  # (N,) this rank's pairs
    return _contrastive(logits, positive, decoupled=decoupled, weight=weight)


def _chunked_info_nce(q: Tensor, l_pos: Tensor, queue: Tensor, temperature: float, rows: int,
                      decoupled: bool, sigma: float | None) -> Tensor:
    """:func:`info_nce` without the (N, 1 + K) logits: the positive enters the logsumexp as `extra`."""
    pos = l_pos / temperature  # (N,)
    lse = _MaskedLogSumExp.apply(q, queue, None if decoupled else pos, None, temperature, rows)  # (N,)
    if sigma is not None:
        n = len(q)
        weight = _dclw_weights(D.gather(l_pos.detach()), sigma)[D.rank() * n:(D.rank() + 1) * n]  # (N,)
        pos = weight * pos
    return (lse - pos).mean()


#: Losses of two views' projections, selectable with ``--set loss=NAME``; each is called as
#: ``fn(z1, z2, temperature)`` (dclw also takes ``sigma``, the config's ``dclw_sigma``).
CONTRASTIVE_LOSSES = {"nt_xent": nt_xent, "dcl": dcl, "dclw": dclw}


def _cross_batch(anchors: Tensor, targets: Tensor, temperature: float) -> Tensor:
    """Mean over the N local anchors of the cross-entropy of anchor i against the global batch of
    ``targets``, its positive being target i: -log softmax_j(<a_i, t_j> / T) at j = i.
    anchors: (N, D) normalised; targets: (M, D) normalised, gathered in rank order."""
    logits = anchors @ targets.T / temperature  # (N, M)
    labels = torch.arange(len(anchors), device=anchors.device) + D.rank() * len(anchors)  # (N,)
    return F.cross_entropy(logits, labels)


@float32
def mocov3(q: Tensor, k: Tensor, temperature: float = 0.2) -> Tensor:
    """MoCo v3's ctr(q, k) (Chen et al. 2021, Algorithm 1; moco-v3 builder.py): InfoNCE of each
    query against every key of the global batch, its own key the positive, times 2τ (the
    official code's scaling, which keeps the gradient's size across temperatures).
    q: (N, D) predictions; k: (N, D) momentum keys of the other view, a constant."""
    q = F.normalize(q, dim=1)  # (N, D)
    k = D.gather(F.normalize(k.detach(), dim=1))  # (M, D), no gradient
    return _cross_batch(q, k, temperature) * (2 * temperature)


@float32
def nnclr(neighbours: Tensor, p: Tensor, temperature: float = 0.1) -> Tensor:
    """NNCLR's loss of one direction (Dwibedi et al. 2021, eq. 2 and its pseudocode): the nearest
    neighbour NN(z_i, Q) of one view's embedding is the anchor, the prediction p_i of the other
    view its positive, the predictions of the rest of the global batch its negatives.
    neighbours: (N, D) from the support set, a constant; p: (N, D) predictions."""
    anchors = F.normalize(neighbours.detach(), dim=1)  # (N, D)
    p = D.gather_with_grad(F.normalize(p, dim=1))  # (M, D)
    return _cross_batch(anchors, p, temperature)


@torch.no_grad()
def nearest_neighbours(z: Tensor, support: Tensor) -> Tensor:
    """NN(z, Q): for each row of ``z`` (N, D) the row of the support set ``support`` (K, D,
    normalised) with the highest cosine similarity, (N, D); no gradient (NNCLR §3.1)."""
    z = F.normalize(z.float(), dim=1)  # (N, D)
    return support[(z @ support.float().T).argmax(dim=1)]  # (N, D)


def _batch_standardise(z: Tensor, eps: float = 1e-5) -> Tensor:
    """Each column of z (N, D) standardised over the global batch with the biased variance, as
    BatchNorm1d(affine=False) in train mode: (z - mean) / sqrt(var + eps), gradients included."""
    m = len(z) * D.world_size()
    mean = D.sum_with_grad(z.sum(0)) / m  # (D,)
    var = D.sum_with_grad((z - mean).pow(2).sum(0)) / m  # (D,) biased
    return (z - mean) / torch.sqrt(var + eps)  # (N, D)


def off_diagonal(x: Tensor) -> Tensor:
    """The off-diagonal entries of a square matrix x (D, D), flattened: (D*(D-1),)."""
    d = x.shape[0]
    return x.flatten()[:-1].view(d - 1, d + 1)[:, 1:].flatten()


@float32
def barlow_twins(z1: Tensor, z2: Tensor, lambd: float = 0.0051) -> Tensor:
    """Barlow Twins (Zbontar et al. 2021, eq. 1): with each view standardised over the global
    batch (the official code's BatchNorm1d without affine), the cross-correlation
    C = z1ᵀ z2 / M (D, D) is pushed to the identity: Σ_i (1 - C_ii)² + λ Σ_{i≠j} C_ij².
    Distributed, C is the sum of every rank's share with its gradient (each rank's loss is the
    whole batch's; no 1/world_size scaling). z1, z2: (N, D) projections."""
    m = len(z1) * D.world_size()
    c = D.sum_with_grad(_batch_standardise(z1).T @ _batch_standardise(z2)) / m  # (D, D)
    on_diag = (1 - torch.diagonal(c)).pow(2).sum()
    off_diag = off_diagonal(c).pow(2).sum()
    return on_diag + lambd * off_diag


@float32
def vicreg(z1: Tensor, z2: Tensor, sim_coeff: float = 25.0, std_coeff: float = 25.0,
           cov_coeff: float = 1.0) -> Tensor:
    """VICReg (Bardes et al. 2022, eq. 6; main_vicreg.py): λ s(z1, z2) + μ [v(z1) + v(z2)] / 2 +
    ν [c(z1) + c(z2)], with s the MSE of this rank's pairs, v the mean over dimensions of
    relu(1 - sqrt(Var + 1e-4)), c the squared off-diagonal covariances (N - 1 normalised) over D,
    the variance and covariance over the global batch (gathered with gradients). z1, z2: (N, D)."""
    invariance = F.mse_loss(z1, z2)
    x, y = D.gather_with_grad(z1), D.gather_with_grad(z2)  # (M, D) each
    x, y = x - x.mean(0), y - y.mean(0)
    variance = (F.relu(1 - torch.sqrt(x.var(0) + 1e-4)).mean() + F.relu(1 - torch.sqrt(y.var(0) + 1e-4)).mean()) / 2
    d = x.shape[1]
    cov_x, cov_y = x.T @ x / (len(x) - 1), y.T @ y / (len(y) - 1)  # (D, D)
    covariance = off_diagonal(cov_x).pow(2).sum() / d + off_diagonal(cov_y).pow(2).sum() / d
    return sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance


# ---------------------------------------------------------------------------------------------
# Without negatives: BYOL, SimSiam and SwAV. The targets (z, codes) are constants: the
# stop-gradient is part of each loss, not something a caller must remember.

@float32
@float32
def byol(p: Tensor, z: Tensor) -> Tensor:
    """BYOL's regression loss (BYOL eq. 2): mean over the batch of ||p/||p|| - z/||z||||²
    = 2 - 2 cos(p, z). p: (N, D) online predictions; z: (N, D) target projections, a constant."""
    p = F.normalize(p, dim=1)  # (N, D)
    z = F.normalize(z.detach(), dim=1)  # (N, D)
    return (p - z).pow(2).sum(1).mean()


@float32
def simsiam(p: Tensor, z: Tensor) -> Tensor:
    """SimSiam's D(p, z) (SimSiam eq. 1 with stop-gradient, eq. 3): mean over the batch of
    -cos(p, z), minimum -1. p: (N, D) predictions; z: (N, D) projections, a constant."""
    p = F.normalize(p, dim=1)  # (N, D)
    z = F.normalize(z.detach(), dim=1)  # (N, D)
    return -(p * z).sum(1).mean()


@torch.no_grad()
@float32
def sinkhorn(scores: Tensor, epsilon: float = 0.05, iterations: int = 3) -> Tensor:
    """SwAV's soft codes (SwAV §3.1, eq. 3): Sinkhorn-Knopp on exp(scores / ε).

    scores: (B, K) sample-prototype similarities -> Q: (B, K), no gradient. Each iteration
    scales every prototype's total to B/K (equal partition), then every sample's row to 1, so
    rows sum to 1 and column sums approach B/K as iterations grow. Distributed, the totals are
    summed over ranks and B is the global batch.

    exp(1 / 0.05) ≈ 4.9e8 already overflows fp16, so this subtracts each prototype's (global)
    maximum score first (a per-prototype constant is exactly what the first prototype scaling
    divides out, so the codes are unchanged by it) and iterates in float64: at ε = 0.02 a score
    range of 2 spans e^-100, below float32's normal range (flushed to 0 where denormals are off).
    """
    k = scores.shape[1]
    b = scores.shape[0] * D.world_size()  # every rank holds an equal share of the batch
    top = D.gather(scores.amax(0, keepdim=True)).amax(0, keepdim=True)  # (1, K) over the global batch
    q = torch.exp((scores.double() - top.double()) / epsilon)  # (B, K), each column has a 1
    tiny = torch.finfo(q.dtype).tiny  # a row whose entries all underflow stays 0, not 0/0
    for _ in range(iterations):
        q *= (b / k) / D.all_reduce_sum(q.sum(0, keepdim=True)).clamp_(min=tiny)  # prototype totals -> B/K
        q /= q.sum(1, keepdim=True).clamp_(min=tiny)  # sample rows -> 1
    return q.float()


@float32
def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over the batch of -Σ_k targets_k log softmax(logits)_k; targets: (N, K)
    probabilities, a constant. The one cross-entropy behind SwAV, DINO and distillation."""
    return -(targets.detach() * F.log_softmax(logits, dim=1)).sum(1).mean()


@float32
def swav(scores: Tensor, codes: Tensor, temperature: float = 0.1) -> Tensor:
    """SwAV's swapped-prediction term (SwAV eq. 2): mean over the batch of
    -Σ_k codes_k log softmax(scores / T)_k. scores: (N, K) of one crop; codes: (N, K) from
    another crop, a constant."""
    return soft_cross_entropy(scores / temperature, codes)  # (N, K) -> ()


@float32
def distill(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Distillation (SimCLRv2 §2 eq. 2, S2-BNN eq. 3): mean over the batch of
    -Σ_k softmax(teacher / τ)_k log softmax(student / τ)_k, the teacher a constant; no τ²
    factor (the papers' formula). Logits: (N, K); S2-BNN takes K over embedding dimensions."""
    targets = F.softmax(teacher_logits.detach() / temperature, dim=1)  # (N, K)
    return soft_cross_entropy(student_logits / temperature, targets)


def dino_targets(teacher_out: Tensor, center: Tensor, teacher_temp: float | Tensor) -> Tensor:
    """DINO's teacher distribution P_t = softmax((g_t(x) - c) / τ_t) (DINO eq. 1 and §3.1's
    centring), a constant. teacher_out: (N, K); center: (K,) or (1, K); teacher_temp: a number
    or a 0-dim tensor (a buffer that changes every step without recompiling a compiled forward)."""
    return F.softmax((teacher_out.detach() - center.detach()) / teacher_temp, dim=1)  # (N, K)


@float32
def dino(student_out: Tensor, teacher_out: Tensor, center: Tensor, student_temp: float = 0.1,
         teacher_temp: float | Tensor = 0.04) -> Tensor:
    """DINO's loss for one (student crop, teacher crop) pair (DINO Algorithm 1): the teacher's
    output centred, then sharpened at ``teacher_temp``, is the target of the student's at
    ``student_temp``. student_out, teacher_out: (N, K); center: (K,) or (1, K), a constant."""
    return soft_cross_entropy(student_out / student_temp, dino_targets(teacher_out, center, teacher_temp))


def dino_multicrop(student_out: Tensor, teacher_out: Tensor, center: Tensor, student_temp: float,
                   teacher_temp: float | Tensor, n_global: int) -> Tensor:
    """DINO's multi-crop loss (DINO Algorithm 1, ``DINOLoss.forward``): the mean over the pairs
    of a teacher crop t (a global crop) and a student crop s != t of  mean_b H(P_t, P_s).

    student_out: (V*B, K) every crop, the G = ``n_global`` global crops first, crop by crop;
    teacher_out: (G*B, K) the global crops; center: (1, K), a constant. Each crop's log-softmax
    and target are computed once; the pair sum is Σ_t Σ_s minus the G same-view terms, so it
    costs O((V + G) B K) however many pairs there are. Computed in (at least) float32 with
    autocast off, as every loss here.
    """
    dtype = torch.promote_types(student_out.dtype, torch.float32)  # float64 stays float64 (tests)
    with torch.autocast(student_out.device.type, enabled=False):
        g = n_global
        b = teacher_out.shape[0] // g
        v = student_out.shape[0] // b
        log_p = F.log_softmax(student_out.to(dtype) / student_temp, dim=1).view(v, b, -1)  # (V, B, K)
        q = dino_targets(teacher_out.to(dtype), center.to(dtype), teacher_temp).view(g, b, -1)  # (G, B, K)
        every_pair = (q.sum(0) * log_p.sum(0)).sum()  # Σ_t Σ_s Σ_b q_t · log p_s
        same_view = (q * log_p[:g]).sum()  # the G pairs s = t, which DINO skips
        return -(every_pair - same_view) / (g * (v - 1) * b)


@float32
def seed(student: Tensor, teacher: Tensor, queue: Tensor, student_temp: float = 0.2,
         teacher_temp: float = 1e-4) -> Tensor:
    """SEED's loss (SEED §3.2, eq. 4): the student matches the teacher's similarity distribution
    over [the teacher's own embedding, a queue of teacher embeddings]:
    distill of [s·t, s Q^T] / τ_s against [t·t, t Q^T] / τ_t (t·t = 1).

    student, teacher: (N, D) embeddings (normalised here), the teacher a constant; queue: (K, D)
    teacher embeddings, already normalised (a snapshot taken before this step's enqueue).
    """
    s = F.normalize(student, dim=1)  # (N, D)
    t = F.normalize(teacher.detach(), dim=1)  # (N, D)
    student_logits = torch.cat([(s * t).sum(1, keepdim=True), s @ queue.T], dim=1)  # (N, 1 + K)
    teacher_logits = torch.cat([(t * t).sum(1, keepdim=True), t @ queue.T], dim=1)  # (N, 1 + K)
    return distill(student_logits / student_temp, teacher_logits / teacher_temp)
