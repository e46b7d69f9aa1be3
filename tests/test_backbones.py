"""Backbones (torchvision layout, stems, width) and projection heads."""
import pytest
import torch
from torch import nn

from selfsup.backbones import BACKBONES, ResNet, build_backbone
from selfsup.heads import ProjectionHead, ScaleOnlyBatchNorm1d, mlp

# torchvision resnet18's conv and BN modules in state_dict order (fc left out), written out by
# hand; a conv holds `weight`, a BN the five entries below.
_R18_MODULES = """
conv1 bn1
layer1.0.conv1 layer1.0.bn1 layer1.0.conv2 layer1.0.bn2
layer1.1.conv1 layer1.1.bn1 layer1.1.conv2 layer1.1.bn2
layer2.0.conv1 layer2.0.bn1 layer2.0.conv2 layer2.0.bn2 layer2.0.downsample.0 layer2.0.downsample.1
layer2.1.conv1 layer2.1.bn1 layer2.1.conv2 layer2.1.bn2
layer3.0.conv1 layer3.0.bn1 layer3.0.conv2 layer3.0.bn2 layer3.0.downsample.0 layer3.0.downsample.1
layer3.1.conv1 layer3.1.bn1 layer3.1.conv2 layer3.1.bn2
layer4.0.conv1 layer4.0.bn1 layer4.0.conv2 layer4.0.bn2 layer4.0.downsample.0 layer4.0.downsample.1
layer4.1.conv1 layer4.1.bn1 layer4.1.conv2 layer4.1.bn2
""".split()
_BN_ENTRIES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
R18_KEYS = [
    f"{m}.{e}" for m in _R18_MODULES
    for e in (_BN_ENTRIES if ".bn" in f".{m}" or m.endswith("downsample.1") else ("weight",))
]


def _x(b=2, size=16):
    return torch.randn(b, 3, size, size)


@pytest.mark.parametrize("cifar_stem", [False, True])
@pytest.mark.parametrize("name,expected", [("resnet18", 128), ("resnet34", 128), ("resnet50", 512)])
def test_output_shape(name, expected, cifar_stem):
    model = build_backbone(name, width=0.25, cifar_stem=cifar_stem)
    assert isinstance(model, ResNet) and model.num_features == expected  # 512w / 2048w
    assert model(_x()).shape == (2, expected)
    assert not hasattr(model, "fc")
    assert isinstance(model.maxpool, nn.Identity if cifar_stem else nn.MaxPool2d)


