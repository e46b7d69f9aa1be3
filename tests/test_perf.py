"""What the performance work relies on (issue 8): no host synchronisation inside the training
step, memory that does not grow with the steps, and chunked contrastive losses equal to the
dense ones. The streaming loader's tests are in test_stream.py."""
import gc
import warnings

import pytest
import torch
import torch.nn.functional as F

from selfsup import losses
from selfsup.config import Config
from selfsup.evaluate import OnlineLinear
from selfsup.losses import dcl, dclw, info_nce, nt_xent
from selfsup.methods import METHODS
from selfsup.perf import build_rig, rss_bytes

SIZE = 16


def _cfg(method: str) -> Config:
    cfg = Config(method=method, loss="info_nce" if method == "moco" else "nt_xent")
    cfg.model.width, cfg.model.proj_hidden, cfg.model.proj_dim = 0.125, 16, 8
    cfg.train.batch_size, cfg.train.precision = 8, "fp32"
    cfg.moco.queue_size, cfg.moco.shuffle_bn_groups = 32, 2
    cfg.swav.prototypes, cfg.swav.freeze_prototypes_steps = 10, 1
    cfg.multicrop.local_crops, cfg.multicrop.local_size = (2, 8) if method == "swav" else (0, None)
    cfg.optim.name = "sgd" if method == "simsiam" else "lars"
    return cfg


# ---------------------------------------------------------------------------------------------
# No host-device synchronisation inside the step. A CUDA-free proxy: every Python-level way of
# reading a tensor back to the host (item, bool, float, int, tolist, numpy, cpu), any explicit
# synchronize, and any blocking .to(device) copy of a host tensor (on CUDA a pageable copy waits
# for the queued work) is counted while real steps run; the count must be zero.

READBACKS = ["item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "cpu"]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A tiny pre-trained run for the distillation method to learn from."""
    from selfsup.cli import main
    out = tmp_path_factory.mktemp("teacher") / "run"
    assert main(["pretrain", "--method", "simclr", "--out", str(out), "--data", "digits", "--batch-size", "32",
                 "--device", "cpu", "--no-progress", "--epochs", "1", "--set", f"data.image_size={SIZE}",
                 "model.width=0.125", "eval.knn_every=0", "optim.warmup_epochs=0"]) == 0
    return out


def _count_host_reads(monkeypatch) -> list[str]:
    """From now on, every read back to the host (as listed above) is appended to the list returned."""
    calls: list[str] = []

    def counting(name, original):
        def wrapper(self, *args, **kwargs):
            calls.append(name)
            return original(self, *args, **kwargs)
        return wrapper

    for name in READBACKS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: calls.append("synchronize"))
    to = torch.Tensor.to

    def blocking_to(self, *args, **kwargs):
        targets_device = any(isinstance(a, (torch.device, str)) for a in args) or "device" in kwargs
        if self.device.type == "cpu" and targets_device and not kwargs.get("non_blocking", False):
            calls.append("blocking host->device copy")
        return to(self, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "to", blocking_to)
    return calls


@pytest.mark.parametrize("method", sorted(METHODS))
def test_train_step_never_reads_back_to_the_host(method, monkeypatch, request):
    cfg = _cfg(method)
    if method == "distill":
        cfg.distill.teacher = str(request.getfixturevalue("teacher_run"))
    rig = build_rig(cfg, torch.device("cpu"), SIZE)
    rig()  # first step outside the count (lazy state, e.g. optimiser buffers)
    calls = _count_host_reads(monkeypatch)
    for _ in range(3):
        rig()
    assert calls == [], f"{method}: {sorted(set(calls))} during 3 training steps"


def _probe(rig) -> OnlineLinear:
    labels = torch.arange(100) % 10
    probe = OnlineLinear(rig.method.backbone.num_features, labels, 10)
    probe.watch(rig.method.backbone)
    return probe


def test_online_linear_step_never_reads_back_to_the_host(monkeypatch):
    rig = build_rig(_cfg("simclr"), torch.device("cpu"), SIZE)
    probe, idx = _probe(rig), torch.arange(rig.cfg.train.batch_size)
    rig()
    probe.step(idx)
    calls = _count_host_reads(monkeypatch)
    for _ in range(3):
        rig()
        probe.step(idx, 0.5)
    assert calls == [], f"{sorted(set(calls))} during 3 steps with the online probe"


@pytest.mark.parametrize("method", ["simclr", "moco"])
def test_online_linear_leaves_the_backbone_gradients_unchanged(method):
    """The same steps with and without the probe: identical backbone gradients and weights."""
    plain, probed = (build_rig(_cfg(method), torch.device("cpu"), SIZE) for _ in range(2))
    probe, idx = _probe(probed), torch.arange(plain.cfg.train.batch_size)
    before = probe.classifier.weight.clone()
    for _ in range(2):
        plain()
        probed()
        probe.step(idx)
        for (name, p), q in zip(plain.method.backbone.named_parameters(), probed.method.backbone.parameters()):
            assert torch.equal(p.grad, q.grad) and torch.equal(p, q), name
    assert not torch.equal(probe.classifier.weight, before)  # the probe itself trained


