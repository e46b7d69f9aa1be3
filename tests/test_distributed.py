"""Two ranks on gloo equal one process holding the whole batch (issue 3).

One spawn of two CPU processes computes everything the comparisons need (the gather's
gradients, global BN, three SimCLR steps with and without synchronised BN); the reference
runs in the test process. The last test launches ``torchrun``, kills a rank and resumes.
"""
import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from selfsup import checkpoint as ckpt
from selfsup import distributed as D
from selfsup.augment import Augment, simclr_view
from selfsup.config import Config
from selfsup.heads import ScaleOnlyBatchNorm1d
from selfsup.losses import nt_xent
from selfsup.optim import build_optimizer
from selfsup.train import build_method

from gloo import free_port, run_ranks

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="needs torch.distributed with the gloo backend")

WORLD = 2
BATCH = 16      # global batch; each rank holds BATCH // WORLD images
SIZE = 16
STEPS = 3
LR = 0.3
TOL = 1e-9       # float64 throughout; float32 rounding would be ~1e-7


def _mine(n: int) -> slice:
    """This rank's rows of a global batch of n."""
    per = n // D.world_size()
    return slice(D.rank() * per, (D.rank() + 1) * per)


# ---------------------------------------------------------------------------------------------
# Computations that run unchanged in one process (world 1) and on every rank.

def _gather_grad() -> torch.Tensor:
    """Input gradient of a rank-specific loss on the gathered batch (8, 5)."""
    g = torch.Generator().manual_seed(3)
    x_all = torch.randn(8, 5, generator=g)
    w = torch.randn(WORLD, 8, 8, generator=g)  # rank r's loss weights every pair of rows
    x = x_all[_mine(8)].clone().requires_grad_()
    y = D.gather_with_grad(x)  # (8, 5)
    ((y @ y.T) * w[D.rank()]).sum().backward()
    return x.grad


def _gather_reference() -> torch.Tensor:
    """The gradient of the sum of both ranks' losses, computed on the whole batch."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 5, generator=g).requires_grad_()
    w = torch.randn(WORLD, 8, 8, generator=g)
    sum(((x @ x.T) * w[r]).sum() for r in range(WORLD)).backward()
    return x.grad


def _gather_reference_local_only() -> torch.Tensor:
    """What rank 0 would get if the backward returned only its own loss's gradient."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 5, generator=g).requires_grad_()
    w = torch.randn(WORLD, 8, 8, generator=g)
    ((x @ x.T) * w[0]).sum().backward()  # rank 0's loss only
    return x.grad[:4]


def _bn_inputs(shape: tuple[int, ...]):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=g) * 3 + 5  # an offset mean: the variance must not cancel
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randn(shape, generator=g), torch.rand(shape[1], generator=g) + 0.5


BN_SHAPES = [(8, 6), (8, 6, 5, 5)]


def _global_bn(shape: tuple[int, ...]) -> dict:
    """GlobalBatchNorm on this rank's share, two training steps."""
    x_all, w_all, gamma = _bn_inputs(shape)
    bn = D.GlobalBatchNorm(shape[1])
    with torch.no_grad():
        bn.weight.copy_(gamma)
    x = x_all[_mine(len(x_all))].clone().requires_grad_()
    for _ in range(2):
        y = bn(x)
        (y * w_all[_mine(len(x_all))]).sum().backward()
    return {"y": y.detach(), "x_grad": x.grad, "weight_grad": bn.weight.grad, "bias_grad": bn.bias.grad,
            "running_mean": bn.running_mean.clone(), "running_var": bn.running_var.clone(),
            "channels_last": y.dim() < 4 or y.is_contiguous(memory_format=torch.channels_last)}


def _tiny_config() -> Config:
    cfg = Config()
    cfg.model.width, cfg.model.proj_hidden, cfg.model.proj_dim = 0.125, 16, 8
    return cfg


def _views() -> list[list[torch.Tensor]]:
    """STEPS pairs of SimCLR views of the whole batch, (BATCH, 3, SIZE, SIZE) each, seeded."""
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (BATCH, SIZE, SIZE, 3), dtype=torch.uint8, generator=g)
    aug = Augment(simclr_view(SIZE, 0.5, blur=False, scale=(0.2, 1.0)))
    return [[aug(images, g), aug(images, g)] for _ in range(STEPS)]


