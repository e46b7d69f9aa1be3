"""Global batch norm without host syncs (issue 24 §5): two gloo ranks holding parts of a batch
equal ``nn.BatchNorm*d`` on the whole batch, with one collective per layer in forward and one
in backward, and no op that reads a tensor's values on the host.

One spawn of two CPU processes computes everything; the references run in the test process.
"""
from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from selfsup import distributed as D

from gloo import run_ranks

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="needs torch.distributed with the gloo backend")

WORLD = 2
STEPS = 2
EXACT = dict(atol=1e-10, rtol=1e-10)  # float64 throughout

# name: (shape, channels_last, affine, momentum, rows of rank 0); rank 1 holds the rest
CASES = {
    "2d": ((8, 6), False, "affine", 0.1, 4),
    "2d-no-affine-cumulative": ((8, 6), False, "none", None, 4),
    "3d-uneven-shares": ((7, 4, 3), False, "affine", 0.1, 5),
    "4d": ((8, 6, 5, 5), False, "affine", None, 4),
    "4d-channels-last": ((8, 6, 5, 5), True, "affine", 0.1, 4),
    "4d-channels-last-scale-only": ((8, 6, 5, 5), True, "scale", None, 4),
    "4d-channels-last-no-affine-uneven": ((8, 6, 3, 3), True, "none", 0.1, 6),
    "4d-rank-1-empty": ((4, 6, 2, 2), False, "affine", 0.1, 4),
}


def _inputs(shape, channels_last: bool, split: int, dtype=torch.float64):
    """The whole batch x, the loss weights w (same shape) and γ, β (C,), seeded."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=g, dtype=dtype) * 3 + 5  # an offset mean: the variance must not cancel
    x[:, 0] = 2.0  # zero variance: the old layer stored an infinite running_var here
    x[:split, 1], x[split:, 1] = 1.0, 3.0  # zero within each rank, not between them
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(shape, generator=g, dtype=dtype)
    return x, w, torch.rand(shape[1], generator=g, dtype=dtype) + 0.5, torch.randn(shape[1], generator=g, dtype=dtype)


def _layer(cls, shape, affine: str, momentum, dtype=torch.float64) -> nn.Module:
    bn = cls(shape[1], momentum=momentum, affine=affine != "none").to(dtype)
    if affine == "scale":
        bn.bias = None
    return bn


def _run(bn: nn.Module, x: torch.Tensor, w: torch.Tensor, gamma, beta) -> dict:
    """STEPS training steps of loss = Σ y·w on x, then an eval forward."""
    if bn.weight is not None:
        with torch.no_grad():
            bn.weight.copy_(gamma)
    if bn.bias is not None:
        with torch.no_grad():
            bn.bias.copy_(beta)
    x = x.clone().requires_grad_()
    for _ in range(STEPS):
        y = bn(x)
        (y * w).sum().backward()
    out = {"y": y.detach(), "x_grad": x.grad, "eval": bn.eval()(x).detach(),
           "running_mean": bn.running_mean.clone(), "running_var": bn.running_var.clone(),
           "num_batches_tracked": bn.num_batches_tracked.clone()}
    if bn.weight is not None:
        out["weight_grad"] = bn.weight.grad
    if bn.bias is not None:
        out["bias_grad"] = bn.bias.grad
    return out


def _mine(split: int, n: int) -> slice:
    return slice(0, split) if D.rank() == 0 else slice(split, n)


def _case_on_my_share(case: str) -> dict:
    shape, channels_last, affine, momentum, split = CASES[case]
    x, w, gamma, beta = _inputs(shape, channels_last, split)
    mine = _mine(split, shape[0])
    return _run(_layer(D.GlobalBatchNorm, shape, affine, momentum), x[mine], w[mine], gamma, beta)


# ---------------------------------------------------------------------------------------------
# Collectives and host reads, seen where every op is dispatched

HOST_READS = {"aten._local_scalar_dense.default",  # .item(), float(t), bool(t), int(t)
              "aten.nonzero.default", "aten.masked_select.default", "aten.unique_dim.default",
              "aten._unique2.default", "aten.unique_consecutive.default", "aten.equal.default"}


class _Watch(TorchDispatchMode):
    """Records every collective and every op whose result needs tensor values on the host
    (a sync on CUDA): scalar reads, data-dependent shapes, boolean-mask indexing."""

    def __init__(self):
        super().__init__()
        self.collectives, self.host_reads = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith("c10d."):
            self.collectives.append(name)
        bool_index = name.startswith("aten.index") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for a in args if isinstance(a, (list, tuple)) for i in a)
        if name in HOST_READS or bool_index:
            self.host_reads.append(name)
        return func(*args, **(kwargs or {}))


def _net() -> nn.Module:
    """Three batch norms: 2-D after a conv, another with momentum None, 1-D after a linear."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1),
                         nn.BatchNorm2d(4, momentum=None), nn.Flatten(), nn.Linear(64, 5), nn.BatchNorm1d(5))


