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
    """Batch norm whose training statistics cover the global batch, for CPU process groups.

    Workaround: ``nn.SyncBatchNorm`` refuses CPU tensors ("expected input tensor to be on GPU",
    torch 2.x), so gloo runs use this. Each rank computes its per-channel mean and biased
    variance; the ranks' moments are gathered and combined exactly (Chan et al.: within-rank
    plus between-rank variance, no E[x²]-E[x]² cancellation). Running statistics take the
    unbiased global variance with the usual momentum. In eval mode this is plain BN. Parameter
    and buffer names are those of ``nn.BatchNorm*d``, so a state dict moves freely between the
    two; ``bias`` may be None (scale-only BN). Takes (B, C) or (B, C, *spatial) inputs in any
    memory format.
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
        with torch.no_grad():
            mean, var, n = _moments(x, sync)  # (C,), (C,), ()
            if self.training and self.track_running_stats:
                self.num_batches_tracked.add_(1)
                m = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
                unbiased = var * n / (n - 1).clamp(min=1)  # (C,) as BatchNorm's running_var
                self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        return _GlobalBatchNorm.apply(x, self.weight, self.bias, mean, var, n, self.eps, sync)


def _moments(x: Tensor, sync: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel mean and biased variance (C,) of x, over every rank's samples if ``sync``,
    and the number of samples per channel."""
    # BN's own kernel gives exact two-pass statistics several times faster than var_mean;
    # with eps 0 its invstd is 1/sqrt(var) exactly (inf when var is 0, which maps back to 0).
    x = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 statistics would lose digits
    _, mean, invstd = torch.native_batch_norm(x, None, None, None, None, True, 0.0, 0.0)
    var = invstd.pow(-2)
    n = mean.new_tensor(float(x.numel() // x.shape[1]))
    if not sync:
        return mean, var, n
    c = mean.shape[0]
    every = gather(torch.cat([mean, var, n.reshape(1)])[None])  # (W, 2C+1)
    means, variances, counts = every[:, :c], every[:, c:2 * c], every[:, 2 * c:]  # (W, C), (W, C), (W, 1)
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
        ctx.save_for_backward(x, weight, mean, var, n)
        ctx.eps, ctx.sync = eps, sync
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, weight, mean, var, n = ctx.saved_tensors
        # BN's eval-mode backward kernel computes both per-channel sums in one pass: Σ g x̂, Σ g
        _, sum_g_xhat, sum_g = torch.ops.aten.native_batch_norm_backward(
            g, x, weight, mean, var, None, None, False, ctx.eps, [False, True, True])  # (C,) each
        grad_weight = sum_g_xhat.clone() if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_g.clone() if ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            sums = torch.cat([sum_g, sum_g_xhat])  # (2C,)
            if ctx.sync:
                dist.all_reduce(sums, op=dist.ReduceOp.SUM)
            sum_g, sum_g_xhat = sums.chunk(2)
            invstd = torch.rsqrt(var + ctx.eps)  # (C,)
            a = invstd if weight is None else weight * invstd  # dy/dx at fixed moments
            k = a * invstd * sum_g_xhat / n  # (C,): the x̂ term, as a coefficient of x
            c = k * mean - a * sum_g / n  # (C,)
            shape = (1, -1) + (1,) * (x.dim() - 2)
            grad_x = torch.addcmul(c.view(shape), g, a.view(shape)).addcmul_(x, k.view(shape), value=-1)
            grad_x = grad_x.to(x.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


def convert_sync_batchnorm(module: nn.Module, device: torch.device | str) -> nn.Module:
    """Give every batch norm in ``module`` statistics over the global batch.

    CUDA: ``nn.SyncBatchNorm``. CPU: :class:`GlobalBatchNorm`. Parameters and buffers are
    shared with the old layers, not copied, and state-dict keys stay the same, so checkpoints
    load into the plain model (and backbones into torchvision's layout).
    """
    if torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _to_global_bn(module)


def _to_global_bn(module: nn.Module) -> nn.Module:
    return replace_batchnorm(
        module, lambda m: isinstance(m, _BatchNorm) and not isinstance(m, GlobalBatchNorm),
        lambda bn: GlobalBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine,
                                   bn.track_running_stats))
