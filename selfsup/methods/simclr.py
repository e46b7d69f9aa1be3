"""SimCLR (Chen et al., 2020): two views, encoder f, projection head g, NT-Xent (§2.1).

With ``model.proj_layers=3`` this is SimCLRv2's deeper head (fine-tuned from its first layer);
``memory.size`` > 0 adds SimCLRv2's memory (§2 of the v2 paper): a momentum copy of f and g
whose keys of the last steps join every anchor's negatives. ``loss`` may be nt_xent, dcl or dclw.

Why the memory collapses at a high temperature: the positive is online, the M memory negatives
are stale keys of the momentum network, and only negatives come from the memory, so nothing ties
the online embedding to the keys' space. If every online embedding collapses to one unit vector
u, the positive and the 2N-2 in-batch negatives all score 1/T, but the spread memory keys score
u·k ≈ 0: L = log(2N - 1 + M e^{-1/T}). A spread embedding with positives at cosine a pays
log(1 + (2N - 2 + M) e^{-a/T}). Once M exceeds (2N - 2)(1 - e^{-a/T}) / (e^{-a/T} - e^{-1/T})
(:func:`selfsup.losses.memory_collapse_size`; a = 0.5: 5.4 N at T 0.5, 300 N at the paper's 0.1)
collapse lowers the loss, and the optimiser finds it: in short CIFAR-10 runs at T 0.5 with a
memory of 16 batches (EMA 0.99 or 0.999) kNN fell below random initialisation, while T 0.1 with
EMA 0.999 learned. The config refuses that region.

With multi-crop (``multicrop.local_crops`` > 0, SwAV §3.2 and its Table 4 on SimCLR) the loss is
the mean of the contrastive loss over every pair of crops that holds a global crop: (g1, g2),
then each global with each local; two views give plain SimCLR.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed as D
from ..augment import Augment, simclr_view
from ..config import Config, ConfigError
from ..heads import ProjectionHead
from ..losses import CONTRASTIVE_LOSSES, memory_collapse_size
from ..momentum import KeyQueue, ema_update, momentum_copy
from .base import Method, encode_by_resolution


class SimCLR(Method):
    reads_loss = True

    def __init__(self, backbone: nn.Module, *, dim: int, hidden_dim: int | None, layers: int, loss: str,
                 temperature: float, dclw_sigma: float, memory_size: int, memory_momentum: float, **shared: Any):
        """dim, hidden_dim (None: the backbone's width), layers: the projection head g (SimCLRv2:
        3 layers); loss: a contrastive loss of :data:`CONTRASTIVE_LOSSES` at ``temperature`` τ;
        memory_size > 0: SimCLRv2's memory of momentum keys, its EMA ``memory_momentum``."""
        super().__init__(backbone, **shared)
        if loss not in CONTRASTIVE_LOSSES:
            raise ValueError(f"loss '{loss}' is not a contrastive loss; choose from "
                             f"{', '.join(sorted(CONTRASTIVE_LOSSES))}")
        width = backbone.num_features
        self.projector = ProjectionHead(width, hidden_dim or width, dim, layers)  # g
        self.criterion = CONTRASTIVE_LOSSES[loss]
        if loss == "dclw":
            self.criterion = functools.partial(self.criterion, sigma=dclw_sigma)
        self.temperature, self.memory_momentum = temperature, memory_momentum
        self.has_memory = bool(memory_size)
        if memory_size:
            self.encoder_k = momentum_copy(self.backbone, self.projector)  # the memory network
            self.memory = KeyQueue(memory_size, dim)  # (M, D)

    @classmethod
    def from_config(cls, cfg: Config, backbone: nn.Module) -> "SimCLR":
        m = cfg.model
        return cls(backbone, dim=m.proj_dim, hidden_dim=m.proj_hidden, layers=m.proj_layers, loss=cfg.loss,
                   temperature=cfg.simclr.temperature, dclw_sigma=cfg.dclw_sigma, memory_size=cfg.memory.size,
                   memory_momentum=cfg.memory.momentum, **cls.shared_settings(cfg))

    @staticmethod
    def check(cfg: Config) -> None:
        mc, memory, batch = cfg.multicrop, cfg.memory.size, cfg.train.batch_size
        if mc.global_crops < 2 or (memory and (mc.global_crops, mc.local_crops) != (2, 0)):
            raise ConfigError("simclr needs multicrop.global_crops >= 2, and exactly two views "
                              "(global_crops=2, local_crops=0) with SimCLRv2's memory (memory.size > 0)")
        if memory and memory % (2 * batch):
            raise ConfigError(f"memory.size {memory} must be a multiple of the keys queued per step, "
                              f"{2 * batch} (2 views x the global batch); e.g. memory.size="
                              f"{max(1, memory // (2 * batch)) * 2 * batch}")
        collapse = memory_collapse_size(batch, cfg.simclr.temperature)
        if memory and memory >= collapse:
            raise ConfigError(f"memory.size {memory} with simclr.temperature {cfg.simclr.temperature:g} at "
                              f"train.batch_size {batch} collapses: above {collapse:.0f} keys a collapsed embedding "
                              f"has the lower loss (stale memory negatives; see selfsup.methods.simclr). Lower "
                              f"simclr.temperature (SimCLRv2: 0.1) or memory.size")

    def augmentations(self, size: int, mean, std) -> list[Augment]:
        a = self.aug
        view = simclr_view(size, a.strength, blur=a.blur, scale=(a.scale_min, 1.0), mean=mean, std=std)
        return self.multi_crop([view] * self.multicrop.global_crops)

    def forward(self, views: list[Tensor]) -> dict[str, Tensor]:
        if len(views) > 2:
            return self._multi_crop_forward(views)
        x = torch.cat(views)                          # (2N, 3, S, S): one pass, BN sees both views
        z = self.projector(self.backbone(x))          # (2N, D)
        z1, z2 = z.chunk(2)                           # (N, D) each
        if not self.has_memory:
            return {"loss": self.criterion(z1, z2, self.temperature), "embedding": z}
        # memory: as MoCo, update the momentum network, take its keys, use the memory as it was
        # before this step, then enqueue the keys of both views of the global batch
        with torch.no_grad():
            ema_update(self.encoder_k, (self.backbone, self.projector), self.memory_momentum)
            k = F.normalize(self.encoder_k(x), dim=1)  # (2N, D)
        loss = self.criterion(z1, z2, self.temperature, negatives=self.memory.snapshot())
        self.memory.push(D.gather(k))                 # (2M, D)
        return {"loss": loss, "embedding": z}

    def _multi_crop_forward(self, views: list[Tensor]) -> dict[str, Tensor]:
        n_global, b = self.multicrop.global_crops, len(views[0])
        z = self.projector(encode_by_resolution(self.backbone, views)).split(b)  # V x (N, D)
        pairs = [(g, v) for g in range(n_global) for v in range(g + 1, len(views))]
        loss = sum(self.criterion(z[g], z[v], self.temperature) for g, v in pairs) / len(pairs)
        return {"loss": loss, "embedding": torch.cat(z[:n_global])}
