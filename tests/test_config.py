import pytest

from selfsup.config import IMAGENET_PLACEHOLDER, PRESETS, ConfigError, parse_set, preset, resolve


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
    (["swav.temperature=-1"], "swav.temperature must be positive"),
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
    for name in PRESETS:
        recipe = preset(name)  # with its _base merged in
        if recipe.get("data", {}).get("source") == IMAGENET_PLACEHOLDER:
            with pytest.raises(ConfigError, match=f"preset '{name}' trains on ImageNet: pass --data PATH"):
                resolve(preset_name=name)
            resolve(preset_name=name, overrides={"data": {"source": "/data/imagenet"}})
        elif recipe.get("method") == "distill":  # needs a teacher run, step two also step one's run
            with pytest.raises(ConfigError, match="needs a frozen teacher: pass --teacher"):
                resolve(preset_name=name)
            teacher = {"distill": {"teacher": "/runs/teacher"}}
            if recipe["model"].get("init_from"):
                with pytest.raises(ConfigError, match=f"preset '{name}' starts from S2-BNN's step one"):
                    resolve(preset_name=name, overrides=teacher)
                teacher["model"] = {"init_from": "/runs/step-one"}
            resolve(preset_name=name, overrides=teacher)
        else:
            resolve(preset_name=name)
        assert recipe.get("_about"), f"preset {name} must state its recipe"


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
    assert PRESETS["cifar10-simclr-dcl"]["loss"] == "dcl"  # the base itself is untouched


def test_simclrv2_memory_in_its_collapse_region_is_refused():
    with pytest.raises(ConfigError, match=r"memory.size 4096 with simclr.temperature 0.5 at train.batch_size 256 "
                                          r"collapses: above 1386 keys"):
        resolve(sets=["train.batch_size=256", "memory.size=4096", "simclr.temperature=0.5"])
    resolve(sets=["train.batch_size=256", "memory.size=512", "simclr.temperature=0.5"])  # 2 batches: below
    resolve(preset_name="cifar10-simclr-v2-small")  # memory 16 batches at the paper's T 0.1
