"""Momentum encoders and the queue of their keys (MoCo §3.2, SimCLRv2's memory; BYOL's target
and DINO's teacher are the same EMA).

The momentum encoder is a frozen copy of the online networks that follows them by an
exponential moving average of the *parameters*: θ_k <- m θ_k + (1 - m) θ_q. Buffers (BN running
statistics) are not averaged; the copy keeps its own, from its own forward passes in train mode.
Copies run without drop path (a ViT student's stochastic depth; DINO's teacher has none).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .vit import without_drop_path


def momentum_copy(*modules: nn.Module) -> nn.Sequential:
    """Frozen deep copies of ``modules`` chained in order: calling the result runs them one
    after another (e.g. backbone then head). It never receives gradients."""
    teacher = without_drop_path(nn.Sequential(*(copy.deepcopy(m) for m in modules)))
    teacher.requires_grad_(False)
    return teacher


class StepMomentum(nn.Module):
    """A momentum m that changes every step (a cosine schedule), kept on the device as the EMA's
    weight 1 - m, so that a compiled forward that applies the EMA reads a tensor, never a Python
    float that would rebuild it, and the update never syncs the host. Not saved: the schedule
    sets it before each step (:meth:`set`)."""

    def __init__(self, m: float):
        super().__init__()
        self.m = m
        self.register_buffer("weight", torch.tensor(1.0 - m), persistent=False)  # 1 - m, float32

    @torch.no_grad()
    def set(self, m: float) -> float:
        """This step's m (1 - m rounded to float32 as the Python scalar it replaces); returns m."""
        self.m = m
        self.weight.fill_(1.0 - m)
        return m


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module | Iterable[nn.Module], m: float | StepMomentum) -> None:
    """θ_teacher <- m θ_teacher + (1 - m) θ_student, over parameters only, in one foreach op.

    ``student`` is a module or the modules ``teacher`` was copied from, in the same order; ``m``
    a constant or this step's :class:`StepMomentum` (the same arithmetic, from a device tensor).
    """
    students = [student] if isinstance(student, nn.Module) else list(student)
    t = list(teacher.parameters())
    s = [p.detach() for module in students for p in module.parameters()]
    if len(t) != len(s):
        raise ValueError(f"teacher has {len(t)} parameter tensors but the student {len(s)}; pass the "
                         f"modules the teacher was copied from, in the same order")
    if isinstance(m, StepMomentum):  # a list of 0-dim weights: a Scalar weight would be read on the host
        torch._foreach_lerp_(t, s, [m.weight] * len(t))
    else:
        torch._foreach_lerp_(t, s, 1.0 - m)  # t + (1 - m)(s - t)


def momentum_at(step: int, total_steps: int, base: float, cosine: bool = False) -> float:
    """The EMA momentum at ``step``: ``base`` throughout, or (``cosine``) rising from ``base`` at
    step 0 to 1 at ``total_steps`` as BYOL: m = 1 - (1 - base)(cos(πk/K) + 1)/2. An EMA updated
    after the optimiser step passes ``step`` = steps taken, so τ = 1 after the last (BYOL's k = K)."""
    if not cosine or total_steps <= 0:
        return base
    return 1 - (1 - base) * (math.cos(math.pi * step / total_steps) + 1) / 2


class MomentumTeacher(nn.Sequential):
    """A momentum copy of ``students`` (chained in order) that follows them: BYOL's target
    network, and the shape of MoCo's key encoder and DINO's teacher.

    It is a ``momentum_copy`` (same state-dict layout: ``0.*`` is the first student's copy) that
    also knows its students, so a method only calls :meth:`update` with the step's τ (from
    :func:`momentum_at`) after each optimiser step. It never receives gradients; it stays in
    train mode with the method, so its BN uses batch statistics and keeps its own running
    statistics (BYOL's ``is_training=True``).
    """

    def __init__(self, *students: nn.Module):
        super().__init__(*(copy.deepcopy(m) for m in students))
        without_drop_path(self)
        self.requires_grad_(False)
        self.momentum: float | None = None  # the τ of the last update
        self._students = students  # a tuple is not registered: the students are saved once, by their owner

    @torch.no_grad()
    def update(self, tau: float | StepMomentum) -> float:
        """θ <- τ θ + (1 - τ) θ_student (τ a constant, or a :class:`StepMomentum` inside a
        compiled forward); returns τ."""
        ema_update(self, self._students, tau)
        self.momentum = tau.m if isinstance(tau, StepMomentum) else tau
        return self.momentum


class KeyQueue(nn.Module):
    """The last K keys of a momentum encoder, first in first out (MoCo §3.1).

    ``keys`` (K, D) and the write pointer ``ptr`` are registered buffers, so a checkpoint
    carries them. It starts as K random unit vectors, as MoCo's does.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))  # (K, D)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def snapshot(self) -> Tensor:
        """The keys as they are now, safe to use in a loss whose backward runs after a push."""
        return self.keys.clone()  # (K, D)

    @torch.no_grad()
    def push(self, k: Tensor) -> None:
        """Replace the oldest len(k) keys with ``k`` (B, D), normalised, gathered over ranks.

        K must be a multiple of B (as MoCo asserts), so the queue always holds whole batches.
        """
        size, b = len(self.keys), len(k)
        if size % b:
            raise ValueError(f"a queue of {size} keys cannot take batches of {b} keys: the size must be "
                             f"a multiple of the keys added per step (e.g. {max(1, size // b) * b})")
        rows = self.ptr + torch.arange(b, device=k.device)  # on the device: no host sync
        self.keys.index_copy_(0, rows, k.to(self.keys.dtype))
        self.ptr.add_(b).remainder_(size)

    def extra_repr(self) -> str:
        return f"size={self.keys.shape[0]}, dim={self.keys.shape[1]}"
