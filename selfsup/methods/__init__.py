"""Self-supervised methods by name."""
from __future__ import annotations

from .base import METHODS, Method
from .byol import BYOL
from .dino import DINO
from .distill import Distill
from .moco import MoCo
from .simclr import SimCLR
from .simsiam import SimSiam
from .swav import SwAV

METHODS.update({
    "simclr": SimCLR,
    "moco": MoCo,
    "byol": BYOL,
    "simsiam": SimSiam,
    "swav": SwAV,
    "dino": DINO,
    "distill": Distill,
})

__all__ = ["BYOL", "DINO", "Distill", "METHODS", "Method", "MoCo", "SimCLR", "SimSiam", "SwAV"]
