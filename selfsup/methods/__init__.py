"""Self-supervised methods by name."""
from __future__ import annotations

from .base import Method
from .simclr import SimCLR

METHODS: dict[str, type[Method]] = {
    "simclr": SimCLR,
}

__all__ = ["METHODS", "Method", "SimCLR"]
