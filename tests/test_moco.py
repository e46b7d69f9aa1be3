"""MoCo, the momentum encoder and its queue, split BN, and SimCLRv2's memory (issue 4).

Tiny encoders (8-channel ResNet-18 on 16x16 inputs); the distributed checks spawn two gloo ranks
once and compare what they saw in the test process.
"""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfsup import checkpoint as ckpt
from selfsup import distributed as D
from selfsup.backbones import build_backbone
from selfsup.cli import main
from selfsup.config import Config, ConfigError, resolve
from selfsup.losses import dcl, dclw, info_nce
from selfsup.methods import StepInfo, check_config
from selfsup.momentum import KeyQueue, ema_update, momentum_at, momentum_copy
from selfsup.norm import SplitBatchNorm2d, convert_split_batchnorm
from selfsup.train import build_method

from gloo import run_ranks

BATCH, SIZE, DIM = 8, 16, 8


def _cfg(method="moco", **sections) -> Config:
    cfg = Config(method=method, loss="info_nce" if method == "moco" else "nt_xent")
    cfg.moco.temperature = cfg.simclr.temperature = 0.2
    cfg.model.width, cfg.model.proj_hidden, cfg.model.proj_dim = 0.125, 16, DIM
    cfg.train.batch_size = BATCH
    cfg.moco.queue_size, cfg.moco.momentum, cfg.moco.shuffle_bn_groups = 24, 0.9, 4
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    return cfg


def _views(n=BATCH, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, SIZE, SIZE, generator=g).contiguous(memory_format=torch.channels_last)
            for _ in range(2)]


def _record_keys(method):
    """Wrap ``method.keys`` so every call's output is kept, in call order."""
    seen, keys = [], method.keys
    method.keys = lambda x, g=None: seen.append(keys(x, g)) or seen[-1]
    return seen


def _build(cfg):
    torch.manual_seed(0)
    return build_method(cfg)


# ---------------------------------------------------------------------------------------------
# The momentum encoder

def test_key_encoder_gets_no_gradient_and_is_updated_before_the_keys():
    moco = _build(_cfg())
    with torch.no_grad():  # make θ_k differ from θ_q, or the update is invisible
        for p in moco.encoder_k.parameters():
            p.add_(0.1 * torch.randn_like(p))
        moco.backbone.bn1.running_mean.fill_(100.0)  # a query buffer the key encoder must not take
    online = [*moco.backbone.parameters(), *moco.projector.parameters()]
    q_old = [p.detach().clone() for p in online]
    k_old = [p.clone() for p in moco.encoder_k.parameters()]
    at_keys = []  # θ_k when the keys are computed
    moco.encoder_k.register_forward_pre_hook(
        lambda mod, args: at_keys.append([p.clone() for p in mod.parameters()]))

    optimizer = torch.optim.SGD(moco.param_groups(0.5), lr=0.5)
    loss = moco(_views())["loss"]
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

    m = _cfg().moco.momentum
    assert all(not p.requires_grad and p.grad is None for p in moco.encoder_k.parameters())
    assert all(p.grad is not None for p in online)
    expected = [m * k + (1 - m) * q for k, q in zip(k_old, q_old)]
    for now, seen, want in zip(moco.encoder_k.parameters(), at_keys[0], expected):
        torch.testing.assert_close(now, want)   # θ_k = m θ_k + (1-m) θ_q, with θ_q before the SGD step
        torch.testing.assert_close(seen, want)  # ... already in force when the keys were computed
    after_sgd = [m * k + (1 - m) * q.detach() for k, q in zip(k_old, online)]
    assert max((a - b).abs().max() for a, b in zip(moco.encoder_k.parameters(), after_sgd)) > 1e-4
    assert moco.encoder_k[0].bn1.running_mean.abs().max() < 10  # BN buffers are not averaged
    assert moco.encoder_k.training  # the key encoder stays in train mode


