"""Check that selfsup's ViT exports load into timm's VisionTransformer strictly and give the same
features (selfsup/export.py's instructions, followed literally).

Needs timm, which the project does not depend on; the peers venv has it:

    bash benchmarks/peers/setup.sh
    PYTHONPATH=. /work/peers-venv/bin/python benchmarks/vit_timm_check.py

Two cases: vit_small with 16-pixel patches at 224 px (timm's ``vit_small_patch16_224`` as it
is) and vit_tiny with 4-pixel patches at 32 px (CIFAR: ``img_size=32, patch_size=4``), each
exported as ``--format timm`` (.pt) and as safetensors. Prints one line per export and
the versions; exits 1 if any differs. tests/test_vit.py runs it wherever timm is importable.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import timm
import torch

from selfsup.backbones import build_backbone
from selfsup.export import export_backbone
from selfsup.runs import BACKBONE, BackboneSpec, save_backbone

CASES = [  # (our backbone, timm model, patch size, image side, timm's extra arguments)
    ("vit_small", "vit_small_patch16_224", 16, 224, {}),
    ("vit_tiny", "vit_tiny_patch16_224", 4, 32, {"img_size": 32, "patch_size": 4}),
]


def fake_run(folder: Path, name: str, patch_size: int, size: int) -> torch.nn.Module:
    """A run folder as training leaves it (backbone.pt + backbone.json) holding a random ViT."""
    torch.manual_seed(0)
    net = build_backbone(name, patch_size=patch_size, image_size=size)
    folder.mkdir(parents=True)
    spec = BackboneSpec(backbone=name, width=1.0, cifar_stem=False, image_size=size, patch_size=patch_size,
                        mean=(0.5,) * 3, std=(0.25,) * 3, method="dino", data="x")
    save_backbone(folder / BACKBONE, net.state_dict(), spec)
    return net.eval()


def timm_weights(path: Path) -> dict[str, torch.Tensor]:
    """An export's state dict, read as a timm user would."""
    if path.suffix == ".safetensors":
        import safetensors.torch  # timm depends on it
        return safetensors.torch.load_file(str(path))
    return torch.load(path, weights_only=True)


def check(root: Path) -> list[str]:
    """One line per export checked; a line starting with FAIL for any that differs."""
    lines = []
    for name, timm_name, patch, size, extra in CASES:
        ours = fake_run(root / name, name, patch, size)
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            want = ours(x)
        for fmt in ("timm", "safetensors"):  # a ViT's formats (torchvision's ViTs name their weights otherwise)
            path = export_backbone(root / name, fmt)
            net = timm.create_model(timm_name, pretrained=False, num_classes=0, **extra).eval()
            result = net.load_state_dict(timm_weights(path), strict=True)
            with torch.no_grad():
                got = net(x)
            what = f"{name} patch {patch} at {size} px, {fmt} -> timm.create_model({timm_name!r}, {extra})"
            try:
                assert not result.missing_keys and not result.unexpected_keys, result
                torch.testing.assert_close(got, want)
            except AssertionError as e:
                lines.append(f"FAIL {what}: {str(e).splitlines()[0]}")
            else:
                diff = (got - want).abs().max().item()
                lines.append(f"ok   {what}: strict load, features {tuple(got.shape)}, max |diff| {diff:.2e}")
    return lines


def main() -> int:
    print(f"torch {torch.__version__}, timm {timm.__version__}, python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory() as tmp:
        lines = check(Path(tmp))
    print("\n".join(lines))
    return 1 if any(line.startswith("FAIL") for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