def _watched_step() -> dict:
    net = D.convert_sync_batchnorm(_net())
    x = torch.randn(3, 3, 6, 6, generator=torch.Generator().manual_seed(D.rank()))
    watched = {}
    for step in range(2):  # the second step: momentum None weighs by 1/2
        with _Watch() as forward:
            loss = net(x).square().sum()
        with _Watch() as backward:
            loss.backward()
        watched[step] = {"forward": forward.collectives, "backward": backward.collectives,
                         "host_reads": forward.host_reads + backward.host_reads}
    return watched


# ---------------------------------------------------------------------------------------------
# float32 input with |mean| = 1000 std, and bfloat16 input: statistics in float32

def _offset_float32() -> dict:
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(8, 3, 4, 4, generator=g) + 1000)[_mine(4, 8)]
    bn = D.GlobalBatchNorm(3, momentum=1.0)  # running statistics = this batch's
    y = bn(x)
    return {"y": y.detach(), "running_mean": bn.running_mean, "running_var": bn.running_var}


def _bfloat16() -> dict:
    x, w, *_ = _inputs((8, 6, 5, 5), True, 4, dtype=torch.bfloat16)
    bn = D.GlobalBatchNorm(6, momentum=1.0)
    mine = _mine(4, 8)
    x = x[mine].clone().requires_grad_()
    y = bn(x)
    (y * w[mine]).sum().backward()
    return {"y": y.detach(), "x_grad": x.grad, "running_mean": bn.running_mean, "running_var": bn.running_var}


def _rank_work() -> dict:
    return {"cases": {c: _case_on_my_share(c) for c in CASES}, "watched": _watched_step(),
            "offset": _offset_float32(), "bf16": _bfloat16()}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(_rank_work, WORLD, tmp_path_factory.mktemp("ranks"))


# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_two_ranks_equal_batchnorm_on_the_whole_batch(ranks, case):
    shape, channels_last, affine, momentum, split = CASES[case]
    x, w, gamma, beta = _inputs(shape, channels_last, split)
    cls = nn.BatchNorm1d if len(shape) < 4 else nn.BatchNorm2d
    expected = _run(_layer(cls, shape, affine, momentum), x, w, gamma, beta)
    for r, got in enumerate(ranks):
        got = got["cases"][case]
        mine = slice(0, split) if r == 0 else slice(split, shape[0])
        for key in ("y", "x_grad", "eval"):
            torch.testing.assert_close(got[key], expected[key][mine], **EXACT)
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(got[key], expected[key], **EXACT)
        if channels_last:
            assert got["y"].is_contiguous(memory_format=torch.channels_last)
    # parameter gradients are each rank's sums over its samples; DDP averages them
    for key in ("weight_grad", "bias_grad"):
        assert (key in expected) == (key in ranks[0]["cases"][case])
        if key in expected:
            torch.testing.assert_close(sum(res["cases"][case][key] for res in ranks), expected[key], **EXACT)


