"""Frozen layers under DDP (issue 24 §4): DINO's last layer and SwAV's prototypes are frozen by
dropping their gradients after backward (Method.frozen_now), not by detaching them, so every
parameter takes part in every step's graph and DDP runs with find_unused_parameters=False.

Two gloo ranks on the CPU, a tiny ResNet on 16x16 images: while frozen the parameters stay
bit-identical (no gradient, no weight decay, no momentum) and the others move, identically on
both ranks; once the freeze ends the same DDP model trains them too. Detaching instead would
leave them out of the graph, and DDP would refuse the second step."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from gloo import run_ranks
from torch import nn

from selfsup import distributed as D
from selfsup.config import Config
from selfsup.methods import StepInfo
from selfsup.optim import build_optimizer
from selfsup.train import build_method, train_step

B, SIZE, FROZEN_STEPS, STEPS_PER_EPOCH = 4, 16, 3, 3  # per rank; the freeze lasts the first epoch


def _config(method: str) -> Config:
    cfg = Config(method=method)
    cfg.model.width, cfg.model.proj_hidden, cfg.model.sync_bn = 0.125, 32, False
    cfg.multicrop.local_crops, cfg.multicrop.local_size = 2, 8
    cfg.train.batch_size, cfg.train.epochs = B * 2, 2
    if method == "dino":
        cfg.dino.out_dim, cfg.dino.bottleneck_dim, cfg.dino.freeze_last_layer_epochs = 64, 16, 1
    else:
        cfg.model.proj_dim, cfg.swav.prototypes, cfg.swav.freeze_prototypes_epochs = 8, 12, 1
    return cfg


def _train_on_rank(method_name: str) -> dict:
    torch.manual_seed(0)  # the same initial weights on both ranks, as DDP's broadcast would make them
    method = build_method(_config(method_name))
    method.train()
    frozen = [method.last_layer.weight_v] if method_name == "dino" else [method.prototypes.weight]
    # as selfsup.train wraps every method: the same graph every step
    model = nn.parallel.DistributedDataParallel(method, find_unused_parameters=False, static_graph=True,
                                                gradient_as_bucket_view=True)
    optimizer = build_optimizer("adamw" if method_name == "dino" else "sgd", method.param_groups(1e-2),
                                lr=1e-2, weight_decay=0.04)
    augmentations = method.augmentations(SIZE, (0.5,) * 3, (0.25,) * 3)
    g = torch.Generator().manual_seed(D.rank())  # each rank its own images and crops
    images = torch.randint(0, 256, (B, SIZE, SIZE, 3), dtype=torch.uint8, generator=g)
    start = {n: p.detach().clone() for n, p in method.named_parameters() if p.requires_grad}
    total = 2 * STEPS_PER_EPOCH
    for step in range(FROZEN_STEPS):
        info = StepInfo(step, total, STEPS_PER_EPOCH, B, 0)
        method.on_step_start(info)
        assert method.frozen_now() == frozen
        train_step(model, optimizer, augmentations, images, g, None, clip_grad=3.0, frozen=method.frozen_now())
        assert all(p.grad is None for p in frozen)
        method.on_step_end(info)
    during = {n: p.detach().clone() for n, p in method.named_parameters() if p.requires_grad}
    info = StepInfo(FROZEN_STEPS, total, STEPS_PER_EPOCH, B, 0)
    method.on_step_start(info)
    assert method.frozen_now() == []
    train_step(model, optimizer, augmentations, images, g, None, clip_grad=3.0, frozen=method.frozen_now())
    method.on_step_end(info)
    after = {n: p.detach().clone() for n, p in method.named_parameters() if p.requires_grad}
    return {"start": start, "during": during, "after": after,
            "frozen": [n for n, p in method.named_parameters() if any(p is f for f in frozen)]}


def _dino() -> dict:
    return _train_on_rank("dino")


def _swav() -> dict:
    return _train_on_rank("swav")


def _check(ranks: list[dict], renormalised: bool) -> None:
    first = ranks[0]
    (name,) = first["frozen"]
    for res in ranks:
        expected = res["start"][name]
        for _ in range(FROZEN_STEPS if renormalised else 0):  # SwAV renormalises C after every step
            expected = F.normalize(expected, dim=1)
        assert torch.equal(res["during"][name], expected)  # bit-identical: no gradient, decay or momentum
        moved = [n for n in res["start"] if n != name and not torch.equal(res["during"][n], res["start"][n])]
        assert len(moved) > len(res["start"]) // 2  # the backbone and head train meanwhile
        assert not torch.allclose(res["after"][name], res["during"][name])  # the freeze ended: it learns
    for key in ("during", "after"):  # DDP kept the ranks in step
        for n in first[key]:
            torch.testing.assert_close(ranks[1][key][n], first[key][n], rtol=0, atol=1e-6, msg=n)


def test_dino_last_layer_frozen_under_ddp_without_find_unused_parameters(tmp_path):
    _check(run_ranks(_dino, 2, tmp_path), renormalised=False)


def test_swav_prototypes_frozen_under_ddp_without_find_unused_parameters(tmp_path):
    _check(run_ranks(_swav, 2, tmp_path), renormalised=True)
