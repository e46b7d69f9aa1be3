"""The fp32 guard against oneDNN's wrong bf16 weight gradients for strided convs on tiny maps."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfsup import conv
from selfsup.backbones import build_backbone
from selfsup.binary import binary_resnet18

WRONG = 0.05  # relative error of a weight gradient; a right bf16 one is about 0.002 here


def _padding_taps(grad: torch.Tensor) -> torch.Tensor:
    """A 3x3 conv's weight gradient on a 1x1 input (padding 1) without its centre tap: the taps
    that see only padding, exactly 0 when right."""
    rest = grad.float().clone()
    rest[:, :, 1, 1] = 0
    return rest


def _raw_kernel_is_wrong(trials: int = 10) -> bool:
    """Whether bf16 autocast's 3x3 stride-2 conv on a 1x1 map gets its weight gradient wrong on
    this CPU (the faulty oneDNN kernel is present), against fp32 on the same bf16 operands."""
    torch.manual_seed(0)
    for _ in range(trials):
        x = torch.randn(8, 64, 1, 1).contiguous(memory_format=torch.channels_last)
        w = (torch.randn(128, 64, 3, 3) * 0.1).contiguous(memory_format=torch.channels_last)
        g = torch.randn(8, 128, 1, 1).bfloat16()
        w16 = w.clone().requires_grad_(True)
        _dirty_the_allocator()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            F.conv2d(x, w16, stride=2, padding=1).backward(g)
        ref = torch.nn.grad.conv2d_weight(x.bfloat16().float(), w.shape, g.float(), 2, 1)
        if (not torch.isfinite(w16.grad).all() or (w16.grad - ref).norm() > WRONG * ref.norm()
                or _padding_taps(w16.grad).abs().max() > 0):
            return True
    return False


def _dirty_the_allocator() -> None:
    """Leave freed memory of many sizes full of 3s. The faulty kernel reads uninitialised
    memory in place of the zero padding: the taps that see only padding come out as 7 x what
    the memory held (21 here), and right only where it held zeros (a fresh page)."""
    junk = [torch.full((1 << k,), 3.0, dtype=d) for k in range(10, 21)
            for d in (torch.bfloat16, torch.float32) for _ in range(4)]
    del junk


def _strided_grad_errors(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Under bf16 autocast: each strided k>1 conv's weight-gradient error against fp32
    ``conv2d_weight`` on the very input and output gradient the conv saw (inf: non-finite)."""
    seen: dict[str, list] = {}

    def hook(name):
        def fn(module, inputs, output):
            seen[name] = [inputs[0].detach()]
            output.register_hook(lambda g: seen[name].append(g))
        return fn

    convs = {n: m for n, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and max(m.stride) > 1 and max(m.kernel_size) > 1}
    handles = [m.register_forward_hook(hook(n)) for n, m in convs.items()]
    model.zero_grad(set_to_none=True)
    _dirty_the_allocator()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().sum().backward()
    for h in handles:
        h.remove()
    errors = {}
    for name, m in convs.items():
        xin, g = seen[name]
        ref = torch.nn.grad.conv2d_weight(xin.float(), m.weight.shape, g.float(), m.stride, m.padding)
        got = m.weight.grad.float()
        errors[name] = ((got - ref).norm() / ref.norm()).item() if torch.isfinite(got).all() else float("inf")
    return errors


# 4-pixel crops with the CIFAR stem and 16-pixel crops with the standard stem leave layer4's
# first conv a 1x1 map
CROPS = [pytest.param(True, 4, id="cifar-stem-4px"), pytest.param(False, 16, id="standard-stem-16px")]


@pytest.mark.parametrize("cifar_stem, size", CROPS)
def test_backbone_weight_gradients_are_right_under_bf16_on_tiny_crops(cifar_stem, size, monkeypatch):
    torch.manual_seed(0)
    model = build_backbone("resnet18", width=0.25, cifar_stem=cifar_stem).to(memory_format=torch.channels_last)
    trials = [torch.randn(8, 3, size, size).contiguous(memory_format=torch.channels_last) for _ in range(8)]
    for x in trials:  # with the guard: every strided conv's gradient is right
        errors = _strided_grad_errors(model, x)
        assert max(errors.values()) < WRONG, errors
        assert torch.count_nonzero(_padding_taps(model.layer4[0].conv1.weight.grad)) == 0
    if not _raw_kernel_is_wrong():
        pytest.skip("oneDNN's bf16 backward-weights kernel is right on this CPU: nothing to guard")
    monkeypatch.setattr(conv, "bf16_kernel_unsafe", lambda x, c: False)  # the guard off
    # layer4's first conv sees a 1x1 map: only its centre tap meets real pixels. Without the guard
    # its gradient is wrong in every trial on a Sapphire Rapids Xeon (AMX) and in about half of
    # them on an AMD EPYC with avx512_bf16 (no AMX), but not always: one clean-clone run on an EPYC
    # saw 32 right trials in a row after the probe had caught it (2026-12-08). Up to 64 trials; if
    # none shows it this time, the guard's side (asserted above) is what this test stands on.
    wrong = []
    for i in range(64):
        x = trials[i % len(trials)]
        error = _strided_grad_errors(model, x)["layer4.0.conv1"]
        wrong.append(error > WRONG or bool(_padding_taps(model.layer4[0].conv1.weight.grad).abs().max() > 0))
        if wrong[-1]:
            break
    if not any(wrong):
        pytest.skip(f"the unguarded kernel was right in all {len(wrong)} trials this time (wrong in the probe): "
                    "oneDNN's bug shows intermittently on this CPU; the guarded gradients above are right")


def test_the_guard_reads_shapes_and_engages_only_where_the_kernel_fails():
    strided, plain, pointwise = nn.Conv2d(4, 4, 3, 2, 1), nn.Conv2d(4, 4, 3, 1, 1), nn.Conv2d(4, 4, 1, 2)
    tiny, wide, big = torch.zeros(1, 4, 1, 1), torch.zeros(1, 4, 4, 1), torch.zeros(1, 4, 3, 3)
    assert not conv.bf16_kernel_unsafe(tiny, strided)  # no autocast: nothing to guard
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv.bf16_kernel_unsafe(tiny, strided) and conv.bf16_kernel_unsafe(wide, strided)
        assert not conv.bf16_kernel_unsafe(big, strided)
        assert not conv.bf16_kernel_unsafe(tiny, plain) and not conv.bf16_kernel_unsafe(tiny, pointwise)
        guarded = conv.Conv2d(4, 4, 3, 2, 1)
        assert guarded(tiny).dtype == torch.float32 and guarded(torch.zeros(1, 4, 8, 8)).dtype == torch.bfloat16
    # the binary backbone's convs are guarded too
    model = binary_resnet18(width=0.25, cifar_stem=True)
    assert all(isinstance(m, conv.Conv2d) for m in model.modules() if isinstance(m, nn.Conv2d))
    assert all(isinstance(m, conv.Conv2d) for m in build_backbone("resnet50", width=0.125).modules()
               if isinstance(m, nn.Conv2d))