def test_one_collective_per_layer_each_way_and_no_host_read(ranks):
    layers = sum(isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) for m in _net().modules())
    for res in ranks:
        for step in res["watched"].values():
            assert step["forward"] == ["c10d._allgather_base_.default"] * layers, step["forward"]
            assert step["backward"] == ["c10d.allreduce_.default"] * layers, step["backward"]
            assert step["host_reads"] == []


def test_the_watch_sees_host_reads_and_collectives():
    """The test above can fail: ``.item()``, a boolean mask and momentum None in plain BN
    (``float(num_batches_tracked)``) are all seen."""
    x = torch.randn(4, 3)
    with _Watch() as watch:
        x.sum().item()
        x[x > 0]
        nn.BatchNorm1d(3, momentum=None)(x)
    assert len(watch.host_reads) == 3, watch.host_reads


def test_the_layer_has_no_host_reads_in_its_code():
    """No ``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()`` or ``float(t)``-like call in the
    layer's code (``.cpu()`` is a no-op on a CPU tensor, so only the code shows it)."""
    tree = ast.parse(Path(D.__file__).read_text())
    names = {"GlobalBatchNorm", "_GlobalBatchNorm", "_moments"}
    nodes = [n for n in tree.body if getattr(n, "name", None) in names]
    assert {n.name for n in nodes} == names
    calls = [c for n in nodes for c in ast.walk(n) if isinstance(c, ast.Call)]
    bad = [ast.unparse(c) for c in calls
           if isinstance(c.func, ast.Attribute) and c.func.attr in {"item", "tolist", "cpu", "numpy"}
           or isinstance(c.func, ast.Name) and c.func.id in {"float", "int", "bool"}]
    assert not bad, bad


