"""What every method shares: the backbone, the view settings, the parameter groups, and hooks
before and after each optimiser step (momentum schedules, EMA teachers and the like).

A method's constructor takes its paper's hyperparameters as keyword arguments, without defaults
(those live once, in :mod:`selfsup.config`); ``from_config`` maps a :class:`Config` onto them.
What only the training loop knows (the step, the run's length, the local batch, the seed) it
hands to the hooks in a :class:`StepInfo`, so no method reads the run's training settings.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..augment import Augment, ViewConfig, byol_view, multi_crop_views
from ..config import AugConfig, Config, ConfigError, MultiCropConfig, OneViewOverrides, ViewOverrides
from ..optim import param_groups


@dataclass(frozen=True)
class StepInfo:
    """What the training loop knows at a step, handed to :meth:`Method.on_step_start` / ``_end``."""
    step: int             # this step's index, from 0
    total_steps: int      # steps in the whole run
    steps_per_epoch: int
    local_batch: int      # images per rank in a step; the global batch is local_batch x world size
    seed: int             # the run's seed: per-step randomness a resumed run repeats (MoCo's Shuffle BN)


class Method(nn.Module):
    """A self-supervised method: ``forward(views)`` returns a dict with the scalar ``loss``, the
    ``embedding`` and optionally other 0-dim tensors (e.g. SwAV's ``code_entropy``), which the
    trainer averages over each epoch and logs under their keys.

    ``aug`` and ``multicrop``: the view recipe's settings (colour strength, blur, crop scale, the
    global and local crops); ``weight_decay`` and ``exclude_bias_and_norm``: the parameter groups'.
    """

    #: Methods whose papers synchronise BN across devices default to global BN.
    sync_bn_default: bool = True
    #: ``optim.clip_grad_mode`` when unset: one global norm (DINO clips each parameter's).
    clip_grad_mode_default: str = "global"
    #: Whether the method reads the top-level ``loss`` (and ``dclw_sigma``); the others' loss is their own.
    reads_loss: bool = False

    def __init__(self, backbone: nn.Module, *, aug: AugConfig, multicrop: MultiCropConfig,
                 weight_decay: float, exclude_bias_and_norm: bool):
        super().__init__()
        self.backbone = backbone
        self.aug, self.multicrop = aug, multicrop
        self.weight_decay, self.exclude_bias_and_norm = weight_decay, exclude_bias_and_norm

    @staticmethod
    def shared_settings(cfg: Config) -> dict[str, Any]:
        """The keyword arguments every method takes, from ``cfg``: its views and parameter groups."""
        return dict(aug=cfg.aug, multicrop=cfg.multicrop, weight_decay=cfg.optim.weight_decay,
                    exclude_bias_and_norm=cfg.optim.exclude_bias_and_norm)

    @classmethod
    def from_config(cls, cfg: Config, backbone: nn.Module) -> "Method":
        """The method ``cfg`` describes, on ``backbone``."""
        raise NotImplementedError

    @staticmethod
    def check(cfg: Config) -> None:
        """Refuse, with a ConfigError naming the keys, settings that pass every field check but
        that this method cannot train with. Called by :func:`selfsup.methods.check_config`."""

    def augmentations(self, size: int, mean, std) -> list[Augment]:
        """One augmentation per view, applied to the same uint8 batch."""
        raise NotImplementedError

    def forward(self, views: list[Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    def asymmetric_views(self, size: int, mean, std) -> tuple[ViewConfig, ViewConfig]:
        """BYOL's two views (BYOL Table 6: blur 1.0 / 0.1, solarisation 0 / 0.2), the recipe of
        BYOL, DINO, Barlow Twins, VICReg, MoCo v3 and NNCLR; blur only if ``aug.blur``. The
        recipe's: :meth:`views` applies the user's overrides."""
        a = self.aug
        v1, v2 = (byol_view(size, i, blur=a.blur, scale=(a.scale_min, 1.0), mean=mean, std=std) for i in (1, 2))
        return v1, v2

    def views(self, global_views: list[ViewConfig], local_views: list[ViewConfig] = ()) -> list[Augment]:
        """The recipe's views as augmentations, with the user's overrides (issue 25): ``aug.*``
        on every view, then ``aug.view1`` on the first, third, ... global view, ``aug.view2`` on
        the second, fourth, ... and ``aug.local`` on the local crops. Unset overrides (None)
        leave the recipe as it is."""
        a = self.aug
        made = [with_overrides(v, a, (a.view1, a.view2)[i % 2]) for i, v in enumerate(global_views)]
        made += [with_overrides(v, a, a.local) for v in local_views]
        return [Augment(v) for v in made]

    def multi_crop(self, global_views: list[ViewConfig], local_from: ViewConfig | None = None) -> list[Augment]:
        """The global views, then ``multicrop.local_crops`` local views of ``local_from``
        (default: the first global view, before its overrides), as ``multicrop`` describes them."""
        mc = self.multicrop
        size = global_views[0].size
        local_size = mc.local_size or max(4, round(size * 96 / 224))
        views = multi_crop_views(global_views, mc.local_crops, local_size,
                                 (mc.local_scale_min, mc.local_scale_max), local_from)
        return self.views(views[:len(global_views)], views[len(global_views):])

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

    def param_groups(self, peak_lr: float) -> list[dict]:
        """The optimiser's parameter groups. ``peak_lr``, the schedule's peak (which only the
        loop knows), is for groups that hold their lr fixed (SimSiam's predictor)."""
        return param_groups(self, self.weight_decay, exclude_bias_and_norm=self.exclude_bias_and_norm)

    @torch.no_grad()
    def on_step_start(self, info: StepInfo) -> None:
        """Called before every training step, for per-step schedules that the forward pass reads
        (MoCo's momentum, DINO's teacher temperature)."""

    @torch.no_grad()
    def on_step_end(self, info: StepInfo) -> None:
        """Called after every optimiser step (EMA targets, SwAV's prototype renormalisation)."""

    def frozen_now(self) -> list[nn.Parameter]:
        """Parameters whose gradient this step drops after backward (set to None), so that no
        optimiser, weight decay or clipping touches them: DINO's last layer and SwAV's prototypes
        early in training, as the official code's ``cancel_gradients_last_layer``. The gradient is
        computed and then dropped, so the graph is the same at every step: DDP needs no
        ``find_unused_parameters`` and a compiled step never recompiles. Decided in
        :meth:`on_step_start`; none by default."""
        return []


class TwoViewMethod(Method):
    """A method whose loss compares exactly two views, BYOL's asymmetric pair, each sent through
    the networks alone so that BN normalises it with its own statistics (the official code of
    Barlow Twins, VICReg, MoCo v3; NNCLR's pseudocode). Subclasses set ``self.projector``."""

    @staticmethod
    def check(cfg: Config) -> None:
        if cfg.multicrop.global_crops != 2 or cfg.multicrop.local_crops:
            raise ConfigError(f"{cfg.method} takes exactly two views; multicrop.global_crops=2 and "
                              f"multicrop.local_crops=0 (multi-crop is for simclr, byol, simsiam, swav and dino)")

    def augmentations(self, size: int, mean, std) -> list[Augment]:
        return self.views(list(self.asymmetric_views(size, mean, std)))

    def project(self, views: list[Tensor]) -> tuple[Tensor, Tensor]:
        """z1, z2 = g(f(x1)), g(f(x2)), one pass per view: (N, D) each."""
        x1, x2 = views
        return self.projector(self.backbone(x1)), self.projector(self.backbone(x2))


#: Overrides (``aug.*``) whose :class:`ViewConfig` field has another name.
VIEW_FIELDS = {"hflip_p": "flip_p"}


def with_overrides(view: ViewConfig, *layers: ViewOverrides | OneViewOverrides) -> ViewConfig:
    """``view`` with every field that ``layers`` set (not None), later layers winning."""
    names = {f.name for f in dataclasses.fields(OneViewOverrides)}  # not aug's recipe knobs (aug.size, ...)
    changes = {VIEW_FIELDS.get(f.name, f.name): getattr(layer, f.name)
               for layer in layers for f in dataclasses.fields(layer)
               if f.name in names and getattr(layer, f.name) is not None}
    return dataclasses.replace(view, **changes) if changes else view


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
