"""Self-supervised methods by name, and the one check of a run's settings (:func:`check_config`)."""
from __future__ import annotations

from ..config import Config, check_placeholders, validate
from ..errors import ConfigError
from .barlow_twins import BarlowTwins
from .base import METHODS, Method, StepInfo
from .byol import BYOL
from .dino import DINO
from .distill import Distill
from .moco import MoCo
from .mocov3 import MoCoV3
from .nnclr import NNCLR
from .simclr import SimCLR
from .simsiam import SimSiam
from .swav import SwAV
from .vicreg import VICReg

METHODS.update({
    "simclr": SimCLR,
    "moco": MoCo,
    "byol": BYOL,
    "simsiam": SimSiam,
    "swav": SwAV,
    "dino": DINO,
    "barlow_twins": BarlowTwins,
    "vicreg": VICReg,
    "mocov3": MoCoV3,
    "nnclr": NNCLR,
    "distill": Distill,
})


def check_config(cfg: Config) -> Config:
    """``cfg`` if a run can train with it, else a ConfigError naming the keys: every field's check
    (:func:`selfsup.config.validate`), then the method's own rules (``METHODS[cfg.method].check``),
    then the presets' placeholders. The trainer's entry calls it; :func:`~selfsup.config.resolve`
    alone checks the fields only."""
    validate(cfg)
    if cfg.loss != Config.loss and not METHODS[cfg.method].reads_loss:
        readers = " and ".join(name for name, method in METHODS.items() if method.reads_loss)
        raise ConfigError(f"loss={cfg.loss} is read by {readers} only; {cfg.method}'s loss is its own")
    METHODS[cfg.method].check(cfg)
    check_placeholders(cfg)
    return cfg


__all__ = ["BYOL", "DINO", "BarlowTwins", "Distill", "METHODS", "Method", "MoCo", "MoCoV3", "NNCLR", "SimCLR",
           "SimSiam", "StepInfo", "SwAV", "VICReg", "check_config"]
