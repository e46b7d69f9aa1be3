"""SimSiam (issue 5): the stop-gradient loss, the heads, the fixed predictor lr, weight decay on BN."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfsup.cli import main
from selfsup.config import Config, resolve
from selfsup.losses import simsiam
from selfsup.optim import build_optimizer, scale_lr, set_lr, warmup_cosine
from selfsup.train import build_method

B, SIZE = 8, 16


def test_simsiam_loss_against_a_naive_reference_and_closed_forms():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(B, 6, generator=g, requires_grad=True)
    z = torch.randn(B, 6, generator=g, requires_grad=True)
    naive = -sum(torch.dot(p[i], z[i]) / (p[i].norm() * z[i].norm()) for i in range(B)) / B
    loss = simsiam(p, z)
    assert loss.item() == pytest.approx(naive.item(), rel=1e-5)
    loss.backward()
    assert p.grad is not None and z.grad is None  # stop-gradient on z
    assert simsiam(z, 2 * z).item() == pytest.approx(-1.0, rel=1e-6)


def _cfg(**optim) -> Config:
    cfg = resolve(preset_name="cifar10-simsiam", overrides={"optim": optim})
    cfg.model.width, cfg.model.proj_dim, cfg.simsiam.pred_hidden = 0.125, 16, 4
    cfg.train.batch_size = B
    return cfg


def test_heads_follow_the_official_code():
    torch.manual_seed(0)
    method = build_method(_cfg())
    last_bn = method.projector[-1][-1]
    assert isinstance(last_bn, nn.BatchNorm1d) and not last_bn.affine  # projector output BN, no γ/β
    assert len(method.projector) == 2  # CIFAR: 2 layers
    assert [m.out_features for m in method.predictor.modules() if isinstance(m, nn.Linear)] == [4, 16]
    assert not any(isinstance(m, nn.BatchNorm1d) for m in method.predictor[-1])  # no BN on the output
    g = torch.Generator().manual_seed(0)
    x1, x2 = (torch.randn(B, 3, SIZE, SIZE, generator=g) for _ in range(2))
    out = method([x1, x2])
    with torch.no_grad():
        z1, z2 = method.projector(method.backbone(torch.cat([x1, x2]))).chunk(2)
        p1, p2 = method.predictor(torch.cat([z1, z2])).chunk(2)
    expected = 0.5 * (F.cosine_similarity(p1, z2).mean() + F.cosine_similarity(p2, z1).mean())
    assert out["loss"].item() == pytest.approx(-expected.item(), rel=1e-4)
    assert out["embedding"].shape == (2 * B, 16)
    # the official encoder is built with zero_init_residual=True: every residual branch starts at 0
    last_bns = [blk.bn2.weight for layer in (method.backbone.layer1, method.backbone.layer4) for blk in layer]
    assert all(w.abs().sum() == 0 for w in last_bns)
    assert build_method(Config()).backbone.layer1[0].bn2.weight.abs().sum() > 0  # off by default


def test_predictor_lr_stays_fixed_while_the_rest_decays_and_wd_reaches_bn():
    torch.manual_seed(0)
    cfg = _cfg()
    method = build_method(cfg)
    peak = scale_lr(cfg.optim.lr, cfg.train.batch_size, "linear")
    groups = method.param_groups(peak)
    # weight decay on every parameter, BN and biases included (exclude_bias_and_norm=false)
    assert all(g["weight_decay"] == cfg.optim.weight_decay == 5e-4 for g in groups)
    decayed = {id(p) for g in groups for p in g["params"]}
    bn = method.backbone.bn1
    assert {id(bn.weight), id(bn.bias), id(method.predictor[-1][0].bias)} <= decayed
    assert len(decayed) == sum(p.requires_grad for p in method.parameters())

    optimizer = build_optimizer("sgd", groups, lr=cfg.optim.lr, momentum=0.9, weight_decay=cfg.optim.weight_decay)
    predictor_ids = {id(p) for p in method.predictor.parameters()}
    seen = []
    for step in range(10):
        set_lr(optimizer, warmup_cosine(step, 10, 0, peak))
        seen.append([g["lr"] for g in optimizer.param_groups])
    is_pred = [all(id(p) in predictor_ids for p in g["params"]) for g in optimizer.param_groups]
    for lrs in seen:
        assert all(lr == peak for lr, pred in zip(lrs, is_pred) if pred)  # held at the peak lr
    encoder_lrs = [lrs[is_pred.index(False)] for lrs in seen]
    assert encoder_lrs[0] == pytest.approx(peak) and encoder_lrs[-1] < 0.1 * peak  # cosine decay

    # a zero-gradient step still shrinks BN's γ: the decay is applied to it
    gamma = bn.weight.detach().clone()
    for p in method.parameters():
        p.grad = torch.zeros_like(p)
    set_lr(optimizer, 10.0)  # large enough for float32 to show lr * wd
    optimizer.step()
    assert torch.all(bn.weight.abs() < gamma.abs())

    method.fix_pred_lr = False
    assert not any(g.get("fixed_lr") for g in method.param_groups(peak))


def test_simsiam_trains_through_the_cli(tmp_path):
    out = tmp_path / "run"
    assert main(["pretrain", "--preset", "cifar10-simsiam", "--out", str(out), "--epochs", "1", "--data", "digits",
                 "--batch-size", "64", "--device", "cpu", "--no-progress",
                 "--set", "data.image_size=8", "model.width=0.125", "model.proj_dim=64", "simsiam.pred_hidden=16",
                 "eval.knn_k=20", "eval.knn_every=1"]) == 0
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert -1 <= metrics["loss"] < 0 and metrics["effective_rank"] > 2 and "knn_top1" in metrics
