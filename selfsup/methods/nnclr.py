"""NNCLR (Dwibedi et al., 2021): nearest-neighbour contrastive learning. Each image's positive
is not its other view but the nearest neighbour, in a support set Q of past embeddings, of one
view's embedding; the prediction of the other view must pick it out among the global batch's
predictions (NNCLR §3, eq. 2). Symmetric: (L(NN(z1), p2) + L(NN(z2), p1)) / 2.

The support set is a FIFO queue of the first view's projections (normalised, without gradient),
pushed after the loss, as the paper's pseudocode; it starts as random unit vectors. The
projector is 3 Linear-BN layers (ReLU between), the predictor Linear-BN-ReLU-Linear (NNCLR
App. A: 2048-2048-256, then 4096-256); the views are BYOL's pair.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed as D
from ..config import Config, ConfigError
from ..heads import mlp
from ..losses import nearest_neighbours, nnclr
from ..momentum import KeyQueue
from .base import TwoViewMethod


class NNCLR(TwoViewMethod):
    def __init__(self, backbone: nn.Module, *, dim: int, hidden_dim: int | None, layers: int, pred_hidden: int,
                 temperature: float, support_size: int, **shared: Any):
        """dim, hidden_dim (None: the backbone's width), layers: the projector; pred_hidden: the
        predictor's hidden width; temperature τ; support_size: the support set's size |Q|."""
        super().__init__(backbone, **shared)
        hidden = hidden_dim or backbone.num_features
        self.projector = mlp(backbone.num_features, hidden, dim, layers, last_norm="affine")
        self.predictor = mlp(dim, pred_hidden, dim, 2)
        self.support = KeyQueue(support_size, dim)  # Q: (K, D)
        self.temperature = temperature

    @classmethod
    def from_config(cls, cfg: Config, backbone: nn.Module) -> "NNCLR":
        m, c = cfg.model, cfg.nnclr
        return cls(backbone, dim=m.proj_dim, hidden_dim=m.proj_hidden, layers=m.proj_layers, pred_hidden=c.pred_hidden,
                   temperature=c.temperature, support_size=c.support_size, **cls.shared_settings(cfg))

    @staticmethod
    def check(cfg: Config) -> None:
        TwoViewMethod.check(cfg)
        size, batch = cfg.nnclr.support_size, cfg.train.batch_size
        if size % batch:
            raise ConfigError(f"nnclr.support_size {size} must be a multiple of the embeddings queued per step, "
                              f"{batch} (the global batch); e.g. nnclr.support_size={max(1, size // batch) * batch}")

    def forward(self, views: list[Tensor]) -> dict[str, Tensor]:
        z1, z2 = self.project(views)  # (N, D) each
        p1, p2 = self.predictor(z1), self.predictor(z2)  # (N, D)
        support = self.support.keys  # (K, D); the lookups copy their rows before the push below
        nn1, nn2 = nearest_neighbours(z1, support), nearest_neighbours(z2, support)  # (N, D) each
        loss = (nnclr(nn1, p2, self.temperature) + nnclr(nn2, p1, self.temperature)) / 2
        self.support.push(D.gather(F.normalize(z1.detach(), dim=1)))  # (M, D)
        return {"loss": loss, "embedding": torch.cat([z1, z2])}
