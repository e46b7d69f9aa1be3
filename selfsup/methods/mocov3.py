"""MoCo v3 (Chen, Xie and He, 2021): no queue. A query from the online network (encoder,
projector, predictor) is contrasted with the keys of the other view made by a momentum encoder
(an EMA of the encoder and projector) for every image of the global batch, symmetrically:
ctr(q1, k2) + ctr(q2, k1), each scaled by 2τ (MoCo v3 §3, Algorithm 1; moco-v3 builder.py).

As the official code: projector and predictor are Linear layers without bias, with BN and ReLU
between them; the projector ends in BN without affine parameters (2 layers for ResNets, 3 for
ViTs), the predictor (2 layers) too for ViTs only; the momentum m rises from ``momentum`` to 1 on a
cosine and the momentum encoder is updated before it makes this step's keys; each view runs
through the networks alone; the views are BYOL's pair. The ViT recipe keeps the random patch
projection fixed (``model.freeze_patch_embed``, §4.2).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..config import Config
from ..heads import mlp
from ..losses import mocov3
from ..momentum import MomentumTeacher, StepMomentum, momentum_at
from .base import StepInfo, TwoViewMethod


class MoCoV3(TwoViewMethod):
    def __init__(self, backbone: nn.Module, *, dim: int, hidden_dim: int | None, layers: int,
                 pred_hidden: int | None, pred_last_bn: bool, temperature: float, momentum: float, **shared: Any):
        """dim, hidden_dim (None: the backbone's width; MoCo v3: 256, 4096), layers: the projector;
        pred_hidden (None: hidden_dim), pred_last_bn (ViTs): the predictor; temperature τ;
        momentum: m at step 0."""
        super().__init__(backbone, **shared)
        hidden = hidden_dim or backbone.num_features
        self.projector = mlp(backbone.num_features, hidden, dim, layers, bias=False, last_norm="none")
        self.predictor = mlp(dim, pred_hidden or hidden, dim, 2, bias=False,
                             last_norm="none" if pred_last_bn else None)
        self.momentum_encoder = MomentumTeacher(self.backbone, self.projector)
        self.T, self.base_m = temperature, momentum
        self.ema = StepMomentum(momentum)  # m of the step, on the device (read inside forward)

    @classmethod
    def from_config(cls, cfg: Config, backbone: nn.Module) -> "MoCoV3":
        m, c = cfg.model, cfg.mocov3
        return cls(backbone, dim=m.proj_dim, hidden_dim=m.proj_hidden, layers=m.proj_layers,
                   pred_hidden=c.pred_hidden, pred_last_bn=m.backbone.startswith("vit_"),  # MoCo_ViT's predictor
                   temperature=c.temperature, momentum=c.momentum, **cls.shared_settings(cfg))

    @torch.no_grad()
    def on_step_start(self, info: StepInfo) -> None:
        self.ema.set(momentum_at(info.step, info.total_steps, self.base_m, cosine=True))  # adjust_moco_momentum

    def forward(self, views: list[Tensor]) -> dict[str, Tensor]:
        z1, z2 = self.project(views)  # (N, D) each
        q1, q2 = self.predictor(z1), self.predictor(z2)  # (N, D) queries
        with torch.no_grad():
            self.momentum_encoder.update(self.ema)  # before this step's keys, as the official code
            k1, k2 = (self.momentum_encoder(v) for v in views)  # (N, D) keys
        loss = mocov3(q1, k2, self.T) + mocov3(q2, k1, self.T)
        return {"loss": loss, "embedding": torch.cat([z1, z2])}
