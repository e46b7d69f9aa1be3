"""What every method shares: the backbone, the augmentation recipe, the parameter groups,
and hooks before and after each optimiser step (momentum schedules, EMA teachers and the like)."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..augment import Augment, ViewConfig, multi_crop_views
from ..config import Config
from ..optim import param_groups


class Method(nn.Module):
    """A self-supervised method: ``forward(views)`` returns a dict with the scalar ``loss``, the
    ``embedding`` and optionally other 0-dim tensors (e.g. SwAV's ``code_entropy``), which the
    trainer averages over each epoch and logs under their keys."""

    #: Methods whose papers synchronise BN across devices default to global BN.
    sync_bn_default: bool = True
    #: ``optim.clip_grad_mode`` when unset: one global norm (DINO clips each parameter's).
    clip_grad_mode_default: str = "global"
    #: DDP must look for parameters without a gradient (SwAV's frozen prototypes drop theirs).
    find_unused_parameters: bool = False

    def __init__(self, cfg: Config, backbone: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone

    @staticmethod
    def check(cfg: Config) -> None:
        """Refuse, with a ConfigError naming the keys, settings that pass every field check but
        that this method cannot train with. Called by :func:`selfsup.methods.check_config`."""

    def augmentations(self, size: int, mean, std) -> list[Augment]:
        """One augmentation per view, applied to the same uint8 batch."""
        raise NotImplementedError

    def forward(self, views: list[Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    def multi_crop(self, global_views: list[ViewConfig], local_from: ViewConfig | None = None) -> list[Augment]:
        """The global views, then ``multicrop.local_crops`` local views of ``local_from``
        (default: the first global view), as ``cfg.multicrop`` describes them."""
        mc = self.cfg.multicrop
        size = global_views[0].size
        local_size = mc.local_size or max(4, round(size * 96 / 224))
        views = multi_crop_views(global_views, mc.local_crops, local_size,
                                 (mc.local_scale_min, mc.local_scale_max), local_from)
        return [Augment(v) for v in views]

    #: What an epoch loss at :meth:`chance_loss` means and what to change, for the trainer's warning.
    chance_advice: str = ""

    def chance_loss(self) -> float | None:
        """The loss of a model that has learnt nothing in a way known to be a dead end (e.g. SwAV's
        uniform codes at ln K); the trainer warns when an epoch's loss sits there. None: no such value."""
        return None

    def warnings(self, metrics: dict[str, float]) -> list[str]:
        """What the epoch's ``metrics`` (loss and the scalars forward returned) say is wrong, in
        words, for the trainer's log (e.g. SwAV's uniform codes). None by default."""
        return []

    def param_groups(self) -> list[dict]:
        return param_groups(self, self.cfg.optim.weight_decay,
                            exclude_bias_and_norm=self.cfg.optim.exclude_bias_and_norm)

    @torch.no_grad()
    def on_step_start(self, step: int, total_steps: int) -> None:
        """Called before every training step (step counts from 0), for per-step schedules that
        the forward pass reads (MoCo's momentum)."""

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        """Called after every optimiser step (step counts from 0)."""


def encode_by_resolution(encoder: Callable[[Tensor], Tensor], views: list[Tensor]) -> Tensor:
    """``encoder`` of every view with one call per resolution: the views of each size are
    concatenated (multi-crop: the global crops in one pass, the local crops in another), so
    BN sees all crops of a size together, as in SwAV's code.

    views: V tensors (B, 3, S_v, S_v) -> (V*B, F), the views in their given order.
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, v in enumerate(views):
        groups.setdefault(tuple(v.shape[-2:]), []).append(i)
    if len(groups) == 1:
        return encoder(torch.cat(views))  # (V*B, F)
    out: list[Tensor] = [views[0]] * len(views)
    for members in groups.values():
        features = encoder(torch.cat([views[i] for i in members]))  # (n*B, F)
        for i, f in zip(members, features.chunk(len(members))):
            out[i] = f  # (B, F)
    return torch.cat(out)  # (V*B, F)


#: Every method by name. Filled by ``selfsup/methods/__init__.py`` once each method's module is
#: imported; it lives here so that a method building another (distill's teacher) imports it
#: from below instead of from the package that imports that method.
METHODS: dict[str, type[Method]] = {}
