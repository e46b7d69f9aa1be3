"""Batches as slices of a seeded permutation of a uint8 dataset that lives on the device.

No DataLoader workers: the whole (N, H, W, 3) uint8 array is moved once to the training device
when it fits the memory budget (otherwise it stays in pinned host memory and each batch is
gathered on the host and copied asynchronously). Each epoch's order is a pure function of
(seed, epoch), so a resumed run sees exactly the batches an uninterrupted run would have.
Distributed: every rank reads its own contiguous share of each global batch.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor


def epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    """The order of epoch ``epoch``: identical on every rank and on every resume."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


class DeviceLoader:
    def __init__(self, images: np.ndarray, global_batch: int, device: torch.device, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1, budget_gb: float = 8.0):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by the {world_size} ranks")
        if len(images) < global_batch:
            raise ValueError(f"the dataset has {len(images)} images, fewer than one batch of "
                             f"{global_batch}; lower train.batch_size")
        self.n, self.global_batch, self.device = len(images), global_batch, device
        self.local_batch = global_batch // world_size
        self.seed, self.rank = seed, rank
        host = torch.from_numpy(np.array(images))  # (N, H, W, 3) uint8, copied into RAM once
        on_device = device.type == "cpu" or host.numel() <= budget_gb * 2**30
        self.on_device = on_device
        if on_device:
            self.images = host.to(device)
        else:  # too big for the budget: pinned host memory, async copies per batch
            self.images = host.pin_memory()

    def __len__(self) -> int:
        """Steps per epoch; the last partial batch is dropped (contrastive batches must be full)."""
        return self.n // self.global_batch

    def indices(self, epoch: int, start: int = 0) -> Iterator[Tensor]:
        """The image indices (B_local,) of each batch of ``epoch`` from step ``start``, on the
        device when the images are (the labels of a batch: ``labels[idx]``)."""
        perm = epoch_permutation(self.n, self.seed, epoch)
        if self.on_device:
            perm = perm.to(self.device)
        for step in range(start, len(self)):
            lo = step * self.global_batch + self.rank * self.local_batch
            yield perm[lo:lo + self.local_batch]

    def batches(self, epoch: int, start: int = 0) -> Iterator[Tensor]:
        """uint8 (B_local, H, W, 3) batches of ``epoch`` on the device, from step ``start``."""
        for idx in self.indices(epoch, start):
            if self.on_device:
                yield self.images.index_select(0, idx)
            else:
                yield self.images.index_select(0, idx).pin_memory().to(self.device, non_blocking=True)
