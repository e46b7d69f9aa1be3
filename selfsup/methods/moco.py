"""MoCo v1/v2 (He et al., 2020; Chen et al., 2020): queries from an encoder f_q are contrasted
with keys from its momentum copy f_k and with a queue of earlier keys (MoCo §3, Algorithm 1).

Every step follows the official code's order:
1. momentum update of the key encoder, θ_k <- m θ_k + (1 - m) θ_q (parameters only);
2. keys of the other view with Shuffle BN, without gradient;
3. InfoNCE of the queries against their keys and the queue *as it was* (a snapshot);
4. enqueue the keys of the whole (global) batch.

Shuffle BN (§3.3): the key encoder normalises a shuffled batch, so a query and its key never
share BN statistics (otherwise the batch statistics leak which key is positive). Across ranks
the global batch is shuffled with rank 0's permutation; on one process, split BN normalises the
(shuffled) batch in ``moco.shuffle_bn_groups`` groups, as that many devices would.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed as D
from ..augment import Augment, simclr_view
from ..config import Config, ConfigError
from ..heads import ProjectionHead
from ..losses import info_nce
from ..momentum import KeyQueue, StepMomentum, ema_update, momentum_at, momentum_copy
from ..norm import convert_split_batchnorm
from .base import Method, StepInfo

# ``loss`` -> info_nce options. nt_xent and info_nce are the same softmax cross-entropy here;
# DCL drops the positive from the denominator, DCLW also weights the positives.
LOSSES = {"info_nce": {}, "nt_xent": {}, "dcl": {"decoupled": True}, "dclw": {"decoupled": True}}


class MoCo(Method):
    sync_bn_default = False  # Shuffle BN, not global BN
    reads_loss = True

    def __init__(self, backbone: nn.Module, *, dim: int, hidden_dim: int | None, mlp: bool, queue_size: int,
                 momentum: float, momentum_cosine: bool, temperature: float, symmetric: bool,
                 shuffle_bn_groups: int, loss: str, dclw_sigma: float, aug_plus: bool, **shared: Any):
        """dim: the key and query dimension; hidden_dim: the MLP's (None: the backbone's width);
        mlp: v2's head; queue_size: K; momentum: m (rising to 1 on a cosine if momentum_cosine);
        temperature: T; symmetric: both views are queries; shuffle_bn_groups: split BN on one
        process; loss: an info_nce option of :data:`LOSSES`; aug_plus: v2's augmentation."""
        super().__init__(backbone, **shared)
        if loss not in LOSSES:
            raise ValueError(f"loss '{loss}' is not available for MoCo; choose from {', '.join(LOSSES)}")
        self.loss_options = dict(LOSSES[loss], **({"sigma": dclw_sigma} if loss == "dclw" else {}))
        self.base_m, self.momentum_cosine, self.T = momentum, momentum_cosine, temperature
        self.symmetric, self.aug_plus = symmetric, aug_plus
        width = backbone.num_features
        # v2: Linear-ReLU-Linear without BN; v1: one Linear (ResNet's fc resized to 128)
        self.projector = ProjectionHead(width, hidden_dim or width, dim, 2 if mlp else 1, batch_norm=False)
        self.groups = shuffle_bn_groups if D.world_size() == 1 else 1  # ranks are the devices
        if self.groups > 1:
            convert_split_batchnorm(self.backbone, self.groups)  # queries too, as on G devices
        self.encoder_k = momentum_copy(self.backbone, self.projector)  # f_k, never trained
        self.queue = KeyQueue(queue_size, dim)  # (K, D)
        self.ema = StepMomentum(momentum)  # m of the step, on the device (read inside forward)
        self.shuffle_seed = 0  # outside the loop: step 0 of seed 0
        self.shuffles: list[Tensor] | None = None  # the step's Shuffle BN permutations, from on_step_start

    @classmethod
    def from_config(cls, cfg: Config, backbone: nn.Module) -> "MoCo":
        c = cfg.moco
        return cls(backbone, dim=cfg.model.proj_dim, hidden_dim=cfg.model.proj_hidden, mlp=c.mlp,
                   queue_size=c.queue_size, momentum=c.momentum, momentum_cosine=c.momentum_cosine,
                   temperature=c.temperature, symmetric=c.symmetric, shuffle_bn_groups=c.shuffle_bn_groups,
                   loss=cfg.loss, dclw_sigma=cfg.dclw_sigma, aug_plus=c.aug_plus, **cls.shared_settings(cfg))

    @staticmethod
    def check(cfg: Config) -> None:
        # MoCo asserts K % batch == 0 so the queue always holds whole batches of keys
        per_step = cfg.train.batch_size * (2 if cfg.moco.symmetric else 1)
        if cfg.moco.queue_size % per_step:
            raise ConfigError(f"moco.queue_size {cfg.moco.queue_size} must be a multiple of the keys queued per "
                              f"step, {per_step} (the global batch{' x 2 views, moco.symmetric' if cfg.moco.symmetric else ''}); "
                              f"e.g. moco.queue_size={max(1, cfg.moco.queue_size // per_step) * per_step}")
        if cfg.multicrop.global_crops != 2 or cfg.multicrop.local_crops:
            raise ConfigError("moco takes exactly two views; multicrop.global_crops=2 and "
                              "multicrop.local_crops=0 (multi-crop is for simclr, byol, simsiam and swav)")

    def augmentations(self, size: int, mean, std) -> list[Augment]:
        a = self.aug
        view = simclr_view(size, a.strength, blur=a.blur, scale=(a.scale_min, 1.0), mean=mean, std=std)
        if not self.aug_plus:  # v1: jitter on every image, hue as strong as the rest
            view = dataclasses.replace(view, jitter_p=1.0, hue=min(0.5, view.brightness))
        return self.views([view, view])

    @torch.no_grad()
    def on_step_start(self, info: StepInfo) -> None:
        if self.groups > 1 and info.local_batch % self.groups:
            raise ValueError(f"moco.shuffle_bn_groups={self.groups} needs a batch size divisible by it, "
                             f"got {info.local_batch}")
        self.ema.set(momentum_at(info.step, info.total_steps, self.base_m, self.momentum_cosine))
        # the Shuffle BN permutations depend on the seed and the step alone, so a resumed run repeats them
        self.shuffle_seed = info.seed * 1_000_003 + info.step
        self.shuffles = self.shuffle_permutations(info.local_batch * D.world_size())

    def shuffle_permutations(self, keys: int) -> list[Tensor]:
        """The step's Shuffle BN permutations of the ``keys`` global keys, one per (query, key)
        pair, drawn on the host from :attr:`shuffle_seed` and sent to the device (rank 0's to
        every rank) before the step, so forward reads tensors: no host work inside it."""
        generator = torch.Generator().manual_seed(self.shuffle_seed)
        device = self.queue.keys.device
        perms = []
        for _ in range(2 if self.symmetric else 1):
            perm = torch.randperm(keys, generator=generator)  # (M,) on the host
            if device.type == "cuda":  # a pageable copy would wait for the queued step: pinned + non_blocking does not
                perm = perm.pin_memory().to(device, non_blocking=True)
            perms.append(D.broadcast(perm))  # rank 0's shuffle everywhere
        return perms

    def forward(self, views: list[Tensor]) -> dict[str, Tensor]:
        x1, x2 = views  # (N, 3, S, S) each
        # query/key views: (x1, x2); symmetric adds (x2, x1) and sums the two losses (CIFAR demo)
        pairs = [(x1, x2), (x2, x1)] if self.symmetric else [(x1, x2)]
        with torch.no_grad():
            ema_update(self.encoder_k, (self.backbone, self.projector), self.ema)  # before the keys
        # outside the training loop (no on_step_start): the permutations of shuffle_seed
        shuffles = self.shuffles or self.shuffle_permutations(len(x1) * D.world_size())
        queue = self.queue.snapshot()  # (K, D): negatives from before this step
        loss, queries, keys = 0.0, [], []
        for (x_q, x_k), perm in zip(pairs, shuffles):
            q = self.projector(self.backbone(x_q))  # (N, D)
            k = self.keys(x_k, perm)  # (N, D), normalised, no gradient
            loss = loss + info_nce(q, k, queue, self.T, **self.loss_options)
            queries.append(q)
            keys.append(D.gather(k))  # (M, D) in rank order
        self.queue.push(torch.cat(keys))  # after the logits
        return {"loss": loss, "embedding": torch.cat(queries)}

    @torch.no_grad()
    def keys(self, x_k: Tensor, perm: Tensor) -> Tensor:
        """k = normalize(f_k(x_k)) with Shuffle BN by the global permutation ``perm`` (M,) of
        :meth:`shuffle_permutations`; rows line up with ``x_k``. (N, ...) -> (N, D)."""
        x_all = D.gather(x_k)  # (M, 3, S, S): the global key batch
        rows = perm.view(D.world_size(), -1)[D.rank()]  # (N,) the images this rank encodes
        k = F.normalize(self.encoder_k(x_all[rows]), dim=1)  # (N, D) in shuffled order
        k_all = D.gather(k)  # (M, D): row j is the key of image perm[j]
        unshuffle = torch.argsort(perm)  # (M,): image i's row in k_all
        return k_all[unshuffle.view(D.world_size(), -1)[D.rank()]]  # (N, D)
