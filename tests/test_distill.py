"""Offline distillation (issue 6): a frozen teacher from any run, S2-BNN's and SEED's losses,
clear errors for a missing or unfit teacher, and runs through the CLI."""
import json

import pytest
import torch
import torch.nn.functional as F

from selfsup import checkpoint as ckpt
from selfsup.cli import main
from selfsup.config import ConfigError, resolve
from selfsup.losses import distill, seed
from selfsup.methods import check_config
from selfsup.methods.distill import load_teacher
from selfsup.optim import build_optimizer
from selfsup.train import build_method, train_step

B, SIZE = 8, 16
TINY = ["--data", "digits", "--batch-size", "32", "--device", "cpu", "--no-progress", "--epochs", "1",
        "--set", f"data.image_size={SIZE}", "model.width=0.125", "eval.knn_k=20", "optim.warmup_epochs=0"]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "run"
    assert main(["pretrain", "--method", "simclr", "--out", str(out), *TINY, "model.proj_dim=16"]) == 0
    return out


def _student(teacher_run, *sets):
    cfg = resolve(sets=["method=distill", f"distill.teacher={teacher_run}", "model.width=0.125",
                        "model.backbone=binary-resnet18", f"train.batch_size={B}", *sets])
    method = build_method(cfg)
    method.train()
    return method


def test_seed_loss_against_a_naive_reference():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(B, 6, generator=g, requires_grad=True), torch.randn(B, 6, generator=g, requires_grad=True)
    queue = F.normalize(torch.randn(5, 6, generator=g), dim=1)
    expected = 0.0
    for i in range(B):
        si, ti = s[i] / s[i].norm(), t[i] / t[i].norm()
        ls = torch.stack([si @ ti] + [si @ q for q in queue]) / 0.2
        lt = torch.stack([ti @ ti] + [ti @ q for q in queue]) / 0.5
        expected = expected - (torch.softmax(lt, 0) * torch.log_softmax(ls, 0)).sum() / B
    loss = seed(s, t, queue, student_temp=0.2, teacher_temp=0.5)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert s.grad is not None and t.grad is None  # the teacher is a constant


def test_teacher_is_frozen_its_bn_statistics_never_move(teacher_run):
    torch.manual_seed(0)
    method = _student(teacher_run, "distill.contrastive_weight=0.5")
    assert not method.teacher.training and method.training  # train() keeps the teacher in eval
    before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    assert any("running_mean" in k for k in before)
    optimizer = build_optimizer("adamw", method.param_groups(1e-2), lr=1e-2)
    assert not any(p is q for g in optimizer.param_groups for p in g["params"] for q in method.teacher.parameters())
    augmentations = method.augmentations(SIZE, (0.5,) * 3, (0.25,) * 3)
    assert len(augmentations) == 2  # contrastive weight > 0: two views
    g = torch.Generator().manual_seed(0)
    student_before = method.backbone.conv1.weight.detach().clone()
    for step in range(3):
        images = torch.randint(0, 256, (B, SIZE, SIZE, 3), dtype=torch.uint8, generator=g)
        out = train_step(method, optimizer, augmentations, images, g, None)
        assert torch.isfinite(out["loss"])
        assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
    for k, v in method.teacher.state_dict().items():
        assert torch.equal(v, before[k]), k  # weights, running_mean/var and num_batches_tracked
    assert not torch.equal(method.backbone.conv1.weight, student_before)


def test_s2bnn_distils_over_embedding_dimensions_of_the_same_view(teacher_run):
    torch.manual_seed(0)
    method = _student(teacher_run)
    mean, std = method.teacher_meta.mean, method.teacher_meta.std
    # a student on other data statistics: the teacher still gets its own normalisation of the pixels
    method.augmentations(SIZE, (0.5,) * 3, (0.25,) * 3)
    pixels = torch.rand(1, 3, 1, 1)
    as_student = (pixels - 0.5) / 0.25
    as_teacher = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(as_student * method.teacher_scale + method.teacher_shift, as_teacher)
    views = [aug(torch.randint(0, 256, (B, SIZE, SIZE, 3), dtype=torch.uint8))
             for aug in method.augmentations(SIZE, mean, std)]  # the teacher's statistics: identity
    assert len(views) == 1  # one view, seen by both
    with torch.no_grad():
        t = F.normalize(method.teacher(views[0]), dim=1)  # (B, 16): the teacher run's proj_dim
        out = method(views)
        s = F.normalize(method.projector(method.backbone(views[0])), dim=1)
    assert t.shape == s.shape == (B, 16)
    assert out["loss"].item() == pytest.approx(distill(s, t, 0.2).item(), rel=1e-5)


def test_seed_queue_takes_the_teacher_embeddings(teacher_run):
    method = _student(teacher_run, "distill.mode=seed", "distill.queue_size=16")
    meta = method.teacher_meta
    views = [aug(torch.randint(0, 256, (B, SIZE, SIZE, 3), dtype=torch.uint8))
             for aug in method.augmentations(SIZE, meta.mean, meta.std)]
    queue_before = method.queue.snapshot()
    with torch.no_grad():
        t = F.normalize(method.teacher(views[0]), dim=1)
        s = method.projector(method.backbone(views[0]))
        out = method(views)
    assert out["loss"].item() == pytest.approx(seed(s, t, queue_before, 0.2, 1e-4).item(), rel=1e-4)
    torch.testing.assert_close(method.queue.keys[:B], t)  # enqueued after the loss
    torch.testing.assert_close(method.queue.keys[B:], queue_before[B:])


def test_missing_or_unfit_teacher_gives_a_clear_error(teacher_run, tmp_path, capsys):
    with pytest.raises(ConfigError, match="needs a frozen teacher: pass --teacher"):
        check_config(resolve(sets=["method=distill"]))
    assert main(["pretrain", "--method", "distill", "--teacher", str(tmp_path / "nope"), *TINY]) == 2
    err = capsys.readouterr().err
    assert "distill.teacher" in err and "does not exist" in err and len(err.strip().splitlines()) == 1

    plain = tmp_path / "weights.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, plain)
    with pytest.raises(ckpt.CheckpointError, match="is not a selfsup pre-training checkpoint"):
        load_teacher(plain)
    with pytest.raises(ckpt.CheckpointError, match="is not a selfsup pre-training checkpoint"):
        load_teacher(teacher_run / "backbone.pt")

    state = ckpt.load(teacher_run / "checkpoint.pt")
    state["config"]["model"]["width"] = 0.25  # weights of a width-0.125 network
    other = tmp_path / "other.pt"
    torch.save(state, other)
    with pytest.raises(ckpt.CheckpointError, match=r"does not fit a simclr resnet18 \(width 0.25\)"):
        load_teacher(other)


def test_distill_trains_a_binary_student_through_the_cli(teacher_run, tmp_path):
    out = tmp_path / "student"
    assert main(["pretrain", "--method", "distill", "--teacher", str(teacher_run), "--out", str(out),
                 "--backbone", "binary-resnet18", *TINY, "distill.mode=seed", "distill.queue_size=64"]) == 0
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["knn_top1"] > 0 and metrics["effective_rank"] > 2
    assert json.loads((out / "backbone.json").read_text())["backbone"] == "binary-resnet18"
    assert main(["eval", "knn", "--checkpoint", str(out), "--data", "digits", "--k", "20", "--device", "cpu"]) == 0
