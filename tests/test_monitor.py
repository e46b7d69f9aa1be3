"""The collapse monitors (issue 13, 1.3): closed forms, a collapsed model of every method is
reported collapsed and a healthy random-init one is not, SwAV's code entropy, chance losses."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from selfsup import checkpoint as ckpt
from selfsup import epoch_end, loop, runs, train
from selfsup.config import resolve
from selfsup.data import load_data
from selfsup.evaluate import extract_features
from selfsup.methods import METHODS
from selfsup.monitor import code_entropy, collapse_warning, effective_rank, feature_std

SIZE = 8
SMALL = ["model.width=0.125", "model.proj_dim=16", "model.proj_hidden=32", "swav.prototypes=30",
         "dino.out_dim=64", "dino.bottleneck_dim=16", "moco.queue_size=64", "train.batch_size=32",
         "simsiam.pred_hidden=8"]


def test_effective_rank_and_feature_std_against_closed_forms():
    D = 16
    assert effective_rank(torch.eye(D)) == pytest.approx(D, rel=1e-4)       # D equal singular values
    assert effective_rank(torch.randn(50, 1) @ torch.randn(1, D)) == pytest.approx(1.0, abs=1e-4)  # rank 1
    assert effective_rank(torch.ones(50, D)) == pytest.approx(1.0, abs=1e-4)  # identical rows
    r = 4  # r equal singular values: rank r
    u, _ = torch.linalg.qr(torch.randn(60, r))
    v, _ = torch.linalg.qr(torch.randn(D, r))
    assert effective_rank(u @ v.T) == pytest.approx(r, rel=1e-4)

    assert feature_std(torch.rand(1, D).expand(40, D) * 3) == pytest.approx(0.0, abs=1e-6)
    m = 5  # every basis vector m times: per dimension a share p = 1/D of ones, std sqrt(N p (1-p) / (N-1))
    onehots = torch.eye(D).repeat(m, 1) * 7.0                                 # (m*D, D), scale removed by the norm
    n, p = m * D, 1 / D
    assert feature_std(onehots) == pytest.approx(math.sqrt(n * p * (1 - p) / (n - 1)), rel=1e-5)


def test_code_entropy_of_uniform_and_one_hot_codes():
    K = 30
    assert code_entropy(torch.full((8, K), 1 / K)).item() == pytest.approx(math.log(K), rel=1e-6)
    assert code_entropy(torch.eye(K)[:8]).item() == pytest.approx(0.0, abs=1e-6)


@pytest.fixture(scope="module")
def digits():
    splits = load_data("digits", image_size=SIZE)
    idx = epoch_end.monitor_indices(len(splits.train), seed=0)
    mean, std = splits.train.mean_std()
    return np.asarray(splits.train.images)[idx[:512]], mean, std


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A random-init SimCLR run checkpoint: distillation's teacher."""
    cfg = resolve(sets=["method=simclr", *SMALL])
    method = train.build_method(cfg)
    out = tmp_path_factory.mktemp("teacher")
    meta = train.backbone_spec(cfg, SIZE, [0.5] * 3, [0.25] * 3).to_json()
    ckpt.save_atomic({"format": ckpt.FORMAT, "version": 1, "config": cfg.to_dict(), "epoch": 0, "step": 0,
                      "model": method.state_dict(), "meta": meta}, out / runs.CHECKPOINT)
    return out


def _method(name: str, teacher_run):
    # torchvision's BN init for every method: with zero-initialised residual branches (SimCLR's and
    # SimSiam's default) an untrained 8-channel network on 8-pixel images is a chain of shortcuts
    # whose features really are low-rank (effective rank 2.8), which is not the healthy case meant here
    sets = [f"method={name}", *SMALL, "model.zero_init_residual=false"] + ([f"distill.teacher={teacher_run}"] if name == "distill" else [])
    return train.build_method(resolve(sets=sets))


