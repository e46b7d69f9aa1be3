"""kNN and the linear probes against independent implementations (scikit-learn), the papers'
linear protocols, and the online linear probe."""
import json

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from torch import nn

from selfsup import checkpoint as ckpt
from selfsup.cli import main
from selfsup.config import from_dict
from selfsup.evaluate import (LINEAR_PROTOCOLS, OnlineLinear, extract_features, knn_predict, linear_eval,
                              linear_probe, protocol_for)


def _blobs(n: int, d: int, classes: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=torch.Generator().manual_seed(123)) * 3
    y = torch.arange(n) % classes
    return centres[y] + spread * torch.randn(n, d, generator=g), y


def test_weighted_knn_matches_scikit_learn():
    """MoCo/DINO's kNN: cosine neighbours voting with exp(sim / T), as KNeighborsClassifier with
    the cosine metric and the weight exp((1 - distance) / T)."""
    x, y = _blobs(400, 16, 5, spread=3.0, seed=0)  # overlapping classes: the votes decide
    q, _ = _blobs(150, 16, 5, spread=3.0, seed=1)
    k, t = 25, 0.1
    scores = knn_predict(x, y, q, num_classes=5, k=k, temperature=t)  # (M, C)
    ref = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute",
                               weights=lambda dist: np.exp((1 - dist) / t)).fit(x.numpy(), y.numpy())
    np.testing.assert_array_equal(scores.argmax(1).numpy(), ref.predict(q.numpy()))
    np.testing.assert_allclose((scores / scores.sum(1, keepdim=True)).numpy(), ref.predict_proba(q.numpy()),
                               rtol=1e-4, atol=1e-6)


def test_fast_linear_probe_matches_logistic_regression():
    x, y = _blobs(300, 10, 3, spread=0.5, seed=0)  # separable
    xt, yt = _blobs(150, 10, 3, spread=0.5, seed=1)
    ours = linear_probe(x, y, xt, yt, num_classes=3, epochs=20)
    ref = LogisticRegression(max_iter=1000).fit(x.numpy(), y.numpy())
    assert ours["top1"] == 100.0 == 100.0 * ref.score(xt.numpy(), yt.numpy())
    assert ours["settings"]["name"] == "fast" and ours["settings"]["epochs"] == 20
    # overlapping classes: the two classifiers agree on the accuracy within a few points
    x, y = _blobs(600, 10, 3, spread=2.5, seed=2)
    xt, yt = _blobs(300, 10, 3, spread=2.5, seed=3)
    ours = linear_probe(x, y, xt, yt, num_classes=3, epochs=30)["top1"]
    ref = 100.0 * LogisticRegression(max_iter=1000).fit(x.numpy(), y.numpy()).score(xt.numpy(), yt.numpy())
    assert 60 < ref < 99 and abs(ours - ref) < 3, (ours, ref)


