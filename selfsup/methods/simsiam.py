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

import torch
from torch import Tensor, nn

from ..augment import Augment, simclr_view
from ..config import Config
from ..heads import mlp
from ..losses import simsiam
from ..optim import param_groups, scale_lr
from .base import Method, encode_by_resolution


class SimSiam(Method):
    def __init__(self, cfg: Config, backbone: nn.Module):
        super().__init__(cfg, backbone)
        m, width = cfg.model, backbone.num_features
        # ImageNet: 3 layers of width 2048; CIFAR (App. D): 2 layers, 2048-d output
        self.projector = mlp(width, m.proj_hidden or width, m.proj_dim, m.proj_layers, last_norm="none")
        self.predictor = mlp(m.proj_dim, cfg.simsiam.pred_hidden or m.proj_dim // 4, m.proj_dim)  # h

    def augmentations(self, size: int, mean, std) -> list[Augment]:
        a = self.cfg.aug  # MoCo v2's augmentation: strength 0.5 gives its jitter (0.4, 0.4, 0.4, 0.1)
        view = simclr_view(size, a.strength, blur=a.blur, scale=(a.scale_min, 1.0), mean=mean, std=std)
        return self.multi_crop([view] * self.cfg.multicrop.global_crops)

    def forward(self, views: list[Tensor]) -> dict[str, Tensor]:
        n_global, b = self.cfg.multicrop.global_crops, len(views[0])
        z = self.projector(encode_by_resolution(self.backbone, views))  # (V*B, D)
        p = self.predictor(z)  # (V*B, D)
        z, p = z.split(b), p.split(b)  # V x (B, D) each
        loss = 0.0
        for g in range(n_global):  # two views: D(p2, z1)/2 + D(p1, z2)/2
            others = [v for v in range(len(views)) if v != g]
            loss = loss + sum(simsiam(p[v], z[g]) for v in others) / len(others)
        return {"loss": loss / n_global, "embedding": torch.cat(z[:n_global])}

    def param_groups(self) -> list[dict]:
        o = self.cfg.optim
        encoder = param_groups(nn.ModuleList([self.backbone, self.projector]), o.weight_decay,
                               exclude_bias_and_norm=o.exclude_bias_and_norm)
        predictor = param_groups(self.predictor, o.weight_decay, exclude_bias_and_norm=o.exclude_bias_and_norm)
        if self.cfg.simsiam.fix_pred_lr:
            # set_lr keeps a fixed group's lr as it finds it: the peak lr (init_lr in the official code)
            peak = scale_lr(o.lr, self.cfg.train.batch_size, o.lr_scaling)
            for group in predictor:
                group.update(lr=peak, fixed_lr=True)
        return encoder + predictor
