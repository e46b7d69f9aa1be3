"""LARS against a per-parameter reference, parameter groups, schedules."""
import copy

import pytest
import torch
from torch import nn

from selfsup.loop import Schedule
from selfsup.optim import LARS, build_optimizer, clip_gradients, cosine, param_groups, scale_lr, set_lr, warmup_cosine


def _reference_lars(params, grads_per_step, lr, momentum, wd, eta, nesterov, exclude):
    """SimCLR's LARSOptimizer written out per parameter, one tensor at a time."""
    params = [p.clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    for grads in grads_per_step:
        for i, (w, g) in enumerate(zip(params, grads)):
            g = g + wd[i] * w
            trust = 1.0
            if not exclude[i]:
                w_norm, g_norm = w.norm().item(), g.norm().item()
                if w_norm > 0 and g_norm > 0:
                    trust = eta * w_norm / g_norm
            bufs[i] = momentum * bufs[i] + lr * trust * g
            update = momentum * bufs[i] + lr * trust * g if nesterov else bufs[i]
            params[i] = w - update
    return params


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("wd", [0.0, 1e-2])
def test_lars_matches_reference(wd, nesterov):
    torch.manual_seed(0)
    shapes = [(8, 4, 3, 3), (16, 8), (16,), (5, 5), (7,)]
    init = [torch.randn(s, dtype=torch.float64) for s in shapes]
    init[3].zero_()  # ||w|| = 0 -> trust 1
    grads_per_step = [[torch.randn(s, dtype=torch.float64) for s in shapes] for _ in range(4)]
    grads_per_step[1][1].zero_()  # ||g|| = 0 (with wd = 0) -> trust 1
    exclude = [False, False, True, False, True]
    wds = [wd, wd, 0.0, wd, 0.0]  # excluded group: no decay, as param_groups sets it

    params = [nn.Parameter(p.clone()) for p in init]
    opt = LARS([{"params": params[:2] + params[3:4]},
                {"params": [params[2], params[4]], "lars_exclude": True, "weight_decay": 0.0}],
               lr=0.5, momentum=0.9, weight_decay=wd, trust_coefficient=0.02, nesterov=nesterov)
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()

    expected = _reference_lars(init, grads_per_step, 0.5, 0.9, wds, 0.02, nesterov, exclude)
    for got, want in zip(params, expected):
        torch.testing.assert_close(got.detach(), want, atol=1e-6, rtol=1e-6)


def test_lars_float32_skips_params_without_grad_and_leaves_grads_alone():
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(3))
    opt = LARS([a, b], lr=0.1, weight_decay=0.1)
    a.grad = torch.randn(4, 4)
    grad, b_before = a.grad.clone(), b.detach().clone()
    opt.step()
    assert torch.equal(a.grad, grad) and torch.equal(b, b_before)
    assert "momentum_buffer" not in opt.state[b]


def test_param_groups():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    model[3].bias.requires_grad_(False)
    decay, no_decay = param_groups(model, 1e-4)
    assert decay["weight_decay"] == 1e-4 and not decay["lars_exclude"]
    assert no_decay["weight_decay"] == 0.0 and no_decay["lars_exclude"]
    ids = lambda g: {id(p) for p in g["params"]}  # noqa: E731
    assert ids(decay) == {id(model[0].weight), id(model[3].weight)}
    assert ids(no_decay) == {id(model[0].bias), id(model[1].weight), id(model[1].bias)}
    (everything,) = param_groups(model, 1e-4, exclude_bias_and_norm=False)
    assert len(everything["params"]) == 5 and everything["weight_decay"] == 1e-4
    assert not everything["lars_exclude"]
    assert len(param_groups(nn.Linear(3, 2, bias=False), 0.1)) == 1  # empty groups dropped


def test_warmup_cosine():
    total, warmup, base, final = 100, 10, 1.0, 0.01
    lrs = [warmup_cosine(s, total, warmup, base, final) for s in range(total + 5)]
    assert lrs[0] == pytest.approx(base / warmup)
    assert all(b - a == pytest.approx(base / warmup) for a, b in zip(lrs[:warmup - 1], lrs[1:warmup]))
    assert lrs[warmup - 1] == pytest.approx(base) and lrs[warmup] == pytest.approx(base)
    assert all(b < a for a, b in zip(lrs[warmup:total], lrs[warmup + 1:total]))
    assert lrs[total - 1] > final and all(lr == final for lr in lrs[total:])
    mid = warmup + (total - warmup) // 2
    assert lrs[mid] == pytest.approx((base + final) / 2)
    assert warmup_cosine(0, 10, 0, 0.5) == 0.5  # no warm-up
    with pytest.raises(ValueError):
        warmup_cosine(0, 10, 20, 0.5)


def test_scale_lr():
    assert scale_lr(0.3, 4096) == pytest.approx(4.8)
    assert scale_lr(0.075, 4096, "sqrt") == pytest.approx(4.8)
    assert scale_lr(0.3, 4096, "none") == 0.3
    with pytest.raises(ValueError, match="linear, sqrt, none"):
        scale_lr(0.3, 256, "log")


