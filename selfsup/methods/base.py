"""What every method shares: the backbone, the augmentation recipe, the parameter groups,
and a hook after each optimiser step (EMA teachers and the like)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..augment import Augment
from ..config import Config
from ..optim import param_groups


class Method(nn.Module):
    """A self-supervised method: ``forward(views)`` returns a dict with the scalar ``loss`` and
    the ``embedding`` whose per-dimension spread the trainer logs as a collapse monitor."""

    #: Methods whose papers synchronise BN across devices default to global BN.
    sync_bn_default: bool = True

    def __init__(self, cfg: Config, backbone: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone

    def augmentations(self, size: int, mean, std) -> list[Augment]:
        """One augmentation per view, applied to the same uint8 batch."""
        raise NotImplementedError

    def forward(self, views: list[Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    def param_groups(self) -> list[dict]:
        return param_groups(self, self.cfg.optim.weight_decay,
                            exclude_bias_and_norm=self.cfg.optim.exclude_bias_and_norm)

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        """Called after every optimiser step (step counts from 0)."""
