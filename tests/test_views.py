"""Issue 25 §3: every view setting in the configuration (``aug.*``, per view), the views grid of
``selfsup views``, and every preset's views exactly as before the new settings.

tests/data/views_snapshot.json holds each preset's (and each method's own) ViewConfigs as
``method.augmentations(size, MEAN, STD)`` made them before issue 25 (written by the code of that
time): the new fields must be off and everything else equal.
"""
import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from selfsup.cli import main
from selfsup.config import IMAGENET_PLACEHOLDER, METHOD_NAMES, ConfigError, preset, resolve
from selfsup.presets import preset_names
from selfsup.train import build_method
from selfsup.views import grid_size

SNAPSHOT = json.loads((Path(__file__).parent / "data" / "views_snapshot.json").read_text())
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.3, 0.4)
NEW_FIELDS = {"vflip_p": 0.0, "rot90_p": 0.0}  # ViewConfig fields added by issue 25, off by default
TINY = ["--data", "digits", "--batch-size", "32", "--device", "cpu", "--no-progress", "--epochs", "1",
        "--set", "data.image_size=16", "model.width=0.125", "eval.knn_k=20", "optim.warmup_epochs=0", "model.proj_dim=16"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "run"
    assert main(["pretrain", "--method", "simclr", "--out", str(out), *TINY]) == 0
    return str(out)


def _views(teacher: str, name: str | None = None, method: str | None = None, sets=()) -> list:
    """The ViewConfigs of a preset (or of a method alone), on a small backbone (views do not depend on it)."""
    recipe = preset(name) if name else {"method": method, "data": {"source": "digits"}}
    model = {} if recipe.get("model", {}).get("backbone", "").startswith("vit") else {"width": 0.0625}
    overrides = {"model": {**model, **({"init_from": None} if recipe.get("model", {}).get("init_from") else {})}}
    if recipe["method"] == "distill":
        overrides["distill"] = {"teacher": teacher}
    if recipe["data"]["source"] == IMAGENET_PLACEHOLDER:
        overrides["data"] = {"source": "/data/imagenet"}
    if method:
        overrides["method"] = method
    cfg = resolve(preset_name=name, sets=list(sets), overrides=overrides)
    size = cfg.aug.size or cfg.data.image_size or (32 if cfg.data.source == "digits" or "cifar" in cfg.data.source else 224)
    cfg.aug.size = size  # a ViT needs the side before the data is read
    return [a.cfg for a in build_method(cfg).augmentations(size, MEAN, STD)]


def test_every_preset_and_method_makes_the_views_it_made_before(teacher):
    assert set(SNAPSHOT) == set(preset_names()) | {f"method:{m}" for m in METHOD_NAMES}
    for key, before in SNAPSHOT.items():
        name, method = (None, key.split(":")[1]) if key.startswith("method:") else (key, None)
        now = [dataclasses.asdict(v) for v in _views(teacher, name, method)]
        for view in now:
            assert {k: view.pop(k) for k in NEW_FIELDS} == NEW_FIELDS, key
        assert json.loads(json.dumps(now)) == before, key  # tuples as JSON lists


def _byol(*sets):
    cfg = resolve(sets=["method=byol", "model.width=0.0625", *sets])
    return [a.cfg for a in build_method(cfg).augmentations(16, MEAN, STD)]


def test_overrides_reach_every_view_or_the_one_named():
    v1, v2 = _byol()
    assert (v1.blur_p, v2.blur_p, v1.solarize_p, v2.solarize_p) == (0.0, 0.0, 0.0, 0.2)  # blur off at 32x32
    w1, w2 = _byol("aug.vflip_p=0.5", "aug.rot90_p=0.75", "aug.hue=0", "aug.view2.solarize_p=0.5",
                   "aug.view2.scale=[0.3,0.9]", "aug.view1.hflip_p=0")
    assert (w1.vflip_p, w2.vflip_p, w1.rot90_p, w2.rot90_p, w1.hue, w2.hue) == (0.5, 0.5, 0.75, 0.75, 0.0, 0.0)
    assert (w1.solarize_p, w2.solarize_p) == (0.0, 0.5)  # view 2 only
    assert (w1.scale, w2.scale) == (v1.scale, (0.3, 0.9)) and (w1.flip_p, w2.flip_p) == (0.0, 0.5)
    # the per-view section wins over aug's own, which wins over the recipe
    x1, x2 = _byol("aug.jitter_p=0.3", "aug.view2.jitter_p=0.1")
    assert (x1.jitter_p, x2.jitter_p) == (0.3, 0.1)


def test_local_overrides_reach_dino_and_multi_crop_locals_only():
    cfg = resolve(sets=["method=dino", "model.width=0.0625", "dino.out_dim=64", "aug.local.blur_p=0.9",
                        "aug.local.scale=[0.1,0.3]", "aug.grayscale_p=0", "multicrop.local_crops=2"])
    views = [a.cfg for a in build_method(cfg).augmentations(32, MEAN, STD)]
    assert [v.blur_p for v in views] == [0.0, 0.0, 0.9, 0.9] and [v.scale for v in views][2:] == [(0.1, 0.3)] * 2
    assert [v.scale for v in views][:2] == [(cfg.aug.scale_min, 1.0)] * 2 and {v.grayscale_p for v in views} == {0.0}
    simclr = resolve(sets=["model.width=0.0625", "multicrop.local_crops=2", "aug.local.hflip_p=0", "aug.view1.vflip_p=1"])
    views = [a.cfg for a in build_method(simclr).augmentations(32, MEAN, STD)]
    assert [v.flip_p for v in views] == [0.5, 0.5, 0.0, 0.0] and [v.vflip_p for v in views] == [1.0, 0.0, 0.0, 0.0]


def test_aug_size_is_a_recipe_knob_not_an_override_of_the_local_size():
    cfg = resolve(sets=["method=swav", "model.width=0.0625", "swav.prototypes=16", "aug.size=32"])
    assert [a.cfg.size for a in build_method(cfg).augmentations(32, MEAN, STD)] == [32, 32] + [14] * 6


def test_set_round_trips_through_the_run_config(tmp_path):
    sets = ["aug.vflip_p=0.5", "aug.rot90_p=0.75", "aug.ratio=[1,1]", "aug.view2.blur_sigma=[0.2,1.5]",
            "aug.local.scale=[0.1,0.2]"]
    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), *TINY, *sets]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())["aug"]
    assert (saved["vflip_p"], saved["rot90_p"], saved["ratio"], saved["jitter_p"]) == (0.5, 0.75, [1.0, 1.0], None)
    assert saved["view2"]["blur_sigma"] == [0.2, 1.5] and saved["local"]["scale"] == [0.1, 0.2]
    again = resolve(file=out / "config.yaml")
    assert again.aug == resolve(sets=[*TINY[TINY.index("--set") + 1:], *sets]).aug
    assert again.aug.view2.blur_sigma == (0.2, 1.5)


def test_views_writes_a_grid_of_the_expected_size(tmp_path, capsys):
    out = tmp_path / "views.png"
    assert main(["views", "--out", str(out), "--images", "3", "--views", "5", "--method", "byol",
                 "--set", "aug.vflip_p=0.5", "aug.rot90_p=0.75", "model.width=0.0625"]) == 0
    assert "3 images x 5 views of byol" in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        assert image.size == grid_size(3, 5, 32)  # digits: 32x32 views in 96-pixel cells
        assert image.size == (4 + 6 * (96 + 4), 14 + 4 + 3 * (96 + 4))
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically: nothing left beside it


def test_views_refuses_bad_settings_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"aug.view2.solarize_p must be in \[0, 1\], got 1.5"):
        resolve(sets=["aug.view2.solarize_p=1.5"])