def test_resnet18_state_dict_matches_torchvision_layout():
    # 20 convs (1 weight each) + 20 BNs (5 entries each) = 120 entries; torchvision has 122 with fc.
    assert len(R18_KEYS) == 120
    sd = build_backbone("resnet18").state_dict()
    assert list(sd) == R18_KEYS
    assert sd["conv1.weight"].shape == (64, 3, 7, 7)
    assert sd["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert sd["layer4.1.bn2.running_var"].shape == (512,)
    assert sum(p.numel() for p in build_backbone("resnet18").parameters()) == 11_689_512 - 513_000


def test_resnet50_state_dict_layout():
    # stem 6 entries; a Bottleneck 3 convs + 3 BNs = 18, +6 with a downsample;
    # 16 blocks, 4 with downsample (layer1.0 too: 64 -> 256): 6 + 16*18 + 4*6 = 318 (320 with fc).
    model = build_backbone("resnet50")
    sd = model.state_dict()
    assert len(sd) == 318
    assert sd["layer1.0.conv3.weight"].shape == (256, 64, 1, 1)
    assert sd["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert sd["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)
    assert model.layer2[0].conv2.stride == (2, 2) and model.layer2[0].conv1.stride == (1, 1)  # v1.5
    assert sd["layer4.2.bn3.weight"].shape == (2048,)
    assert sum(p.numel() for p in model.parameters()) == 25_557_032 - 2_049_000  # torchvision minus fc


def test_resnet34_entry_count():
    # 36 convs/BNs in blocks + 3 downsample pairs + stem: 33 convs, 33 BNs -> 33*6 + 18 = 216
    assert len(build_backbone("resnet34").state_dict()) == 216


def test_cifar_stem_and_width():
    model = build_backbone("resnet18", cifar_stem=True)
    assert model.state_dict()["conv1.weight"].shape == (64, 3, 3, 3)
    assert model.conv1.stride == (1, 1) and model.conv1.padding == (1, 1)
    narrow = build_backbone("resnet50", width=0.25)
    assert narrow.conv1.weight.shape == (16, 3, 7, 7)
    assert narrow.layer4[0].conv3.weight.shape == (512, 128, 1, 1)
    assert build_backbone("resnet18", width=0.001).conv1.out_channels == 1


def test_channels_last_and_bf16_autocast():
    model = build_backbone("resnet18", width=0.25, cifar_stem=True).to(memory_format=torch.channels_last)
    x = _x().to(memory_format=torch.channels_last)
    ref = model.eval()(x.contiguous())
    assert torch.allclose(model(x), ref, atol=1e-5)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = model.train()(x)
    assert out.shape == (2, 128) and torch.isfinite(out).all()
    out.float().sum().backward()
    assert model.conv1.weight.grad is not None


def test_zero_init_residual():
    model = build_backbone("resnet50", width=0.25, zero_init_residual=True)
    assert all((b.bn3.weight == 0).all() for layer in (model.layer1, model.layer4) for b in layer)
    assert (model.layer1[0].bn2.weight == 1).all()
    basic = build_backbone("resnet18", width=0.25, zero_init_residual=True)
    assert all((b.bn2.weight == 0).all() and (b.bn1.weight == 1).all() for b in basic.layer3)
    assert (build_backbone("resnet18", width=0.25).layer1[0].bn2.weight == 1).all()


def test_unknown_backbone():
    with pytest.raises(ValueError, match="unknown backbone 'vit'; choose from resnet18, resnet34, resnet50"):
        build_backbone("vit")
    assert list(BACKBONES) == ["resnet18", "resnet34", "resnet50"]


# ---- heads ------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_projection_head_shapes(num_layers):
    head = ProjectionHead(32, 64, 16, num_layers)
    x = torch.randn(4, 32)
    assert head(x).shape == (4, 16)
    hiddens = head(x, return_hidden=True)
    assert len(hiddens) == num_layers + 1 and hiddens[0] is x
    assert [h.shape[1] for h in hiddens] == [32] + [64] * (num_layers - 1) + [16]
    assert torch.equal(hiddens[-1], head(x))  # train-mode BN: same batch, same output


def test_layers_up_to_reproduces_hidden():
    head = ProjectionHead(32, 64, 16, 3).eval()
    x = torch.randn(4, 32)
    hiddens = head(x, return_hidden=True)
    assert torch.allclose(head.layers_up_to(1)(x), hiddens[1])
    assert torch.allclose(head.layers_up_to(3)(x), hiddens[3])
    assert len(head.layers_up_to(0)) == 0 and torch.equal(head.layers_up_to(0)(x), x)
    assert head.layers_up_to(1)[0][0] is head.layers[0][0]  # shared, not copied
    with pytest.raises(ValueError):
        head.layers_up_to(4)


def test_simclr_layer_structure():
    head = ProjectionHead(32, 64, 16, 2)
    middle, last = head.layers
    assert [type(m) for m in middle] == [nn.Linear, nn.BatchNorm1d, nn.ReLU]
    assert [type(m) for m in last] == [nn.Linear, ScaleOnlyBatchNorm1d]
    assert last[0].bias is None and last[1].bias is None and last[1].weight is not None
    moco = ProjectionHead(32, 64, 16, 2, batch_norm=False)
    assert [type(m) for m in moco.layers[0]] == [nn.Linear, nn.ReLU]
    assert [type(m) for m in moco.layers[1]] == [nn.Linear] and moco.layers[1][0].bias is not None
    no_last_bn = ProjectionHead(32, 64, 16, 2, last_bn=False)
    assert [type(m) for m in no_last_bn.layers[1]] == [nn.Linear] and no_last_bn.layers[1][0].bias is not None
    linear = ProjectionHead(32, 64, 16, 1, batch_norm=False)
    assert len(linear.layers) == 1 and linear.layers[0][0].bias is not None


def test_last_bn_has_no_trainable_shift():
    torch.manual_seed(0)
    head = ProjectionHead(8, 16, 4, 2)
    bn = head.layers[-1][1]
    names = [n for n, p in head.named_parameters() if p.requires_grad]
    assert "layers.1.1.weight" in names and "layers.1.1.bias" not in names
    opt = torch.optim.SGD(head.parameters(), lr=1.0, weight_decay=0.1)
    head(torch.randn(8, 8)).pow(3).sum().backward()
    weight = bn.weight.detach().clone()
    opt.step()
    assert not torch.equal(bn.weight, weight)  # the scale trains
    head.requires_grad_(True)
    assert bn.bias is None  # and the shift cannot come back
    bn.eval()  # an input at the running mean maps to 0: no additive term anywhere
    assert torch.allclose(bn(bn.running_mean[None]), torch.zeros(1, 4), atol=1e-6)
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(head)
    assert sync.layers[1][1].bias is None and sync.layers[1][1].weight is not None


def test_mlp_variants():
    pred = mlp(16, 8, 16)  # BYOL/SimSiam predictor shape
    assert [type(m) for m in pred[0]] == [nn.Linear, nn.BatchNorm1d, nn.ReLU]
    assert pred[0][0].bias is None and pred[1][0].bias is not None
    simsiam = mlp(16, 16, 16, 3, last_norm="none")
    assert simsiam[2][1].weight is None and simsiam[2][1].bias is None
    assert mlp(16, 16, 16, last_norm="affine")[1][1].bias is not None
    with pytest.raises(ValueError):
        mlp(16, 16, 16, 0)