def test_ema_update_and_momentum_schedule():
    student = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    teacher = momentum_copy(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        student[1].running_mean.fill_(5.0)
    before = [p.clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.75)
    for t, b, s in zip(teacher.parameters(), before, student.parameters()):
        torch.testing.assert_close(t, 0.75 * b + 0.25 * s)
    assert teacher[0][1].running_mean.abs().max() == 0  # buffers untouched
    with pytest.raises(ValueError, match="parameter tensors"):
        ema_update(teacher, nn.Linear(3, 4), 0.5)

    assert momentum_at(0, 100, 0.99) == momentum_at(70, 100, 0.99) == 0.99
    assert momentum_at(0, 100, 0.99, cosine=True) == pytest.approx(0.99)
    assert momentum_at(50, 100, 0.99, cosine=True) == pytest.approx(0.995)
    assert momentum_at(100, 100, 0.99, cosine=True) == pytest.approx(1.0)
    moco = _build(_cfg(moco={"momentum_cosine": True, "momentum": 0.99}))
    moco.on_step_start(StepInfo(50, 100, 10, BATCH, seed=3))
    assert moco.ema.m == pytest.approx(0.995) and moco.shuffle_seed == 3 * 1_000_003 + 50


# ---------------------------------------------------------------------------------------------
# The queue

def test_logits_use_the_queue_from_before_the_enqueue_and_the_pointer_wraps():
    moco = _build(_cfg())
    keys = _record_keys(moco)
    assert moco.queue.keys.shape == (24, DIM)
    for step in range(4):
        before = moco.queue.keys.clone()
        ptr = int(moco.queue.ptr)
        out = moco(_views(seed=step))
        k = keys[-1]
        rows = slice(ptr, ptr + BATCH)
        assert int(moco.queue.ptr) == (ptr + BATCH) % 24  # advances by the (global) batch, wraps
        torch.testing.assert_close(moco.queue.keys[rows], k)
        untouched = torch.ones(24, dtype=torch.bool)
        untouched[rows] = False
        assert torch.equal(moco.queue.keys[untouched], before[untouched])
        expected = info_nce(out["embedding"], k, before, 0.2)  # the queue as it was
        assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
        assert out["loss"].item() != pytest.approx(info_nce(out["embedding"], k, moco.queue.keys, 0.2).item(), rel=1e-4)
    assert int(moco.queue.ptr) == 4 * BATCH % 24
    assert torch.allclose(moco.queue.keys.norm(dim=1), torch.ones(24))


def test_symmetric_loss_sums_both_directions_and_queues_both_views():
    moco = _build(_cfg(moco={"symmetric": True, "queue_size": 32}))
    keys = _record_keys(moco)
    before = moco.queue.keys.clone()
    out = moco(_views())
    k2, k1 = keys  # pairs (x1 -> x2) then (x2 -> x1): keys of view 2 first
    q1, q2 = out["embedding"].chunk(2)
    expected = info_nce(q1, k2, before, 0.2) + info_nce(q2, k1, before, 0.2)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert int(moco.queue.ptr) == 2 * BATCH
    torch.testing.assert_close(moco.queue.keys[:2 * BATCH], torch.cat([k2, k1]))


def test_dcl_and_dclw_are_info_nce_options_of_moco():
    for loss, options in [("dcl", {"decoupled": True}), ("dclw", {"decoupled": True, "sigma": 0.5})]:
        cfg = _cfg()
        cfg.loss = loss
        moco = _build(cfg)
        keys = _record_keys(moco)
        before = moco.queue.keys.clone()
        out = moco(_views())
        expected = info_nce(out["embedding"], keys[0], before, 0.2, **options)
        assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    cfg = _cfg()
    cfg.loss = "swav"
    with pytest.raises(ValueError, match="not available for MoCo; choose from info_nce, nt_xent, dcl, dclw"):
        build_method(cfg)


def test_queue_size_must_be_a_multiple_of_the_keys_per_step():
    with pytest.raises(ConfigError, match=r"moco.queue_size 20 must be a multiple of the keys queued per step, 8"):
        check_config(resolve(sets=["method=moco", "train.batch_size=8", "moco.queue_size=20"]))
    with pytest.raises(ConfigError, match=r"multiple of the keys queued per step, 16 .*moco.symmetric"):
        check_config(resolve(sets=["method=moco", "train.batch_size=8", "moco.queue_size=24", "moco.symmetric=true"]))
    with pytest.raises(ConfigError, match=r"memory.size 40 must be a multiple of the keys queued per step, 16"):
        check_config(resolve(sets=["train.batch_size=8", "memory.size=40"]))
    check_config(resolve(sets=["method=moco", "train.batch_size=8", "moco.queue_size=24"]))
    # the queue itself refuses a batch that does not divide it (e.g. a method used directly)
    moco = _build(_cfg(moco={"shuffle_bn_groups": 1}))
    with pytest.raises(ValueError, match="a queue of 24 keys cannot take batches of 16 keys"):
        moco(_views(n=16))
    queue = KeyQueue(6, 2)
    queue.push(F.normalize(torch.ones(3, 2), dim=1))
    queue.push(F.normalize(-torch.ones(3, 2), dim=1))
    assert int(queue.ptr) == 0 and queue.keys[:3].sum() > 0 and queue.keys[3:].sum() < 0


# ---------------------------------------------------------------------------------------------
# Split batch norm

@pytest.mark.parametrize("channels_last", [False, True])
def test_split_bn_equals_ordinary_bn_on_each_group(channels_last):
    g, groups = torch.Generator().manual_seed(0), 4
    x = (torch.randn(16, 6, 5, 5, generator=g) * 2 + 3)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(16, 6, 5, 5, generator=g)
    split = SplitBatchNorm2d(6, groups)
    with torch.no_grad():
        split.weight.copy_(torch.rand(6, generator=g) + 0.5)
        split.bias.copy_(torch.randn(6, generator=g))
    plain = [copy.deepcopy(nn.BatchNorm2d(6)) for _ in range(groups)]
    for bn in plain:
        bn.load_state_dict(split.state_dict())
    xs, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    for _ in range(2):  # running statistics over two steps
        y = split(xs)
        (y * w).sum().backward()
        ys = [bn(chunk) for bn, chunk in zip(plain, xp.chunk(groups))]
        (torch.cat(ys) * w).sum().backward()
    torch.testing.assert_close(y, torch.cat(ys))
    torch.testing.assert_close(xs.grad, xp.grad)
    torch.testing.assert_close(split.weight.grad, sum(bn.weight.grad for bn in plain))
    torch.testing.assert_close(split.bias.grad, sum(bn.bias.grad for bn in plain))
    torch.testing.assert_close(split.running_mean, torch.stack([bn.running_mean for bn in plain]).mean(0))
    torch.testing.assert_close(split.running_var, torch.stack([bn.running_var for bn in plain]).mean(0))
    assert int(split.num_batches_tracked) == 2
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    # the groups differ from one BN over the whole batch, and eval mode is plain BN
    whole = nn.BatchNorm2d(6)
    whole.load_state_dict(split.state_dict())
    assert (whole(x) - split(x)).abs().max() > 1e-2
    whole.load_state_dict(split.state_dict())
    whole.eval(), split.eval()
    torch.testing.assert_close(split(x), whole(x))
    with pytest.raises(ValueError, match="a batch of 10 cannot be split into 4 equal groups"):
        split.train()(x[:10])


def test_convert_split_bn_keeps_keys_and_shares_parameters():
    net = build_backbone("resnet18", width=0.125, cifar_stem=True)
    keys = list(net.state_dict())
    weight = net.bn1.weight
    convert_split_batchnorm(net, 4)
    assert isinstance(net.bn1, SplitBatchNorm2d) and net.bn1.weight is weight
    assert not any(type(m) is nn.BatchNorm2d for m in net.modules())
    assert list(net.state_dict()) == keys
    build_backbone("resnet18", width=0.125, cifar_stem=True).load_state_dict(net.state_dict())


def test_one_process_shuffle_bn_keys_line_up_with_their_images():
    moco = _build(_cfg())
    assert isinstance(moco.encoder_k[0].bn1, SplitBatchNorm2d) and isinstance(moco.backbone.bn1, SplitBatchNorm2d)
    x = _views()[1]
    seen = []
    moco.encoder_k.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    moco.encoder_k.eval()  # batch-independent: the unshuffled keys must equal a direct pass
    k = moco.keys(x, torch.randperm(len(x), generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(k, F.normalize(moco.encoder_k(x), dim=1))
    assert not torch.equal(seen[0], x)  # the encoder did see a shuffled batch
    moco.encoder_k.train()  # in train mode the groups of the shuffled batch set the statistics
    k_train = moco.keys(x, torch.randperm(len(x), generator=torch.Generator().manual_seed(1)))
    unshuffled = F.normalize(moco.encoder_k(x), dim=1)
    assert (k_train - unshuffled).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# SimCLRv2's memory

def naive_memory_nt_xent(z1, z2, memory, t):
    """Each anchor's candidates: the other 2N-1 embeddings of the batch and the K memory keys."""
    z = F.normalize(torch.cat([z1, z2]).double(), dim=1)
    n2, n = len(z), len(z) // 2
    total = 0.0
    for i in range(n2):
        candidates = [z[j] for j in range(n2) if j != i] + list(memory.double())
        logits = torch.stack([torch.dot(z[i], c) / t for c in candidates])
        total = total - (torch.dot(z[i], z[(i + n) % n2]) / t - torch.logsumexp(logits, 0))
    return total / n2


def test_simclr_memory_loss_matches_naive_loop_and_fills_with_momentum_keys():
    cfg = _cfg("simclr", memory={"size": 48, "momentum": 0.9}, model={"proj_layers": 3})
    simclr = _build(cfg)
    assert len(simclr.projector.layers) == 3
    grabbed = []
    simclr.projector.register_forward_hook(lambda mod, args, out: grabbed.append(out))
    for step in range(4):
        memory = simclr.memory.keys.clone()
        ptr = int(simclr.memory.ptr)
        views = _views(seed=step)
        with torch.no_grad():  # the keys: the updated momentum network on both views
            k_net = copy.deepcopy(simclr.encoder_k)
            ema_update(k_net, (simclr.backbone, simclr.projector), 0.9)
            k = F.normalize(k_net(torch.cat(views)), dim=1)
        out = simclr(views)
        z1, z2 = grabbed[-1].chunk(2)
        assert out["loss"].item() == pytest.approx(naive_memory_nt_xent(z1, z2, memory, 0.2).item(), rel=1e-5)
        assert int(simclr.memory.ptr) == (ptr + 2 * BATCH) % 48
        torch.testing.assert_close(simclr.memory.keys[ptr:ptr + 2 * BATCH], k, atol=1e-5, rtol=1e-5)
        out["loss"].backward()
        assert all(p.grad is None for p in simclr.encoder_k.parameters())
    assert int(simclr.memory.ptr) == 4 * 2 * BATCH % 48
    # without a memory, SimCLR is unchanged: no momentum network, plain NT-Xent
    plain = _build(_cfg("simclr"))
    assert not hasattr(plain, "memory") and not any("encoder_k" in k for k in plain.state_dict())


def test_moco_augmentations_v1_and_v2():
    moco = _build(_cfg(aug={"strength": 0.5}))
    v2 = moco.augmentations(SIZE, (0.5,) * 3, (0.5,) * 3)[0].cfg
    assert (v2.brightness, v2.contrast, v2.saturation, v2.hue, v2.jitter_p, v2.grayscale_p) == (0.4, 0.4, 0.4, 0.1, 0.8, 0.2)
    moco = _build(_cfg(aug={"strength": 0.5}, moco={"aug_plus": False}))
    v1 = moco.augmentations(SIZE, (0.5,) * 3, (0.5,) * 3)[0].cfg
    assert (v1.hue, v1.jitter_p, v1.blur_p) == (0.4, 1.0, 0.0)


def test_presets_build_the_papers_heads():
    demo = resolve(preset_name="cifar10-moco-v2")
    assert (demo.moco.queue_size, demo.moco.momentum, demo.moco.temperature, demo.moco.shuffle_bn_groups) == (4096, 0.99, 0.1, 8)
    assert demo.optim.name == "sgd" and demo.optim.weight_decay == 5e-4 and not demo.optim.exclude_bias_and_norm
    demo.model.width = 0.125
    assert len(build_method(demo).projector.layers) == 1  # the demo's fc -> 128
    v2 = resolve(preset_name="imagenet-moco-v2", sets=["data.source=/data/in1k"])
    assert v2.moco.mlp and v2.moco.temperature == 0.2 and v2.aug.blur and not v2.model.cifar_stem
    v2.model.width = 0.125
    head = build_method(v2).projector.layers
    assert len(head) == 2 and not any(isinstance(m, nn.BatchNorm1d) for m in head.modules())  # no BN in v2's MLP


# ---------------------------------------------------------------------------------------------
# Through the trainer: split BN keys load into a plain ResNet, and resume is exact

TINY = ["--data", "digits", "--batch-size", "64", "--device", "cpu", "--no-progress", "--method", "moco",
        "--set", "data.image_size=8", "model.width=0.125", "eval.knn_every=0", "eval.knn_k=20",
        "train.checkpoint_every=1", "optim.warmup_epochs=0", "optim.name=sgd", "optim.lr=0.06",
        "moco.queue_size=256", "moco.momentum_cosine=true", "moco.temperature=0.2"]


def test_moco_trains_through_the_cli_and_resumes_exactly(tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(["pretrain", "--out", str(full), "--epochs", "2", *TINY]) == 0
    assert main(["pretrain", "--out", str(split), "--epochs", "2", "--max-minutes", "0", *TINY]) == 0
    assert main(["pretrain", "--out", str(split), "--resume", "--device", "cpu", "--no-progress"]) == 0
    a, b = ckpt.load(full / "checkpoint.pt"), ckpt.load(split / "checkpoint.pt")
    assert int(a["model"]["queue.ptr"]) == 2 * 22 * 64 % 256
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    backbone = build_backbone("resnet18", width=0.125, cifar_stem=True)
    backbone.load_state_dict(ckpt.load(full / "backbone.pt"))  # split BN left the keys alone
    losses = [json.loads(line)["loss"] for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


# ---------------------------------------------------------------------------------------------
# Two gloo ranks

WORLD = 2


def _rank_work() -> dict:
    n = BATCH // WORLD
    mine = slice(D.rank() * n, (D.rank() + 1) * n)
    views = _views()
    # alignment first, while both ranks' key encoders (BN statistics included) are identical
    moco = _build(_cfg(moco={"queue_size": 16}))  # same seed: the same networks on both ranks
    assert moco.groups == 1  # ranks are the devices: no split BN
    seen = []
    hook = moco.encoder_k.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    moco.encoder_k.eval()  # batch-independent keys: shuffled-and-restored must equal direct
    x = views[1][mine]
    aligned = moco.keys(x, moco.shuffle_permutations(BATCH)[0])  # rank 0's permutation of the global batch
    direct = F.normalize(moco.encoder_k(x), dim=1)
    hook.remove()

    moco = _build(_cfg(moco={"queue_size": 16}))
    keys = _record_keys(moco)
    moco([v[mine] for v in views])

    g = torch.Generator().manual_seed(9)
    z1, z2, q, k = (torch.randn(BATCH, DIM, generator=g) for _ in range(4))
    queue = F.normalize(torch.randn(16, DIM, generator=g), dim=1)
    return {"queue": moco.queue.keys.clone(), "ptr": int(moco.queue.ptr), "k": keys[0],
            "aligned": aligned, "direct": direct, "encoded": seen[0],
            "dcl": dcl(z1[mine], z2[mine], 0.2).item(), "dclw": dclw(z1[mine], z2[mine], 0.2).item(),
            "info_nce_w": info_nce(q[mine], k[mine], queue, 0.2, decoupled=True, sigma=0.5).item()}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(_rank_work, WORLD, tmp_path_factory.mktemp("moco_ranks"))


def test_gathered_keys_fill_the_queue_in_rank_order(ranks):
    n = BATCH // WORLD
    for res in ranks:
        assert res["ptr"] == BATCH  # the global batch
        for r in range(WORLD):
            torch.testing.assert_close(res["queue"][r * n:(r + 1) * n], ranks[r]["k"])
    torch.testing.assert_close(ranks[0]["queue"], ranks[1]["queue"])


def test_shuffle_bn_across_ranks_permutes_and_restores_the_batch(ranks):
    n = BATCH // WORLD
    x = _views()[1]
    for res in ranks:  # every key lines up with its own image
        torch.testing.assert_close(res["aligned"], res["direct"], atol=1e-6, rtol=1e-5)
    encoded = torch.cat([res["encoded"] for res in ranks])  # what each rank's key encoder ran on
    match = [[torch.equal(e, img) for img in x] for e in encoded]
    assert all(sum(row) == 1 for row in match)  # a permutation of the global batch ...
    order = [row.index(True) for row in match]
    assert sorted(order) == list(range(BATCH))
    assert any(i >= n for i in order[:n])  # ... that moved images between ranks


def test_dcl_dclw_and_weighted_info_nce_use_the_global_batch(ranks):
    g = torch.Generator().manual_seed(9)
    z1, z2, q, k = (torch.randn(BATCH, DIM, generator=g) for _ in range(4))
    queue = F.normalize(torch.randn(16, DIM, generator=g), dim=1)
    whole = {"dcl": dcl(z1, z2, 0.2), "dclw": dclw(z1, z2, 0.2),
             "info_nce_w": info_nce(q, k, queue, 0.2, decoupled=True, sigma=0.5)}
    for name, value in whole.items():  # the ranks' mean (what DDP optimises) is the whole batch's loss
        assert sum(res[name] for res in ranks) / WORLD == pytest.approx(value.item(), rel=1e-5), name
