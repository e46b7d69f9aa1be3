"""Offline distillation from a frozen self-supervised teacher: S2-BNN (Shen et al., 2021) and
SEED (Fang et al., 2021). Any selfsup pre-training run is a teacher (``--teacher RUN``): its
backbone and projection head, in eval mode and without gradients, embed the same view the
student sees. The student (any backbone, e.g. ``binary-resnet18``) has a MoCo v2-style head
(Linear-ReLU-Linear) to the teacher's embedding dimension.

- ``s2bnn`` (S2-BNN eq. 3): distillation over the D embedding dimensions of both L2-normalised
  outputs, softmax(t / T) the target of log softmax(s / T), T = 0.2;
- ``seed`` (SEED eq. 4): the student matches the teacher's similarity distribution over
  [the teacher's own embedding, a queue of past teacher embeddings], student T 0.2, teacher T
  ``distill.teacher_temp``; the queue then takes the batch's teacher embeddings;
- ``distill.contrastive_weight`` > 0 adds the student's own NT-Xent between two views (S2-BNN's
  "contrastive + distillation" ablation); the distillation uses the first view.

Teacher features are recomputed every step (no cache): the views are random.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed as D
from ..augment import Augment, simclr_view
from ..backbones import build_backbone
from ..config import Config, from_dict
from ..errors import CheckpointError, ConfigError
from ..heads import ProjectionHead
from ..losses import distill, nt_xent, seed
from ..momentum import KeyQueue
from ..runs import CHECKPOINT, BackboneSpec, load_run, run_spec
from .base import METHODS, Method


def load_teacher(path: str | Path) -> tuple[nn.Module, BackboneSpec]:
    """A selfsup run's backbone and projection head chained, frozen in eval mode, and the
    run's backbone spec (input size and normalisation). ``path``: a run folder or its
    checkpoint.pt. Errors name the file and what is wrong with it."""
    file, state = load_run(path, who="distill.teacher", kind="pre-training",
                           hint=f"; pass the run folder (its {CHECKPOINT} holds the projection head a teacher needs)")
    spec = run_spec(state, file)
    if spec.num_classes is not None:  # a classifier of SimCLRv2's steps (selfsup finetune / distill)
        made = "a fine-tuning run" if spec.method == "finetune" else f"a {spec.method} run"
        raise CheckpointError(f"distill.teacher '{file}' is {made} (selfsup {spec.method}); a distillation "
                              f"teacher is a pre-training run (selfsup pretrain)")
    try:
        saved = from_dict(state["config"])
    except ConfigError as e:
        raise CheckpointError(f"distill.teacher '{file}': its config is not one this version "
                              f"reads ({e})") from None
    m = saved.model
    about = f"a {saved.method} {m.backbone} (width {m.width})"
    try:
        backbone = build_backbone(m.backbone, width=m.width, cifar_stem=m.cifar_stem,
                                  binary_weights=m.binary_weights, **spec.vit_args())
        method = METHODS[saved.method].from_config(saved, backbone)
        method.load_state_dict(state["model"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"distill.teacher '{file}' does not fit {about}, the architecture its config "
                              f"describes: {str(e).splitlines()[0][:300]}") from None
    if not isinstance(getattr(method, "projector", None), nn.Module):
        raise CheckpointError(f"distill.teacher '{file}' is {about} without a projection head to distil")
    teacher = nn.Sequential(method.backbone, method.projector)
    teacher.requires_grad_(False)
    return teacher.eval(), spec


class Distill(Method):
    sync_bn_default = False  # a per-sample target: nothing to gain from global BN

    def __init__(self, backbone: nn.Module, *, teacher: str | Path, mode: str, temperature: float, teacher_temp: float,
                 queue_size: int, contrastive_weight: float, contrastive_temperature: float,
                 hidden_dim: int | None, **shared: Any):
        """teacher: a selfsup run folder or checkpoint; mode: s2bnn or seed; temperature: T (the
        student's, and s2bnn's teacher's); teacher_temp: SEED's teacher T; queue_size: SEED's
        queue; contrastive_weight > 0 adds NT-Xent at contrastive_temperature; hidden_dim
        (None: the backbone's width): the student's head."""
        super().__init__(backbone, **shared)
        self.teacher, self.teacher_meta = load_teacher(teacher)
        size = self.teacher_meta.image_size
        with torch.no_grad():
            dim = self.teacher(torch.zeros(2, 3, size, size)).shape[1]  # D of the teacher's embedding
        width = backbone.num_features
        self.projector = ProjectionHead(width, hidden_dim or width, dim, 2, batch_norm=False)
        self.mode, self.temperature, self.teacher_temp = mode, temperature, teacher_temp
        self.contrastive_weight, self.contrastive_temperature = contrastive_weight, contrastive_temperature
        if mode == "seed":
            self.queue = KeyQueue(queue_size, dim)  # teacher embeddings
        # the teacher sees its own normalisation: x_t = x * scale + shift (set in augmentations)
        self.register_buffer("teacher_scale", torch.ones(1, 3, 1, 1), persistent=False)
        self.register_buffer("teacher_shift", torch.zeros(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_config(cls, cfg: Config, backbone: nn.Module) -> "Distill":
        c = cfg.distill
        return cls(backbone, teacher=c.teacher, mode=c.mode, temperature=c.temperature, teacher_temp=c.teacher_temp,
                   queue_size=c.queue_size, contrastive_weight=c.contrastive_weight,
                   contrastive_temperature=cfg.simclr.temperature, hidden_dim=cfg.model.proj_hidden,
                   **cls.shared_settings(cfg))

    @staticmethod
    def check(cfg: Config) -> None:
        c, batch = cfg.distill, cfg.train.batch_size
        if not c.teacher:
            raise ConfigError("--method distill needs a frozen teacher: pass --teacher RUN_DIR_OR_CHECKPOINT "
                              "(distill.teacher), a selfsup pre-training run")
        if c.mode == "seed" and c.queue_size % batch:
            raise ConfigError(f"distill.queue_size {c.queue_size} must be a multiple of the global batch "
                              f"{batch}; e.g. distill.queue_size={max(1, c.queue_size // batch) * batch}")

    def train(self, mode: bool = True) -> "Distill":
        super().train(mode)
        self.teacher.eval()  # frozen: its BN uses, and never updates, its running statistics
        return self

    def augmentations(self, size: int, mean, std) -> list[Augment]:
        a = self.aug
        # S2-BNN's "aug+" lowers jitter to p 0.6 and blur to p 0.2; SEED's is the teacher's (MoCo v2's)
        aug_plus = {"jitter_p": 0.6, "blur_p": 0.2 if a.blur else 0.0} if self.mode == "s2bnn" else {}
        view = simclr_view(size, a.strength, blur=a.blur, scale=(a.scale_min, 1.0), mean=mean, std=std, **aug_plus)
        t_mean, t_std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1)
                         for v in (self.teacher_meta.mean, self.teacher_meta.std))
        s_mean, s_std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in (mean, std))
        self.teacher_scale.copy_(s_std / t_std)
        self.teacher_shift.copy_((s_mean - t_mean) / t_std)
        return self.views([view] * (2 if self.contrastive_weight > 0 else 1))

    def forward(self, views: list[Tensor]) -> dict[str, Tensor]:
        b = len(views[0])
        z = self.projector(self.backbone(torch.cat(views)))  # (V*B, D): one pass, BN sees every view
        s = z[:b]  # (B, D) the student on the first view
        with torch.no_grad():  # the teacher on the same view
            t = F.normalize(self.teacher(views[0] * self.teacher_scale + self.teacher_shift).float(), dim=1)  # (B, D)
        if self.mode == "s2bnn":  # softmax over the D embedding dimensions
            loss = distill(F.normalize(s.float(), dim=1), t, self.temperature)
        else:
            loss = seed(s, t, self.queue.snapshot(), self.temperature, self.teacher_temp)
            self.queue.push(D.gather(t))  # (M, D) after the loss, as MoCo's enqueue
        if self.contrastive_weight > 0:
            z1, z2 = z.chunk(2)  # (B, D) each
            loss = loss + self.contrastive_weight * nt_xent(z1, z2, self.contrastive_temperature)
        return {"loss": loss, "embedding": z}