def test_set_lr_fixed_and_scaled_groups():
    a, b, c = (nn.Parameter(torch.zeros(2)) for _ in range(3))
    opt = torch.optim.SGD([{"params": [a]}, {"params": [b], "fixed_lr": True},
                           {"params": [c], "lr_scale": 0.1}], lr=0.05)
    for lr in (1.0, 0.2):
        set_lr(opt, lr)
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([lr, 0.05, 0.1 * lr])


@pytest.mark.parametrize("name,cls", [("lars", LARS), ("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_build_optimizer(name, cls):
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    opt = build_optimizer(name, param_groups(model, 1e-3), lr=0.1, weight_decay=0.5)
    assert isinstance(opt, cls)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-3, 0.0]  # group values win
    model(torch.randn(8, 4)).square().mean().backward()
    before = model[0].weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model[0].weight)
    with pytest.raises(ValueError, match="lars, sgd, adamw"):
        build_optimizer("adam", param_groups(model, 0.0), lr=0.1)


def test_lars_trust_ratio_is_scale_invariant():
    # without momentum and decay, ||step|| / ||w|| = eta whatever the scale of w and g
    # (for a scale-invariant loss, w -> k*w sends g -> g/k)
    torch.manual_seed(0)
    w0 = torch.randn(16)
    grad = torch.randn(16)
    grad -= (grad @ w0) / (w0 @ w0) * w0  # orthogonal to w, like the gradient of a BN'd weight
    sizes = []
    for k in (1.0, 10.0):
        w = nn.Parameter(w0 * k)
        opt = LARS([w], lr=1.0, momentum=0.0)
        w.grad = grad / k
        opt.step()
        sizes.append(((w.detach() - w0 * k).norm() / (w0 * k).norm()).item())
    assert sizes == pytest.approx([1e-3, 1e-3], rel=1e-4)


def _dino_clip_gradients(model: nn.Module, clip: float) -> None:
    """DINO's utils.clip_gradients, one parameter at a time."""
    for p in model.parameters():
        if p.grad is not None:
            norm = p.grad.norm(2).item()
            coef = clip / (norm + 1e-6)
            if coef < 1:
                p.grad.mul_(coef)


@pytest.mark.parametrize("mode", ["per_param", "global"])
def test_clip_gradients_against_hand_written_references(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    model[0].bias.requires_grad_(False)  # no gradient: skipped
    grads = [torch.randn(5, 6) * 10, torch.randn(3, 5) * 0.01, torch.randn(3) * 3]  # above, below, above
    reference = copy.deepcopy(model)
    for m in (model, reference):
        for p, g in zip([m[0].weight, m[2].weight, m[2].bias], grads):
            p.grad = g.clone()
    clip_gradients(model.parameters(), 1.0, mode)
    if mode == "per_param":
        _dino_clip_gradients(reference, 1.0)
        assert torch.equal(model[2].weight.grad, grads[1])  # a small gradient is left alone
        norms = [p.grad.norm() for p in (model[0].weight, model[2].bias)]
        assert all(torch.isclose(n, torch.tensor(1.0), atol=1e-5) for n in norms)
    else:  # one norm over all gradients
        total = torch.cat([g.flatten() for g in grads]).norm()
        for p in reference.parameters():
            if p.grad is not None:
                p.grad.mul_(1.0 / (total + 1e-6))
    for p, q in zip(model.parameters(), reference.parameters()):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="clipping mode 'layer'"):
        clip_gradients(model.parameters(), 1.0, "layer")


def test_dino_clips_per_parameter_by_default():
    from selfsup.config import resolve
    from selfsup.train import build_method

    assert build_method(resolve(sets=["method=dino", "model.width=0.125"])).clip_grad_mode_default == "per_param"
    assert build_method(resolve(sets=["model.width=0.125"])).clip_grad_mode_default == "global"
    assert resolve(preset_name="cifar10-dino").optim.clip_grad_mode == "per_param"


def test_weight_decay_cosine_reaches_its_end_on_the_decayed_groups_only():
    """DINO's ViT recipe: wd 0.04 -> 0.4 on a cosine per step, biases and norms kept at 0."""
    assert cosine(0, 10, 0.04, 0.4) == pytest.approx(0.04)
    assert cosine(5, 10, 0.04, 0.4) == pytest.approx(0.22)  # half-way: the mean
    assert cosine(10, 10, 0.04, 0.4) == cosine(12, 10, 0.04, 0.4) == 0.4
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    optimizer = build_optimizer("adamw", param_groups(model, 0.04), lr=1e-3)
    schedule = Schedule.create(2, 5, 1, 1e-3, 0.0, weight_decay=0.04, final_weight_decay=0.4)
    seen = []
    for step in range(10):
        schedule.apply(optimizer, step)
        seen.append([g["weight_decay"] for g in optimizer.param_groups])
    assert [s[0] for s in seen] == pytest.approx([cosine(k, 10, 0.04, 0.4) for k in range(10)])
    assert all(s[1] == 0.0 for s in seen)  # the bias / norm group
    constant = build_optimizer("adamw", param_groups(model, 0.04), lr=1e-3)
    Schedule.create(2, 5, 1, 1e-3).apply(constant, 7)  # no final_weight_decay: untouched
    assert [g["weight_decay"] for g in constant.param_groups] == [0.04, 0.0]
