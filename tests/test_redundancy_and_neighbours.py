"""Barlow Twins, VICReg, MoCo v3 and NNCLR (issue 16): each loss against a loop written from its
paper and against closed forms; each method's step; two gloo ranks against one process holding
the whole batch, with plain SGD so that a gradient scaled by 1/world_size would show (LARS's
trust ratio would hide it)."""
import copy
import importlib
import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfsup import distributed as D
from selfsup import losses as L
from selfsup.config import ConfigError, resolve
from selfsup.methods import StepInfo, check_config
from selfsup.optim import build_optimizer
from selfsup.train import build_method

from gloo import run_ranks

NEW_METHODS = ("barlow_twins", "vicreg", "mocov3", "nnclr")


def hadamard(n: int) -> torch.Tensor:
    """Sylvester's n x n Hadamard matrix (n a power of 2): ±1 entries, orthogonal columns."""
    h = torch.ones(1, 1)
    while len(h) < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


def standardised_orthogonal(n: int, d: int) -> torch.Tensor:
    """(n, d) columns of mean 0, biased variance 1, mutually orthogonal: Hadamard columns 1..d."""
    return hadamard(n)[:, 1:d + 1].clone()


# ---------------------------------------------------------------------------------------------
# Barlow Twins

def naive_barlow_twins(z1, z2, lambd):
    """Zbontar et al. eq. 1 with the official code's BatchNorm1d(affine=False) in train mode."""
    bn = nn.BatchNorm1d(z1.shape[1], affine=False).double()
    a, b = bn(z1.double()), bn(z2.double())
    n, d = a.shape
    total = 0.0
    for i in range(d):
        for j in range(d):
            c_ij = sum(a[k, i] * b[k, j] for k in range(n)) / n
            total = total + ((1 - c_ij) ** 2 if i == j else lambd * c_ij ** 2)
    return total


@pytest.mark.parametrize("n,d,lambd", [(8, 4, 0.0051), (6, 5, 0.5), (16, 3, 1.0)])
def test_barlow_twins_matches_the_papers_sum_and_its_gradient(n, d, lambd):
    g = torch.Generator().manual_seed(n + d)
    z1 = (torch.randn(n, d, generator=g) * 3 + 1).double().requires_grad_()
    z2 = (torch.randn(n, d, generator=g) - 2).double().requires_grad_()
    loss = L.barlow_twins(z1, z2, lambd)
    naive = naive_barlow_twins(z1, z2, lambd)
    assert loss.item() == pytest.approx(naive.item(), rel=1e-4)
    got = torch.autograd.grad(loss, (z1, z2))
    want = torch.autograd.grad(naive, (z1, z2))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)


def test_barlow_twins_closed_forms():
    z = standardised_orthogonal(8, 4)
    one = 1 / (1 + 1e-5)  # a unit-variance column standardised with BN's eps
    assert L.barlow_twins(z, z.clone() * 5 + 3).item() == pytest.approx(4 * (1 - one) ** 2, abs=1e-7)  # C = I
    assert L.barlow_twins(z, -z).item() == pytest.approx(4 * (1 + one) ** 2, rel=1e-6)  # C = -I
    # two identical columns: C has an off-diagonal 1 on each side, weighted λ
    z_dup = torch.cat([z[:, :1], z[:, :1]], 1)
    assert L.barlow_twins(z_dup, z_dup.clone(), 0.25).item() == pytest.approx(0.25 * 2 * one ** 2, rel=1e-6)


def test_off_diagonal_lists_every_entry_but_the_diagonal():
    x = torch.arange(16.0).view(4, 4)
    want = [x[i, j].item() for i in range(4) for j in range(4) if i != j]
    assert L.off_diagonal(x).tolist() == want


# ---------------------------------------------------------------------------------------------
# VICReg

def naive_vicreg(x, y, sim, std, cov):
    """main_vicreg.py's terms, each written out as a loop over dimensions."""
    x, y = x.double(), y.double()
    n, d = x.shape
    invariance = sum(((x[k] - y[k]) ** 2).sum() for k in range(n)) / (n * d)
    def variance(z):
        return sum(F.relu(1 - torch.sqrt(z[:, j].var() + 1e-4)) for j in range(d)) / d
    def covariance(z):
        z = z - z.mean(0)
        c = sum(torch.outer(z[k], z[k]) for k in range(n)) / (n - 1)
        return sum(c[i, j] ** 2 for i in range(d) for j in range(d) if i != j) / d
    return sim * invariance + std * (variance(x) + variance(y)) / 2 + cov * (covariance(x) + covariance(y))


