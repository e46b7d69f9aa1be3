"""Exports that load into torchvision's ResNets, and the Python API (README example included)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import selfsup
from selfsup import checkpoint as ckpt
from selfsup.backbones import build_backbone
from selfsup.cli import main

REPO = Path(__file__).resolve().parents[1]


# A reference ResNet written out here in torchvision's module layout (torchvision.models.resnet:
# conv1/bn1/relu/maxpool, layer1-4 of blocks with conv/bn pairs and downsample.0/.1, avgpool,
# fc), so the test does not trust selfsup.backbones to define what "torchvision names" are.
class _Basic(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + idt)


class _Bottle(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + idt)


class ReferenceResNet(nn.Module):
    def __init__(self, block, layers, num_classes=1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._layer(block, 64, layers[0], 1)
        self.layer2 = self._layer(block, 128, layers[1], 2)
        self.layer3 = self._layer(block, 256, layers[2], 2)
        self.layer4 = self._layer(block, 512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def _layer(self, block, planes, n, stride):
        ds = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            ds = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                               nn.BatchNorm2d(planes * block.expansion))
        blocks = [block(self.inplanes, planes, stride, ds)]
        self.inplanes = planes * block.expansion
        blocks += [block(self.inplanes, planes) for _ in range(1, n)]
        return nn.Sequential(*blocks)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _fake_run(folder: Path, name: str, *, width: float = 1.0, cifar_stem: bool, size: int = 32) -> nn.Module:
    """A run folder as training leaves it (backbone.pt + backbone.json), with perturbed BN stats."""
    torch.manual_seed(0)
    net = build_backbone(name, width=width, cifar_stem=cifar_stem)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial running statistics must travel too
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    folder.mkdir(parents=True)
    ckpt.save_atomic(net.state_dict(), folder / "backbone.pt")
    (folder / "backbone.json").write_text(json.dumps(
        {"backbone": name, "width": width, "cifar_stem": cifar_stem, "image_size": size,
         "data_image_size": size, "mean": [0.5] * 3, "std": [0.25] * 3, "method": "simclr", "data": "x"}))
    return net.eval()


@pytest.mark.parametrize("name,block,layers,cifar_stem", [
    ("resnet18", _Basic, (2, 2, 2, 2), False),
    ("resnet18", _Basic, (2, 2, 2, 2), True),
    ("resnet50", _Bottle, (3, 4, 6, 3), False),
])
def test_torchvision_export_loads_into_a_reference_resnet_strictly_except_fc(tmp_path, name, block, layers,
                                                                             cifar_stem, capsys):
    ours = _fake_run(tmp_path / "run", name, cifar_stem=cifar_stem)
    assert main(["export", str(tmp_path / "run"), "--format", "torchvision"]) == 0
    path = tmp_path / "run" / "backbone-torchvision.pt"
    assert str(path) in capsys.readouterr().out
    ref = ReferenceResNet(block, layers)
    if cifar_stem:
        selfsup.apply_cifar_stem(ref)  # the documented stem change
    result = ref.load_state_dict(torch.load(path, weights_only=True), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []
    ref.fc = nn.Identity()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ref.eval()(x), ours(x))
    assert json.loads(path.with_suffix(".json").read_text())["stem"] == ("cifar" if cifar_stem else "standard")


def test_export_into_real_torchvision_when_installed(tmp_path):
    torchvision = pytest.importorskip("torchvision", reason="torchvision is not importable here")
    ours = _fake_run(tmp_path / "run", "resnet18", cifar_stem=True)
    path = selfsup.export_backbone(tmp_path / "run", "torchvision")
    net = selfsup.apply_cifar_stem(torchvision.models.resnet18())
    result = net.load_state_dict(torch.load(path, weights_only=True), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    net.fc = nn.Identity()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(net.eval()(x), ours(x))


def test_safetensors_export_round_trips_through_load_backbone(tmp_path):
    pytest.importorskip("safetensors", reason="pip install safetensors")
    ours = _fake_run(tmp_path / "run", "resnet18", width=0.125, cifar_stem=True, size=16)
    out = tmp_path / "w.safetensors"
    assert main(["export", str(tmp_path / "run"), "--format", "safetensors", "--out", str(out)]) == 0
    back = selfsup.load_backbone(out)
    assert back.meta["width"] == 0.125 and back.meta["cifar_stem"] is True
    for k, v in ours.state_dict().items():
        assert torch.equal(back.encoder.state_dict()[k], v), k


def test_torchvision_export_of_a_narrow_model_is_refused_clearly(tmp_path, capsys):
    _fake_run(tmp_path / "run", "resnet18", width=0.25, cifar_stem=True)
    assert main(["export", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "width 0.25" in err[0] and "--format safetensors" in err[0]


def test_extract_features_accepts_arrays_tensors_and_folders(tmp_path):
    _fake_run(tmp_path / "run", "resnet18", width=0.125, cifar_stem=True, size=16)
    backbone = selfsup.load_backbone(tmp_path / "run")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    ref = selfsup.extract_features(backbone, images)
    assert ref.shape == (5, backbone.num_features) and ref.dtype == torch.float32
    chw = torch.from_numpy(images).permute(0, 3, 1, 2)
    torch.testing.assert_close(selfsup.extract_features(backbone, chw), ref)
    torch.testing.assert_close(selfsup.extract_features(backbone, chw.float() / 255), ref)
    torch.testing.assert_close(selfsup.extract_features(backbone, images[0]), ref[:1])
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / ("sub" if i % 2 else "") / f"{i}.png")
    order = [int(p.stem) for p in selfsup.image_files(folder)]
    torch.testing.assert_close(selfsup.extract_features(backbone, folder), ref[order])
    # a gray 40x30 image in the folder: converted to RGB and resized to the training size
    Image.fromarray(images[0][..., 0]).resize((40, 30)).convert("L").save(folder / "gray.png")
    assert selfsup.extract_features(backbone, folder).shape == (6, backbone.num_features)


def test_import_selfsup_stays_light():
    code = "import sys, selfsup; assert 'torch' not in sys.modules; print(selfsup.load_backbone.__module__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "selfsup.api", proc.stderr


def test_pretrain_from_a_dict_with_a_preset(tmp_path):
    result = selfsup.pretrain({"preset": "digits-simclr", "out": str(tmp_path / "nb"),
                               "data": {"image_size": 8}, "model": {"width": 0.125},
                               "train": {"epochs": 1, "batch_size": 256, "device": "cpu", "progress": False},
                               "eval": {"knn_k": 5}})
    assert result["epoch"] == 1 and np.isfinite(result["loss"]) and "knn_top1" in result
    with pytest.raises(selfsup.config.ConfigError, match="did you mean 'train.epochs'"):
        selfsup.pretrain({"train": {"epoch": 1}})


def test_readme_python_example_runs(tmp_path, monkeypatch):
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Python API"):]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "the README's Python API section has no python code block"
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "README.md", "exec"), {"__name__": "readme"})
    assert (tmp_path / "runs" / "notebook" / "backbone.pt").exists()