# ---------------------------------------------------------------------------------------------
# Memory that does not grow with the number of steps.

def _live_tensor_bytes() -> int:
    gc.collect()
    seen, total = set(), 0
    with warnings.catch_warnings():  # isinstance() on some deprecated module attributes warns
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in tensors:
        if not obj.is_meta:
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


@pytest.mark.parametrize("method", ["moco", "swav"])  # a queue of keys; a queue of embeddings
def test_memory_does_not_grow_with_steps(method):
    cfg = _cfg(method)
    cfg.swav.queue_length = 16
    rig = build_rig(cfg, torch.device("cpu"), SIZE)
    n = 10
    for _ in range(n):
        rig()
    tensors_n, rss_n = _live_tensor_bytes(), rss_bytes()
    for _ in range(n):
        rig()
    tensors_2n, rss_2n = _live_tensor_bytes(), rss_bytes()
    assert tensors_2n == tensors_n, f"live tensors grew from {tensors_n} to {tensors_2n} bytes"
    assert rss_2n - rss_n < 16 * 2**20, f"RSS grew by {(rss_2n - rss_n) / 2**20:.1f} MiB in {n} steps"


# ---------------------------------------------------------------------------------------------
# Chunked logits: same values and gradients as the dense path, never the (2N, 2M) matrix.

def _grads(fn, inputs):
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    value = fn(*inputs)
    return value.detach(), torch.autograd.grad(value, inputs)


@pytest.mark.parametrize("loss", [nt_xent, dcl, dclw])
@pytest.mark.parametrize("with_negatives", [False, True])
@pytest.mark.parametrize("chunk", [1, 5, 7])
def test_chunked_pair_losses_equal_dense(loss, with_negatives, chunk):
    g = torch.Generator().manual_seed(chunk)
    z1, z2 = torch.randn(9, 16, generator=g), torch.randn(9, 16, generator=g)
    negatives = F.normalize(torch.randn(11, 16, generator=g), dim=1) if with_negatives else None
    dense = _grads(lambda a, b: loss(a, b, 0.2, negatives=negatives, chunk=0), [z1, z2])
    chunked = _grads(lambda a, b: loss(a, b, 0.2, negatives=negatives, chunk=chunk), [z1, z2])
    torch.testing.assert_close(chunked[0], dense[0], rtol=1e-6, atol=1e-6)
    for got, want in zip(chunked[1], dense[1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("options", [{}, {"decoupled": True}, {"decoupled": True, "sigma": 0.5}])
def test_chunked_info_nce_equals_dense_including_queue_gradient(options):
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(10, 16, generator=g), torch.randn(10, 16, generator=g)
    queue = F.normalize(torch.randn(40, 16, generator=g), dim=1)
    dense = _grads(lambda a, b, c: info_nce(a, b, c, 0.2, chunk=0, **options), [q, k, queue])
    chunked = _grads(lambda a, b, c: info_nce(a, b, c, 0.2, chunk=3, **options), [q, k, queue])
    torch.testing.assert_close(chunked[0], dense[0], rtol=1e-6, atol=1e-6)
    for got, want in zip(chunked[1], dense[1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_chunked_gradient_passes_gradcheck():
    g = torch.Generator().manual_seed(2)
    a, c = torch.randn(6, 5, generator=g, dtype=torch.double), torch.randn(8, 5, generator=g, dtype=torch.double)
    extra = torch.randn(6, generator=g, dtype=torch.double)
    masked = torch.randint(0, 8, (6, 2), generator=g)
    inputs = [x.requires_grad_() for x in (a, c, extra)]
    assert torch.autograd.gradcheck(lambda a, c, e: losses._MaskedLogSumExp.apply(a, c, e, masked, 0.3, 4), inputs)


def test_large_batches_take_the_chunked_path_automatically(monkeypatch):
    z1, z2 = torch.randn(8, 4, requires_grad=True), torch.randn(8, 4)
    used = []
    original = losses._MaskedLogSumExp.apply
    monkeypatch.setattr(losses._MaskedLogSumExp, "apply", lambda *a: used.append(1) or original(*a))
    nt_xent(z1, z2).backward()
    assert not used  # 16 x 16 logits: dense
    monkeypatch.setattr(losses, "DENSE_LOGITS_MAX", 100)
    nt_xent(z1, z2).backward()
    assert used  # 256 entries > 100: chunks of 100 // 16 = 6 anchors
