"""Normalisation layers shared by methods: split batch norm (MoCo's single-device Shuffle BN)."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that, in training, normalises its batch in ``num_splits`` contiguous groups,
    each with its own statistics, as ``num_splits`` devices with ordinary BN would.

    MoCo's Shuffle BN needs per-device statistics; on one device this emulates them (the
    official CIFAR-10 demo uses 8 groups). Running statistics are updated by every group from
    the same starting point and averaged, as the devices' would be after an all-reduce. Eval
    mode is plain BN. Parameter and buffer names are BatchNorm2d's.
    """

    def __init__(self, num_features: int, num_splits: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> same
        g = self.num_splits
        if not self.training or g == 1:
            return super().forward(x)
        b, c = x.shape[:2]
        if b % g:
            raise ValueError(f"split batch norm: a batch of {b} cannot be split into {g} equal groups; "
                             f"use a batch size divisible by {g} or change the number of groups")
        # group i's channel j becomes channel i*C + j of a batch of B/G: one BN call for all groups
        grouped = x.unflatten(0, (g, b // g)).transpose(0, 1).flatten(1, 2)  # (B/G, G*C, H, W)
        track = self.track_running_stats
        if track:
            self.num_batches_tracked.add_(1)
            momentum = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
            mean, var = self.running_mean.repeat(g), self.running_var.repeat(g)  # (G*C,) each
        else:
            momentum, mean, var = 0.0, None, None
        y = F.batch_norm(grouped, mean, var, None if self.weight is None else self.weight.repeat(g),
                         None if self.bias is None else self.bias.repeat(g), True, momentum, self.eps)
        if track:
            with torch.no_grad():
                self.running_mean.copy_(mean.view(g, c).mean(0))
                self.running_var.copy_(var.view(g, c).mean(0))
        y = y.unflatten(1, (g, c)).transpose(0, 1).flatten(0, 1)  # (B, C, H, W)
        return y.contiguous(memory_format=torch.channels_last) if _channels_last(x) else y.contiguous()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_splits={self.num_splits}"


def _channels_last(x: Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def replace_batchnorm(module: nn.Module, match: Callable[[nn.Module], bool],
                      make: Callable[[_BatchNorm], nn.Module]) -> nn.Module:
    """Swap every batch-norm layer that ``match``es for ``make(layer)``, the new layer sharing the
    old one's parameters and buffers, so state-dict keys and values are unchanged (checkpoints
    still load into a plain model). Returns the module, converted in place."""
    if match(module):
        bn = make(module)
        if module.affine:
            bn.weight, bn.bias = module.weight, module.bias  # bias None: scale-only BN stays so
        if module.track_running_stats:
            bn.running_mean, bn.running_var = module.running_mean, module.running_var
            bn.num_batches_tracked = module.num_batches_tracked
        bn.train(module.training)
        return bn
    for name, child in module.named_children():
        module.add_module(name, replace_batchnorm(child, match, make))
    return module


def convert_split_batchnorm(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in ``module`` by :class:`SplitBatchNorm2d` sharing its
    parameters and buffers (state-dict keys unchanged). Returns the module, converted in place."""
    return replace_batchnorm(
        module, lambda m: type(m) is nn.BatchNorm2d,
        lambda bn: SplitBatchNorm2d(bn.num_features, num_splits, eps=bn.eps, momentum=bn.momentum,
                                    affine=bn.affine, track_running_stats=bn.track_running_stats))


def plain_batchnorm(module: nn.Module) -> nn.Module:
    """Undo :func:`convert_split_batchnorm`: every :class:`SplitBatchNorm2d` becomes a plain
    ``nn.BatchNorm2d`` sharing its parameters and buffers (a MoCo backbone fine-tuned or used
    elsewhere normalises over its whole batch, of any size). Returns the module, in place."""
    return replace_batchnorm(
        module, lambda m: isinstance(m, SplitBatchNorm2d),
        lambda bn: nn.BatchNorm2d(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                                  track_running_stats=bn.track_running_stats))
