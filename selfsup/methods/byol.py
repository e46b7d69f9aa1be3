"""BYOL (Grill et al., 2020): an online network (encoder f_θ, projector g_θ, predictor q_θ)
predicts the projection of another view made by a target network (f_ξ, g_ξ), an exponential
moving average of the online one; no negatives (BYOL §3.1).

ξ <- τ ξ + (1 - τ) θ after every optimiser step, τ = 1 - (1 - τ_base)(cos(πk/K) + 1)/2. The
target runs in train mode (its BN uses batch statistics) and never receives gradients. The loss
is symmetric: both views are predicted and both are targets (BYOL eq. 2-4).

``byol.per_view_bn=true`` sends each view through the networks alone, as the official code, so BN
normalises every view with its own batch statistics; the default (false) makes one pass over all
views of a size, which did 1.4 points better in the one CIFAR-10 comparison measured
(docs/results.md, issue 13).

With ``multicrop.local_crops`` > 0 the target encodes the global crops only and every other
crop predicts each of them, as SwAV's swapped prediction.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..augment import Augment
from ..config import Config
from ..heads import mlp
from ..losses import byol
from ..momentum import MomentumTeacher, momentum_at
from .base import Method, StepInfo, encode_by_resolution


class BYOL(Method):
    def __init__(self, backbone: nn.Module, *, dim: int, hidden_dim: int | None, pred_hidden_dim: int | None,
                 momentum: float, per_view_bn: bool, **shared: Any):
        """dim, hidden_dim (None: the backbone's width; BYOL: 256, 4096): the projector g_θ;
        pred_hidden_dim (None: hidden_dim): the predictor q_θ; momentum: τ_base; per_view_bn:
        the networks once per view (BYOL's code)."""
        super().__init__(backbone, **shared)
        hidden = hidden_dim or backbone.num_features
        # Linear + BN + ReLU + Linear, the last without bias (BYOL App. A), for both MLPs
        self.projector = mlp(backbone.num_features, hidden, dim, bias=False)  # g_θ
        self.predictor = mlp(dim, pred_hidden_dim or hidden, dim, bias=False)  # q_θ
        self.target = MomentumTeacher(self.backbone, self.projector)  # f_ξ, g_ξ
        self.tau_base, self.per_view_bn = momentum, per_view_bn

    @classmethod
    def from_config(cls, cfg: Config, backbone: nn.Module) -> "BYOL":
        m, c = cfg.model, cfg.byol
        return cls(backbone, dim=m.proj_dim, hidden_dim=m.proj_hidden, pred_hidden_dim=c.pred_hidden,
                   momentum=c.momentum, per_view_bn=c.per_view_bn, **cls.shared_settings(cfg))

    def augmentations(self, size: int, mean, std) -> list[Augment]:
        n = self.multicrop.global_crops
        v1, v2 = self.asymmetric_views(size, mean, std)
        return self.multi_crop([(v1, v2)[i % 2] for i in range(n)], local_from=v2)

    def forward(self, views: list[Tensor]) -> dict[str, Tensor]:
        n_global, b = self.multicrop.global_crops, len(views[0])
        if self.per_view_bn:  # BYOL's code: the networks once per view, BN statistics per view
            z = torch.cat([self.projector(self.backbone(v)) for v in views])  # (V*B, D) online projections
            p = [self.predictor(z_v) for z_v in z.split(b)]  # V x (B, D)
            with torch.no_grad():
                z_target = [self.target(v) for v in views[:n_global]]  # G x (B, D)
        else:
            z = self.projector(encode_by_resolution(self.backbone, views))  # (V*B, D) online projections
            p = self.predictor(z).split(b)  # V x (B, D)
            with torch.no_grad():
                z_target = self.target(torch.cat(views[:n_global])).split(b)  # G x (B, D)
        # each target view is predicted from every other view; two views give BYOL's
        # loss(p1, z'2) + loss(p2, z'1)
        loss = 0.0
        for g, z_g in enumerate(z_target):
            others = [v for v in range(len(views)) if v != g]
            loss = loss + sum(byol(p[v], z_g) for v in others) / len(others)
        return {"loss": loss, "embedding": z[: n_global * b]}

    @torch.no_grad()
    def on_step_end(self, info: StepInfo) -> None:
        # ξ <- τ ξ + (1 - τ) θ after the optimiser step: k = steps taken, so τ = 1 after the last
        self.target.update(momentum_at(info.step + 1, info.total_steps, self.tau_base, cosine=True))
