"""Vision Transformers (selfsup/vit.py): timm's names and shapes, position embeddings resampled
per input size, drop path, MoCo v3's frozen patch projection, and their plumbing through
build_backbone, the run folder, the trainer's build_method and the exports."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from selfsup.backbones import build_backbone
from selfsup.config import ConfigError, resolve
from selfsup.export import export_backbone
from selfsup.methods.base import encode_by_resolution
from selfsup.momentum import momentum_copy
from selfsup.runs import BACKBONE, BackboneSpec, load_backbone, save_backbone
from selfsup.train import backbone_spec, build_method
from selfsup.vit import Block, DropPath, VisionTransformer, resample_pos_embed, without_drop_path

REPO = Path(__file__).resolve().parents[1]

# timm's VisionTransformer (1.0.31, global_pool="token", num_classes=0) state dict, written out by
# hand so that the test does not trust selfsup.vit to define it: the model's own parameters,
# then one block's entries (repeated for blocks.0 ... blocks.11), then the final norm.
TIMM_HEAD = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
TIMM_BLOCK = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
              "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
              "mlp.fc2.weight", "mlp.fc2.bias"]
TIMM_TAIL = ["norm.weight", "norm.bias"]
# sum(p.numel() for p in timm.create_model(f"{name}_patch16_224", num_classes=0).parameters())
TIMM_PARAMS = {"vit_tiny": 5_524_416, "vit_small": 21_665_664, "vit_base": 85_798_656}


def tiny(**kw) -> VisionTransformer:
    """vit_tiny for CIFAR: 4-pixel patches, position embeddings for 32-pixel views (an 8x8 grid)."""
    torch.manual_seed(0)
    return build_backbone("vit_tiny", patch_size=4, image_size=32, **kw)


def x(size=32, b=2) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(size))


@pytest.mark.parametrize("name,dim,heads", [("vit_tiny", 192, 3), ("vit_small", 384, 6), ("vit_base", 768, 12)])
def test_sizes_match_timm(name, dim, heads):
    with torch.device("meta"):  # shapes only: no time spent initialising 86M weights
        model = build_backbone(name)  # 224 px, 16-pixel patches: a 14x14 grid
    assert isinstance(model, VisionTransformer) and model.num_features == dim
    assert len(model.blocks) == 12 and model.blocks[0].attn.num_heads == heads
    assert model.pos_embed.shape == (1, 1 + 14 * 14, dim)
    assert sum(p.numel() for p in model.parameters()) == TIMM_PARAMS[name]


def test_tiny_forward_shape_and_timm_state_dict_layout():
    model = tiny()
    assert model(x()).shape == (2, 192)
    sd = model.state_dict()
    assert list(sd) == TIMM_HEAD + [f"blocks.{i}.{k}" for i in range(12) for k in TIMM_BLOCK] + TIMM_TAIL
    shapes = {"cls_token": (1, 1, 192), "pos_embed": (1, 65, 192), "patch_embed.proj.weight": (192, 3, 4, 4),
              "blocks.3.attn.qkv.weight": (576, 192), "blocks.3.attn.proj.weight": (192, 192),
              "blocks.3.mlp.fc1.weight": (768, 192), "blocks.3.mlp.fc2.weight": (192, 768), "norm.bias": (192,)}
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes
    assert model.norm.eps == 1e-6 and model.blocks[0].norm1.eps == 1e-6


def test_init_as_dino():
    model = tiny()
    for p in (model.pos_embed, model.cls_token, model.blocks[0].attn.qkv.weight, model.blocks[5].mlp.fc2.weight):
        assert 0.015 < p.std().item() < 0.025  # trunc_normal(std=0.02)
    assert (model.blocks[0].attn.qkv.bias == 0).all() and (model.blocks[0].mlp.fc1.bias == 0).all()
    assert (model.norm.weight == 1).all() and (model.blocks[2].norm2.bias == 0).all()


def test_one_network_for_every_multiple_of_the_patch():
    model = tiny().eval()
    big, small = model(x(32)), model(x(16))  # 8x8 grid as learned, 4x4 resampled
    assert big.shape == small.shape == (2, 192) and torch.isfinite(small).all()
    assert resample_pos_embed(model.pos_embed, 8) is model.pos_embed  # at img_size: no interpolation
    with pytest.raises(ValueError, match="image side 30 is not a multiple of the ViT's patch size 4"):
        model(x(30))
    with pytest.raises(ValueError, match="square"):
        model(torch.randn(1, 3, 32, 16))
    with pytest.raises(ValueError, match="img_size 30 is not a multiple of patch_size 4"):
        build_backbone("vit_tiny", patch_size=4, image_size=30)


@pytest.mark.parametrize("grid", [4, 12])
def test_resampled_pos_embed_is_bicubic_on_the_row_major_grid(grid):
    G, D = 8, 6
    pos = torch.randn(1, 1 + G * G, D)
    out = resample_pos_embed(pos, grid)
    assert out.shape == (1, 1 + grid * grid, D)
    assert torch.equal(out[:, 0], pos[:, 0])  # the class position is kept
    # token 1 + i*G + j is patch (row i, column j), as the patch conv's output is flattened
    ref = F.interpolate(pos[0, 1:].reshape(G, G, D).permute(2, 0, 1)[None], size=(grid, grid),
                        mode="bicubic", align_corners=False)  # (1, D, grid, grid)
    torch.testing.assert_close(out[0, 1:], ref[0].permute(1, 2, 0).reshape(grid * grid, D))
    # orientation: an embedding that varies by row only still does after resampling
    rows = torch.arange(G, dtype=torch.float32).repeat_interleave(G)  # (G²,) the row of each patch
    by_row = resample_pos_embed(torch.cat([torch.zeros(1), rows])[None, :, None], grid)[0, 1:, 0]
    by_row = by_row.reshape(grid, grid)
    torch.testing.assert_close(by_row, by_row[:, :1].expand(grid, grid))
    assert (by_row[1:, 0] > by_row[:-1, 0]).all()


def test_drop_path_rates_train_and_eval_modes():
    model = tiny(drop_path=0.5)
    rates = [b.drop_path.drop_prob for b in model.blocks]
    assert rates == pytest.approx([0.5 * i / 11 for i in range(12)])
    assert list(model.state_dict()) == list(tiny().state_dict())  # no parameters of its own
    inputs = x()
    model.eval()
    assert torch.equal(model(inputs), model(inputs))
    model.train()
    assert not torch.equal(model(inputs), model(inputs))
    assert without_drop_path(model) is model
    assert all(b.drop_path.drop_prob == 0 for b in model.blocks)
    assert torch.equal(model(inputs), model(inputs))  # train mode, now deterministic


def test_drop_path_drops_whole_samples_and_keeps_the_mean():
    drop = DropPath(0.25).train()
    ones = lambda y: torch.ones_like(y)  # noqa: E731  the residual branch
    out = drop(torch.zeros(4000, 3, 5), ones)
    per_sample = out[:, 0, 0]
    torch.testing.assert_close(per_sample.unique(), torch.tensor([0.0, 4 / 3]))
    assert (out == per_sample[:, None, None]).all()
    assert abs(out.mean().item() - 1) < 0.05
    assert torch.equal(drop.eval()(out, ones), out + 1)  # eval: the plain residual x + branch(x)


def _branch(y):
    return torch.tanh(y) * 2.0 + y.square()  # (b, N, D) per sample, nonlinear


@pytest.mark.parametrize("b,p,keep", [(10, 0.25, 8), (4000, 0.25, 3000), (8, 0.01, 8), (3, 0.9, 1)])
def test_drop_path_subset_runs_the_branch_on_exactly_round_b_1_minus_p_samples(b, p, keep):
    """subset=True: round(B(1 - p)) kept rows (at least 1) get x + branch(x) * B / keep, the
    others stay x; the branch sees only the kept rows and only they get its gradient."""
    drop = DropPath(p, subset=True).train()
    x = torch.randn(b, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(b), requires_grad=True)
    seen = []
    torch.manual_seed(0)
    out = drop(x, lambda y: seen.append(len(y)) or _branch(y))
    assert seen == [keep]  # the branch's compute is keep / B of the whole batch's
    full = (x + _branch(x) * b / keep).detach()
    kept = (out.detach() != x.detach()).flatten(1).any(1)  # (B,)
    assert kept.sum().item() == keep
    torch.testing.assert_close(out[kept], full[kept], rtol=1e-12, atol=1e-12)
    assert torch.equal(out[~kept], x[~kept])
    branch_sum = _branch(x).sum() - _branch(x).detach().sum()  # a zero that carries branch(x)'s gradient
    (direct,) = torch.autograd.grad(out.sum() - x.sum(), x)  # the gradient through the branch only
    (whole,) = torch.autograd.grad(branch_sum, x)
    torch.testing.assert_close(direct[kept], whole[kept] * b / keep)
    assert (direct[~kept] == 0).all()
    torch.manual_seed(0)  # the draw comes from torch's global RNG: a seeded run repeats it
    assert torch.equal(drop(x, _branch), out)


def test_drop_path_subset_keeps_the_expectation():
    drop = DropPath(0.3, subset=True).train()
    x = torch.randn(10, 2, 3, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    mean = torch.stack([drop(x, _branch) for _ in range(4000)]).mean(0)
    torch.testing.assert_close(mean, x + _branch(x), rtol=0, atol=0.1)  # each row kept w.p. 7/10, scaled 10/7
    block = Block(6, 2, 2.0, 0.3, drop_path_subset=True).train()
    assert block.drop_path.subset and tiny(drop_path=0.2, drop_path_subset=True).blocks[-1].drop_path.subset


def test_a_momentum_copy_without_drop_path_leaves_the_student_alone():
    student = tiny(drop_path=0.1)
    teacher = without_drop_path(momentum_copy(student))
    assert all(b.drop_path.drop_prob == 0 for b in teacher[0].blocks)
    assert student.blocks[-1].drop_path.drop_prob == pytest.approx(0.1)


def test_frozen_patch_embed_is_moco_v3s_and_gets_no_gradient():
    model = tiny(freeze_patch_embed=True)
    proj = model.patch_embed.proj
    assert not proj.weight.requires_grad and not proj.bias.requires_grad
    bound = math.sqrt(6 / (3 * 4 * 4 + 192))  # xavier over a patch's fan-in (MoCo v3 vits.py)
    assert 0.95 * bound < proj.weight.abs().max().item() <= bound and (proj.bias == 0).all()
    model(x()).sum().backward()
    assert proj.weight.grad is None and proj.bias.grad is None
    assert model.pos_embed.grad is not None and model.blocks[0].attn.qkv.weight.grad is not None
    assert tiny().patch_embed.proj.weight.requires_grad


def test_bf16_autocast_and_channels_last():
    model = tiny(drop_path=0.1).to(memory_format=torch.channels_last)
    inputs = [v.to(memory_format=torch.channels_last) for v in (x(32), x(16))]
    ref = model.eval()(inputs[0].contiguous())
    torch.testing.assert_close(model(inputs[0]), ref)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch.cat([model(v) for v in inputs])  # (4, 192)
    assert out.shape == (4, 192) and torch.isfinite(out).all()
    out.float().square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_encode_by_resolution_with_mixed_sizes_equals_each_size_alone():
    model = tiny().eval()
    views = [x(32), x(32) + 1, x(16), x(16) - 1, x(16) * 2]  # 2 global, 3 local crops
    with torch.no_grad():
        out = encode_by_resolution(model, views)  # (5*2, 192)
        alone = torch.cat([model(v) for v in views])
    torch.testing.assert_close(out, alone, rtol=1e-4, atol=1e-5)


def test_width_and_vit_only_arguments_are_refused_where_they_do_not_apply():
    with pytest.raises(ValueError, match="width 0.5 applies to ResNets only"):
        build_backbone("vit_tiny", width=0.5)
    for arg in ({"patch_size": 4}, {"drop_path": 0.1}, {"freeze_patch_embed": True}):
        with pytest.raises(ValueError, match=f"{next(iter(arg))}=.* applies to ViTs only"):
            build_backbone("resnet18", width=0.125, **arg)
    # the ResNet-only switches the config sets for every backbone leave a ViT as it is
    a = build_backbone("vit_tiny", patch_size=8, image_size=32, cifar_stem=True, zero_init_residual=True)
    b = build_backbone("vit_tiny", patch_size=8, image_size=32)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


def _vit_run(folder: Path) -> torch.nn.Module:
    net = tiny().eval()
    folder.mkdir(parents=True)
    spec = BackboneSpec(backbone="vit_tiny", width=1.0, cifar_stem=True, image_size=32, patch_size=4,
                        mean=(0.5,) * 3, std=(0.25,) * 3, method="dino", data="cifar10")
    save_backbone(folder / BACKBONE, net.state_dict(), spec)
    return net


def test_a_saved_vit_reloads_with_its_patch_and_grid(tmp_path):
    ours = _vit_run(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "backbone.json").read_text())["patch_size"] == 4
    back, spec = load_backbone(tmp_path / "run")
    assert spec.patch_size == 4 and back.pos_embed.shape == (1, 65, 192)
    with torch.no_grad():
        assert torch.equal(back.eval()(x()), ours(x()))
        assert torch.equal(back(x(16)), ours(x(16)))
    old = BackboneSpec.from_json({"backbone": "resnet18", "width": 1, "cifar_stem": True, "image_size": 32,
                                  "mean": [0.5] * 3, "std": [0.5] * 3}, "old.json")
    assert old.patch_size is None and "patch_size" not in old.to_json()


def test_vit_exports_say_timm_and_round_trip(tmp_path):
    ours = _vit_run(tmp_path / "run")
    with pytest.raises(ConfigError, match="use --format timm"):
        export_backbone(tmp_path / "run", "torchvision")
    pt = export_backbone(tmp_path / "run", "timm")
    assert pt.name == "backbone-timm.pt"
    meta = json.loads(pt.with_suffix(".json").read_text())
    assert meta["layout"] == "timm" and "stem" not in meta and meta["patch_size"] == 4
    assert list(torch.load(pt, weights_only=True)) == list(ours.state_dict())
    pytest.importorskip("safetensors", reason="pip install safetensors")
    st = export_backbone(tmp_path / "run", "safetensors")
    back, spec = load_backbone(st)
    assert spec.layout == "timm" and spec.format == "safetensors"
    with torch.no_grad():
        assert torch.equal(back.eval()(x()), ours(x()))


def test_build_method_learns_the_pos_grid_for_the_training_views():
    cfg = resolve(sets=["model.backbone=vit_tiny", "model.patch_size=4", "model.drop_path=0.1"])  # digits: 32 px
    method = build_method(cfg)
    assert method.backbone.pos_embed.shape == (1, 65, 192)
    assert method.backbone.blocks[-1].drop_path.drop_prob == pytest.approx(0.1)
    assert backbone_spec(cfg, 32, (0.5,) * 3, (0.5,) * 3).patch_size == 4
    assert backbone_spec(resolve(), 32, (0.5,) * 3, (0.5,) * 3).patch_size is None  # a ResNet
    cfg.aug.size = 16
    assert build_method(cfg).backbone.pos_embed.shape == (1, 17, 192)
    cfg.aug.size, cfg.data.source = None, "/some/image/folder"
    with pytest.raises(ConfigError, match="set aug.size"):
        build_method(cfg)


def test_exports_load_into_timm_strictly():
    """benchmarks/vit_timm_check.py: the exports of vit_small (patch 16, 224 px) and vit_tiny
    (patch 4, 32 px) in timm.create_model(...), strict=True, same features in eval mode."""
    pytest.importorskip("timm", reason="timm is not installed here; run PYTHONPATH=. /work/peers-venv/bin/python "
                                       "benchmarks/vit_timm_check.py (bash benchmarks/peers/setup.sh makes the venv)")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "vit_timm_check.py")], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------
# model.grad_checkpointing (issue 24 §5)

def _loss_and_grads(model, inputs):
    loss = model(inputs).square().mean()
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    return loss, grads


def _saved_bytes(model, inputs) -> int:
    """Bytes of the activations autograd keeps for backward (parameters excluded, shared storage once)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            kept[ptr] = max(kept.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(inputs).sum().backward()
    return sum(kept.values())


@pytest.mark.parametrize("drop_path,subset", [(0.0, False), (0.3, False), (0.3, True)])
def test_grad_checkpointing_gives_the_same_loss_and_gradients(drop_path, subset):
    """float64; with stochastic depth the checkpoint replays the same draw in backward."""
    plain = tiny(drop_path=drop_path, drop_path_subset=subset).double().train()
    ckpt = tiny(drop_path=drop_path, drop_path_subset=subset, grad_checkpointing=True).double().train()
    ckpt.load_state_dict(plain.state_dict())
    inputs = x(b=4).double()
    torch.manual_seed(1)
    loss, grads = _loss_and_grads(plain, inputs)
    torch.manual_seed(1)
    loss_c, grads_c = _loss_and_grads(ckpt, inputs)
    torch.testing.assert_close(loss_c, loss, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads_c, grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_grad_checkpointing_keeps_less_for_backward_only_when_training():
    model = tiny()
    inputs = x(b=4)
    full = _saved_bytes(model.train(), inputs)
    model.grad_checkpointing = True  # an attribute, as timm's set_grad_checkpointing()
    assert _saved_bytes(model, inputs) < full / 4  # the blocks' activations are recomputed, not kept
    assert _saved_bytes(model.eval(), inputs) == full  # eval (or no_grad) runs the blocks as they are


def test_grad_checkpointing_is_for_vits_only_and_reaches_the_trainer():
    with pytest.raises(ConfigError, match="model.grad_checkpointing=true applies to ViTs only"):
        build_backbone("resnet18", width=0.125, grad_checkpointing=True)
    assert tiny(grad_checkpointing=True).grad_checkpointing and not tiny().grad_checkpointing
    cfg = resolve(sets=["method=dino", "model.backbone=vit_tiny", "model.patch_size=4",
                        "model.grad_checkpointing=true", "multicrop.local_crops=0"])
    assert build_method(cfg).backbone.grad_checkpointing
    cfg = resolve(sets=["model.grad_checkpointing=true"])  # simclr's ResNet-18
    with pytest.raises(ConfigError, match="model.grad_checkpointing"):
        build_method(cfg)