def _collapse(backbone: torch.nn.Module, kind: str) -> None:
    """Make the backbone's pooled features collapsed: every image the same vector, or a rank-1
    matrix s(x) c whose scale s changes sign (normalised rows ±c: a spread that looks healthy;
    ReLU features cannot do this, but a monitor should not rely on it)."""
    c = torch.rand(backbone.num_features) + 0.1  # (F,)

    def hook(module, inputs, out):  # out: (N, F)
        if kind == "constant":
            return c.expand_as(out).clone()
        s = out.mean(1, keepdim=True)  # (N, 1), varies with the image
        return (s - s.mean()) * c

    backbone.register_forward_hook(hook)


def _monitor(method, images, mean, std) -> dict:
    features = extract_features(method.backbone, images, size=SIZE, mean=mean, std=std, device=torch.device("cpu"))
    return epoch_end.collapse_monitor(features)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_monitor_reports_a_collapsed_model_of_every_method_and_not_a_healthy_one(name, digits, teacher_run):
    images, mean, std = digits
    method = _method(name, teacher_run)
    dim = method.backbone.num_features
    healthy = _monitor(method, images, mean, std)
    assert collapse_warning(healthy["feature_std"], healthy["effective_rank"], dim) is None, healthy
    assert not any("collapsed" in w for w in epoch_end.monitor_warnings(method, {"loss": 1.0, **healthy}, dim))
    for kind in ("constant", "rank-1"):
        collapsed = _method(name, teacher_run)
        _collapse(collapsed.backbone, kind)
        m = _monitor(collapsed, images, mean, std)
        assert m["effective_rank"] == pytest.approx(1.0, abs=1e-3), (kind, m)
        warnings = epoch_end.monitor_warnings(collapsed, {"loss": 1.0, **m}, dim)
        assert any("backbone features look collapsed" in w for w in warnings), (kind, m)
        if kind == "rank-1":  # a spread that looks healthy: feature std alone is fooled, the rank is not
            assert m["feature_std"] * math.sqrt(dim) > healthy["feature_std"] * math.sqrt(dim)


def test_simsiam_old_embedding_std_reads_perfect_spread_on_a_collapsed_model(digits, teacher_run):
    """The monitor this replaces: SimSiam's embedding ends in BN without affine, so its normalised
    per-dimension std is ≈ 1/√D however collapsed the backbone is."""
    images, mean, std = digits
    torch.manual_seed(0)
    method = _method("simsiam", teacher_run)
    _collapse(method.backbone, "rank-1")
    method.train()
    x = torch.as_tensor(images[:256]).permute(0, 3, 1, 2).float() / 255  # (B, 3, S, S)
    views = [x + 0.05 * torch.randn_like(x), x + 0.05 * torch.randn_like(x)]
    with torch.no_grad():
        embedding = method(views)["embedding"]  # (2B, D)
    old = F.normalize(embedding, dim=1).std(0).mean().item()
    D = embedding.shape[1]
    assert old == pytest.approx(1 / math.sqrt(D), rel=0.05)  # "perfect spread"
    m = _monitor(method, images, mean, std)
    assert collapse_warning(m["feature_std"], m["effective_rank"], method.backbone.num_features)


def test_swav_code_entropy_is_ln_k_for_a_collapsed_embedding_and_its_loss_at_chance_warns(digits, teacher_run):
    images, _, _ = digits
    method = _method("swav", teacher_run)
    _collapse(method.backbone, "constant")  # every z the same: Sinkhorn spreads each sample uniformly
    x = torch.as_tensor(images[:32]).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        out = method([x, x])
    K = method.prototypes.out_features
    assert out["code_entropy"].dim() == 0
    assert out["code_entropy"].item() == pytest.approx(math.log(K), rel=1e-4)
    assert method.chance_loss() == pytest.approx(math.log(K))
    [warning] = epoch_end.monitor_warnings(method, {"loss": math.log(K) * 1.005}, 128)
    assert "chance value" in warning and "uniform codes" in warning and "swav.epsilon" in warning
    assert epoch_end.monitor_warnings(method, {"loss": math.log(K) * 0.9}, 128) == []
    # uniform codes, however the loss reads (at T 0.1 it sits above ln K): SwAV's own warning
    uniform = {"loss": math.log(K) * 1.05, "code_entropy": out["code_entropy"].item()}
    [warning] = epoch_end.monitor_warnings(method, uniform, 128)
    assert "codes are uniform" in warning and "swav.epsilon" in warning
    assert epoch_end.monitor_warnings(method, {"loss": math.log(K) * 1.05, "code_entropy": 0.9 * math.log(K)}, 128) == []
    assert METHODS["simclr"].chance_loss(method) is None  # methods without a known dead end: no warning


