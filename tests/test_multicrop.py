"""Multi-crop (issue 5): the view recipe, one backbone pass per resolution, the config checks."""
import pytest
import torch

from selfsup.augment import Augment, multi_crop_views, sample_crop_boxes, simclr_view
from selfsup.config import Config, ConfigError, resolve
from selfsup.methods import check_config
from selfsup.methods.base import encode_by_resolution
from selfsup.train import build_method

B = 8


def test_views_have_the_global_and_local_sizes_and_scales():
    view = simclr_view(32, 1.0, blur=True, scale=(0.14, 1.0))
    views = multi_crop_views([view, view], 6, 16, (0.05, 0.14))
    assert [v.size for v in views] == [32, 32] + [16] * 6
    assert [v.scale for v in views] == [(0.14, 1.0)] * 2 + [(0.05, 0.14)] * 6
    assert views[2].blur_p == view.blur_p and Augment(views[2]).kernel_size == 3  # the local kernel follows its size
    images = torch.randint(0, 256, (B, 32, 32, 3), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    crops = [Augment(v)(images, g) for v in views]
    assert [tuple(c.shape) for c in crops] == [(B, 3, 32, 32)] * 2 + [(B, 3, 16, 16)] * 6
    for v in (views[0], views[2]):  # the crop boxes cover the asked fraction of the image
        boxes = sample_crop_boxes(4096, 32, 32, v.scale, v.ratio, torch.Generator().manual_seed(1))
        area = boxes[:, 2] * boxes[:, 3] / 32 ** 2
        lo, hi = v.scale
        assert area.min() >= lo - 0.03 and area.max() <= hi + 0.03  # up to rounding to whole pixels
        assert area.mean() == pytest.approx((lo + hi) / 2, rel=0.1)


def test_encode_by_resolution_runs_each_size_once_and_keeps_the_view_order():
    calls = []
    encoder = lambda x: calls.append(tuple(x.shape)) or x.mean(dim=(1, 2, 3))[:, None]  # noqa: E731
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(B, 3, s, s, generator=g) for s in (16, 8, 16, 8, 8)]
    out = encode_by_resolution(encoder, views)
    assert sorted(calls) == [(2 * B, 3, 16, 16), (3 * B, 3, 8, 8)]
    torch.testing.assert_close(out, torch.cat([encoder(v) for v in views]))


@pytest.mark.parametrize("method,per_view", [("simclr", False), ("byol", False), ("byol", True), ("simsiam", False),
                                             ("swav", False)])
def test_each_resolution_goes_through_the_backbone_once(method, per_view):
    """One pass per resolution; BYOL's per_view_bn (as its code) one pass per view."""
    cfg = Config(method=method)
    cfg.simclr.temperature, cfg.byol.per_view_bn = 0.1, per_view
    cfg.model.width, cfg.model.proj_hidden, cfg.model.proj_dim = 0.125, 16, 8
    cfg.train.batch_size, cfg.swav.prototypes = B, 10
    cfg.multicrop.global_crops, cfg.multicrop.local_crops, cfg.multicrop.local_size = 2, 3, 8
    torch.manual_seed(0)
    m = build_method(cfg)
    augs = m.augmentations(16, (0.5,) * 3, (0.5,) * 3)
    assert [a.cfg.size for a in augs] == [16, 16, 8, 8, 8]
    images = torch.randint(0, 256, (B, 16, 16, 3), dtype=torch.uint8)
    views = [a(images, torch.Generator().manual_seed(i)) for i, a in enumerate(augs)]
    seen = []
    m.backbone.register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape)))
    out = m(views)
    if per_view:
        assert sorted(seen) == [(B, 3, 8, 8)] * 3 + [(B, 3, 16, 16)] * 2
    else:
        assert sorted(seen) == [(2 * B, 3, 16, 16), (3 * B, 3, 8, 8)]
    assert torch.isfinite(out["loss"]) and out["embedding"].shape == (2 * B, 8)  # global crops' embedding
    out["loss"].backward()


def test_config_checks_for_multicrop():
    with pytest.raises(ConfigError, match="two views"):
        check_config(resolve(overrides={"method": "moco", "multicrop": {"local_crops": 2}}))
    with pytest.raises(ConfigError, match="memory"):
        check_config(resolve(overrides={"method": "simclr", "memory": {"size": 1024}, "multicrop": {"local_crops": 2}}))
    assert resolve(overrides={"method": "simclr", "multicrop": {"local_crops": 2}}).multicrop.local_crops == 2
    with pytest.raises(ConfigError, match="local_scale"):
        resolve(overrides={"method": "swav", "multicrop": {"local_scale_min": 0.5, "local_scale_max": 0.2}})
    with pytest.raises(ConfigError, match="at least two"):
        resolve(overrides={"method": "byol", "multicrop": {"global_crops": 1}})
    cfg = resolve(preset_name="cifar10-swav")
    assert (cfg.multicrop.global_crops, cfg.multicrop.local_crops, cfg.multicrop.local_size) == (2, 6, 16)


def test_simclr_multicrop_averages_the_loss_over_pairs_with_a_global_crop():
    from selfsup.losses import nt_xent
    cfg = Config(method="simclr")
    cfg.model.width, cfg.model.proj_hidden, cfg.model.proj_dim = 0.125, 16, 8
    cfg.multicrop.local_crops, cfg.multicrop.local_size = 2, 8
    torch.manual_seed(0)
    m = build_method(cfg)
    augs = m.augmentations(16, (0.5,) * 3, (0.5,) * 3)
    images = torch.randint(0, 256, (B, 16, 16, 3), dtype=torch.uint8)
    views = [a(images, torch.Generator().manual_seed(i)) for i, a in enumerate(augs)]
    m.eval()  # fixed BN statistics, so each crop's projection does not depend on the others
    out = m(views)
    z = [m.projector(m.backbone(v)) for v in views]
    pairs = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3)]  # (global, global), then each global with each local
    expected = sum(nt_xent(z[i], z[j], cfg.simclr.temperature) for i, j in pairs) / len(pairs)
    torch.testing.assert_close(out["loss"], expected)
    assert out["embedding"].shape == (2 * B, 8)
