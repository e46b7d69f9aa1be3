"""DINO (Caron et al., 2021): self-distillation with no labels (DINO §3.1, Algorithm 1).

A student (backbone + head) predicts, at temperature τ_s, the output of a momentum teacher
(the same networks, an EMA of the student) that is centred and sharpened at τ_t:

    L = mean over teacher crops t and student crops s != t of  H(P_t(x_t), P_s(x_s)),
    P_t = softmax((g_t(x) - c) / τ_t),  P_s = softmax(g_s(x) / τ_s)

As the official code: the head is an MLP (GELU) to a bottleneck, L2 normalisation and a
weight-normalised last layer of K outputs whose norms are fixed at 1; the teacher sees only the
global crops and same-view pairs are skipped; the centre c is a buffer updated *after* the loss,
c <- m c + (1 - m) mean(teacher outputs) with m 0.9 over the global batch; τ_t warms up linearly
(a non-persistent buffer, so a compiled forward reads each step's value without recompiling);
the last layer's gradient is dropped after backward during the first
``dino.freeze_last_layer_epochs`` (:meth:`DINO.frozen_now`, ``utils.cancel_gradients_last_layer``),
so every step has the same graph and DDP needs no ``find_unused_parameters``; gradients
are clipped per parameter (``optim.clip_grad``, ``clip_grad_mode`` per_param as DINO's
``utils.clip_gradients``). The EMA covers parameters only; the teacher's BN keeps its
own statistics in train mode, as the momentum teachers of BYOL.

``dino.head_bn`` adds BN after the head's hidden layers (DINO's ``--use_bn_in_head``). Without
it, short runs of a CIFAR-stem ResNet-18 on digits lost the spread of the bottleneck within a few
steps (the teacher's output became uniform, loss ln K); see docs/results.md.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed as D
from ..augment import Augment
from ..config import Config
from ..heads import mlp
from ..losses import dino_multicrop
from ..momentum import MomentumTeacher, momentum_at
from ..optim import linear_warmup
from .base import Method, StepInfo, encode_by_resolution


class L2Norm(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=-1)


class WeightNormLinear(nn.Module):
    """Linear without bias, weight = g v / ||v|| per output row (weight normalisation); with
    ``norm_last_layer`` g is fixed at 1, so the K rows are unit vectors."""

    def __init__(self, in_dim: int, out_dim: int, norm_last_layer: bool = True):
        super().__init__()
        self.weight_v = nn.Parameter(nn.Linear(in_dim, out_dim, bias=False).weight.detach())  # (K, D)
        self.weight_g = None
        if not norm_last_layer:
            self.weight_g = nn.Parameter(self.weight_v.detach().norm(dim=1, keepdim=True))  # (K, 1)

    def forward(self, x: Tensor) -> Tensor:  # (N, D) -> (N, K)
        w = F.normalize(self.weight_v, dim=1)  # (K, D)
        if self.weight_g is not None:
            w = self.weight_g * w
        return F.linear(x, w)


class DINO(Method):
    clip_grad_mode_default = "per_param"  # main_dino.py: utils.clip_gradients(student, 3.0)

    def __init__(self, backbone: nn.Module, *, out_dim: int, hidden_dim: int | None, layers: int,
                 bottleneck_dim: int, head_bn: bool, norm_last_layer: bool, momentum: float,
                 student_temp: float, teacher_temp: float, warmup_teacher_temp: float,
                 warmup_teacher_temp_epochs: float, center_momentum: float, freeze_last_layer_epochs: float,
                 **shared: Any):
        """The head (DINOHead): ``layers`` of ``hidden_dim`` (None: 2048), BN if head_bn, the
        L2-normalised bottleneck, K = out_dim outputs (norms fixed at 1 if norm_last_layer);
        momentum: the teacher's EMA (rising to 1 on a cosine); τ_s = student_temp; τ_t warms up
        from warmup_teacher_temp to teacher_temp over warmup_teacher_temp_epochs; the centre's
        EMA is center_momentum m; the last layer gets no gradient for freeze_last_layer_epochs."""
        super().__init__(backbone, **shared)
        # DINOHead: in -> 2048 -> 2048 -> 256 (GELU, no BN), L2-normalised bottleneck
        self.projector = nn.Sequential(
            mlp(backbone.num_features, hidden_dim or 2048, bottleneck_dim, layers,
                batch_norm=head_bn, activation=nn.GELU), L2Norm())
        for layer in self.projector.modules():
            if isinstance(layer, nn.Linear):  # DINOHead._init_weights
                nn.init.trunc_normal_(layer.weight, std=0.02)
                if layer.bias is not None:  # none before a BN
                    nn.init.zeros_(layer.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, norm_last_layer)
        self.teacher = MomentumTeacher(self.backbone, self.projector, self.last_layer)
        self.register_buffer("center", torch.zeros(1, out_dim))  # c: (1, K)
        # τ_t of the step: a tensor, so a compiled forward is built once; not in checkpoints
        self.register_buffer("teacher_temp", torch.tensor(float(warmup_teacher_temp)), persistent=False)
        self.momentum, self.center_momentum = momentum, center_momentum
        self.student_temp = student_temp  # τ_s, fixed
        self.warmup_teacher_temp, self.final_teacher_temp = warmup_teacher_temp, teacher_temp
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.freeze_last_layer_epochs = freeze_last_layer_epochs
        self.last_layer_frozen = False  # this step's, from on_step_start

    @classmethod
    def from_config(cls, cfg: Config, backbone: nn.Module) -> "DINO":
        c = cfg.dino
        return cls(backbone, out_dim=c.out_dim, hidden_dim=cfg.model.proj_hidden, layers=cfg.model.proj_layers,
                   bottleneck_dim=c.bottleneck_dim, head_bn=c.head_bn, norm_last_layer=c.norm_last_layer,
                   momentum=c.momentum, student_temp=c.student_temp, teacher_temp=c.teacher_temp,
                   warmup_teacher_temp=c.warmup_teacher_temp, warmup_teacher_temp_epochs=c.warmup_teacher_temp_epochs,
                   center_momentum=c.center_momentum, freeze_last_layer_epochs=c.freeze_last_layer_epochs,
                   **cls.shared_settings(cfg))

    def augmentations(self, size: int, mean, std) -> list[Augment]:
        # DINO's crops are BYOL's asymmetric pair (blur 1.0 / 0.1, solarise 0 / 0.2); locals blur 0.5
        a, n = self.aug, self.multicrop.global_crops
        v1, v2 = self.asymmetric_views(size, mean, std)
        local = dataclasses.replace(v1, blur_p=0.5 if a.blur else 0.0)
        return self.multi_crop([(v1, v2)[i % 2] for i in range(n)], local_from=local)

    @torch.no_grad()
    def on_step_start(self, info: StepInfo) -> None:
        warmup_steps = self.warmup_teacher_temp_epochs * info.steps_per_epoch
        self.teacher_temp.fill_(linear_warmup(info.step, warmup_steps, self.warmup_teacher_temp,
                                              self.final_teacher_temp))
        self.last_layer_frozen = info.step < self.freeze_last_layer_epochs * info.steps_per_epoch

    def frozen_now(self) -> list[nn.Parameter]:
        """The last layer (v, and g unless fixed) during the first ``freeze_last_layer_epochs``."""
        return list(self.last_layer.parameters()) if self.last_layer_frozen else []

    def forward(self, views: list[Tensor]) -> dict[str, Tensor]:
        b, n_global = len(views[0]), self.multicrop.global_crops
        z = self.projector(encode_by_resolution(self.backbone, views))  # (V*B, D) unit bottleneck
        student_out = self.last_layer(z)  # (V*B, K)
        with torch.no_grad():
            teacher_out = self.teacher(torch.cat(views[:n_global]))  # (G*B, K)
        loss = dino_multicrop(student_out, teacher_out, self.center, self.student_temp, self.teacher_temp, n_global)
        self.update_center(teacher_out)  # after the loss: this step's targets used the old centre
        return {"loss": loss, "embedding": z[: n_global * b]}

    chance_advice = ("DINO's collapse to the uniform distribution (the centring outweighs the sharpening, "
                     "DINO §5.3): sharpen the teacher (lower dino.teacher_temp) or set dino.head_bn=true")

    def chance_loss(self) -> float:
        """ln K: uniform student and teacher outputs."""
        return math.log(self.center.shape[1])

    @torch.no_grad()
    def update_center(self, teacher_out: Tensor) -> None:
        """c <- m c + (1 - m) mean over the global batch of the raw teacher outputs (G*B, K)."""
        batch_center = D.all_reduce_mean(teacher_out.float().mean(0, keepdim=True))  # (1, K)
        m = self.center_momentum
        self.center.mul_(m).add_(batch_center, alpha=1 - m)

    @torch.no_grad()
    def on_step_end(self, info: StepInfo) -> None:
        # τ 0.996 -> 1 on a cosine, after the optimiser step: k = steps taken
        self.teacher.update(momentum_at(info.step + 1, info.total_steps, self.momentum, cosine=True))
