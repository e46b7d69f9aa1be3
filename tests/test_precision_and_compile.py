"""The step built for GPUs, as far as a CPU shows it (issue 24 §2 and §4): the precision policy,
fp16 with its gradient scaler (scaled backward, unscaled clipping, the scale saved and resumed),
a view's random numbers drawn in one call then applied by a pure function (bit-identical to the
ops drawing one by one), and that function compiled."""
import copy
import dataclasses

import pytest
import torch
from torch import nn

from selfsup import checkpoint as ckpt
from selfsup.augment import (Augment, byol_view, color_jitter, crop_flip_view, normalize, quarter_turns,
                             random_gaussian_blur, random_grayscale, random_resized_crop_flip, random_solarize,
                             resized_crop, sample_crop_boxes, simclr_view)
from selfsup.augment.filters import blur_kernel_size
from selfsup.cli import main
from selfsup.device import autocast_dtype, grad_scaler
from selfsup.loop import backward_step

TINY = ["--data", "digits", "--batch-size", "64", "--device", "cpu", "--no-progress",
        "--set", "data.image_size=8", "model.width=0.125", "eval.knn_every=0", "eval.online_linear=false",
        "train.checkpoint_every=1", "optim.warmup_epochs=1", "train.precision=fp16"]


# ---------------------------------------------------------------------------------------------
# Precision


@pytest.mark.parametrize("capability,expected", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                                 ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_auto_takes_bf16_only_where_the_gpu_computes_it_natively(monkeypatch, capability, expected):
    # the GPU's compute capability is the one thing a CPU machine cannot have: it is stood in for
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert autocast_dtype("auto", torch.device("cuda")) == expected
    assert autocast_dtype("bf16", torch.device("cuda")) == torch.bfloat16
    assert autocast_dtype("fp16", torch.device("cpu")) == torch.float16
    assert autocast_dtype("fp32", torch.device("cuda")) is None
    assert grad_scaler(torch.device("cpu"), torch.float16) is not None
    assert grad_scaler(torch.device("cpu"), torch.bfloat16) is None and grad_scaler(torch.device("cpu"), None) is None


def test_a_scaled_step_equals_the_unscaled_step_clipping_included():
    """The loss scale is a power of two, so scaling and unscaling are exact: with the scaler the
    parameters move exactly as without it, the clipping acting on the true gradients."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    x = torch.randn(16, 6)
    results = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)):
        model = copy.deepcopy(net)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        for _ in range(3):
            backward_step(optimizer, model(x).pow(2).mean(), clip_grad=0.05, scaler=scaler)
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_fp16_runs_save_their_loss_scale_and_resume_exactly(tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(["pretrain", "--out", str(full), "--epochs", "2", *TINY]) == 0
    assert main(["pretrain", "--out", str(split), "--epochs", "2", "--max-minutes", "0", *TINY]) == 0
    saved = ckpt.load(split / "checkpoint.pt")
    assert saved["epoch"] == 1 and saved["grad_scaler"]["scale"] > 0  # fp16's loss scale is in the checkpoint
    assert main(["pretrain", "--out", str(split), "--resume", "--device", "cpu", "--no-progress"]) == 0
    a, b = ckpt.load(full / "checkpoint.pt"), ckpt.load(split / "checkpoint.pt")
    assert a["grad_scaler"] == b["grad_scaler"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


# ---------------------------------------------------------------------------------------------
# One draw, then a pure function


def _op_by_op(cfg, images, generator):
    """The view as the ops make it when each draws its own numbers (the recipe before issue 24).

    Issue 25's vertical flip and quarter turns draw after every other op but act in the crop: their
    numbers are found first on a copy of the generator, and drawn again at the end."""
    b, height, width, _ = images.shape
    if cfg.vflip_p > 0 or cfg.rot90_p > 0:
        ahead = torch.Generator().set_state(generator.get_state())
        _op_by_op(dataclasses.replace(cfg, vflip_p=0.0, rot90_p=0.0), images, ahead)
        vflip, turns = _flips_and_turns(cfg, b, ahead)
        boxes = sample_crop_boxes(b, height, width, cfg.scale, cfg.ratio, generator)
        flip = torch.rand(b, generator=generator) < cfg.flip_p if cfg.flip_p > 0 else None
        x = resized_crop(images.permute(0, 3, 1, 2).float(), boxes, cfg.size, flip, vflip, turns).mul_(1.0 / 255.0)
    else:
        x = random_resized_crop_flip(images, cfg.size, cfg.scale, cfg.ratio, cfg.flip_p, generator)
    if cfg.jitter_p > 0:
        x = color_jitter(x, cfg.jitter_p, cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue, generator)
    if cfg.grayscale_p > 0:
        x = random_grayscale(x, cfg.grayscale_p, generator)
    if cfg.blur_p > 0:
        x = random_gaussian_blur(x, cfg.blur_p, cfg.blur_sigma, blur_kernel_size(cfg.size, cfg.blur_kernel_frac),
                                 generator)
    if cfg.solarize_p > 0:
        x = random_solarize(x, cfg.solarize_p, cfg.solarize_threshold, generator)
    _flips_and_turns(cfg, b, generator)  # the numbers used above, drawn now, in their turn
    return normalize(x, cfg.mean, cfg.std)


def _flips_and_turns(cfg, b, generator):
    vflip = torch.rand(b, generator=generator) < cfg.vflip_p if cfg.vflip_p > 0 else None
    turns = quarter_turns(torch.rand((b, 2), generator=generator), cfg.rot90_p) if cfg.rot90_p > 0 else None
    return vflip, turns


VIEWS = {"simclr": simclr_view(24), "simclr blur": simclr_view(24, blur=True), "byol 1": byol_view(24, 1),
         "byol 2": byol_view(24, 2), "crop+flip": crop_flip_view(24),
         "no hue, no flip": dataclasses.replace(simclr_view(24), hue=0.0, flip_p=0.0),
         "vertical flip": simclr_view(24, vflip_p=0.5), "quarter turns": byol_view(24, 2, rot90_p=0.75),
         "every symmetry": crop_flip_view(24, vflip_p=0.5, rot90_p=0.5, scale=(1.0, 1.0), ratio=(1.0, 1.0))}


@pytest.mark.parametrize("name", VIEWS)
def test_one_draw_is_bit_identical_to_drawing_op_by_op(name):
    cfg = VIEWS[name]
    images = torch.randint(0, 256, (32, 40, 36, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    augment = Augment(cfg)
    for _ in range(2):  # and the generators stay in step
        assert torch.equal(augment(images, g1), _op_by_op(cfg, images, g2))
        assert torch.equal(g1.get_state(), g2.get_state())
    u = augment.draw(len(images), torch.Generator().manual_seed(3), images.device)
    assert u.shape == (32 * augment.per_sample,)
    assert torch.equal(augment.apply(images, u), augment.apply(images, u.clone()))  # a function of its inputs


def test_the_compiled_view_matches_the_eager_one_and_draws_the_same_numbers():
    cfg = simclr_view(16)
    images = torch.randint(0, 256, (16, 20, 20, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    eager, compiled = Augment(cfg), Augment(cfg).compile_apply()
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for _ in range(2):
        a, b = eager(images, g1), compiled(images, g2)
        torch.testing.assert_close(b, a, atol=1e-4, rtol=0)  # fused arithmetic rounds differently, no more
        assert b.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(g1.get_state(), g2.get_state())
