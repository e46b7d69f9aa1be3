"""SwAV (Caron et al., 2020): Swapping Assignments between multiple Views (SwAV §3.1).

Each crop's normalised embedding z is scored against K prototypes C (unit vectors); the codes
q of a global crop come from Sinkhorn-Knopp over the batch (an equal partition of the batch
among the prototypes) and are predicted from every other crop's scores:

    L = mean over global crops s of  mean over crops t != s of  -Σ_k q_s,k log softmax(z_t C / T)_k

As the official code: the prototypes are renormalised after every optimiser step (so every
forward sees unit prototypes), codes come from the global crops only and without gradient, the
prototypes' gradient is dropped after backward during the first ``swav.freeze_prototypes_epochs``
(1: SwAV's ``freeze_prototypes_niters``, 313 steps of batch 4096 or 5005 of 256 on ImageNet; or
exactly ``swav.freeze_prototypes_steps``; :meth:`SwAV.frozen_now`), and an optional queue of past
global-crop embeddings (re-scored with the current prototypes) joins Sinkhorn's input from
``swav.queue_start_epoch`` on, once it is full; only the codes of the current batch are kept.

What forward reads of the step is decided in ``on_step_start`` as two booleans (the queue filling,
the queue in use), each of which turns on once in a run: a compiled forward recompiles at most
twice, not every step.

The official queue is each rank's own. Here every rank holds the queue of the global batch
(identical everywhere, so DDP's buffer broadcast and a rank-0 checkpoint keep it whole) and
each rank re-scores only the rows it contributed: the same Sinkhorn input as the original.

The step output's ``code_entropy`` is the mean over samples (and global crops) of each code's
entropy H(q_i): ln K when the codes are uniform, the collapse the SwAV README describes (its
loss then sits at ln K). The entropy of the *mean* assignment says nothing here: Sinkhorn makes
it ≈ ln K (equal partition) for healthy and collapsed codes alike.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed as D
from ..augment import Augment, simclr_view
from ..config import Config, ConfigError
from ..heads import mlp
from ..losses import sinkhorn, swav
from ..monitor import CHANCE_TOLERANCE, code_entropy
from ..optim import freeze_steps
from .base import Method, StepInfo, encode_by_resolution


class SwAV(Method):
    def __init__(self, backbone: nn.Module, *, dim: int, hidden_dim: int | None, prototypes: int,
                 temperature: float, epsilon: float, sinkhorn_iterations: int, freeze_prototypes_epochs: float,
                 freeze_prototypes_steps: int | None, queue_length: int, queue_start_epoch: int, **shared: Any):
        """dim, hidden_dim (None: the backbone's width): the head; prototypes: K; temperature: τ;
        epsilon, sinkhorn_iterations: Sinkhorn's ε and iterations; the prototypes get no gradient
        for ``freeze_prototypes_epochs`` (or exactly ``freeze_prototypes_steps``); queue_length
        past global-crop embeddings join Sinkhorn's input from ``queue_start_epoch`` on."""
        super().__init__(backbone, **shared)
        # Linear + BN + ReLU + Linear (SwAV: 2048 -> 2048 -> 128), then L2 normalisation
        self.projector = mlp(backbone.num_features, hidden_dim or backbone.num_features, dim)
        self.prototypes = nn.Linear(dim, prototypes, bias=False)  # C: (K, D)
        self.normalize_prototypes()
        self.temperature, self.epsilon, self.sinkhorn_iterations = temperature, epsilon, sinkhorn_iterations
        self.freeze_prototypes_epochs, self.freeze_prototypes_steps = freeze_prototypes_epochs, freeze_prototypes_steps
        self.queue_length, self.queue_start_epoch = queue_length, queue_start_epoch
        if queue_length:  # (G, L, D): per global crop, the embeddings of the last L / B global batches
            self.register_buffer("queue", torch.zeros(self.multicrop.global_crops, queue_length, dim))
        # the step's, from on_step_start (outside the loop: not frozen, no queue)
        self.prototypes_frozen = self.queue_filling = self.queue_full = False
        self.local_batch: int | None = None

    @classmethod
    def from_config(cls, cfg: Config, backbone: nn.Module) -> "SwAV":
        c = cfg.swav
        return cls(backbone, dim=cfg.model.proj_dim, hidden_dim=cfg.model.proj_hidden, prototypes=c.prototypes,
                   temperature=c.temperature, epsilon=c.epsilon, sinkhorn_iterations=c.sinkhorn_iterations,
                   freeze_prototypes_epochs=c.freeze_prototypes_epochs,
                   freeze_prototypes_steps=c.freeze_prototypes_steps, queue_length=c.queue_length,
                   queue_start_epoch=c.queue_start_epoch, **cls.shared_settings(cfg))

    @staticmethod
    def check(cfg: Config) -> None:
        batch = cfg.train.batch_size
        if cfg.swav.queue_length % batch:
            raise ConfigError(f"swav.queue_length {cfg.swav.queue_length} must be a multiple of the global batch "
                              f"{batch}; e.g. swav.queue_length={max(1, cfg.swav.queue_length // batch) * batch}")

    def augmentations(self, size: int, mean, std) -> list[Augment]:
        a = self.aug
        view = simclr_view(size, a.strength, blur=a.blur, scale=(a.scale_min, 1.0), mean=mean, std=std)
        return self.multi_crop([view] * self.multicrop.global_crops)

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        w = self.prototypes.weight  # (K, D)
        w.copy_(F.normalize(w, dim=1))

    @torch.no_grad()
    def on_step_start(self, info: StepInfo) -> None:
        frozen = freeze_steps(self.freeze_prototypes_epochs, info.steps_per_epoch, self.freeze_prototypes_steps)
        self.prototypes_frozen = info.step < frozen
        self.local_batch = info.local_batch
        self.queue_filling, self.queue_full = self._queue_state(info)

    def frozen_now(self) -> list[nn.Parameter]:
        """The prototypes C during the first ``freeze_prototypes_epochs`` (or ``_steps``)."""
        return [self.prototypes.weight] if self.prototypes_frozen else []

    @torch.no_grad()
    def on_step_end(self, info: StepInfo) -> None:
        self.normalize_prototypes()

    def forward(self, views: list[Tensor]) -> dict[str, Tensor]:
        b, n_global, n_crops = len(views[0]), self.multicrop.global_crops, len(views)
        z = F.normalize(self.projector(encode_by_resolution(self.backbone, views)), dim=1)  # (V*B, D)
        C = self.prototypes.weight  # (K, D)
        scores = (z @ C.T).split(b)  # V x (B, K)
        filling, full = self.queue_filling, self.queue_full
        loss, entropy = 0.0, 0.0
        for s in range(n_global):
            with torch.no_grad():
                out = scores[s].detach()  # (B, K)
                if full:
                    out = torch.cat([self._own_rows(self.queue[s]) @ C.T, out])  # (L/W + B, K): re-scored
                if filling:  # newest global batch first, oldest dropped
                    batch = D.gather(z[s * b:(s + 1) * b].detach().to(self.queue.dtype))  # (W*B, D)
                    self.queue[s] = torch.cat([batch, self.queue[s, :-len(batch)]])
                q = sinkhorn(out, self.epsilon, self.sinkhorn_iterations)[-b:]  # (B, K) this batch's codes
                entropy = entropy + code_entropy(q)
            predicted = [swav(scores[t], q, self.temperature) for t in range(n_crops) if t != s]
            loss = loss + sum(predicted) / (n_crops - 1)  # swapped: crop t predicts the codes of s
        return {"loss": loss / n_global, "embedding": z[: n_global * b], "code_entropy": entropy / n_global}

    chance_advice = ("SwAV's collapse to uniform codes (SwAV README), not a slow start: lower swav.epsilon "
                     "(e.g. 0.03), start the queue later (swav.queue_start_epoch) or freeze the prototypes "
                     "longer (swav.freeze_prototypes_epochs)")

    def chance_loss(self) -> float:
        """ln K: uniform codes predicted by uniform scores."""
        return math.log(self.prototypes.out_features)

    def warnings(self, metrics: dict[str, float]) -> list[str]:
        """Uniform codes (code entropy at ln K): the collapse, whatever the loss reads."""
        entropy, chance = metrics.get("code_entropy"), self.chance_loss()
        if entropy is None or entropy < (1 - CHANCE_TOLERANCE) * chance:
            return []
        return [f"the codes are uniform (code entropy {entropy:.4f}, ln K = {chance:.4f}): {self.chance_advice}"]

    def _queue_state(self, info: StepInfo) -> tuple[bool, bool]:
        """(filling, full): the queue takes embeddings from ``queue_start_epoch`` on and joins
        Sinkhorn's input once it is full, ``L / B`` steps later (a pure function of the step,
        so a resumed run behaves as an uninterrupted one)."""
        if not self.queue_length:
            return False, False
        since = info.step - self.queue_start_epoch * info.steps_per_epoch  # steps of filling
        return since >= 0, since >= self.queue_length // (info.local_batch * D.world_size())

    def _own_rows(self, queue: Tensor) -> Tensor:
        """The rows of the global queue (L, D) that this rank pushed: (L/W, D), newest first."""
        w, b = D.world_size(), self.local_batch
        return queue.view(-1, w, b, queue.shape[1])[:, D.rank()].reshape(-1, queue.shape[1])  # (L/W, D)
