"""DINO (issue 6): the centre, the teacher-temperature schedule, the frozen last layer, the
pairs of crops, gradient clipping in the one training loop, and a run through the CLI."""
import json

import pytest
import torch
import torch.nn.functional as F
from gloo import run_ranks

from selfsup import checkpoint as ckpt
from selfsup import loop
from selfsup.cli import main
from selfsup.config import Config
from selfsup.losses import dino, dino_multicrop
from selfsup.methods import dino as dino_module
from selfsup.methods.base import encode_by_resolution
from selfsup.methods import StepInfo
from selfsup.optim import build_optimizer, linear_warmup
from selfsup.train import build_method, train_step

B, SIZE = 8, 16


def _cfg(local_crops: int = 2) -> Config:
    cfg = Config(method="dino")
    cfg.model.width, cfg.model.proj_hidden = 0.125, 32
    cfg.dino.out_dim, cfg.dino.bottleneck_dim = 64, 16
    cfg.multicrop.local_crops, cfg.multicrop.local_size = local_crops, 8
    cfg.train.batch_size, cfg.train.epochs = B, 2
    return cfg


def _at(step, total_steps):
    """The loop's StepInfo for ``_cfg``'s runs: train.epochs 2, so total // 2 steps an epoch."""
    return StepInfo(step, total_steps, max(1, total_steps // 2), B, 0)


def _views(method, n=B, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, SIZE, SIZE, 3), dtype=torch.uint8, generator=g)
    return [aug(images, g) for aug in method.augmentations(SIZE, (0.5,) * 3, (0.25,) * 3)]


def test_teacher_temperature_warms_up_linearly_per_step_then_stays():
    temps = [linear_warmup(s, 3 * 10, 0.04, 0.07) for s in range(40)]  # 3 warm-up epochs of 10 steps
    assert temps[0] == 0.04 and temps[15] == pytest.approx(0.055) and temps[29] < 0.07
    assert temps[30:] == [0.07] * 10
    assert all(a < b for a, b in zip(temps[:30], temps[1:31]))
    assert linear_warmup(0, 0 * 10, 0.04, 0.07) == 0.07  # DINO's code default: no warm-up
    cfg = _cfg()
    cfg.dino.warmup_teacher_temp, cfg.dino.teacher_temp, cfg.dino.warmup_teacher_temp_epochs = 0.04, 0.06, 1
    method = build_method(cfg)
    temp = method.teacher_temp  # a 0-dim buffer updated in place: a compiled forward reads it, never recompiles
    method.on_step_start(_at(5, total_steps=20))  # 2 epochs of 10 steps: half-way through the warm-up
    assert method.teacher_temp is temp and temp.item() == pytest.approx(0.05)
    method.on_step_start(_at(10, total_steps=20))
    assert method.teacher_temp is temp and temp.item() == pytest.approx(0.06)
    assert "teacher_temp" not in method.state_dict()  # non-persistent: checkpoints keep their keys


def test_center_is_updated_after_the_loss_with_the_raw_teacher_outputs():
    torch.manual_seed(0)
    method = build_method(_cfg(local_crops=0))
    method.train()
    method.center.copy_(torch.randn_like(method.center))
    c0 = method.center.clone()
    views = _views(method)
    method.on_step_start(_at(0, 20))
    with torch.no_grad():
        teacher_out = method.teacher(torch.cat(views))  # (2B, K); train-mode BN: same as in forward
        student = method.last_layer(method.projector(method.backbone(torch.cat(views)))).chunk(2)
    out = method(views)
    t1, t2 = teacher_out.chunk(2)
    expected = (dino(student[1], t1, c0, 0.1, method.teacher_temp)
                + dino(student[0], t2, c0, 0.1, method.teacher_temp)) / 2  # the old centre
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(method.center, 0.9 * c0 + 0.1 * teacher_out.mean(0, keepdim=True))


def test_same_view_pairs_are_skipped(monkeypatch):
    calls = []

    def recording(*args):
        calls.append([a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args])
        return dino_multicrop(*args)

    monkeypatch.setattr(dino_module, "dino_multicrop", recording)
    torch.manual_seed(0)
    method = build_method(_cfg(local_crops=2))
    method.train()
    views = _views(method)
    assert [tuple(v.shape[-2:]) for v in views] == [(16, 16)] * 2 + [(8, 8)] * 2
    with torch.no_grad():  # every crop's student output and the global crops' teacher outputs
        student = method.last_layer(method.projector(encode_by_resolution(method.backbone, views))).split(B)
        teacher = method.teacher(torch.cat(views[:2])).split(B)
    method.on_step_start(_at(0, 20))
    loss = method(views)["loss"]
    (student_out, teacher_out, center, student_temp, teacher_temp, n_global), = calls  # one call for all crops
    assert n_global == 2 and student_temp == 0.1
    torch.testing.assert_close(student_out, torch.cat(student), atol=1e-5, rtol=0)  # every crop
    torch.testing.assert_close(teacher_out, torch.cat(teacher), atol=1e-5, rtol=0)  # the global crops only
    pair = lambda t, s: dino(student[s], teacher[t], center, 0.1, teacher_temp).item()  # noqa: E731
    skipping = [(0, 1), (0, 2), (0, 3), (1, 0), (1, 2), (1, 3)]  # G x (V - 1): never a crop against itself
    assert loss.item() == pytest.approx(sum(pair(t, s) for t, s in skipping) / 6, rel=1e-5)
    every = [(t, s) for t in range(2) for s in range(4)]
    assert loss.item() != pytest.approx(sum(pair(t, s) for t, s in every) / 8, rel=1e-5)


def _pairwise_dino(student, teacher, center, student_temp, teacher_temp, n_global):
    """The pre-issue-24 formulation, written out: one softmax pair per (teacher t, student s != t)."""
    b = len(teacher) // n_global
    s_crops, t_crops = student.split(b), teacher.split(b)
    pairs = [(t, s) for t in range(n_global) for s in range(len(s_crops)) if s != t]
    terms = [-(F.softmax((t_crops[t] - center) / teacher_temp, dim=1)
               * F.log_softmax(s_crops[s] / student_temp, dim=1)).sum(1).mean() for t, s in pairs]
    return sum(terms) / len(pairs)


@pytest.mark.parametrize("n_global,n_views", [(2, 2), (2, 10), (1, 3), (3, 5)])
def test_multicrop_loss_equals_the_mean_over_pairs_in_float64(n_global, n_views):
    g = torch.Generator().manual_seed(n_views)
    b, k = 5, 17
    student = torch.randn(n_views * b, k, dtype=torch.float64, generator=g, requires_grad=True)
    teacher = torch.randn(n_global * b, k, dtype=torch.float64, generator=g)
    center = torch.randn(1, k, dtype=torch.float64, generator=g)
    temp = torch.tensor(0.055, dtype=torch.float64)
    loss = dino_multicrop(student, teacher, center, 0.1, temp, n_global)
    (grad,) = torch.autograd.grad(loss, student)
    ref = _pairwise_dino(student, teacher, center, 0.1, temp, n_global)
    (ref_grad,) = torch.autograd.grad(ref, student)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
    # float32 and bf16 inputs compute in float32, as the single-pair loss
    low = dino_multicrop(student.detach().bfloat16(), teacher.bfloat16(), center.float(), 0.1, 0.055, n_global)
    assert low.dtype == torch.float32 and low.item() == pytest.approx(ref.item(), rel=2e-2)


def test_last_layer_is_frozen_for_the_first_epoch_and_gradients_are_clipped():
    torch.manual_seed(0)
    cfg = _cfg(local_crops=0)
    cfg.dino.freeze_last_layer_epochs = 1
    method = build_method(cfg)
    method.train()
    optimizer = build_optimizer("adamw", method.param_groups(1e-2), lr=1e-2, weight_decay=0.04)
    augmentations = method.augmentations(SIZE, (0.5,) * 3, (0.25,) * 3)
    images = torch.randint(0, 256, (B, SIZE, SIZE, 3), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    v0, w0 = method.last_layer.weight_v.detach().clone(), method.backbone.conv1.weight.detach().clone()
    total, per_epoch = 4, 2
    for step in range(per_epoch):  # epoch 1: frozen
        method.on_step_start(_at(step, total))
        assert method.frozen_now() == [method.last_layer.weight_v]
        train_step(method, optimizer, augmentations, images, g, None, clip_grad=1e-3, frozen=method.frozen_now())
        assert method.last_layer.weight_v.grad is None
        norm = torch.cat([p.grad.flatten() for p in method.parameters() if p.grad is not None]).norm()
        assert norm.item() <= 1e-3 * 1.0001  # clipped to optim.clip_grad
        method.on_step_end(_at(step, total))
    assert torch.equal(method.last_layer.weight_v, v0)  # no gradient, no weight decay either
    assert not torch.equal(method.backbone.conv1.weight, w0)
    teacher_v = method.teacher[2].weight_v.clone()
    method.on_step_start(_at(per_epoch, total))  # epoch 2: it learns
    assert method.frozen_now() == []
    train_step(method, optimizer, augmentations, images, g, None, frozen=method.frozen_now())
    assert not torch.equal(method.last_layer.weight_v, v0)
    method.on_step_end(_at(per_epoch, total))
    assert not torch.equal(method.teacher[2].weight_v, teacher_v)  # the EMA follows the student
    # the last layer's rows are unit vectors (weight_g fixed at 1)
    w = F.normalize(method.last_layer.weight_v, dim=1)
    x = torch.randn(3, 16)
    torch.testing.assert_close(method.last_layer(x), x @ w.T)


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_frozen_last_layer_leaves_every_other_gradient_as_a_detach_would(norm_last_layer):
    """frozen_now names v (and g when it learns); dropping their gradients after backward changes
    nothing upstream: the other gradients equal those of a forward where the last layer takes none."""
    grads = []
    for last_learns in (True, False):
        torch.manual_seed(0)
        cfg = _cfg(local_crops=2)
        cfg.dino.norm_last_layer, cfg.dino.freeze_last_layer_epochs = norm_last_layer, 1
        method = build_method(cfg)
        method.train()
        method.on_step_start(_at(0, 20))
        assert method.frozen_now() == list(method.last_layer.parameters())
        assert len(method.frozen_now()) == (1 if norm_last_layer else 2)  # v, and g unless fixed at 1
        method.last_layer.requires_grad_(last_learns)
        method(_views(method))["loss"].backward()
        grads.append({n: p.grad for n, p in method.named_parameters() if not n.startswith("last_layer")})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=0, msg=name)


def test_dino_runs_through_the_cli_and_logs_the_collapse_monitor(tmp_path, monkeypatch):
    out = tmp_path / "dino"
    modes = []  # DINO clips each parameter's gradient norm (utils.clip_gradients), not the global one
    monkeypatch.setattr(loop, "clip_gradients", lambda params, norm, mode: modes.append((norm, mode)))
    assert main(["pretrain", "--method", "dino", "--out", str(out), "--data", "digits", "--batch-size", "64",
                 "--device", "cpu", "--no-progress", "--epochs", "1",
                 "--set", "data.image_size=16", "model.width=0.125", "model.proj_hidden=32", "dino.out_dim=64",
                 "dino.bottleneck_dim=16", "multicrop.local_crops=2", "multicrop.local_size=8",
                 "optim.clip_grad=3.0", "eval.knn_k=20", "optim.warmup_epochs=0", "dino.head_bn=true"]) == 0
    assert modes and set(modes) == {(3.0, "per_param")}
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["effective_rank"] > 2 and torch.isfinite(torch.tensor(metrics["loss"]))
    state = ckpt.load(out / "checkpoint.pt")["model"]
    assert any(k.startswith("projector.") and k.endswith("running_mean") for k in state)  # dino.head_bn


def _center_on_rank() -> dict:
    import torch.distributed as dist

    method = build_method(_cfg(local_crops=0))
    outputs = torch.arange(4 * 64, dtype=torch.float32).view(4, 64) * (1 + dist.get_rank())  # (G*B, K)
    method.update_center(outputs)
    return {"center": method.center.clone()}


def test_center_is_the_mean_over_every_rank(tmp_path):
    ranks = run_ranks(_center_on_rank, 2, tmp_path)
    outputs = torch.arange(4 * 64, dtype=torch.float32).view(4, 64)
    expected = 0.1 * torch.cat([outputs, 2 * outputs]).mean(0, keepdim=True)  # the global batch
    for res in ranks:
        torch.testing.assert_close(res["center"], expected)