def test_the_loop_averages_every_scalar_a_method_returns_besides_the_loss():
    sums: dict = {}
    for e in (1.0, 3.0):
        loop.accumulate_scalars(sums, {"loss": torch.tensor(9.0), "embedding": torch.ones(4, 2),
                                       "code_entropy": torch.tensor(e)})
    assert sums.keys() == {"code_entropy"} and sums["code_entropy"].item() == 4.0


# ---------------------------------------------------------------------------------------------
# Label-free monitors on every path (issue 25 §2)


def test_alignment_and_uniformity_against_closed_forms():
    from selfsup.monitor import alignment, uniformity
    z = torch.randn(200, 8)
    assert alignment(z, 3 * z) == pytest.approx(0.0, abs=1e-10)  # the same directions
    assert alignment(z, -z) == pytest.approx(4.0, rel=1e-6)      # opposite: ||u - (-u)||² = 4
    assert uniformity(torch.ones(50, 8)) == pytest.approx(0.0, abs=1e-12)  # one point: the worst
    two = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])  # one pair at distance 2: log exp(-2 * 4)
    assert uniformity(two) == pytest.approx(-8.0, rel=1e-9)
    assert -4.0 < uniformity(torch.randn(500, 64)) < -3.5       # spread over a 64-D sphere


def _image_folder(root, n=48):
    """A folder of ``n`` unlabelled JPEGs of mixed sizes, flat (no splits, no classes)."""
    from PIL import Image
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        side = int(rng.integers(24, 60))
        pixels = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((side, side + i % 5), Image.BICUBIC).save(root / f"{i:03d}.jpg")
    return root


def test_a_streamed_unlabelled_run_logs_the_label_free_monitors_and_kNN_on_eval_data(tmp_path):
    import json
    from selfsup.cli import main
    folder = _image_folder(tmp_path / "mine")
    args = ["pretrain", "--data", str(folder), "--device", "cpu", "--no-progress", "--epochs", "2",
            "--set", "data.stream=true", "data.workers=0", "aug.size=16", "train.batch_size=16", *SMALL[:3]]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    for m in lines:  # no labels, streamed: the label-free monitors all the same
        assert {"feature_std", "effective_rank", "alignment", "uniformity"} <= m.keys() and "knn_top1" not in m
        assert 0 <= m["alignment"] <= 4 and -8 <= m["uniformity"] <= 0
    # --eval-data: a labelled source for the kNN monitor (the online probe needs the run's own labels)
    assert main([*args, "--out", str(tmp_path / "b"), "--eval-data", "digits"]) == 0
    last = json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 < last["knn_top1"] <= 100 and "linear_top1" not in last and "alignment" in last


def test_the_alignment_views_are_the_same_every_epoch():
    cfg = resolve(preset_name="digits-simclr", sets=SMALL + ["data.image_size=8"])
    splits = load_data("digits", image_size=SIZE)
    torch.manual_seed(0)
    method = train.build_method(cfg)
    sample = epoch_end.monitor_sample(splits.train.images, seed=0)
    assert len(sample) == min(len(splits.train), epoch_end.MONITOR_IMAGES)
    monitors = epoch_end.build_monitors(cfg, method, splits, len(splits.train), (SIZE, (0.5,) * 3, (0.5,) * 3),
                                        sample, torch.device("cpu"), None, None)
    a, b = monitors(0, False), monitors(1, False)  # the weights did not move: the same readings
    assert a["alignment"] == b["alignment"] and a["uniformity"] == b["uniformity"] > -8
    assert 0 < a["alignment"] < 4
