"""BYOL (issue 5): the regression loss, the momentum teacher with its schedule, the method."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfsup.cli import main
from selfsup.config import Config
from selfsup.losses import byol
from selfsup.methods import StepInfo
from selfsup.momentum import MomentumTeacher, momentum_at
from selfsup.optim import LARS
from selfsup.train import build_method

B, SIZE = 8, 16


def test_byol_loss_against_a_naive_reference_and_closed_forms():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(B, 6, generator=g, requires_grad=True)
    z = torch.randn(B, 6, generator=g, requires_grad=True)
    naive = sum(((p[i] / p[i].norm() - z[i] / z[i].norm()) ** 2).sum() for i in range(B)) / B
    loss = byol(p, z)
    assert loss.item() == pytest.approx(naive.item(), rel=1e-5)
    assert loss.item() == pytest.approx((2 - 2 * F.cosine_similarity(p, z)).mean().item(), rel=1e-5)
    loss.backward()
    assert p.grad is not None and z.grad is None  # z is the target: a constant
    assert byol(z, 3 * z).item() == pytest.approx(0.0, abs=1e-6)  # same direction
    assert byol(z, -z).item() == pytest.approx(4.0, rel=1e-6)  # opposite


def test_teacher_update_is_the_ema_of_the_student_and_never_gets_gradients():
    student = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    teacher = MomentumTeacher(student)
    assert list(teacher.state_dict()) == ["0." + k for k in student.state_dict()]  # momentum_copy's layout
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    old = [p.clone() for p in teacher.parameters()]
    tau = teacher.update(momentum_at(3, 10, 0.9, cosine=True))
    assert tau == teacher.momentum == pytest.approx(1 - 0.1 * (math.cos(math.pi * 3 / 10) + 1) / 2)
    for t, o, s in zip(teacher.parameters(), old, student.parameters()):
        torch.testing.assert_close(t, tau * o + (1 - tau) * s)
    x = torch.randn(5, 3)
    (teacher(x).sum() + student(x).sum()).backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    # τ = 1 - (1 - τ_base)(cos(πk/K) + 1)/2: τ_base at k = 0, 1 after the last step
    assert momentum_at(0, 10, 0.9, cosine=True) == pytest.approx(0.9)
    frozen = [p.clone() for p in teacher.parameters()]
    assert teacher.update(momentum_at(10, 10, 0.9, cosine=True)) == 1.0
    assert all(torch.equal(a, b) for a, b in zip(frozen, teacher.parameters()))  # τ = 1: no change


def _cfg() -> Config:
    cfg = Config(method="byol")
    cfg.model.width, cfg.model.proj_hidden, cfg.model.proj_dim = 0.125, 32, 8
    cfg.train.batch_size, cfg.byol.momentum = B, 0.9
    return cfg


def test_byol_steps_the_target_after_the_optimiser_and_reaches_tau_one():
    torch.manual_seed(0)
    method = build_method(_cfg())
    method.train()
    optimizer = LARS(method.param_groups(0.1), lr=0.1, weight_decay=1e-5)
    # LARS excludes biases and norms (BYOL's exclude_bias_and_norm)
    excluded = [g for g in optimizer.param_groups if g["lars_exclude"]][0]["params"]
    assert any(p is method.projector[0][1].weight for p in excluded)
    assert not any(p is t for t in method.target.parameters() for g in optimizer.param_groups for p in g["params"])

    g = torch.Generator().manual_seed(0)
    views = [torch.randn(B, 3, SIZE, SIZE, generator=g) for _ in range(2)]
    target_bn_steps = method.target[0].bn1.num_batches_tracked.item()
    out = method(views)
    passes = 2 if method.per_view_bn else 1  # the target runs once per view, or once for both
    assert method.target[0].bn1.num_batches_tracked.item() == target_bn_steps + passes  # BN in train mode
    optimizer.zero_grad()
    out["loss"].backward()
    assert all(p.grad is None for p in method.target.parameters())
    old = [p.clone() for p in method.target.parameters()]
    optimizer.step()
    online = [p.detach().clone() for m in (method.backbone, method.projector) for p in m.parameters()]
    method.on_step_end(StepInfo(0, 4, 4, B, 0))  # the trainer's hook, after the optimiser step
    tau = method.target.momentum
    assert tau == pytest.approx(momentum_at(1, 4, 0.9, cosine=True))
    for t, o, s in zip(method.target.parameters(), old, online):
        torch.testing.assert_close(t, tau * o + (1 - tau) * s)
    method.on_step_end(StepInfo(3, 4, 4, B, 0))
    assert method.target.momentum == 1.0  # the last step


@pytest.mark.parametrize("per_view_bn", [True, False])
def test_symmetric_loss_and_asymmetric_views(per_view_bn):
    torch.manual_seed(0)
    cfg = _cfg()
    cfg.byol.per_view_bn = per_view_bn
    method = build_method(cfg)
    g = torch.Generator().manual_seed(1)
    x1, x2 = (torch.randn(B, 3, SIZE, SIZE, generator=g) for _ in range(2))
    out = method([x1, x2])
    with torch.no_grad():
        if per_view_bn:  # BYOL's code: each view through the networks alone, BN statistics per view
            (p1, t1), (p2, t2) = ((method.predictor(method.projector(method.backbone(x))), method.target(x))
                                  for x in (x1, x2))
        else:  # one pass: BN normalises both views together
            z = method.projector(method.backbone(torch.cat([x1, x2])))
            p1, p2 = method.predictor(z).chunk(2)
            t1, t2 = method.target(torch.cat([x1, x2])).chunk(2)
    assert out["loss"].item() == pytest.approx((byol(p1, t2) + byol(p2, t1)).item(), rel=1e-5)
    # per view, view 1's embedding does not depend on view 2 (its BN statistics are its own)
    other = method([x1, torch.randn(B, 3, SIZE, SIZE, generator=g)])["embedding"][:B]
    assert torch.allclose(other, out["embedding"][:B], atol=1e-6) == per_view_bn
    v1, v2 = (a.cfg for a in method.augmentations(SIZE, (0.5,) * 3, (0.5,) * 3))
    method.aug.blur = True
    b1, b2 = (a.cfg for a in method.augmentations(SIZE, (0.5,) * 3, (0.5,) * 3))
    assert (b1.blur_p, b1.solarize_p, b2.blur_p, b2.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    assert (v1.blur_p, v2.blur_p, v2.solarize_p) == (0.0, 0.0, 0.2)  # aug.blur=false: no blur at 32x32
    assert (v1.brightness, v1.contrast, v1.saturation, v1.hue, v1.jitter_p, v1.grayscale_p) == (0.4, 0.4, 0.2, 0.1, 0.8, 0.2)


def test_byol_trains_through_the_cli(tmp_path):
    out = tmp_path / "run"
    assert main(["pretrain", "--method", "byol", "--out", str(out), "--epochs", "1", "--data", "digits",
                 "--batch-size", "64", "--device", "cpu", "--no-progress",
                 "--set", "data.image_size=8", "model.width=0.125", "model.proj_hidden=64", "model.proj_dim=16",
                 "eval.knn_k=20", "optim.warmup_epochs=0"]) == 0
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 < metrics["loss"] < 8 and metrics["effective_rank"] > 2 and "knn_top1" in metrics
