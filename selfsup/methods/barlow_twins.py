"""Barlow Twins (Zbontar et al., 2021): the cross-correlation of two views' embeddings, each
standardised over the batch, is pushed to the identity: the diagonal to 1 (invariance), the rest
to 0 (redundancy reduction, weighted λ) (Barlow Twins §2, eq. 1; facebookresearch/barlowtwins).

As the official code: the projector is Linear-BN-ReLU layers and a last Linear, none with a bias
(8192-8192-8192 on ImageNet); each view runs through the networks alone, so BN normalises every
view with its own statistics; the views are BYOL's pair; biases and BN parameters train at
``bias_lr_ratio`` times the weights' lr (0.0048 against 0.2) outside LARS's adaptation and
weight decay. Distributed, the cross-correlation is the all-reduced sum over the global batch
with its gradient (:func:`selfsup.losses.barlow_twins`).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..config import Config
from ..heads import mlp
from ..losses import barlow_twins
from .base import TwoViewMethod


class BarlowTwins(TwoViewMethod):
    def __init__(self, backbone: nn.Module, *, dim: int, hidden_dim: int | None, layers: int, lambd: float,
                 bias_lr_ratio: float, **shared: Any):
        """dim, hidden_dim (None: the backbone's width), layers: the projector (8192, 8192, 3 on
        ImageNet); lambd: λ; bias_lr_ratio: the lr of biases and BN over the weights'."""
        super().__init__(backbone, **shared)
        self.projector = mlp(backbone.num_features, hidden_dim or backbone.num_features, dim, layers, bias=False)
        self.lambd, self.bias_lr_ratio = lambd, bias_lr_ratio

    @classmethod
    def from_config(cls, cfg: Config, backbone: nn.Module) -> "BarlowTwins":
        m = cfg.model
        return cls(backbone, dim=m.proj_dim, hidden_dim=m.proj_hidden, layers=m.proj_layers,
                   lambd=cfg.barlow_twins.lambd, bias_lr_ratio=cfg.barlow_twins.bias_lr_ratio,
                   **cls.shared_settings(cfg))

    def forward(self, views: list[Tensor]) -> dict[str, Tensor]:
        z1, z2 = self.project(views)  # (N, D) each, BN per view
        return {"loss": barlow_twins(z1, z2, self.lambd), "embedding": torch.cat([z1, z2])}

    def param_groups(self, peak_lr: float) -> list[dict]:
        groups = super().param_groups(peak_lr)
        for group in groups:
            if group["lars_exclude"]:  # biases and BN: learning_rate_biases = 0.024 x learning_rate_weights
                group["lr_scale"] = self.bias_lr_ratio
        return groups
