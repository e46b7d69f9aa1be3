"""Everything that touches ``torch.distributed`` lives here.

Helpers fall back to rank 0 / world size 1 when no process group exists, so every method
and loss runs unchanged on one CPU, one GPU, or many processes launched by ``torchrun``.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .norm import replace_batchnorm


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def setup(device: str) -> None:
    """Join the process group that ``torchrun`` describes in the environment (no-op otherwise).

    NCCL for CUDA devices, gloo for CPU.
    """
    if is_distributed() or not launched_by_torchrun():
        return
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward returns to each rank the gradient of its own slice, summed
    over every rank's loss (so DDP's gradient averaging yields the gradient of the global mean)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # (N, D) -> (W*N, D)
        out = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # (W*N, D) -> (N, D)
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        n = grad.shape[0] // world_size()
        return grad[rank() * n:(rank() + 1) * n]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every rank in rank order, keeping gradients. (N, D) -> (W*N, D)."""
    if not is_distributed() or world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every rank in rank order, without gradients."""
    if not is_distributed() or world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


class _SumWithGrad(torch.autograd.Function):
    """All-reduce sum whose backward all-reduces the gradients: every rank computes the same
    loss from the sum, so each rank's input gets the gradient of the sum of every rank's loss
    (W times the loss's; DDP's averaging divides by W), as :func:`gather_with_grad`."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def sum_with_grad(x: Tensor) -> Tensor:
    """The sum of ``x`` over ranks, keeping gradients (Barlow Twins' cross-correlation, global
    statistics); a new tensor, ``x`` itself without a process group."""
    if not is_distributed() or world_size() == 1:
        return x
    return _SumWithGrad.apply(x)


def all_reduce_sum(x: Tensor) -> Tensor:
    """In-place sum over ranks (identity without a process group)."""
    if is_distributed() and world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_mean(x: Tensor) -> Tensor:
    """In-place mean over ranks (identity without a process group)."""
    if is_distributed() and world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= world_size()
    return x


def all_gather_object(obj) -> list:
    """Every rank's Python object, in rank order (``[obj]`` without a process group)."""
    if not is_distributed() or world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's Python object on every rank."""
    if not is_distributed() or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def broadcast(x: Tensor) -> Tensor:
    """Rank 0's ``x`` on every rank, in place (identity without a process group)."""
    if is_distributed() and world_size() > 1:
        dist.broadcast(x, src=0)
    return x


# ---------------------------------------------------------------------------------------------
# Global batch norm: statistics over every rank's samples (SimCLR §2.2, BYOL, SwAV, SimSiam).

class GlobalBatchNorm(_BatchNorm):
    """Batch norm whose training statistics cover the global batch, on CPUs and GPUs alike,
    with one collective per layer in forward, one in backward, and no host sync.

    Why not ``nn.SyncBatchNorm``: it refuses CPU tensors, and on CUDA it stops the host at every
    layer (a boolean mask drops empty ranks' statistics, a data-dependent shape; momentum None
    reads the step count with ``float()``), about 22 syncs a ResNet-18 step: at each the CPU
    waits for the GPU, which then idles while the next kernels are launched. Here every shape
    follows from the input's shape alone:

    - forward: each rank packs [count, mean (C), biased variance (C)] of its share, in float32 or
      wider even for bf16 input; one ``all_gather_single`` hands every rank all of them, combined
      exactly (Chan et al.: within-rank plus between-rank variance). Not a summed [Σx, Σx²]: its
      E[x²] - E[x]² cancels in float32 when |mean| ≫ std. The count is gathered too, so ranks
      may hold different batch sizes; an empty share weighs 0.
    - backward: one ``all_reduce`` of [Σg, Σg·x̂] (2C,) over the global batch.

    Running statistics take the unbiased global variance; momentum None (cumulative average)
    weighs the step by 1/num_batches_tracked as a tensor. Eval mode is plain BN on the running
    statistics; training in one process is BN over the local batch. Parameter and buffer names
    are those of ``nn.BatchNorm*d``, so a state dict moves freely between the two; ``bias`` may
    be None (scale-only BN). Takes (B, C) or (B, C, *spatial) inputs in any memory format.
    """

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"GlobalBatchNorm expects (B, C) or (B, C, ...) input, got {tuple(x.shape)}")

    def forward(self, x: Tensor) -> Tensor:  # (B, C, *spatial) -> same
        self._check_input_dim(x)
        if not self.training and self.running_mean is not None:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)
        sync = self.training and world_size() > 1  # as SyncBatchNorm: eval on batch stats stays local
        if not sync and x.numel() == x.shape[1]:  # BN's check; across ranks it would need a host read
            raise ValueError(f"batch norm in training needs more than 1 value per channel, got input "
                             f"of shape {tuple(x.shape)}; use a larger batch")
        with torch.no_grad():
            mean, var, n = _moments(x, sync)  # (C,), (C,), ()
            if self.training and self.track_running_stats:
                self.num_batches_tracked.add_(1)
                # momentum None: BN reads the step count on the host; 1/t as a tensor does not
                m = self.momentum if self.momentum is not None else \
                    1 / self.num_batches_tracked.to(self.running_mean.dtype)
                unbiased = var * n / (n - 1).clamp(min=1)  # (C,) as BatchNorm's running_var
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        return _GlobalBatchNorm.apply(x, self.weight, self.bias, mean, var, n, self.eps, sync)