def _train_simclr(sync_bn: bool) -> dict:
    """STEPS LARS steps of SimCLR at a fixed lr, each rank on its share of every view.

    In float64, loss included: in float32 a 1e-7 rounding difference (a sum split over two
    ranks) can flip a ReLU whose input is near 0, and the next steps amplify that to 1e-3.
    """
    torch.manual_seed(0)
    method = build_method(_tiny_config()).to(torch.float64, memory_format=torch.channels_last)  # as train.py
    method.criterion = nt_xent.__wrapped__  # the same NT-Xent without its float32 cast
    if sync_bn and D.world_size() > 1:
        method = D.convert_sync_batchnorm(method)
    model = nn.parallel.DistributedDataParallel(method) if D.world_size() > 1 else method
    optimizer = build_optimizer("lars", method.param_groups(LR), lr=LR, momentum=0.9, weight_decay=1e-6)
    losses = []
    for views in _views():
        loss = model([v[_mine(BATCH)].double() for v in views])["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(D.all_reduce_mean(loss.detach().clone()).item())  # the global batch's loss
    return {"loss": losses, "state": copy.deepcopy(method.state_dict())}


def _rank_work() -> dict:
    return {"gather": _gather_grad(), "bn": {s: _global_bn(s) for s in BN_SHAPES},
            "sync": _train_simclr(sync_bn=True), "local": _train_simclr(sync_bn=False)}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(_rank_work, WORLD, tmp_path_factory.mktemp("ranks"))


@pytest.fixture(scope="module")
def one_process() -> dict:
    return _train_simclr(sync_bn=True)  # no process group: plain BatchNorm over the whole batch


def _max_diff(a: dict, b: dict) -> float:
    """The largest |a - b| / (1 + |b|) over every tensor of two state dicts."""
    assert a.keys() == b.keys()
    return max(((a[k].double() - b[k].double()).abs() / (1 + b[k].double().abs())).max().item() for k in a)


# ---------------------------------------------------------------------------------------------

def test_gather_returns_every_ranks_gradient_to_its_owner(ranks):
    expected = _gather_reference()  # (8, 5)
    for r, res in enumerate(ranks):
        torch.testing.assert_close(res["gather"], expected[4 * r:4 * (r + 1)], atol=1e-5, rtol=1e-5)
    # the local loss alone gives a different gradient, so the check above can fail
    local = _gather_reference_local_only()
    assert (local - expected[:4]).abs().max() > 1e-2


@pytest.mark.parametrize("shape", BN_SHAPES)
def test_global_bn_on_two_ranks_equals_batchnorm_on_the_whole_batch(ranks, shape):
    x, w, gamma = _bn_inputs(shape)
    bn = (nn.BatchNorm1d if len(shape) == 2 else nn.BatchNorm2d)(shape[1])
    with torch.no_grad():
        bn.weight.copy_(gamma)
    x.requires_grad_()
    for _ in range(2):
        y = bn(x)
        (y * w).sum().backward()
    half = len(x) // WORLD
    close = dict(atol=1e-5, rtol=1e-5)
    for r, res in enumerate(ranks):
        got = res["bn"][shape]
        mine = slice(r * half, (r + 1) * half)
        torch.testing.assert_close(got["y"], y[mine].detach(), **close)
        torch.testing.assert_close(got["x_grad"], x.grad[mine], **close)
        torch.testing.assert_close(got["running_mean"], bn.running_mean, **close)
        torch.testing.assert_close(got["running_var"], bn.running_var, **close)
        assert got["channels_last"]
    # parameter gradients are per-rank sums over local samples; DDP would average them
    for name in ("weight_grad", "bias_grad"):
        total = sum(res["bn"][shape][name] for res in ranks)
        torch.testing.assert_close(total, getattr(bn, name.split("_")[0]).grad, **close)


def test_two_ranks_with_sync_bn_equal_one_process_with_the_whole_batch(ranks, one_process):
    for res in ranks:
        assert max(abs(a - b) for a, b in zip(res["sync"]["loss"], one_process["loss"])) < TOL
        assert _max_diff(res["sync"]["state"], one_process["state"]) < TOL  # weights and BN statistics
    assert _max_diff(ranks[0]["sync"]["state"], ranks[1]["sync"]["state"]) == 0


def test_without_sync_bn_two_ranks_differ_from_one_process(ranks, one_process):
    """Local BN sees half the batch: the same comparison must fail, or the test above proves nothing."""
    local = ranks[0]["local"]
    assert local["loss"][0] != pytest.approx(one_process["loss"][0], abs=TOL)
    assert _max_diff(local["state"], one_process["state"]) > 100 * TOL


def test_convert_keeps_keys_scale_only_bn_and_loads_into_a_plain_model():
    torch.manual_seed(0)
    plain = build_method(_tiny_config())
    converted = D.convert_sync_batchnorm(copy.deepcopy(plain))
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in converted.modules())
    assert list(converted.state_dict()) == list(plain.state_dict())
    last = converted.projector.layers[-1][-1]  # was ScaleOnlyBatchNorm1d: γ but no β
    assert isinstance(last, D.GlobalBatchNorm) and last.weight is not None and last.bias is None
    assert isinstance(plain.projector.layers[-1][-1], ScaleOnlyBatchNorm1d)
    build_method(_tiny_config()).load_state_dict(converted.state_dict(), strict=True)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in converted.modules())  # not on CUDA either: host syncs

    # without a process group it is plain BN, in training and in eval mode
    x = _views()[0][0]
    for mode in (True, False):
        plain.train(mode)
        converted.train(mode)
        torch.testing.assert_close(converted.backbone(x), plain.backbone(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(converted.state_dict(), plain.state_dict(), atol=1e-6, rtol=1e-6)


def test_sync_bn_flag_sets_the_config(monkeypatch):
    import selfsup.train
    from selfsup.cli import main

    seen = []
    monkeypatch.setattr(selfsup.train, "pretrain", lambda cfg, resume=False: seen.append(cfg.model.sync_bn))
    for flag, expected in [([], None), (["--sync-bn"], True), (["--no-sync-bn"], False)]:
        assert main(["pretrain", "--data", "digits", *flag]) == 0
        assert seen[-1] is expected


# ---------------------------------------------------------------------------------------------
# torchrun: kill a rank, resume, and match the uninterrupted run.

TINY = ["--data", "digits", "--batch-size", "256", "--device", "cpu", "--no-progress", "--epochs", "3",
        "--set", "data.image_size=8", "model.width=0.125", "eval.knn_every=0", "eval.knn_k=20",
        "train.checkpoint_every=1", "optim.warmup_epochs=1"]


def _torchrun(log: Path, *args: str) -> subprocess.Popen:
    """``torchrun --nproc_per_node=2 -m selfsup pretrain ARGS`` in the background, output to ``log``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "selfsup", "pretrain", *args]
    with open(log, "w") as f:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, cwd=log.parent, stdout=f, stderr=subprocess.STDOUT)


def _descendants(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return children + [d for c in children for d in _descendants(c)]


def _worker_pid(launcher: int, rank: int) -> int:
    for pid in _descendants(launcher):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    raise AssertionError(f"no worker of rank {rank} under launcher {launcher}")


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds worker processes through /proc")
def test_killed_rank_fails_the_launch_and_resume_matches_the_uninterrupted_run(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    log = {name: tmp_path / f"{name}.log" for name in ("full", "killed", "resumed")}
    assert _torchrun(log["full"], "--out", str(full), *TINY).wait(timeout=120) == 0, log["full"].read_text()

    run = _torchrun(log["killed"], "--out", str(killed), *TINY)
    deadline = time.monotonic() + 90
    while not (killed / "checkpoint.pt").exists():  # the end of epoch 1
        assert run.poll() is None and time.monotonic() < deadline, log["killed"].read_text()
        time.sleep(0.01)
    os.kill(_worker_pid(run.pid, rank=1), signal.SIGKILL)
    assert run.wait(timeout=90) != 0
    report = log["killed"].read_text()
    assert "ChildFailedError" in report and "SIGKILL" in report, report
    assert ckpt.load(killed / "checkpoint.pt")["epoch"] in (1, 2)  # 5 steps an epoch: it died mid-run

    resumed = _torchrun(log["resumed"], "--out", str(killed), "--resume", "--device", "cpu", "--no-progress")
    assert resumed.wait(timeout=120) == 0, log["resumed"].read_text()
    a, b = ckpt.load(full / "checkpoint.pt"), ckpt.load(killed / "checkpoint.pt")
    assert a["epoch"] == b["epoch"] == 3 and len(b["generators"]) == WORLD
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    losses = [[json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]
              for d in (full, killed)]
    assert losses[0] == losses[1]
