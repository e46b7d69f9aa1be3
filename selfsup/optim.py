"""Parameter groups, LARS, and the per-step schedules: the learning rate (SimCLR §2.3 and
App. B.1), warm-ups and freezes that a training loop or a method's hook evaluates at a step."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, *, exclude_bias_and_norm: bool = True,
                 plain: Iterable[nn.Parameter] = ()) -> list[dict]:
    """Split trainable parameters into a decayed group and a bias/norm group.

    Biases and normalisation parameters (every tensor with ndim <= 1) get no weight decay and,
    under LARS, no trust-ratio adaptation, as in SimCLR and BYOL. SwAV and SimSiam's linear
    eval decay everything: ``exclude_bias_and_norm=False`` gives one group.

    ``plain``: parameters that LARS trains by plain momentum SGD (no trust ratio), SimCLRv2's
    new supervised head (tf2/model.py and lars_optimizer.py exclude ``head_supervised``; the
    head's kernel keeps an L2 term of ``weight_decay``, its bias none): groups with
    ``"lars_exclude": True``, weight decay ``weight_decay`` on tensors with ndim > 1, 0 on the rest.
    """
    plain_ids = {id(p) for p in plain}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in plain_ids]
    head = [p for p in model.parameters() if p.requires_grad and id(p) in plain_ids]
    if not exclude_bias_and_norm:
        groups = [{"params": params, "weight_decay": weight_decay, "lars_exclude": False}]
    else:
        groups = [
            {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay,
             "lars_exclude": False},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lars_exclude": True},
        ]
    groups += [{"params": [p for p in head if p.ndim > 1], "weight_decay": weight_decay, "lars_exclude": True},
               {"params": [p for p in head if p.ndim <= 1], "weight_decay": 0.0, "lars_exclude": True}]
    return [g for g in groups if g["params"]]


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as in SimCLR's code.

    g += wd*w; trust = eta*||w||/||g|| (1 if either norm is 0); v = m*v + lr*trust*g; w -= v.

    Groups with ``"lars_exclude": True`` skip the trust ratio (plain momentum SGD) and take their
    weight decay from the group (0 via :func:`param_groups`). ``nesterov``: w -= m*v + lr*trust*g.
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, nesterov: bool = False):
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient <= 0:
            raise ValueError("LARS needs lr, momentum, weight_decay >= 0 and trust_coefficient > 0")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, nesterov=nesterov, lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("LARS does not support sparse gradients")
            grads = [p.grad for p in params]
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                bufs.append(state["momentum_buffer"])
            lr, m = group["lr"], group["momentum"]

            if group["weight_decay"] != 0:
                # decay enters the gradient before the trust ratio, as in SimCLR's LARSOptimizer
                steps = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            else:
                steps = torch._foreach_mul(grads, 1.0)  # a copy: p.grad stays untouched
            if group["lars_exclude"]:
                torch._foreach_mul_(steps, lr)
            else:
                # all norms of the group at once; stays on device (no .item() sync)
                w_norm = torch.stack(torch._foreach_norm(params))  # (P,)
                g_norm = torch.stack(torch._foreach_norm(steps))  # (P,)
                trust = torch.where((w_norm > 0) & (g_norm > 0),
                                    group["trust_coefficient"] * w_norm / g_norm, torch.ones_like(w_norm))
                torch._foreach_mul_(steps, list((lr * trust).unbind()))  # lr*trust*g

            torch._foreach_mul_(bufs, m)
            torch._foreach_add_(bufs, steps)  # v = m*v + lr*trust*g
            if group["nesterov"]:
                torch._foreach_add_(steps, bufs, alpha=m)  # m*v + lr*trust*g
                torch._foreach_sub_(params, steps)
            else:
                torch._foreach_sub_(params, bufs)
        return loss


def build_optimizer(name: str, groups: list[dict], *, lr: float, momentum: float = 0.9,
                    weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                    nesterov: bool = False) -> torch.optim.Optimizer:
    """Build ``lars``, ``sgd`` or ``adamw`` over ``groups``; a group's own ``weight_decay`` wins."""
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    params = [p for g in groups for p in g["params"]]
    if name == "sgd":  # fused on CUDA (one kernel for all parameters); foreach on the CPU, as before
        fused = bool(params) and all(p.is_floating_point() and p.is_cuda for p in params)
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               nesterov=nesterov, fused=fused or None, foreach=None if fused else True)
    if name == "adamw":
        # the fused kernel exists for floating-point CPU and CUDA tensors; foreach elsewhere
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay,
                                 fused=fused or None, foreach=None if fused else True)
    raise ValueError(f"unknown optimizer {name!r}; choose from lars, sgd, adamw")