def _moments(x: Tensor, sync: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel mean and biased variance (C,) of x in float32 or wider, over every rank's
    samples if ``sync``, and the number of samples per channel ()."""
    c, n = x.shape[1], x.numel() // x.shape[1]  # n from the shape: no host read
    wide = torch.promote_types(x.dtype, torch.float32)
    if n:
        # BN's statistics kernel (two-pass on CPU, Welford on CUDA), which computes no output;
        # CUDA's returns float32 for bf16 input, the CPU one bf16, so the CPU gets a float32 copy
        mean, var = torch.batch_norm_update_stats(x if x.is_cuda else x.to(wide), None, None, 0.0)
    else:  # an empty share (an uneven last batch) weighs 0 below
        mean = var = x.new_zeros(c, dtype=wide)
    count = mean.new_full((1,), n)
    if not sync:
        return mean, var, count[0]
    every = mean.new_empty(world_size() * (2 * c + 1))
    dist.all_gather_single(every, torch.cat([count, mean, var]))  # the one collective: (W*(2C+1),)
    counts, means, variances = every.view(world_size(), -1).split([1, c, c], dim=1)  # (W, 1), (W, C), (W, C)
    n = counts.sum()
    mean = (counts * means).sum(0) / n  # (C,)
    var = (counts * (variances + (means - mean) ** 2)).sum(0) / n  # within + between ranks
    return mean, var, n


class _GlobalBatchNorm(torch.autograd.Function):
    """y = (x - mean) / sqrt(var + eps) * weight + bias with the global moments; the backward
    includes their dependence on x.

    dx = w / sqrt(var + eps) * (g - Σg / N - x̂ Σ(g x̂) / N), with both sums over the global
    batch: summing every rank's local sums makes dx the gradient of the sum of the ranks'
    losses, and DDP's averaging of parameter gradients makes that the gradient of their mean,
    the loss of one process holding the whole batch. dweight = Σ g x̂ and dbias = Σ g stay local
    sums (DDP averages them like every other parameter gradient).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor,
                n: Tensor, eps: float, sync: bool) -> Tensor:
        ctx.save_for_backward(x, weight, mean, torch.rsqrt(var + eps), n)
        ctx.eps, ctx.sync = eps, sync
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, weight, mean, invstd, n = ctx.saved_tensors
        if x.numel():
            # BN's backward kernel fed the global moments gives both per-channel sums in one pass,
            # Σ g x̂ as "dweight" and Σ g as "dbias"; ones stand in for a missing weight (CUDA's
            # kernel takes the sums' dtype from it)
            _, sum_g_xhat, sum_g = torch.ops.aten.native_batch_norm_backward(
                g, x, torch.ones_like(mean) if weight is None else weight, None, None, mean, invstd,
                True, ctx.eps, [False, True, True])  # (C,) each
        else:
            sum_g_xhat = sum_g = torch.zeros_like(mean)
        grad_weight = sum_g_xhat if ctx.needs_input_grad[1] else None
        grad_bias = sum_g if ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            sums = torch.cat([sum_g, sum_g_xhat]).to(mean.dtype)  # (2C,), a copy: the above stay local
            if ctx.sync:
                dist.all_reduce(sums, op=dist.ReduceOp.SUM)  # the one collective of the backward
            sum_g, sum_g_xhat = sums.chunk(2)
            a = invstd if weight is None else weight * invstd  # (C,) dy/dx at fixed moments
            k = a * invstd * sum_g_xhat / n  # (C,): the x̂ term per unit of x - mean
            b = a * sum_g / n  # (C,): the mean term
            shape = (1, -1) + (1,) * (x.dim() - 2)
            # x - mean first: k·x - k·mean would cancel in float32 when |mean| ≫ std
            grad_x = torch.addcmul(-b.view(shape), x - mean.view(shape), -k.view(shape))
            grad_x = grad_x.addcmul_(g, a.view(shape)).to(x.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Give every batch norm in ``module`` statistics over the global batch: a
    :class:`GlobalBatchNorm`, on the CPU and on CUDA alike (not ``nn.SyncBatchNorm``, which syncs
    the host at every layer).

    Parameters and buffers are shared with the old layers, not copied, and state-dict keys stay
    the same, so checkpoints load into the plain model (and backbones into torchvision's layout).
    """
    return replace_batchnorm(
        module, lambda m: isinstance(m, _BatchNorm) and not isinstance(m, GlobalBatchNorm),
        lambda bn: GlobalBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine,
                                   bn.track_running_stats))