@pytest.mark.parametrize("scale", [0.3, 2.0])  # below and above the hinge's std of 1
def test_vicreg_matches_its_terms_written_out(scale):
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(10, 6, generator=g) * scale).double().requires_grad_()
    y = (torch.randn(10, 6, generator=g) * scale).double().requires_grad_()
    loss, naive = L.vicreg(x, y, 25.0, 25.0, 1.0), naive_vicreg(x, y, 25.0, 25.0, 1.0)
    assert loss.item() == pytest.approx(naive.item(), rel=1e-5)
    for a, b in zip(torch.autograd.grad(loss, (x, y)), torch.autograd.grad(naive, (x, y))):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-7)


def test_vicreg_closed_forms():
    z = standardised_orthogonal(8, 4) * 2  # std above 1, uncorrelated
    assert L.vicreg(z, z.clone()).item() == pytest.approx(0.0, abs=1e-5)
    collapsed = torch.ones(8, 4)
    # identical, constant: only the variance hinge, relu(1 - sqrt(1e-4)) = 0.99 for every dimension
    assert L.vicreg(collapsed, collapsed.clone()).item() == pytest.approx(25 * 0.99, rel=1e-6)
    assert L.vicreg(z, z + 1, sim_coeff=1.0, std_coeff=0.0, cov_coeff=0.0).item() == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# MoCo v3 and NNCLR: cross-entropy over the batch

def naive_cross_batch(anchors, targets, t):
    a, b = F.normalize(anchors.double(), dim=1), F.normalize(targets.double(), dim=1)
    total = 0.0
    for i in range(len(a)):
        logits = torch.stack([torch.dot(a[i], b[j]) / t for j in range(len(b))])
        total = total - (logits[i] - torch.logsumexp(logits, 0))
    return total / len(a)


@pytest.mark.parametrize("t", [0.2, 1.0])
def test_mocov3_loss_is_the_cross_entropy_over_the_batch_times_two_t(t):
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(6, 5, generator=g, requires_grad=True), torch.randn(6, 5, generator=g, requires_grad=True)
    loss = L.mocov3(q, k, t)
    assert loss.item() == pytest.approx(2 * t * naive_cross_batch(q, k, t).item(), rel=1e-5)
    loss.backward()
    assert q.grad is not None and k.grad is None  # keys are constants
    n = 4  # one-hot queries on their own keys: logits 1/T on the diagonal, 0 elsewhere
    e = torch.eye(n)
    want = 2 * t * (math.log(math.exp(1 / t) + n - 1) - 1 / t)
    assert L.mocov3(e * 3, e.clone(), t).item() == pytest.approx(want, rel=1e-6)


def test_nnclr_loss_and_its_gradient_through_the_predictions_only():
    g = torch.Generator().manual_seed(3)
    nn_, p = torch.randn(7, 4, generator=g, requires_grad=True), torch.randn(7, 4, generator=g, requires_grad=True)
    loss = L.nnclr(nn_, p, 0.1)
    assert loss.item() == pytest.approx(naive_cross_batch(nn_, p, 0.1).item(), rel=1e-5)
    loss.backward()
    assert p.grad is not None and nn_.grad is None  # the neighbours come from the support set


def test_nearest_neighbour_is_the_most_similar_support_row():
    g = torch.Generator().manual_seed(4)
    support = F.normalize(torch.randn(50, 8, generator=g), dim=1)
    z = torch.randn(9, 8, generator=g) * 7  # scale must not matter: cosine similarity
    got = L.nearest_neighbours(z, support)
    for i in range(len(z)):
        sims = [F.cosine_similarity(z[i], s, dim=0) for s in support]
        assert torch.equal(got[i], support[int(torch.stack(sims).argmax())])
    assert torch.equal(L.nearest_neighbours(support[:5] * 2, support), support[:5])  # members find themselves


# ---------------------------------------------------------------------------------------------
# The methods

B, SIZE = 8, 16


