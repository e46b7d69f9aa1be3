"""The 1-bit ResNet-18 (issue 6): ±1 tensors in every binary conv, straight-through gradients,
shapes, packed weight memory, and S2-BNN's two steps (step two starts from step one)."""
import json

import pytest
import torch

from selfsup import checkpoint as ckpt
from selfsup.backbones import build_backbone
from selfsup.binary import ApproxSign, BinarizeWeight, BinaryConv2d, BinaryResNet, RSign, weight_memory
from selfsup.cli import main
from selfsup.config import ConfigError, resolve
from selfsup.runs import load_backbone
from selfsup.train import build_method

TINY = ["--data", "digits", "--batch-size", "64", "--device", "cpu", "--no-progress", "--epochs", "1",
        "--backbone", "binary-resnet18",
        "--set", "data.image_size=8", "model.width=0.125", "eval.knn_k=20", "optim.warmup_epochs=0"]


def _record_convs(monkeypatch) -> list[tuple[BinaryConv2d, torch.Tensor, torch.Tensor]]:
    """Every binary conv's actual input and weight, as the convolution receives them."""
    calls = []
    original = BinaryConv2d._conv_forward

    def spy(self, x, w, b):
        calls.append((self, x.detach().clone(), w.detach().clone()))
        return original(self, x, w, b)

    monkeypatch.setattr(BinaryConv2d, "_conv_forward", spy)
    return calls


@pytest.mark.parametrize("binary_weights", [True, False])
def test_binary_convs_see_only_signs_and_scaled_sign_weights(monkeypatch, binary_weights):
    torch.manual_seed(0)
    net = build_backbone("binary-resnet18", width=0.125, cifar_stem=True, binary_weights=binary_weights)
    calls = _record_convs(monkeypatch)
    net(torch.randn(4, 3, 16, 16))
    assert len(calls) == 16  # every 3x3 conv of ResNet-18's 8 blocks; the stem is real
    for conv, x, w in calls:
        assert set(x.unique().tolist()) == {-1.0, 1.0}  # activations: ±1 only, both present
        if binary_weights:
            alpha = conv.weight.detach().abs().mean(dim=(1, 2, 3), keepdim=True)  # (O, 1, 1, 1)
            torch.testing.assert_close(w.abs(), alpha.expand_as(w))  # one magnitude per output channel
            assert set((w / alpha).unique().tolist()) == {-1.0, 1.0}
            assert torch.equal(torch.sign(w), torch.where(conv.weight >= 0, 1.0, -1.0))
        else:
            assert torch.equal(w, conv.weight.detach())  # step one: real weights


def test_straight_through_estimators_pass_gradients():
    x = torch.linspace(-1.5, 1.5, 13, requires_grad=True)
    ApproxSign.apply(x).sum().backward()
    torch.testing.assert_close(x.grad, (2 - 2 * x.detach().abs()).clamp(min=0))  # Bi-Real's ApproxSign
    w = torch.tensor([[-2.0, -0.5], [0.25, 1.5]]).view(2, 2, 1, 1).requires_grad_()
    out = BinarizeWeight.apply(w)
    torch.testing.assert_close(out.detach().view(2, 2), torch.tensor([[-1.25, -1.25], [0.875, 0.875]]))
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(w.grad.view(2, 2), torch.tensor([[0.0, 1.0], [1.0, 0.0]]))  # clipped at |w| > 1

    torch.manual_seed(0)
    net = build_backbone("binary-resnet18", width=0.125, cifar_stem=True)
    net(torch.randn(4, 3, 16, 16)).pow(2).sum().backward()
    binary = [m for m in net.modules() if isinstance(m, BinaryConv2d)]
    signs = [m for m in net.modules() if isinstance(m, RSign)]
    assert net.conv1.weight.grad.abs().sum() > 0  # through every sign down to the stem
    assert all(m.weight.grad.abs().sum() > 0 for m in binary)
    assert all(m.shift.grad.abs().sum() > 0 for m in signs)


@pytest.mark.parametrize("cifar_stem", [True, False])
def test_output_shape_and_registered_name(cifar_stem):
    net = build_backbone("binary-resnet18", width=0.25, cifar_stem=cifar_stem)
    assert isinstance(net, BinaryResNet) and net.num_features == 128 and net.binary_weights
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 128)
    with pytest.raises(ValueError, match="binary backbones only"):
        build_backbone("resnet18", binary_weights=False)
    with pytest.raises(ConfigError, match="binary_weights=false applies to binary backbones"):
        resolve(sets=["model.binary_weights=false"])


def test_packed_weight_memory_counts_one_bit_per_binary_weight():
    net = build_backbone("binary-resnet18")
    report = weight_memory(net)
    params = sum(p.numel() for p in net.parameters())
    binary = sum(m.weight.numel() for m in net.modules() if isinstance(m, BinaryConv2d))
    alphas = sum(m.out_channels for m in net.modules() if isinstance(m, BinaryConv2d))
    assert report["binary_weights"] == binary
    assert report["fp32_bytes"] == 4 * params
    assert report["packed_bytes"] == (binary + 32 * (params - binary) + 32 * alphas) / 8
    step_one = build_backbone("binary-resnet18", binary_weights=False)
    assert weight_memory(step_one)["packed_bytes"] == 4 * params  # real weights: nothing packed


def test_step_two_starts_from_step_one_and_evaluates(tmp_path):
    one = tmp_path / "one"
    assert main(["pretrain", "--method", "simclr", "--out", str(one), *TINY,
                 "model.binary_weights=false"]) == 0
    meta = json.loads((one / "backbone.json").read_text())
    assert meta["backbone"] == "binary-resnet18" and meta["binary_weights"] is False
    rebuilt, _ = load_backbone(one)  # evaluation rebuilds step one's network from its metadata
    assert not rebuilt.binary_weights

    cfg = resolve(sets=["model.backbone=binary-resnet18", "model.width=0.125", f"model.init_from={one}"])
    method = build_method(cfg)
    assert method.backbone.binary_weights
    step_one = ckpt.load(one / "backbone.pt")
    for key, value in method.backbone.state_dict().items():
        assert torch.equal(value, step_one[key]), key

    assert main(["eval", "knn", "--checkpoint", str(one), "--data", "digits", "--k", "20", "--device", "cpu"]) == 0
    assert json.loads((one / "eval_knn.json").read_text())["top1"] > 0
    with pytest.raises(ckpt.CheckpointError, match="does not fit model.backbone resnet18"):
        build_method(resolve(sets=["model.width=0.125", f"model.init_from={one}"]))