def test_float32_statistics_are_exact_far_from_zero(ranks):
    """Gathered moments, not summed x and x²: with |mean| = 1000 std, E[x²] - E[x]² in float32
    loses every digit of the variance."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 3, 4, 4, generator=g) + 1000
    var, mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=1)
    for r, res in enumerate(ranks):
        got = res["offset"]
        torch.testing.assert_close(got["running_mean"].double(), mean, atol=0, rtol=1e-6)
        torch.testing.assert_close(got["running_var"].double(), var, atol=0, rtol=1e-4)
        y = (x.double() - mean.view(1, -1, 1, 1)) / (var * 127 / 128 + 1e-5).sqrt().view(1, -1, 1, 1)
        torch.testing.assert_close(got["y"].double(), y[4 * r:4 * (r + 1)], atol=1e-3, rtol=0)
    sums = x.sum((0, 2, 3)), x.square().sum((0, 2, 3))  # float32, what one all-reduced pack would hold
    naive = (sums[1] / 128 - (sums[0] / 128) ** 2) * 128 / 127
    assert ((naive.double() - var).abs() / var).max() > 1e-2


def test_bfloat16_input_gets_float32_statistics(ranks):
    x, w, *_ = _inputs((8, 6, 5, 5), True, 4, dtype=torch.bfloat16)
    var, mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=1)  # of the bf16 values, exactly
    for res in ranks:
        got = res["bf16"]
        assert got["running_mean"].dtype == torch.float32
        torch.testing.assert_close(got["running_mean"].double(), mean, atol=1e-6, rtol=1e-6)  # bf16: ~1e-2
        torch.testing.assert_close(got["running_var"].double(), var, atol=1e-6, rtol=1e-6)
        assert got["y"].dtype == got["x_grad"].dtype == torch.bfloat16
    bn = nn.BatchNorm2d(6).double()
    xd = x.double().requires_grad_()
    (bn(xd) * w.double()).sum().backward()
    for r, res in enumerate(ranks):
        rows = slice(4 * r, 4 * (r + 1))
        torch.testing.assert_close(res["bf16"]["x_grad"].double(), xd.grad[rows], atol=0.1, rtol=2e-2)


# ---------------------------------------------------------------------------------------------
# One process

def test_one_process_is_batchnorm_over_the_local_batch_in_train_and_eval():
    x, w, gamma, beta = _inputs((8, 6, 5, 5), True, 4)
    for momentum in (0.1, None):
        got = _run(_layer(D.GlobalBatchNorm, x.shape, "affine", momentum), x, w, gamma, beta)
        expected = _run(_layer(nn.BatchNorm2d, x.shape, "affine", momentum), x, w, gamma, beta)
        torch.testing.assert_close(got, expected, **EXACT)


def test_one_value_per_channel_is_refused_as_batchnorm_does():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        D.GlobalBatchNorm(3)(torch.randn(1, 3))
    D.GlobalBatchNorm(3).eval()(torch.randn(1, 3))  # running statistics: fine


def test_bfloat16_autocast_keeps_float32_statistics():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    converted = D.convert_sync_batchnorm(copy.deepcopy(plain))
    x = torch.randn(4, 3, 8, 8) * 2 + 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = plain[0](x)  # bf16, the input both batch norms see
        y_plain, y = plain(x), converted(x)
    assert h.dtype == y.dtype == y_plain.dtype == torch.bfloat16
    var, mean = torch.var_mean(h.double(), dim=(0, 2, 3), correction=1)
    bn = converted[1]
    torch.testing.assert_close(bn.running_mean.double(), 0.1 * mean, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), 0.9 + 0.1 * var, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(y.float(), y_plain.float(), atol=2e-2, rtol=2e-2)


# ---------------------------------------------------------------------------------------------
# CUDA: the device must never wait for the host (skipped without GPUs)

def _cuda_step(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = model(x)
    y.float().square().sum().backward()
    return y


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_training_never_syncs_the_host():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None)).cuda()
    converted = D.convert_sync_batchnorm(copy.deepcopy(plain))
    x = torch.randn(4, 3, 8, 8, device="cuda").contiguous(memory_format=torch.channels_last)
    _cuda_step(converted, x)  # warm-up: first-call allocations and kernel loads
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = _cuda_step(converted, x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _cuda_step(plain, x)
    y_plain = _cuda_step(plain, x)
    torch.testing.assert_close(y.float(), y_plain.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(converted[1].running_var, plain[1].running_var, atol=1e-4, rtol=1e-4)


def _nccl_work() -> dict:
    x_all, w_all, *_ = _inputs((8, 6, 5, 5), True, 4)
    mine = _mine(4, 8)
    bn = _layer(D.GlobalBatchNorm, (8, 6), "affine", None).cuda()
    x, w = x_all[mine].cuda().requires_grad_(), w_all[mine].cuda()
    (bn(x) * w).sum().backward()  # warm-up: NCCL's communicator is set up here
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = bn(x)
        (y * w).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return {"y": y.detach().cpu(), "x_grad": x.grad.cpu(), "running_var": bn.running_var.cpu()}


@pytest.mark.skipif(torch.cuda.device_count() < WORLD, reason=f"needs {WORLD} GPUs")
def test_two_gpus_never_sync_the_host_and_equal_batchnorm(tmp_path):
    ranks = run_ranks(_nccl_work, WORLD, tmp_path, backend="nccl")
    x, w, *_ = _inputs((8, 6, 5, 5), True, 4)
    bn = _layer(nn.BatchNorm2d, (8, 6), "affine", None)
    x = x.requires_grad_()
    for _ in range(STEPS):
        y = bn(x)
        (y * w).sum().backward()
    for r, res in enumerate(ranks):
        rows = slice(4 * r, 4 * (r + 1))
        torch.testing.assert_close(res["y"], y[rows].detach(), **EXACT)
        torch.testing.assert_close(res["x_grad"], x.grad[rows], **EXACT)
        torch.testing.assert_close(res["running_var"], bn.running_var, **EXACT)