def tiny(method: str, **overrides):
    cfg = resolve(overrides={"method": method, "train": {"batch_size": B},
                             "model": {"width": 0.125, "proj_hidden": 32, "proj_dim": 16},
                             "nnclr": {"support_size": 4 * B}, **overrides})
    return check_config(cfg)


@pytest.mark.parametrize("method", NEW_METHODS)
def test_each_method_steps_and_refuses_multi_crop(method):
    torch.manual_seed(0)
    cfg = tiny(method)
    model = build_method(cfg)
    before = copy.deepcopy(model.backbone.state_dict())
    optimizer = build_optimizer("sgd", model.param_groups(0.1), lr=0.1, momentum=0.9)
    augs = model.augmentations(SIZE, (0.5,) * 3, (0.25,) * 3)
    images = torch.randint(0, 256, (B, SIZE, SIZE, 3), dtype=torch.uint8)
    views = [a(images, torch.Generator().manual_seed(i)) for i, a in enumerate(augs)]
    assert len(views) == 2 and views[0].shape == (B, 3, SIZE, SIZE)
    model.on_step_start(StepInfo(step=0, total_steps=10, steps_per_epoch=5, local_batch=B, seed=0))
    out = model(views)
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    assert out["embedding"].shape == (2 * B, cfg.model.proj_dim)
    optimizer.zero_grad()
    out["loss"].backward()
    optimizer.step()
    model.on_step_end(StepInfo(step=0, total_steps=10, steps_per_epoch=5, local_batch=B, seed=0))
    assert any(not torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())
    with pytest.raises(ConfigError, match="exactly two views"):
        check_config(tiny(method, multicrop={"local_crops": 2}))


def test_barlow_twins_biases_and_bn_train_at_their_ratio_of_the_lr():
    model = build_method(tiny("barlow_twins"))
    groups = model.param_groups(1.0)
    scales = {g.get("lr_scale", 1.0) for g in groups if g["lars_exclude"]}
    assert scales == {0.024} and all(g.get("lr_scale", 1.0) == 1.0 for g in groups if not g["lars_exclude"])


def test_mocov3_momentum_encoder_follows_a_cosine_before_each_steps_keys():
    model = build_method(tiny("mocov3"))
    model.on_step_start(StepInfo(step=5, total_steps=10, steps_per_epoch=5, local_batch=B, seed=0))
    assert model.ema.m == pytest.approx(1 - 0.01 * (math.cos(math.pi / 2) + 1) / 2)  # 0.995 half-way
    student = [p.detach().clone() for p in (*model.backbone.parameters(), *model.projector.parameters())]
    teacher = [p.detach().clone() for p in model.momentum_encoder.parameters()]
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(1.0)  # the student moved; the forward must average it in before the keys
        student = [p.detach().clone() for p in (*model.backbone.parameters(), *model.projector.parameters())]
    model([torch.randn(B, 3, SIZE, SIZE), torch.randn(B, 3, SIZE, SIZE)])
    for t_old, s, t_new in zip(teacher, student, model.momentum_encoder.parameters()):
        torch.testing.assert_close(t_new, model.ema.m * t_old + (1 - model.ema.m) * s)
    assert all(not p.requires_grad for p in model.momentum_encoder.parameters())
    assert isinstance(model.projector[-1][-1], nn.BatchNorm1d) and not model.projector[-1][-1].affine
    assert not isinstance(model.predictor[-1][-1], nn.BatchNorm1d)  # ResNet: predictor without a last BN


def test_nnclr_support_set_takes_the_first_views_embeddings_after_the_loss():
    model = build_method(tiny("nnclr"))
    before = model.support.keys.clone()
    views = [torch.randn(B, 3, SIZE, SIZE), torch.randn(B, 3, SIZE, SIZE)]
    out = model(views)
    z1 = F.normalize(out["embedding"][:B].detach(), dim=1)
    torch.testing.assert_close(model.support.keys[:B], z1)
    assert torch.equal(model.support.keys[B:], before[B:])
    with pytest.raises(ConfigError, match="nnclr.support_size 30 must be a multiple"):
        check_config(tiny("nnclr", nnclr={"support_size": 30}))


# ---------------------------------------------------------------------------------------------
# Two ranks equal one process

WORLD, GLOBAL, STEPS = 2, 8, 3