def _colour_images(n: int, seed: int) -> tuple[np.ndarray, torch.Tensor]:
    """Three classes of noisy uniform colours (red, green, blue): crops and flips keep the class."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    base = np.full((n, 8, 8, 3), 60.0)
    base[np.arange(n), :, :, y] = 190.0
    return np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8), torch.as_tensor(y)


@pytest.mark.parametrize("name", ["simclr", "moco"])
def test_papers_linear_protocols_learn_separable_images_with_a_frozen_backbone(name):
    images, y = _colour_images(600, 0)
    test_images, yt = _colour_images(150, 1)
    backbone = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(3))  # (B, 3)
    mean, std = (0.4, 0.4, 0.4), (0.25, 0.25, 0.25)
    kw = dict(size=8, mean=mean, std=std, device=torch.device("cpu"))
    test_f = extract_features(backbone, test_images, **kw)
    out = linear_eval(backbone, images, y, test_f, yt, num_classes=3, protocol=LINEAR_PROTOCOLS[name],
                      epochs=10, **kw)
    ref = LogisticRegression(max_iter=1000).fit(extract_features(backbone, images, **kw).numpy(), y.numpy())
    assert out["top1"] == 100.0 == 100.0 * ref.score(test_f.numpy(), yt.numpy())
    bn = backbone[2]  # frozen in eval mode: BN statistics never updated, mode restored
    assert bn.num_batches_tracked.item() == 0 and backbone.training
    assert out["settings"]["name"] == name and out["settings"]["epochs"] == 10


def test_protocol_defaults_follow_the_papers():
    s, m = LINEAR_PROTOCOLS["simclr"], LINEAR_PROTOCOLS["moco"]
    assert (s.base_lr(512), s.weight_decay, s.nesterov, s.schedule, s.epochs, s.batch_size) == \
        (0.2, 0.0, True, "cosine", 100, 256)
    assert (m.base_lr(512), m.weight_decay, m.nesterov, m.schedule, m.milestones) == (30.0, 0.0, False, "steps", (0.6, 0.8))
    assert protocol_for("moco") == "moco" and protocol_for("byol") == "simclr"


def test_online_linear_learns_separable_features():
    x, y = _blobs(600, 12, 4, spread=0.7, seed=0)
    xt, yt = _blobs(200, 12, 4, spread=0.7, seed=1)
    backbone = nn.Identity()
    probe = OnlineLinear(12, y, 4)
    probe.watch(backbone)
    for epoch in range(3):
        for idx in torch.randperm(600, generator=torch.Generator().manual_seed(epoch)).split(50):
            backbone(torch.cat([x[idx], x[idx]]))  # two "views" in one call, as SimCLR's forward
            with torch.no_grad():
                backbone(x[:3])  # an evaluation pass in between is not captured
            probe.step(idx)
    assert probe.accuracy(xt, yt) > 97


def test_retired_eval_keys_of_saved_runs_are_ignored():
    cfg = from_dict({"eval": {"linear_epochs": 100, "linear_lr": 0.1, "linear_batch_size": 256, "knn_k": 7}})
    assert cfg.eval.knn_k == 7 and cfg.eval.online_linear


TINY = ["--data", "digits", "--batch-size", "64", "--device", "cpu", "--no-progress", "--epochs", "1",
        "--set", "data.image_size=8", "model.width=0.125", "eval.knn_every=1", "eval.knn_k=20",
        "optim.warmup_epochs=0"]


def test_online_probe_never_changes_training_and_knn_reports_its_features(tmp_path):
    with_probe, without = tmp_path / "a", tmp_path / "b"
    assert main(["pretrain", "--out", str(with_probe), *TINY]) == 0
    assert main(["pretrain", "--out", str(without), *TINY, "eval.online_linear=false", "eval.knn_features=head"]) == 0
    a, b = ckpt.load(with_probe / "checkpoint.pt"), ckpt.load(without / "checkpoint.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert "online_linear" in a and "online_linear" not in b
    ma, mb = (json.loads((d / "metrics.jsonl").read_text().splitlines()[-1]) for d in (with_probe, without))
    assert ma["loss"] == mb["loss"]
    assert 0 <= ma["linear_top1"] <= 100 and "linear_top1" not in mb
    assert (ma["knn_features"], mb["knn_features"]) == ("backbone", "head")

    # offline: kNN on head features, the three linear protocols, each saying what it used
    run = str(with_probe)
    assert main(["eval", "knn", "--checkpoint", run, "--data", "digits", "--k", "20", "--device", "cpu",
                 "--features", "head"]) == 0
    e = json.loads((with_probe / "eval_knn_head.json").read_text())
    assert e["features"] == "head" and 0 < e["top1"] <= 100
    for name in ("simclr", "moco", "fast"):
        assert main(["eval", "linear", "--checkpoint", run, "--data", "digits", "--device", "cpu",
                     "--protocol", name, "--epochs", "1"]) == 0
        e = json.loads((with_probe / f"eval_linear_{name}.json").read_text())
        assert e["linear_protocol"] == e["settings"]["name"] == name and e["epochs"] == 1