CLIP_MODES = ("global", "per_param")


def clip_gradients(params: Iterable[torch.Tensor], max_norm: float, mode: str = "global") -> None:
    """Scale gradients in place so that their norm is at most ``max_norm``.

    ``global``: one norm over every gradient (``nn.utils.clip_grad_norm_``). ``per_param``: each
    parameter's gradient by its own norm, g *= min(1, max_norm / (||g|| + 1e-6)), as DINO's
    ``utils.clip_gradients``. Neither reads a value back to the host.
    """
    if mode not in CLIP_MODES:
        raise ValueError(f"unknown gradient clipping mode {mode!r}; choose from {', '.join(CLIP_MODES)}")
    params = [p for p in params if p.grad is not None]
    if not params:
        return
    if mode == "global":
        nn.utils.clip_grad_norm_(params, max_norm)
    else:
        grads = [p.grad for p in params]
        norms = torch.stack(torch._foreach_norm(grads))  # (P,)
        torch._foreach_mul_(grads, list((max_norm / (norms + 1e-6)).clamp(max=1.0).unbind()))


def scale_lr(base_lr: float, batch_size: int, rule: str = "linear") -> float:
    """SimCLR's learning-rate scaling (App. B.1): linear base*B/256, sqrt base*sqrt(B), or none."""
    if rule == "linear":
        return base_lr * batch_size / 256
    if rule == "sqrt":
        return base_lr * math.sqrt(batch_size)
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown lr scaling rule {rule!r}; choose from linear, sqrt, none")


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, base_lr: float,
                  final_lr: float = 0.0) -> float:
    """Linear warm-up then cosine decay without restarts (SimCLR §2.3, SwAV's final_lr)."""
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"need 0 <= warmup_steps <= total_steps, got {warmup_steps} and {total_steps}")
    # 1) warm-up: (step + 1) so the first step already moves; base_lr at step warmup_steps - 1
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    # 3) after the schedule
    if step >= total_steps:
        return final_lr
    # 2) cosine from base_lr (at step warmup_steps) towards final_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return final_lr + 0.5 * (base_lr - final_lr) * (1.0 + math.cos(math.pi * progress))


def cosine(step: int, total_steps: int, start: float, end: float) -> float:
    """``start`` at step 0 to ``end`` at ``total_steps`` on a half cosine, then ``end`` (DINO's
    ``cosine_scheduler`` without warm-up: the weight decay 0.04 -> 0.4, per step)."""
    if step >= total_steps:
        return end
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * step / total_steps))


def linear_warmup(step: int, warmup_steps: float, start: float, end: float) -> float:
    """``start`` at step 0, linear to ``end`` at ``warmup_steps``, then ``end`` (DINO's
    ``teacher_temp_schedule``, per step)."""
    if step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


def freeze_steps(epochs: float, steps_per_epoch: int, steps: int | None = None) -> int:
    """How many first steps a module gets no gradient: ``steps`` if given, else ``epochs`` of
    ``steps_per_epoch``, rounded (SwAV's ``freeze_prototypes_niters``)."""
    return steps if steps is not None else round(epochs * steps_per_epoch)


def set_weight_decay(optimizer: torch.optim.Optimizer, weight_decay: float) -> None:
    """Set the weight decay of every group that has one (its first value > 0) to ``weight_decay``;
    biases and norms (weight decay 0) keep none (DINO's regularised group only)."""
    for group in optimizer.param_groups:
        if group.setdefault("initial_weight_decay", group["weight_decay"]) > 0:
            group["weight_decay"] = weight_decay


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set each group's lr to ``lr * group["lr_scale"]`` (default 1).

    Groups with ``"fixed_lr": True`` keep the lr they had at the first call (SimSiam's predictor).
    """
    for group in optimizer.param_groups:
        if group.get("fixed_lr", False):
            group["lr"] = group.setdefault("initial_lr", group["lr"])
        else:
            group["lr"] = lr * group.get("lr_scale", 1.0)
