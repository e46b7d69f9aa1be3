"""SimSiam (Chen & He, 2021): a Siamese encoder f (backbone + projection MLP) and a predictor
h; one view's prediction p = h(f(x1)) matches the other's projection z = f(x2) under
stop-gradient, symmetrised: L = D(p1, z2)/2 + D(p2, z1)/2 with D = -cos (SimSiam Algorithm 1).

As the official code: the projector's output BN has no affine parameters, the predictor is a
bottleneck (2048 -> 512 -> 2048) without BN on its output, weight decay applies to every
parameter (BN and biases too: set ``optim.exclude_bias_and_norm=false``), and the predictor's
lr stays at its peak while the rest follows the schedule (``simsiam.fix_pred_lr``).

With ``multicrop.local_crops`` > 0 every crop predicts each global crop's projection.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..augment import Augment, simclr_view
from ..config import Config
from ..heads import mlp
from ..losses import simsiam
from ..optim import param_groups
from .base import Method, encode_by_resolution


class SimSiam(Method):
    def __init__(self, backbone: nn.Module, *, dim: int, hidden_dim: int | None, layers: int,
                 pred_dim: int | None, fix_pred_lr: bool, **shared: Any):
        """dim, hidden_dim (None: the backbone's width), layers: the projection MLP of f;
        pred_dim (None: dim // 4): the predictor h's bottleneck; fix_pred_lr: h keeps the peak lr."""
        super().__init__(backbone, **shared)
        width = backbone.num_features
        # ImageNet: 3 layers of width 2048; CIFAR (App. D): 2 layers, 2048-d output
        self.projector = mlp(width, hidden_dim or width, dim, layers, last_norm="none")
        self.predictor = mlp(dim, pred_dim or dim // 4, dim)  # h
        self.fix_pred_lr = fix_pred_lr

    @classmethod
    def from_config(cls, cfg: Config, backbone: nn.Module) -> "SimSiam":
        m = cfg.model
        return cls(backbone, dim=m.proj_dim, hidden_dim=m.proj_hidden, layers=m.proj_layers,
                   pred_dim=cfg.simsiam.pred_hidden, fix_pred_lr=cfg.simsiam.fix_pred_lr, **cls.shared_settings(cfg))

    def augmentations(self, size: int, mean, std) -> list[Augment]:
        a = self.aug  # MoCo v2's augmentation: strength 0.5 gives its jitter (0.4, 0.4, 0.4, 0.1)
        view = simclr_view(size, a.strength, blur=a.blur, scale=(a.scale_min, 1.0), mean=mean, std=std)
        return self.multi_crop([view] * self.multicrop.global_crops)

    def forward(self, views: list[Tensor]) -> dict[str, Tensor]:
        n_global, b = self.multicrop.global_crops, len(views[0])
        z = self.projector(encode_by_resolution(self.backbone, views))  # (V*B, D)
        p = self.predictor(z)  # (V*B, D)
        z, p = z.split(b), p.split(b)  # V x (B, D) each
        loss = 0.0
        for g in range(n_global):  # two views: D(p2, z1)/2 + D(p1, z2)/2
            others = [v for v in range(len(views)) if v != g]
            loss = loss + sum(simsiam(p[v], z[g]) for v in others) / len(others)
        return {"loss": loss / n_global, "embedding": torch.cat(z[:n_global])}

    def param_groups(self, peak_lr: float) -> list[dict]:
        wd, exclude = self.weight_decay, self.exclude_bias_and_norm
        encoder = param_groups(nn.ModuleList([self.backbone, self.projector]), wd, exclude_bias_and_norm=exclude)
        predictor = param_groups(self.predictor, wd, exclude_bias_and_norm=exclude)
        if self.fix_pred_lr:
            # set_lr keeps a fixed group's lr as it finds it: the peak lr (init_lr in the official code)
            for group in predictor:
                group.update(lr=peak_lr, fixed_lr=True)
        return encoder + predictor