def _train(method: str) -> dict:
    """STEPS SGD steps in float64 of a tiny run of ``method`` on every rank's share of the batch."""
    torch.manual_seed(0)
    cfg = tiny(method, train={"batch_size": GLOBAL})
    model = build_method(cfg).double()
    if D.world_size() > 1:
        model = D.convert_sync_batchnorm(model)
    wrapped = nn.parallel.DistributedDataParallel(model) if D.world_size() > 1 else model
    optimizer = build_optimizer("sgd", model.param_groups(0.5), lr=0.5, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    per = GLOBAL // D.world_size()
    mine = slice(D.rank() * per, (D.rank() + 1) * per)
    losses = []
    for step in range(STEPS):
        views = [torch.randn(GLOBAL, 3, SIZE, SIZE, generator=g, dtype=torch.float64) for _ in range(2)]
        model.on_step_start(StepInfo(step=step, total_steps=STEPS, steps_per_epoch=STEPS, local_batch=per, seed=0))
        loss = wrapped([v[mine] for v in views])["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.on_step_end(StepInfo(step=step, total_steps=STEPS, steps_per_epoch=STEPS, local_batch=per, seed=0))
        losses.append(D.all_reduce_mean(loss.detach().clone()).item())
    return {"loss": losses, "state": copy.deepcopy(model.state_dict())}


def _in_float64(method: str):
    """The method's loss without its float32 cast: float64 throughout, so one process and two
    ranks agree to 1e-9 (a sum split over two ranks rounds differently in float32)."""
    module = importlib.import_module(f"selfsup.methods.{method}")
    return mock.patch.object(module, method, getattr(L, method).__wrapped__)


def _train_in_float64(method: str) -> dict:
    with _in_float64(method):
        return _train(method)


def _rank_work() -> dict:
    return {m: _train_in_float64(m) for m in NEW_METHODS}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(_rank_work, WORLD, tmp_path_factory.mktemp("new_methods_ranks"))


@pytest.mark.parametrize("method", NEW_METHODS)
def test_two_ranks_equal_one_process_with_the_whole_batch(ranks, method):
    """Losses, weights, BN statistics, momentum encoders and support sets, step for step."""
    one = _train_in_float64(method)
    for res in ranks:
        got = res[method]
        assert got["loss"] == pytest.approx(one["loss"], abs=1e-9)
        assert got["state"].keys() == one["state"].keys()
        for k, v in one["state"].items():
            torch.testing.assert_close(got["state"][k].double(), v.double(), rtol=1e-7, atol=1e-9, msg=k)


# ---------------------------------------------------------------------------------------------
# The ViT recipes

def test_dino_with_a_vit_teacher_has_no_drop_path_and_local_crops_share_the_network():
    cfg = check_config(resolve(preset_name="cifar10-dino-vit-tiny", overrides={
        "model": {"patch_size": 8}, "aug": {"size": 16}, "multicrop": {"local_crops": 2, "local_size": 8},
        "dino": {"out_dim": 64}, "train": {"batch_size": 4}}))
    model = build_method(cfg)
    student = [m.drop_prob for m in model.backbone.modules() if hasattr(m, "drop_prob")]
    teacher = [m.drop_prob for m in model.teacher.modules() if hasattr(m, "drop_prob")]
    assert max(student) == pytest.approx(0.1) and set(teacher) == {0.0}
    views = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16), torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)]
    out = model(views)  # 2x2 and 1x1 grids of 8-pixel patches through one ViT
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and model.backbone.pos_embed.grad is not None


def test_mocov3_vit_recipe_freezes_the_patch_projection_and_ends_the_predictor_in_bn():
    cfg = check_config(resolve(preset_name="cifar10-mocov3-vit-tiny", overrides={
        "model": {"patch_size": 8, "proj_hidden": 32}, "aug": {"size": 16}, "train": {"batch_size": 4}}))
    model = build_method(cfg)
    assert isinstance(model.predictor[-1][-1], nn.BatchNorm1d) and not model.predictor[-1][-1].affine
    out = model([torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)])
    out["loss"].backward()
    proj = model.backbone.patch_embed.proj
    assert proj.weight.grad is None and not proj.weight.requires_grad
    assert all(id(proj.weight) not in {id(p) for p in g["params"]} for g in model.param_groups(1.0))
