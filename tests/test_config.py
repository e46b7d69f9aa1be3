from importlib import resources

import pytest

from selfsup.backbones import NAMES as BUILT_BACKBONES
from selfsup.config import (BACKBONE_NAMES, IMAGENET_PLACEHOLDER, INIT_PLACEHOLDER, METHOD_DEFAULTS, METHOD_NAMES,
                            Config, ConfigError, load_yaml, parse_set, preset, resolve)
from selfsup.methods import METHODS, check_config
from selfsup.presets import merge, preset_names, preset_settings, read_preset


def test_defaults_and_preset_and_overrides_in_order(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 0.3\ntrain:\n  epochs: 7\n")
    cfg = resolve(preset_name="cifar10-simclr", file=f, sets=["train.epochs=9", "simclr.temperature=0.2"],
                  overrides={"train": {"batch_size": 64}})
    assert cfg.preset == "cifar10-simclr"
    assert cfg.aug.strength == 0.5 and cfg.aug.blur is False          # from the preset
    assert cfg.optim.lr == 0.3                                         # file over preset
    assert cfg.train.epochs == 9 and cfg.simclr.temperature == 0.2            # --set over file
    assert cfg.train.batch_size == 64                                  # explicit flags last


def test_parse_set_types():
    assert parse_set("optim.lr=1e-3") == {"optim": {"lr": 1e-3}}
    assert parse_set("model.sync_bn=false") == {"model": {"sync_bn": False}}
    assert parse_set("data.image_size=null") == {"data": {"image_size": None}}


@pytest.mark.parametrize("sets,message", [
    (["optim.lrr=1"], "unknown config key 'optim.lrr'"),
    (["nonsense=1"], "unknown config key 'nonsense'"),
    (["train.epochs=abc"], "train.epochs: expected int"),
    (["train.batch_size=1"], "batch_size must be at least 2"),
    (["swav.temperature=-1"], "swav.temperature must be at least 0.001"),
    (["optim=3"], "optim: expected a mapping"),
    (["train.epochs"], "--set expects key=value"),
    (["method=nope"], "unknown method 'nope'"),
])
def test_bad_values_are_named(sets, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve(sets=sets)


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ConfigError, match="unknown preset 'nope'; available: .*digits-simclr"):
        resolve(preset_name="nope")


def test_every_preset_resolves_and_says_what_it_follows():
    for name in preset_names():
        recipe = preset(name)  # with its base merged in
        if recipe.get("data", {}).get("source") == IMAGENET_PLACEHOLDER:
            with pytest.raises(ConfigError, match=f"preset '{name}' trains on ImageNet: pass --data PATH"):
                check_config(resolve(preset_name=name))
            check_config(resolve(preset_name=name, overrides={"data": {"source": "/data/imagenet"}}))
        elif recipe.get("method") == "distill":  # needs a teacher run, step two also step one's run
            with pytest.raises(ConfigError, match="needs a frozen teacher: pass --teacher"):
                check_config(resolve(preset_name=name))
            teacher = {"distill": {"teacher": "/runs/teacher"}}
            if recipe["model"].get("init_from"):
                with pytest.raises(ConfigError, match=f"preset '{name}' starts from S2-BNN's step one"):
                    check_config(resolve(preset_name=name, overrides=teacher))
                teacher["model"] = {"init_from": "/runs/step-one"}
            check_config(resolve(preset_name=name, overrides=teacher))
        else:
            check_config(resolve(preset_name=name))
        file = read_preset(name)
        assert file.get("about") and file.get("source"), f"preset {name} must state its recipe and its source"


def test_the_placeholders_are_the_presets_own():
    assert preset("imagenet-moco-v2")["data"]["source"] == IMAGENET_PLACEHOLDER  # through its base's base
    assert preset("cifar10-distill-s2bnn-step2")["model"]["init_from"] == INIT_PLACEHOLDER


def test_preset_files_are_strict_yaml_and_state_only_what_their_base_does_not():
    """Each file holds unique keys and no setting that its base (or, without one, the defaults with
    the method's recipe) already has: a value is stated once. Every preset names its method and
    data source, itself or through its base."""
    files = [f for f in resources.files("selfsup.presets").iterdir() if f.name.endswith(".yaml")]
    assert {f.name.removesuffix(".yaml") for f in files} == {*preset_names(), "_imagenet", "_methods"}
    for f in files:
        load_yaml(f)  # no duplicate keys, valid YAML
    for name in preset_names():
        recipe = read_preset(name)
        own = {k: v for k, v in recipe.items() if k not in ("about", "source", "base")}
        base = preset_settings(recipe["base"]) if "base" in recipe else {}
        inherited = {("method", None) if "method" in base else None,
                     ("data", "source") if "source" in base.get("data", {}) else None}
        assert preset(name)["method"] and preset(name)["data"]["source"], name
        settings = resolve(overrides=merge(base, own)).to_dict()
        for section, value in own.items():
            for key in (value if isinstance(value, dict) else [None]):
                if (section, key) in {("method", None), ("data", "source")} - inherited:  # what the preset is
                    continue
                less = {**own, section: {k: v for k, v in value.items() if k != key}} if key else \
                    {k: v for k, v in own.items() if k != section}
                try:
                    restated = resolve(overrides=merge(base, less)).to_dict() == settings
                except ConfigError:  # needed: without it the preset is not even valid
                    restated = False
                assert not restated, f"preset {name} restates {section}{'.' + key if key else ''}"


def test_the_method_recipes_state_only_what_differs_from_the_defaults():
    defaults = Config().to_dict()
    assert set(METHOD_DEFAULTS) < set(METHOD_NAMES)
    for method, recipe in METHOD_DEFAULTS.items():
        for section, values in recipe.items():
            for key, x in values.items():
                assert x != defaults[section][key], f"the {method} recipe restates {section}.{key}={x!r}"


def test_the_config_names_every_method_and_backbone():
    assert set(METHOD_NAMES) == set(METHODS)
    assert BACKBONE_NAMES == BUILT_BACKBONES  # ResNets, binary ResNets, ViTs, in build_backbone's order


def test_bad_yaml_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        resolve(file=f)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve(file=tmp_path / "missing.yaml")
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        resolve(file=f)


def test_a_preset_with_a_base_changes_only_what_it_names():
    dcl, dclw = resolve(preset_name="cifar10-simclr-dcl"), resolve(preset_name="cifar10-simclr-dclw")
    assert (dclw.loss, dclw.dclw_sigma) == ("dclw", 0.5)
    assert dclw.simclr.temperature == dcl.simclr.temperature and dclw.optim == dcl.optim and dclw.train == dcl.train
    assert preset("cifar10-simclr-dcl")["loss"] == "dcl"  # the base itself is untouched


def test_simclrv2_memory_in_its_collapse_region_is_refused():
    with pytest.raises(ConfigError, match=r"memory.size 4096 with simclr.temperature 0.5 at train.batch_size 256 "
                                          r"collapses: above 1386 keys"):
        check_config(resolve(sets=["train.batch_size=256", "memory.size=4096", "simclr.temperature=0.5"]))
    check_config(resolve(sets=["train.batch_size=256", "memory.size=512", "simclr.temperature=0.5"]))  # 2 batches: below
    check_config(resolve(preset_name="cifar10-simclr-v2-small"))  # memory 16 batches at the paper's T 0.1
