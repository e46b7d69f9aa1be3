"""Tests for selfsup.augment: contracts, per-op references and sampling statistics."""

from __future__ import annotations

import colorsys
import dataclasses
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from selfsup.augment import (
    BRIGHTNESS,
    CONTRAST,
    HUE,
    SATURATION,
    Augment,
    JitterParams,
    ViewConfig,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    apply_color_jitter,
    blur_kernel_size,
    color_jitter,
    byol_view,
    crop_flip_view,
    eval_view,
    gaussian_blur,
    random_gaussian_blur,
    random_resized_crop_flip,
    resized_crop,
    rgb_to_grayscale,
    sample_crop_boxes,
    sample_jitter_params,
    simclr_view,
    solarize,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LUMA = (0.299, 0.587, 0.114)


def _gen(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _random_u8(b: int, h: int, w: int, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    g = _gen(seed)
    return torch.randint(0, 256, (b, h, w, 3), dtype=torch.uint8, generator=g).to(device)


def _random_float(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand((b, 3, h, w), generator=_gen(seed))


def _plain(size: int, **kw) -> ViewConfig:
    """A view that does nothing unless told: full crop, no flip, no colour, raw [0, 1] output."""
    base = dict(
        size=size, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0,
        blur_p=0.0, solarize_p=0.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
    )
    base.update(kw)
    return ViewConfig(**base)


def _assert_binomial(count: int, n: int, p: float, sds: float = 5.0) -> None:
    sd = math.sqrt(n * p * (1 - p))
    assert abs(count - n * p) <= sds * sd + 1, (count, n, p)


# --------------------------------------------------------------------------- contract


@pytest.mark.parametrize("device", DEVICES)
def test_output_contract(device):
    images = _random_u8(16, 20, 24, device=device)  # non-square source on purpose
    cfg = simclr_view(16, blur=True, solarize_p=0.5, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4))
    out = Augment(cfg)(images, _gen(1, device))
    assert out.shape == (16, 3, 16, 16)
    assert out.dtype == torch.float32
    assert out.device == images.device
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(out).all()
    # Normalised [0, 1] inputs stay within the image of [0, 1].
    lo = (0 - torch.tensor(cfg.mean)) / torch.tensor(cfg.std)
    hi = (1 - torch.tensor(cfg.mean)) / torch.tensor(cfg.std)
    per_channel = out.cpu().transpose(0, 1).reshape(3, -1)
    assert (per_channel.min(1).values >= lo - 1e-5).all() and (per_channel.max(1).values <= hi + 1e-5).all()


@pytest.mark.parametrize("device", DEVICES)
def test_identity_when_everything_off(device):
    images = _random_u8(8, 16, 16, device=device)
    out = Augment(_plain(16))(images, _gen(0, device))
    expected = images.permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_reproducible_with_seed():
    images = _random_u8(32, 16, 16)
    aug = Augment(simclr_view(16, blur=True, solarize_p=0.2))
    a = aug(images, _gen(123))
    b = aug(images, _gen(123))
    c = aug(images, _gen(124))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_view_configs():
    cfg = simclr_view(32, strength=0.5, blur=False)
    assert cfg.brightness == cfg.contrast == cfg.saturation == pytest.approx(0.4)
    assert cfg.hue == pytest.approx(0.1)
    assert (cfg.jitter_p, cfg.grayscale_p, cfg.blur_p, cfg.scale) == (0.8, 0.2, 0.0, (0.08, 1.0))
    assert simclr_view(224).blur_p == 0.5
    assert simclr_view(32, flip_p=0.0).flip_p == 0.0
    ft = crop_flip_view(32)
    assert (ft.jitter_p, ft.grayscale_p, ft.blur_p, ft.solarize_p, ft.flip_p) == (0.0, 0.0, 0.0, 0.0, 0.5)
    with pytest.raises(ValueError):
        ViewConfig(scale=(0.5, 0.1))
    with pytest.raises(ValueError):
        ViewConfig(hue=0.7)


# --------------------------------------------------------------------------- crop + flip


def test_flip_frequency_and_mirroring():
    b, s = 512, 16
    images = torch.zeros((b, s, s, 3), dtype=torch.uint8)
    images[:, :, s // 2:] = 255  # left half dark, right half bright
    out = Augment(_plain(s, flip_p=0.3))(images, _gen(5))
    flipped = out[:, 0, 0, 0] > 0.5  # top-left pixel bright only when mirrored
    _assert_binomial(int(flipped.sum()), b, 0.3)
    src = images.permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(out[flipped], src[flipped].flip(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[~flipped], src[~flipped], atol=1e-5, rtol=0)


def _corner(out: torch.Tensor) -> torch.Tensor:
    """Which corner of each (B, 3, S, S) view holds the bright quadrant: 0 top-left, 1 bottom-left,
    2 bottom-right, 3 top-right (counter-clockwise, as torch.rot90 turns it)."""
    s = out.shape[-1]
    corners = torch.stack([out[:, 0, 0, 0], out[:, 0, s - 1, 0], out[:, 0, s - 1, s - 1], out[:, 0, 0, s - 1]], 1)
    return corners.argmax(1)  # (B,)


def test_vertical_flip_is_an_exact_mirror_at_the_rate_asked():
    b, s = 512, 16
    images = _random_u8(b, s, s, seed=3) // 2  # dim, so that the bright quadrant marks its corner
    images[:, : s // 2, : s // 2] = 255  # a bright top-left quadrant
    plain = Augment(_plain(s))(images, _gen(0))  # the identity crop, no flip
    out = Augment(_plain(s, vflip_p=0.3))(images, _gen(5))
    flipped = _corner(out) == 1
    _assert_binomial(int(flipped.sum()), b, 0.3)
    assert torch.equal(out[flipped], plain[flipped].flip(-2))  # exactly the rows in reverse order
    assert torch.equal(out[~flipped], plain[~flipped])


@pytest.mark.parametrize("p", [1.0, 0.75, 0.3])
def test_quarter_turns_are_exact_and_uniform_over_1_2_3(p):
    b, s = 1200, 12
    images = _random_u8(b, s, s, seed=4) // 2  # dim, so that the bright quadrant marks its corner
    images[:, : s // 2, : s // 2] = 255
    plain = Augment(_plain(s))(images, _gen(0))
    out = Augment(_plain(s, rot90_p=p))(images, _gen(6))
    k = _corner(out)  # (B,) the quarter turns each sample got
    _assert_binomial(int((k == 0).sum()), b, 1 - p)
    for turns in (1, 2, 3):
        _assert_binomial(int((k == turns).sum()), b, p / 3)
    for turns in range(4):
        assert torch.equal(out[k == turns], torch.rot90(plain[k == turns], turns, dims=(-2, -1)))


def test_flips_and_turns_fold_into_any_crop():
    """On a random crop a flip or turn is still an exact permutation of the unturned view."""
    x = _random_float(6, 20, 28, seed=2) * 255
    boxes = sample_crop_boxes(6, 20, 28, (0.2, 1.0), generator=_gen(1))
    base = resized_crop(x, boxes, 16)
    for turns in range(4):
        out = resized_crop(x, boxes, 16, None, torch.ones(6, dtype=torch.bool), torch.full((6,), turns))
        assert torch.equal(out, torch.rot90(base.flip(-2), turns, dims=(-2, -1)))


@pytest.mark.parametrize("cfg", [simclr_view(24), simclr_view(24, blur=True), crop_flip_view(24), byol_view(24, 1),
                                 byol_view(24, 2)], ids=["simclr", "simclr blur", "crop+flip", "byol 1", "byol 2"])
def test_the_new_ops_draw_nothing_when_off(cfg):
    augment = Augment(cfg)
    assert cfg.vflip_p == cfg.rot90_p == 0.0 and not {"vflip", "rot90"} & {name for name, _ in augment.draws}
    on = Augment(dataclasses.replace(cfg, vflip_p=0.5, rot90_p=0.5))
    assert on.draws[:-2] == augment.draws and on.per_sample == augment.per_sample + 3  # appended last


def test_crop_boxes_recovered_from_output():
    # Pixel values encode their own coordinates, so the sampled box can be read back from
    # the output. Source 32 -> output 4 keeps every sample point between pixel centres
    # (no border clamping), where bilinear interpolation of a ramp is exact.
    b, side, s = 512, 32, 4
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    coord = torch.arange(side, dtype=torch.uint8) * 8
    images = torch.zeros((b, side, side, 3), dtype=torch.uint8)
    images[..., 0] = coord.view(1, 1, side)  # x
    images[..., 1] = coord.view(1, side, 1)  # y
    out = random_resized_crop_flip(images, s, scale, ratio, flip_p=0.5, generator=_gen(7)) * 255 / 8

    def extent(ch):
        lo = out[:, ch].amin(dim=(1, 2))
        hi = out[:, ch].amax(dim=(1, 2))
        size = (hi - lo) * s / (s - 1)
        start = lo + 0.5 - 0.5 * size / s
        return start, size

    x0, w = extent(0)
    y0, h = extent(1)
    for v in (x0, w, y0, h):  # boxes are whole pixels, as in the reference algorithm
        torch.testing.assert_close(v, v.round(), atol=2e-3, rtol=0)
    w, h, x0, y0 = w.round(), h.round(), x0.round(), y0.round()
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= side).all() and (y0 + h <= side).all()
    # w, h are rounded from real values: allow half a pixel each way.
    area = side * side
    assert ((w + 0.5) * (h + 0.5) >= scale[0] * area).all()
    assert ((w - 0.5) * (h - 0.5) <= scale[1] * area).all()
    assert ((w + 0.5) / (h - 0.5) >= ratio[0]).all()
    assert ((w - 0.5) / (h + 0.5) <= ratio[1]).all()
    frac = w * h / area
    assert frac.min() < 0.15 and frac.max() > 0.85  # the whole range is used
    # Positions are spread over the image, not pinned to a corner or the centre.
    small = frac < 0.3
    assert x0[small].min() <= 2 and (x0 + w)[small].max() >= side - 2


def test_sample_crop_boxes_fallback_and_positions():
    # Ratio (2, 3) cannot fit a square image at full area: every try fails, so the
    # fallback is the centred full-width box with aspect clamped to 2.
    boxes = sample_crop_boxes(64, 16, 16, scale=(1.0, 1.0), ratio=(2.0, 3.0), generator=_gen(0))
    assert torch.equal(boxes, torch.tensor([[0.0, 4.0, 16.0, 8.0]]).expand(64, 4))
    # Full-area square crops on a square image are exactly the image.
    boxes = sample_crop_boxes(8, 16, 16, scale=(1.0, 1.0), ratio=(1.0, 1.0), generator=_gen(0))
    assert torch.equal(boxes, torch.tensor([[0.0, 0.0, 16.0, 16.0]]).expand(8, 4))
    # Fixed-size boxes: offsets uniform over every valid integer position.
    boxes = sample_crop_boxes(4000, 8, 8, scale=(0.25, 0.25), ratio=(1.0, 1.0), generator=_gen(1))
    assert (boxes[:, 2:] == 4).all()
    counts = torch.bincount(boxes[:, 0].long(), minlength=5)
    assert (counts > 4000 / 5 * 0.8).all() and counts.numel() == 5


# --------------------------------------------------------------------------- colour ops


def test_brightness_contrast_saturation_against_reference():
    x = _random_float(4, 5, 6, seed=3)
    factors = torch.tensor([0.0, 0.6, 1.0, 1.5])
    gray = LUMA[0] * x[:, 0:1] + LUMA[1] * x[:, 1:2] + LUMA[2] * x[:, 2:3]
    f = factors.view(-1, 1, 1, 1)
    torch.testing.assert_close(adjust_brightness(x, factors), (x * f).clamp(0, 1))
    torch.testing.assert_close(adjust_brightness(x, 1.5), (x * 1.5).clamp(0, 1))
    mean = gray.mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(adjust_contrast(x, factors), (f * x + (1 - f) * mean).clamp(0, 1))
    torch.testing.assert_close(adjust_saturation(x, factors), (f * x + (1 - f) * gray).clamp(0, 1))
    # Factor 1 is bit-exact identity for all three.
    ones = torch.ones(4)
    for op in (adjust_brightness, adjust_contrast, adjust_saturation):
        assert torch.equal(op(x, ones), x)


def test_grayscale_weights():
    x = torch.eye(3).view(3, 3, 1, 1).expand(3, 3, 2, 2)  # pure red, green, blue
    g = rgb_to_grayscale(x)
    assert g.shape == (3, 1, 2, 2)
    torch.testing.assert_close(g[:, 0, 0, 0], torch.tensor(LUMA))


def test_hue_identity_shifts():
    x = _random_float(3, 8, 8, seed=4)
    torch.testing.assert_close(adjust_hue(x, torch.zeros(3)), x, atol=1e-6, rtol=0)
    torch.testing.assert_close(adjust_hue(x, torch.ones(3)), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(adjust_hue(x, -torch.ones(3)), x, atol=1e-5, rtol=0)
    gray = x[:, :1].expand(3, 3, 8, 8)  # achromatic pixels have no hue to rotate
    torch.testing.assert_close(adjust_hue(gray, torch.full((3,), 0.3)), gray, atol=1e-6, rtol=0)


def test_hue_against_colorsys():
    x = _random_float(3, 4, 5, seed=5)
    # Ties for the max channel, primaries and grays exercise every branch of the hue formula.
    x[:, :, 0] = torch.tensor([
        [1.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [0.6, 0.6, 0.6], [0.7, 0.7, 0.2],
    ]).T
    x[:, :, 1, :3] = torch.eye(3)
    shifts = torch.tensor([0.25, -0.4, 0.1])
    expected = torch.empty_like(x)
    for i in range(3):
        for r in range(4):
            for c in range(5):
                h, s, v = colorsys.rgb_to_hsv(*x[i, :, r, c].tolist())
                expected[i, :, r, c] = torch.tensor(colorsys.hsv_to_rgb((h + shifts[i].item()) % 1.0, s, v))
    torch.testing.assert_close(adjust_hue(x, shifts), expected, atol=1e-5, rtol=0)


def test_solarize():
    x = torch.tensor([0.0, 0.3, 0.5, 0.7, 1.0]).view(1, 1, 1, 5).expand(2, 3, 1, 5)
    out = solarize(x, 0.5)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.0, 0.3, 0.5, 0.3, 0.0]))
    masked = solarize(x, 0.5, mask=torch.tensor([False, True]))
    assert torch.equal(masked[0], x[0]) and torch.equal(masked[1], out[1])
    # Per-sample thresholds; a pixel equal to its threshold is inverted.
    per_sample = solarize(x, torch.tensor([0.3, 0.7]))
    torch.testing.assert_close(per_sample[0, 0, 0], torch.tensor([0.0, 0.7, 0.5, 0.3, 0.0]))
    torch.testing.assert_close(per_sample[1, 0, 0], torch.tensor([0.0, 0.3, 0.5, 0.3, 0.0]))


def test_building_blocks_do_not_modify_inputs():
    x = _random_float(4, 6, 6, seed=13)
    ref = x.clone()
    f = torch.tensor([0.5, 1.0, 1.5, 0.0])
    params = sample_jitter_params(4, 1.0, 0.5, 0.5, 0.5, 0.2, generator=_gen(0))
    for fn in (
        lambda: adjust_brightness(x, f), lambda: adjust_contrast(x, f), lambda: adjust_saturation(x, f),
        lambda: adjust_hue(x, f), lambda: apply_color_jitter(x, params), lambda: solarize(x, 0.5),
        lambda: gaussian_blur(x, f, 3), lambda: rgb_to_grayscale(x),
    ):
        fn()
        assert torch.equal(x, ref)


# --------------------------------------------------------------------------- jitter order


def test_jitter_orders_all_occur():
    params = sample_jitter_params(2000, 1.0, 0.4, 0.4, 0.4, 0.1, generator=_gen(0))
    order = params.order
    assert order.shape == (2000, 4)
    assert torch.equal(order.sort(dim=1).values, torch.arange(4).expand(2000, 4))
    seen = {tuple(row) for row in order.tolist()}
    assert seen == set(itertools.permutations(range(4)))


def test_jitter_param_ranges():
    params = sample_jitter_params(4000, 0.25, 0.4, (0.5, 0.7), 1.5, 0.1, generator=_gen(1))
    assert params.brightness.min() >= 0.6 and params.brightness.max() <= 1.4
    assert params.contrast.min() >= 0.5 and params.contrast.max() <= 0.7
    assert params.saturation.min() >= 0.0 and params.saturation.max() <= 2.5
    assert params.hue.abs().max() <= 0.1
    _assert_binomial(int(params.apply.sum()), 4000, 0.25)


def _reference_jitter(x: torch.Tensor, params: JitterParams) -> torch.Tensor:
    """One image at a time, ops in each sample's own order, with the textbook formulas."""
    out = x.clone()
    for i in range(x.shape[0]):
        if not params.apply[i]:
            continue
        y = x[i:i + 1]
        for op in params.order[i].tolist():
            gray = LUMA[0] * y[:, 0:1] + LUMA[1] * y[:, 1:2] + LUMA[2] * y[:, 2:3]
            if op == BRIGHTNESS:
                y = (params.brightness[i] * y).clamp(0, 1)
            elif op == CONTRAST:
                f = params.contrast[i]
                y = (f * y + (1 - f) * gray.mean()).clamp(0, 1)
            elif op == SATURATION:
                f = params.saturation[i]
                y = (f * y + (1 - f) * gray).clamp(0, 1)
            elif op == HUE:
                y = adjust_hue(y, params.hue[i:i + 1])  # checked against colorsys separately
        out[i] = y[0]
    return out


def test_jitter_matches_sequential_reference():
    x = _random_float(96, 6, 6, seed=6)
    # Strong factors so that the op order visibly matters.
    params = sample_jitter_params(96, 0.75, 0.8, 0.8, 0.8, 0.3, generator=_gen(2))
    out = apply_color_jitter(x, params)
    torch.testing.assert_close(out, _reference_jitter(x, params), atol=2e-5, rtol=0)
    # Unselected samples are untouched, bit for bit.
    assert torch.equal(out[~params.apply], x[~params.apply])
    # Order matters for these factors: a fixed order would not reproduce the result.
    fixed = params._replace(order=torch.arange(4).expand(96, 4))
    assert not torch.allclose(apply_color_jitter(x, fixed), out, atol=1e-3)


def test_jitter_without_hue_matches_reference():
    x = _random_float(64, 5, 5, seed=7)
    params = sample_jitter_params(64, 0.8, 0.8, 0.8, 0.8, 0.0, generator=_gen(3))
    out = apply_color_jitter(x, params, with_hue=False)
    torch.testing.assert_close(out, _reference_jitter(x, params), atol=2e-5, rtol=0)
    # color_jitter takes that path itself when hue is 0, drawing the same parameters.
    torch.testing.assert_close(color_jitter(x, 0.8, 0.8, 0.8, 0.8, 0.0, _gen(3)), out)


def test_jitter_and_grayscale_frequencies():
    b, s = 512, 8
    images = _random_u8(b, s, s, seed=8)
    base = Augment(_plain(s))(images, _gen(0))
    jit = Augment(_plain(s, jitter_p=0.3, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1))(images, _gen(9))
    changed = (jit - base).abs().amax(dim=(1, 2, 3)) > 1e-6
    _assert_binomial(int(changed.sum()), b, 0.3)
    gray = Augment(_plain(s, grayscale_p=0.2))(images, _gen(10))
    is_gray = (gray[:, 0] == gray[:, 1]).all(dim=(1, 2)) & (gray[:, 1] == gray[:, 2]).all(dim=(1, 2))
    _assert_binomial(int(is_gray.sum()), b, 0.2)
    torch.testing.assert_close(gray[is_gray][:, :1], rgb_to_grayscale(base[is_gray]))
    assert torch.equal(gray[~is_gray], base[~is_gray])


# --------------------------------------------------------------------------- blur


def test_blur_kernel_size():
    assert blur_kernel_size(224) == 23  # SimCLR's ImageNet kernel
    assert blur_kernel_size(32) == 3 and blur_kernel_size(16) == 3
    assert blur_kernel_size(64) == 7 and blur_kernel_size(96) == 11


def test_blur_constant_and_mean():
    const = torch.full((4, 3, 12, 12), 0.37)
    sigma = torch.tensor([0.1, 0.5, 1.0, 2.0])
    torch.testing.assert_close(gaussian_blur(const, sigma, 7), const)
    x = _random_float(4, 32, 32, seed=9)
    blurred = gaussian_blur(x, sigma, 7)
    torch.testing.assert_close(blurred.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=5e-3, rtol=0)
    # Blur smooths: high-frequency energy drops as sigma grows.
    tv = (blurred[..., 1:] - blurred[..., :-1]).abs().mean(dim=(1, 2, 3))
    assert (tv[1:] < tv[:-1]).all()


def test_blur_matches_per_image_reference():
    x = _random_float(5, 9, 11, seed=10)
    sigma = torch.tensor([0.3, 0.8, 1.2, 2.0, 0.0])  # sigma 0: identity
    k = 5
    out = gaussian_blur(x, sigma, k)
    t = torch.arange(k, dtype=torch.float32) - k // 2
    for i in range(5):
        if sigma[i] == 0:
            torch.testing.assert_close(out[i], x[i], atol=0, rtol=0)
            continue
        k1 = torch.exp(-t ** 2 / (2 * sigma[i] ** 2))
        k1 = k1 / k1.sum()
        k2 = torch.outer(k1, k1).expand(3, 1, k, k)
        ref = F.conv2d(F.pad(x[i:i + 1], (k // 2,) * 4, mode="reflect"), k2, groups=3)[0]
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def test_random_blur_probability():
    x = _random_float(400, 8, 8, seed=11)
    out = random_gaussian_blur(x, 0.5, (0.5, 2.0), 3, generator=_gen(12))
    unchanged = (out == x).flatten(1).all(dim=1)
    _assert_binomial(int((~unchanged).sum()), 400, 0.5)


# --------------------------------------------------------------------------- eval view


@pytest.mark.parametrize("device", DEVICES)
def test_eval_view_normalisation(device):
    images = _random_u8(6, 16, 16, seed=12, device=device)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    out = eval_view(images, 16, mean, std)
    assert out.shape == (6, 3, 16, 16) and out.dtype == torch.float32 and out.device == images.device
    assert out.is_contiguous(memory_format=torch.channels_last)
    x = images.permute(0, 3, 1, 2).float().cpu() / 255
    expected = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(out.cpu(), expected, atol=1e-5, rtol=0)


def test_eval_view_resize():
    # A horizontal ramp upsampled 16 -> 32: output pixel u samples source x = (u + 0.5) / 2 - 0.5,
    # where bilinear interpolation of the ramp is exact; the outermost columns clamp.
    images = torch.zeros((2, 16, 16, 3), dtype=torch.uint8)
    images[..., :] = (torch.arange(16, dtype=torch.uint8) * 10 + 50).view(1, 1, 16, 1)
    out = eval_view(images, 32, (0, 0, 0), (1, 1, 1)) * 255
    u = torch.arange(32, dtype=torch.float32)
    src = ((u + 0.5) / 2 - 0.5).clamp(0, 15)
    torch.testing.assert_close(out[0, 0, 5], 10 * src + 50, atol=1e-3, rtol=0)
    assert torch.equal(out[:, :, :1].expand_as(out), out)  # rows are unchanged
    # Downscaling a constant image keeps it constant.
    const = torch.full((2, 20, 24, 3), 77, dtype=torch.uint8)
    small = eval_view(const, 8, (0, 0, 0), (1, 1, 1))
    assert small.shape == (2, 3, 8, 8)
    torch.testing.assert_close(small, torch.full_like(small, 77 / 255), atol=1e-6, rtol=0)


def test_augment_dataclass_roundtrip():
    cfg = simclr_view(16)
    assert dataclasses.replace(cfg, size=8).size == 8
    assert Augment(cfg)(_random_u8(2, 16, 16), _gen(0)).shape == (2, 3, 16, 16)
