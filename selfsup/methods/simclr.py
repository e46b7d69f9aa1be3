"""SimCLR (Chen et al., 2020): two views, encoder f, projection head g, NT-Xent (§2.1).

With ``model.proj_layers=3`` this is SimCLRv2's deeper head (fine-tuned from its first layer)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..augment import Augment, simclr_view
from ..config import Config
from ..heads import ProjectionHead
from ..losses import CONTRASTIVE_LOSSES
from .base import Method


class SimCLR(Method):
    def __init__(self, cfg: Config, backbone: nn.Module):
        super().__init__(cfg, backbone)
        if cfg.loss not in CONTRASTIVE_LOSSES:
            raise ValueError(f"loss '{cfg.loss}' is not a contrastive loss; choose from "
                             f"{', '.join(sorted(CONTRASTIVE_LOSSES))}")
        width = backbone.num_features
        self.projector = ProjectionHead(width, cfg.model.proj_hidden or width, cfg.model.proj_dim,
                                        cfg.model.proj_layers)
        self.criterion = CONTRASTIVE_LOSSES[cfg.loss]

    def augmentations(self, size: int, mean, std) -> list[Augment]:
        a = self.cfg.aug
        view = simclr_view(size, a.strength, blur=a.blur, scale=(a.scale_min, 1.0), mean=mean, std=std)
        return [Augment(view), Augment(view)]

    def forward(self, views: list[Tensor]) -> dict[str, Tensor]:
        x = torch.cat(views)                          # (2N, 3, S, S): one pass, BN sees both views
        z = self.projector(self.backbone(x))          # (2N, D)
        z1, z2 = z.chunk(2)                           # (N, D) each
        return {"loss": self.criterion(z1, z2, self.cfg.temperature), "embedding": z}

