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

import torch
from torch import Tensor, nn

from ..augment import Augment, byol_view
from ..config import Config
from ..heads import mlp
from ..losses import byol
from ..momentum import MomentumTeacher
from .base import Method, encode_by_resolution


class BYOL(Method):
    def __init__(self, cfg: Config, backbone: nn.Module):
        super().__init__(cfg, backbone)
        m, width = cfg.model, backbone.num_features
        hidden = m.proj_hidden or width  # BYOL: 4096
        # Linear + BN + ReLU + Linear, the last without bias (BYOL App. A), for both MLPs
        self.projector = mlp(width, hidden, m.proj_dim, bias=False)  # g_θ
        self.predictor = mlp(m.proj_dim, cfg.byol.pred_hidden or hidden, m.proj_dim, bias=False)  # q_θ
        self.target = MomentumTeacher(self.backbone, self.projector, base=cfg.byol.momentum)  # f_ξ, g_ξ

    def augmentations(self, size: int, mean, std) -> list[Augment]:
        a, n = self.cfg.aug, self.cfg.multicrop.global_crops
        v1, v2 = (byol_view(size, i, blur=a.blur, scale=(a.scale_min, 1.0), mean=mean, std=std)
                  for i in (1, 2))
        return self.multi_crop([(v1, v2)[i % 2] for i in range(n)], local_from=v2)

    def forward(self, views: list[Tensor]) -> dict[str, Tensor]:
        n_global, b = self.cfg.multicrop.global_crops, len(views[0])
        if self.cfg.byol.per_view_bn:  # BYOL's code: the networks once per view, BN statistics per view
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
    def on_step_end(self, step: int, total_steps: int) -> None:
        self.target.update(step + 1, total_steps)  # after the optimiser step; τ = 1 after the last
