"""Bad input, tried: each case gets a one-line error naming what is wrong (exit 2, no traceback)
or a documented recovery. The files are built by tests/bad_inputs.py.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import torch

from selfsup import checkpoint as ckpt
from selfsup.augment import simclr_view
from selfsup.backbones import build_backbone
from selfsup.cli import main
from selfsup.config import ConfigError, resolve
from selfsup.data import DataError, load_data
from selfsup.stream import ImageStream, StreamLoader

sys.path.insert(0, str(Path(__file__).parent))
import bad_inputs  # noqa: E402

FAST = ["--epochs", "1", "--device", "cpu", "--no-progress", "--set", "model.width=0.125"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    paths = bad_inputs.build(root)
    run = root / "run"  # a backbone.pt with its description, as training leaves it
    run.mkdir()
    ckpt.save_atomic(build_backbone("resnet18", width=0.125, cifar_stem=True).state_dict(), run / "backbone.pt")
    meta = {"backbone": "resnet18", "width": 0.125, "cifar_stem": True, "image_size": 8, "data_image_size": 8,
            "mean": [0.5] * 3, "std": [0.5] * 3, "method": "simclr", "data": "digits"}
    (run / "backbone.json").write_text(json.dumps(meta))
    paths["run"] = run
    bad_json = root / "bad_json"
    bad_json.mkdir()
    (bad_json / "backbone.pt").write_bytes((run / "backbone.pt").read_bytes())
    (bad_json / "backbone.json").write_text('{"backbone": "resnet18",')
    paths["bad_json"] = bad_json
    truncated = root / "truncated_ckpt"
    truncated.mkdir()
    data = (run / "backbone.pt").read_bytes()
    (truncated / "backbone.pt").write_bytes(data[: len(data) // 3])
    (truncated / "backbone.json").write_text(json.dumps(meta))
    paths["truncated_ckpt"] = truncated
    for name, damage in DAMAGED_SPECS.items():  # issue 28: backbone.json edited by hand
        folder = root / name
        folder.mkdir()
        (folder / "backbone.pt").write_bytes((run / "backbone.pt").read_bytes())
        (folder / "backbone.json").write_text(json.dumps({**meta, **damage}))
        paths[name] = folder
    return paths


#: backbone.json fields damaged by hand, each a run folder of :func:`files`
DAMAGED_SPECS = {"width_text": {"width": "0.5"}, "short_mean": {"mean": [0.5, 0.5]}, "image_size_0": {"image_size": 0},
                 "vit_with_width": {"backbone": "vit_tiny", "width": 0.5}}


def _one_line_error(capsys, rc: int, message: str, code: int = 2) -> None:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("selfsup")]  # INFO notes may precede
    assert rc == code and len(errors) == 1 and message in errors[0], (rc, err)


PRETRAIN_CASES = {
    # wrong types
    "int given text": (["--set", "train.batch_size=abc"], "train.batch_size: expected int, got 'abc'"),
    "int given a bool": (["--set", "train.epochs=true"], "train.epochs: expected an integer, got True"),
    "required value null": (["--set", "moco.temperature=null"], "moco.temperature: must not be empty"),
    "section given a scalar": (["--set", "optim=3"], "optim: expected a mapping of"),
    "flag not an int": (["--epochs", "ten"], "argument --epochs: invalid int value: 'ten'"),
    # negative or zero sizes and out-of-range values
    "negative epochs": (["--epochs", "-1"], "train.epochs must be at least 1"),
    "negative width": (["--set", "model.width=-0.5"], "model.width must be positive"),
    "negative image size": (["--set", "data.image_size=-8"], "data.image_size must be at least 8"),
    "zero learning rate": (["--set", "optim.lr=0"], "optim.lr must be positive"),
    "negative weight decay": (["--set", "optim.weight_decay=-1e-4"], "optim.weight_decay must be >= 0"),
    "crop scale above 1": (["--set", "aug.scale_min=1.5"], "aug.scale_min must be in (0, 1]"),
    # issue 25: every view setting, each range checked with the key named
    "vertical flip above 1": (["--set", "aug.vflip_p=1.5"], "aug.vflip_p must be in [0, 1], got 1.5"),
    "negative quarter-turn probability": (["--set", "aug.rot90_p=-0.1"], "aug.rot90_p must be in [0, 1], got -0.1"),
    "hue beyond half a turn": (["--set", "aug.hue=0.7"], "aug.hue must be in [0, 0.5] (turns), got 0.7"),
    "negative brightness": (["--set", "aug.brightness=-1"], "aug.brightness must be >= 0, got -1.0"),
    "view 2 blur above 1": (["--set", "aug.view2.blur_p=2"], "aug.view2.blur_p must be in [0, 1], got 2.0"),
    "local crop scale above 1": (["--set", "aug.local.scale=[0.5,2]"],
                                 "aug.local.scale must be [lo, hi] with 0 < lo <= hi <= 1, got [0.5, 2.0]"),
    "ratio the wrong way round": (["--set", "aug.ratio=[2,1]"], "aug.ratio must be [lo, hi] with 0 < lo <= hi, got [2.0, 1.0]"),
    "blur sigma of 0": (["--set", "aug.view1.blur_sigma=[0,1]"], "aug.view1.blur_sigma must be [lo, hi] with 0 < lo"),
    "range given one number": (["--set", "aug.ratio=1"], "aug.ratio: expected a list of 2 numbers, e.g. aug.ratio=[0.5,1.0], got 1"),
    "infinite ratio": (["--set", "aug.ratio=[1,.inf]"], "aug.ratio must be a finite number"),
    "unknown view": (["--set", "aug.view3.blur_p=1"], "unknown config key 'aug.view3'; did you mean 'aug.view2'?"),
    "batch of one": (["--batch-size", "1"], "train.batch_size must be at least 2"),
    "batch larger than the data": (["--batch-size", "100000"], "fewer than one batch of 100000"),
    "negative time limit": (["--max-minutes", "-5"], "train.max_minutes must be >= 0"),
    "moco queue not whole batches": (["--method", "moco", "--batch-size", "64", "--set", "moco.queue_size=100"],
                                     "must be a multiple of the keys queued per step"),
    # non-finite and out-of-range numbers (issue 17): refused at resolve time with the key named
    "infinite lr": (["--set", "optim.lr=inf"], "optim.lr must be a finite number, got inf"),
    "infinite warm-up": (["--set", "optim.warmup_epochs=inf"], "optim.warmup_epochs must be a finite number"),
    "infinite width": (["--set", "model.width=inf"], "model.width must be a finite number, got inf"),
    "NaN momentum": (["--set", "moco.momentum=nan"], "moco.momentum must be a finite number, got nan"),
    "NaN teacher temperature": (["--set", "dino.teacher_temp=.nan"], "dino.teacher_temp must be a finite number"),
    "infinite time limit": (["--set", "train.max_minutes=inf"], "train.max_minutes must be a finite number"),
    "tiny temperature": (["--set", "simclr.temperature=1e-30"], "simclr.temperature must be at least 0.001"),
    "tiny DINO student temperature": (["--set", "dino.student_temp=1e-9"], "dino.student_temp must be at least"),
    "negative final lr": (["--set", "optim.final_lr=-5"], "optim.final_lr must be in [0, 1]"),
    "optimiser momentum of 1.5": (["--set", "optim.momentum=1.5"], "optim.momentum must be in [0, 1)"),
    "two presets": (["--preset", "digits-simclr", "--set", "preset=cifar10-simclr"],
                    "--set preset=cifar10-simclr contradicts the preset 'digits-simclr'"),
    "--set preset is applied": (["--set", "preset=cifar10-simclr-smal"], "did you mean 'cifar10-simclr-small'?"),
    # issue 16's methods and ViTs
    "ViT given a width": (["--backbone", "vit_tiny", "--set", "model.width=0.5", "model.patch_size=4"],
                          "width 0.5 applies to ResNets only"),
    "drop path on a ResNet": (["--set", "model.drop_path=0.1"], "drop_path=0.1 applies to ViTs only"),
    "drop path of 1": (["--backbone", "vit_tiny", "--set", "model.drop_path=1"], "model.drop_path must be in [0, 1)"),
    "views not whole patches": (["--backbone", "vit_tiny", "--set", "model.width=1", "model.patch_size=5"], "multiple of"),
    "weight-decay schedule without decay": (["--set", "optim.weight_decay=0", "optim.final_weight_decay=0.4"],
                                            "optim.final_weight_decay schedules"),
    "negative final weight decay": (["--set", "optim.final_weight_decay=-1"], "optim.final_weight_decay must be >= 0"),
    "negative Barlow Twins lambda": (["--method", "barlow_twins", "--set", "barlow_twins.lambd=-1"],
                                     "barlow_twins.lambd must be >= 0"),
    "Barlow Twins with multi-crop": (["--method", "barlow_twins", "--set", "multicrop.local_crops=2"],
                                     "barlow_twins takes exactly two views"),
    "negative VICReg coefficient": (["--method", "vicreg", "--set", "vicreg.std_coeff=-1"],
                                    "vicreg.sim_coeff, vicreg.std_coeff and vicreg.cov_coeff must be >= 0"),
    "tiny MoCo v3 temperature": (["--method", "mocov3", "--set", "mocov3.temperature=1e-6"],
                                 "mocov3.temperature must be at least 0.001"),
    "MoCo v3 momentum above 1": (["--method", "mocov3", "--set", "mocov3.momentum=1.5"],
                                 "mocov3.momentum must be in [0, 1]"),
    "NNCLR support set not whole batches": (["--method", "nnclr", "--batch-size", "64", "--set", "nnclr.support_size=100"],
                                            "nnclr.support_size 100 must be a multiple of the embeddings queued"),
    # issue 28: settings that make no sense
    "VICReg with every loss weight 0": (["--method", "vicreg", "--set", "vicreg.sim_coeff=0", "vicreg.std_coeff=0",
                                         "vicreg.cov_coeff=0"], "are all 0: the loss would always be zero"),
    "a loss BYOL never reads": (["--method", "byol", "--set", "loss=dcl"],
                                "loss=dcl is read by simclr and moco only; byol's loss is its own"),
    "a loss DINO never reads": (["--method", "dino", "--set", "loss=info_nce"], "dino's loss is its own"),
    "projection too large to allocate": (["--set", "model.proj_dim=100000000"],
                                         "model.proj_dim=100000000 is above 65536 (2^16, 8x Barlow Twins' 8192): one "
                                         "head layer alone would hold 100000000 x 512 float32 weights = 204.8 GB"),
    "hidden layer too large": (["--set", "model.proj_hidden=10000000"], "model.proj_hidden=10000000 is above 65536"),
    "width giving one channel": (["--set", "model.width=0.01"],
                                 "model.width=0.01 gives the ResNet's first stage 1 channel(s) (64 x width); use "
                                 "at least 0.0625 (4 channels)"),
    "negative seed": (["--set", "train.seed=-1"], "train.seed must be in [0, 2^40) = [0, 1099511627776), got -1"),
    "seed beyond 64 bits": (["--set", "train.seed=99999999999999999999"],
                            "train.seed must be in [0, 2^40) = [0, 1099511627776), got 99999999999999999999"),
    # unknown names, with a did-you-mean where one is close
    "unknown key": (["--set", "train.epoch=3"], "unknown config key 'train.epoch'; did you mean 'train.epochs'?"),
    "unknown section": (["--set", "trian.epochs=3"], "unknown config key 'trian'; did you mean 'train'?"),
    "set without =": (["--set", "optim.lr"], "--set expects key=value, got 'optim.lr'"),
    "unknown method": (["--method", "simclrr"], "unknown method 'simclrr'; did you mean 'simclr'?"),
    "unknown preset": (["--preset", "cifar10-simclr-smal"], "did you mean 'cifar10-simclr-small'?"),
    "unknown backbone": (["--backbone", "vgg16"], "model.backbone 'vgg16' unknown; choose resnet18"),
    "unknown device": (["--device", "tpu"], "train.device 'tpu' unknown"),
    "unknown optimiser": (["--set", "optim.name=adam"], "optim.name 'adam' unknown; choose lars, sgd or adamw"),
    "unknown precision": (["--set", "train.precision=fp8"], "train.precision must be auto, bf16, fp16 or fp32"),
    "unknown compile mode": (["--set", "train.compile_mode=fast"], "train.compile_mode 'fast' unknown; choose default, max-autotune-no-cudagraphs, reduce-overhead"),
    # data paths
    "missing data path": (["--data", "/no/such/folder"], "data source '/no/such/folder' not found"),
    "empty data name": (["--data", " "], "data source must be a name or a path"),
}


@pytest.mark.parametrize("args,message", PRETRAIN_CASES.values(), ids=PRETRAIN_CASES.keys())
def test_pretrain_arguments(args, message, tmp_path, capsys):
    data = [] if "--data" in args else ["--data", "digits"]
    rc = main(["pretrain", "--out", str(tmp_path / "out"), *data, *FAST, *args])  # later flags win
    _one_line_error(capsys, rc, message)


FILE_CASES = {
    # data sources
    "truncated tar.gz": ("truncated_tar", "could not read archive", "is it truncated or corrupt?"),
    "truncated zip": ("truncated_zip", "could not read archive", "BadZipFile"),
    "empty archive": ("empty_archive", "could not read archive", "empty file"),
    "empty class folder": ("empty_class", "class folder", "train/b has no images"),
    "class folder of non-images": ("no_images", "train/a has no images", "add images or remove the folder"),
    "undecodable image": ("corrupt", "junk.png", "--skip-corrupt"),
    "test class missing from train": ("extra_test_class", "class folder(s) that train/ lacks (zebra)", ""),
    "empty folder": ("empty_dir", "no dataset found in folder", "train/<class>/<image>"),
    "file that is not an archive": ("not_archive", "is a file but not a .tar", ""),
}


def test_mixed_sizes_in_the_split_layout_train_at_the_default_size(files, tmp_path, capsys):
    """Issue 25: no longer bad input; the size follows the model (64 for the CIFAR stem)."""
    assert main(["pretrain", "--out", str(tmp_path / "out"), "--data", str(files["mixed_sizes"]), "--batch-size", "4",
                 *FAST]) == 0
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["data"]["image_size"] == 64


@pytest.mark.parametrize("name,message,more", FILE_CASES.values(), ids=FILE_CASES.keys())
def test_bad_data_sources(name, message, more, files, tmp_path, capsys):
    rc = main(["pretrain", "--out", str(tmp_path / "out"), "--data", str(files[name]), "--batch-size", "4", *FAST])
    _one_line_error(capsys, rc, message)
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


CONFIG_FILE_CASES = {
    "invalid YAML": ("bad_yaml", "is not valid YAML at line 2"),
    "YAML list": ("list_yaml", "must hold a mapping of keys, got list"),
    "unknown key in YAML": ("unknown_key_yaml", "did you mean 'train.epochs'?"),
    "wrong type in YAML": ("wrong_type_yaml", "train.epochs: expected int, got 'ten'"),
    "section given a scalar in YAML": ("section_scalar_yaml", "optim: expected a mapping"),
    "preset not a name": ("preset_number_yaml", "preset: expected a preset name, got 3"),
}


@pytest.mark.parametrize("name,message", CONFIG_FILE_CASES.values(), ids=CONFIG_FILE_CASES.keys())
def test_bad_config_files(name, message, files, tmp_path, capsys):
    _one_line_error(capsys, main(["pretrain", "--out", str(tmp_path / "o"), "--config", str(files[name])]), message)


def test_config_file_that_does_not_exist(tmp_path, capsys):
    rc = main(["pretrain", "--out", str(tmp_path / "o"), "--config", str(tmp_path / "nope.yaml")])
    _one_line_error(capsys, rc, "nope.yaml' does not exist")


@pytest.mark.parametrize("data,message", [
    ({"train": {"epochs": "5"}}, "train.epochs: expected int, got '5'"),
    ({"model": {"cifar_stem": "yes"}}, "model.cifar_stem: expected bool"),
    ({"data": {"image_size": 3.5}}, "data.image_size: expected int or null"),
    ({"eval": {"knn_k": 0}}, "eval.knn_k must be at least 1"),
    ({"eval": {"knn_features": "pooled"}}, "eval.knn_features 'pooled' unknown; use backbone or head"),
])
def test_config_loader_rejects_values(data, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve(overrides=data)


OTHER_CASES = {
    "resume without --out": (["pretrain", "--resume"], "--resume needs --out DIR"),
    "resume with no checkpoint": (["pretrain", "--resume", "--out", "{tmp}"], "no checkpoint.pt in"),
    "eval of a missing run": (["eval", "knn", "--checkpoint", "/no/such/run", "--data", "digits"], "does not exist"),
    "eval of a truncated checkpoint": (["eval", "knn", "--checkpoint", "{truncated_ckpt}", "--data", "digits"],
                                       "is unreadable or truncated"),
    "eval with a broken description": (["eval", "knn", "--checkpoint", "{bad_json}", "--data", "digits"],
                                       "backbone.json' is not valid JSON"),
    "eval of a description with a width as text": (["eval", "knn", "--checkpoint", "{width_text}", "--data", "digits"],
                                                   "width_text/backbone.json: width must be a positive number, got '0.5'"),
    "eval of a description with 2 means for 3 channels": (
        ["eval", "knn", "--checkpoint", "{short_mean}", "--data", "digits"],
        "short_mean/backbone.json: mean must be a list of 3 finite numbers (one per colour channel), got [0.5, 0.5]"),
    "eval of a description with image size 0": (["eval", "knn", "--checkpoint", "{image_size_0}", "--data", "digits"],
                                                "image_size_0/backbone.json: image_size must be a whole number >= 1, got 0"),
    "eval of a ViT described with a width": (["eval", "knn", "--checkpoint", "{vit_with_width}", "--data", "digits"],
                                             "its description builds no backbone: width 0.5 applies to ResNets only"),
    "eval with k = 0": (["eval", "knn", "--checkpoint", "{run}", "--data", "digits", "--k", "0"],
                        "--k must be a positive finite number, got 0"),
    "eval with an infinite lr": (["eval", "linear", "--checkpoint", "{run}", "--data", "digits", "--lr", "inf"],
                                 "--lr must be a positive finite number, got inf"),
    "eval with a NaN temperature": (["eval", "knn", "--checkpoint", "{run}", "--data", "digits", "--t", "nan"],
                                    "--t must be a positive finite number, got nan"),
    "eval on data without a test split": (["eval", "knn", "--checkpoint", "{run}", "--data", "{only_train}",
                                           "--device", "cpu"], "has no labelled test split"),
    "export to an unknown format": (["export", "{run}", "--format", "onnx"], "invalid choice: 'onnx'"),
    "report with too few points": (["report", "{run}", "--points", "1"], "--points must be at least 2"),
    "unknown command": (["train"], "invalid choice: 'train'"),
    "views into a non-PNG file": (["views", "--out", "{tmp}/views.jpg"], "must name a .png file"),
    "views of no images": (["views", "--out", "{tmp}/v.png", "--images", "0"], "--images and --views must be at least 1"),
    "views with a bad key": (["views", "--out", "{tmp}/v.png", "--set", "aug.vflip=0.5"],
                             "unknown config key 'aug.vflip'; did you mean 'aug.vflip_p'?"),
}


@pytest.mark.parametrize("args,message", OTHER_CASES.values(), ids=OTHER_CASES.keys())
def test_other_commands(args, message, files, tmp_path, capsys):
    args = [a.format(tmp=tmp_path, **files) for a in args]
    _one_line_error(capsys, main(args), message)


# ------------------------------------------------------------------------------------------------
# fine-tuning, distillation, the recipe: damaged runs and what --resume may not change

STEP_CASES = {
    "finetune from a checkpoint without its settings": (["finetune", "--checkpoint", "{no_config}"],
                                                        "holds no settings ('config') to rebuild its network"),
    "finetune from settings that are text": (["finetune", "--checkpoint", "{text_config}"],
                                             "holds no settings ('config')"),
    "finetune from another architecture's weights": (["finetune", "--checkpoint", "{other_weights}"],
                                                     "does not fit a simclr model with a resnet18"),
    "finetune from a checkpoint without its description": (["finetune", "--checkpoint", "{no_meta}"],
                                                           "is a JSON NoneType, not an object"),
    "head features without the settings": (["eval", "knn", "--checkpoint", "{no_config}", "--data", "digits",
                                            "--features", "head"], "--features head: "),
    "resume of a bad epoch count": (["pretrain", "--resume", "--out", "{bad_epoch}"],
                                    "holds no count of epochs done ('epoch': 'x')"),
    "pretrain resume of a fine-tuned run": (["pretrain", "--resume", "--out", "{finetuned}"],
                                            "holds a finetune run, not a pretrain run; continue it with selfsup finetune"),
    "finetune resume of a pre-training run": (["finetune", "--resume", "--out", "{pretrained}"],
                                              "holds a pretrain run, not a finetune run"),
    "distill resume of a fine-tuned run": (["distill", "--resume", "--out", "{finetuned}"],
                                           "holds a finetune run, not a distill run"),
    "distill resume of an empty folder": (["distill", "--resume", "--out", "{tmp}"], "no checkpoint.pt in"),
    "finetune resume without --out": (["finetune", "--resume"], "--resume needs --out DIR"),
    "finetune without --checkpoint": (["finetune", "--out", "{tmp}"], "--checkpoint is required"),
    "distill without --teacher": (["distill", "--out", "{tmp}"], "--teacher is required"),
    "semisup without --data": (["semisup", "--out", "{tmp}"], "--data is required"),
    "semisup resume without its plan": (["semisup", "--resume", "--out", "{tmp}"], "no semisup.yaml in"),
    "semisup resume of a damaged plan": (["semisup", "--resume", "--out", "{bad_plan}"],
                                         "is not the plan a semisup run wrote"),
    "semisup resume with new data": (["semisup", "--resume", "--out", "{bad_plan}", "--data", "cifar10"],
                                     "--data cannot change"),
    "resume changing the optimiser": (["finetune", "--resume", "--out", "{finetuned}", "--set", "optimizer=sgd"],
                                      "optimizer cannot change on resume (only epochs, lr"),
    "resume changing the labels": (["finetune", "--resume", "--out", "{finetuned}", "--labels", "20"],
                                   "labels cannot change on resume"),
    "resume with an unknown key": (["finetune", "--resume", "--out", "{finetuned}", "--set", "nope=1"],
                                   "unknown config key 'nope'"),
    "resume with no epochs": (["finetune", "--resume", "--out", "{finetuned}", "--epochs", "0"],
                              "finetune: epochs must be at least 1"),
    "finetune with an infinite lr": (["finetune", "--checkpoint", "{pretrained}", "--lr", "inf"],
                                     "finetune: lr must be a finite number, got inf"),
    "finetune with a NaN momentum": (["finetune", "--checkpoint", "{pretrained}", "--set", "momentum=nan"],
                                     "finetune: momentum must be a finite number, got nan"),
    "finetune checkpointing every 0 epochs": (["finetune", "--checkpoint", "{pretrained}", "--set",
                                               "checkpoint_every=0"], "checkpoint_every must be at least 1"),
    "distill at a vanishing temperature": (["distill", "--teacher", "{finetuned}", "--temperature", "1e-30"],
                                           "distill: temperature must be at least 0.001"),
    "a fine-tuned run as a distillation teacher": (["pretrain", "--method", "distill", "--teacher", "{finetuned}",
                                                    "--data", "digits", "--out", "{tmp}"],
                                                   "is a fine-tuning run (selfsup finetune); a distillation teacher is "
                                                   "a pre-training run (selfsup pretrain)"),
    "finetune with a negative seed": (["finetune", "--checkpoint", "{pretrained}", "--set", "seed=-1"],
                                      "finetune: seed must be in [0, 2^40)"),
    "finetune with a huge label seed": (["finetune", "--checkpoint", "{pretrained}", "--set", "label_seed=99999999999999999999"],
                                        "finetune: label_seed must be in [0, 2^40)"),
    "a ViT student given a width": (["distill", "--teacher", "{finetuned}", "--student", "vit_tiny", "--set", "width=0.5"],
                                    "distill: width 0.5 applies to ResNet students; a vit_tiny has a fixed width"),
    "a patch size for a ResNet student": (["distill", "--teacher", "{finetuned}", "--set", "patch_size=4"],
                                          "distill: patch_size 4 must be at least 1, for a ViT student (not resnet18)"),
    "pretrain with a fine-tuned run's config": (["pretrain", "--config", "{finetuned}/config.yaml"],
                                                "holds the settings of a selfsup finetune run, not of a pre-training"),
    "finetune into a file": (["finetune", "--checkpoint", "{pretrained}", "--out", "{a_file}"],
                             "is a file, not a folder"),
}


@pytest.fixture(scope="module")
def damaged(pretrained, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("damaged")
    finetuned = root / "ft"
    assert main(["finetune", "--checkpoint", str(pretrained), "--labels", "10", "--epochs", "1",
                 "--batch-size", "32", "--device", "cpu", "--out", str(finetuned)]) == 0
    return bad_inputs.build_runs(root, pretrained, finetuned)


@pytest.mark.parametrize("args,message", STEP_CASES.values(), ids=STEP_CASES.keys())
def test_damaged_runs_and_step_settings(args, message, damaged, tmp_path, capsys):
    args = [a.format(tmp=tmp_path / "out", **damaged) for a in args] + ["--device", "cpu"]
    capsys.readouterr()
    _one_line_error(capsys, main(args), message)


def test_a_recipe_into_a_used_folder(damaged, capsys):
    capsys.readouterr()
    _one_line_error(capsys, main(["semisup", "--data", "digits", "--out", str(damaged["used_recipe"])]),
                    "already holds a semisup run (semisup.yaml); pass --resume", code=1)


# ------------------------------------------------------------------------------------------------
# documented recoveries


def test_grayscale_rgba_palette_and_bilevel_images_are_converted_to_rgb(files):
    splits = load_data(str(files["modes"]))
    assert splits.train.images.shape == (6, 8, 8, 3) and splits.train.images.dtype == np.uint8
    from PIL import Image
    gray = next(p for p in sorted((files["modes"] / "train").rglob("*.png")) if Image.open(p).mode == "L")
    row = sorted((files["modes"] / "train").rglob("*.png")).index(gray)
    pixel = np.asarray(Image.open(gray))
    assert all(np.array_equal(splits.train.images[row][..., c], pixel) for c in range(3))  # gray in R, G and B


def test_mixed_sizes_are_resized_when_image_size_is_given(files):
    splits = load_data(str(files["mixed_sizes"]), image_size=8)
    assert splits.train.images.shape == (7, 8, 8, 3)


def test_undecodable_images_are_skipped_and_counted_on_request(files):
    with pytest.warns(UserWarning, match=r"skipped 1 corrupt image\(s\).*junk.png"):
        splits = load_data(str(files["corrupt"]), skip_corrupt=True)
    assert len(splits.train) == 6


def test_an_untrusted_checkpoint_never_runs_code(tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"model": Payload()}, tmp_path / "checkpoint.pt")
    rc = main(["pretrain", "--out", str(tmp_path), "--resume", "--device", "cpu"])
    out = capsys.readouterr()
    assert rc == 2 and "refusing to load" in out.err and "this must never run" not in out.out


# ---------------------------------------------------------------------------------------------
# Labelled subsets for fine-tuning (issue 7): a label file with bad indices, impossible requests

LABEL_CASES = {
    "label file with a word": ("3\nseven\n", "labels.txt:2: 'seven' is not an image index"),
    "label file with a negative index": ("4\n-1\n", "labels.txt:2: '-1' is not an image index"),
    "label file index out of range": ("1\n99999\n", "labels.txt:2: index 99999 is out of range"),
    "label file with a duplicate": ("5\n6\n5\n", "labels.txt:3: index 5 is listed twice (first on line 1)"),
    "empty label file": ("\n", "lists no image index"),
    "zero per cent": (None, "a fraction must be in (0%, 100%]"),
    "more labels per class than exist": (None, "has only"),
}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pre") / "run"
    assert main(["pretrain", "--out", str(out), "--data", "digits", "--batch-size", "64",
                 *FAST, "data.image_size=8", "eval.knn_every=0"]) == 0
    return out


@pytest.mark.parametrize("content,message", LABEL_CASES.values(), ids=LABEL_CASES.keys())
def test_bad_label_subsets(content, message, pretrained, tmp_path, capsys):
    if content is not None:  # a file of image indices, one per line
        spec = str(tmp_path / "labels.txt")
        Path(spec).write_text(content)
    else:  # a fraction or a count per class that cannot be met
        spec = "0%" if "fraction" in message else "100000"
    capsys.readouterr()
    rc = main(["finetune", "--checkpoint", str(pretrained), "--data", "digits", "--labels", spec,
               "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "ft")])
    _one_line_error(capsys, rc, message)


# ---------------------------------------------------------------------------------------------
# Symlinks, named pipes, archives with duplicate or oversized members, odd config files (issue 17).
# Every case is the real thing: real links, real FIFOs, real archives.


@pytest.fixture(scope="module")
def faults(tmp_path_factory) -> dict[str, Path]:
    return bad_inputs.build_faults(tmp_path_factory.mktemp("faults"))


@pytest.fixture
def no_hang():
    """Fail, rather than hang, a test whose code blocks (on a named pipe) for more than 20 s."""
    def hung(signum, frame):
        raise TimeoutError("blocked for 20 s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


FAULT_CASES = {
    "dir symlink to the root in a class folder": ("link_to_root", "train/a/all leads to", "inside the test/ split"),
    "dir symlink from train into test": ("link_into_test", "train/a/more leads to", "inside the test/ split"),
    "file symlink from train into test": ("file_link_into_test", "train/a/9.png leads to", "inside the test/ split"),
    "test split a symlink to train": ("test_is_train", "are the same folder or one holds the other", ""),
    "one folder linked into two splits": ("shared_pool", "test/a/0.png is the file", "which is also in train/"),
    "symlink loop": ("self_loop", "train/a/loop.png is a symbolic link loop", ""),
    "dangling file symlink": ("dangling", "train/a/gone.png is a broken symbolic link (to nowhere.png)", ""),
    "dangling dir symlink": ("dangling_dir", "train/b/more is a broken symbolic link", ""),
    "dir symlink outside the root": ("dir_link_outside", "train/owl leads to", "outside the dataset folder"),
    "file symlink outside the root": ("file_link_outside", "train/a/9.png leads to", "outside the dataset folder"),
    "split symlink outside the root": ("split_link_outside", "/test leads to", "outside the dataset folder"),
    "named pipe as an image": ("fifo_image", "train/a/pipe.png is not a regular file (a named pipe)", ""),
    "tar member listed twice": ("dup_tar", "dup.tar.gz holds the member 'ds/test/a/0.png' twice", ""),
    "zip member listed twice": ("dup_zip", "dup.zip holds the member 'ds/test/a/0.png' twice", ""),
    "zip member over the size limit": ("bomb_zip", "bomb.zip: member 'ds/train/a/huge.png' expands to 4.0 MiB",
                                       "more than the 1 MiB allowed for an image"),
    "tar member over the size limit": ("bomb_tar", "bomb.tar.gz: member 'ds/train/b/huge.png' expands to 4.0 MiB",
                                       "more than the 1 MiB allowed for an image"),
}


@pytest.mark.parametrize("name,message,more", FAULT_CASES.values(), ids=FAULT_CASES.keys())
def test_links_pipes_and_archive_members(name, message, more, faults, tmp_path, capsys, monkeypatch, no_hang):
    monkeypatch.setenv("SELFSUP_MAX_IMAGE_MB", "1")  # the bombs are 4 MiB of zeros, a few KiB packed
    monkeypatch.setenv("SELFSUP_CACHE", str(tmp_path / "cache"))
    rc = main(["pretrain", "--out", str(tmp_path / "out"), "--data", str(faults[name]), "--batch-size", "4", *FAST])
    _one_line_error(capsys, rc, message)
    with pytest.raises(DataError) as e:
        load_data(str(faults[name]), cache_dir=tmp_path / "cache")
    assert message in str(e.value) and more in str(e.value) and "\n" not in str(e.value)


def test_a_bad_image_size_limit_is_named(faults, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SELFSUP_MAX_IMAGE_MB", "lots")
    rc = main(["pretrain", "--out", str(tmp_path / "out"), "--data", str(faults["bomb_zip"]), *FAST])
    _one_line_error(capsys, rc, "SELFSUP_MAX_IMAGE_MB must be a positive number of MiB, got 'lots'")


@pytest.mark.parametrize("name", ["dir_loop", "fifo_other", "fifo_tar"])
def test_link_loops_are_read_once_and_pipes_without_an_image_name_skipped(name, faults, tmp_path, no_hang):
    splits = load_data(str(faults[name]), cache_dir=tmp_path / "cache")
    assert (len(splits.train), len(splits.test)) == (6, 6)  # the images of folder(), each once


def test_a_split_never_holds_another_splits_files_by_real_path(faults, tmp_path):
    splits = load_data(str(faults["dir_loop"]), cache_dir=tmp_path / "cache")
    train = {bytes(im) for im in np.asarray(splits.train.images)}
    assert not train & {bytes(im) for im in np.asarray(splits.test.images)}


FAULT_CONFIG_CASES = {
    "duplicate YAML key": ("duplicate_key_yaml", "duplicate_key_yaml.yaml' sets 'epochs' twice in one mapping "
                                                 "(lines 2 and 4)"),
    "non-UTF-8 config": ("latin1_yaml", "latin1_yaml.yaml' is not UTF-8 text (byte 0xe9 at offset 22)"),
    "directory as --config": ("config_dir", "config_dir.yaml' is a directory; pass a YAML file"),
    "named pipe as --config": ("fifo_yaml", "fifo.yaml' is not a regular file"),
}


@pytest.mark.parametrize("name,message", FAULT_CONFIG_CASES.values(), ids=FAULT_CONFIG_CASES.keys())
def test_odd_config_files(name, message, faults, tmp_path, capsys, no_hang):
    _one_line_error(capsys, main(["pretrain", "--out", str(tmp_path / "o"), "--config", str(faults[name])]), message)


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    (tmp_path / "c.yaml").write_text("base: &b {epochs: 2}\ntrain:\n  <<: *b\n  epochs: 3\n")
    from selfsup.config import load_yaml
    assert load_yaml(tmp_path / "c.yaml")["train"] == {"epochs": 3}


def test_non_utf8_label_file(pretrained, tmp_path, capsys):
    (tmp_path / "labels.txt").write_bytes("3\n4 # f\u00fcnf\n".encode("latin-1"))
    capsys.readouterr()
    rc = main(["finetune", "--checkpoint", str(pretrained), "--data", "digits", "--labels", str(tmp_path / "labels.txt"),
               "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "ft")])
    _one_line_error(capsys, rc, "labels.txt is not UTF-8 text (byte 0xfc at offset 7)")


# Stream mode, exports, report inputs and memory estimates (issue 17, second part).
STREAM = ["--set", "data.stream=true", "data.workers=0", "aug.size=8"]
STREAM_CASES = {k: v for k, v in FAULT_CASES.items() if not v[0].startswith(("dup_", "bomb_"))}  # the folders


@pytest.mark.parametrize("name,message,more", STREAM_CASES.values(), ids=STREAM_CASES.keys())
def test_stream_mode_scans_folders_by_the_same_rules(name, message, more, faults, tmp_path, capsys, no_hang):
    rc = main(["pretrain", "--out", str(tmp_path / "out"), "--data", str(faults[name]), "--batch-size", "4",
               *FAST, *STREAM])
    _one_line_error(capsys, rc, message)


@pytest.fixture(scope="module")
def stream_files(tmp_path_factory) -> dict[str, Path]:
    return bad_inputs.build_stream_faults(tmp_path_factory.mktemp("stream"))


def test_a_corrupt_image_in_stream_mode_is_named_in_one_line(stream_files, tmp_path, capsys):
    rc = main(["pretrain", "--out", str(tmp_path / "out"), "--data", str(stream_files["stream_corrupt"]),
               "--batch-size", "9", *FAST, *STREAM, "data.workers=1"])  # a real worker process decodes
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "worker" not in err, err
    (line,) = [x for x in err.splitlines() if x.startswith("selfsup")]
    assert "train/a/cut.jpg" in line and "--skip-corrupt" in line


def test_skip_corrupt_reaches_stream_mode_from_the_cli(stream_files, tmp_path, capfd):
    with pytest.warns(UserWarning, match=r"skipped corrupt image .*train/a/cut\.jpg"):
        rc = main(["pretrain", "--out", str(tmp_path / "out"), "--data", str(stream_files["stream_corrupt"]),
                   "--batch-size", "9", "--skip-corrupt", *FAST, *STREAM, "data.workers=1"])
    err = capfd.readouterr().err
    assert rc == 0 and "Traceback" not in err, err


def _stream_loader(folder: Path, *, skip_corrupt: bool, workers: int, batch: int = 9) -> StreamLoader:
    views = [simclr_view(8), simclr_view(8)]
    return StreamLoader(ImageStream(folder, skip_corrupt=skip_corrupt), views, batch, torch.device("cpu"),
                        workers=workers)


@pytest.mark.parametrize("workers", [0, 1])
def test_stream_skip_corrupt_replaces_and_counts_the_bad_image(stream_files, workers):
    loader = _stream_loader(stream_files["stream_corrupt"], skip_corrupt=True, workers=workers)  # 9 images
    with pytest.warns(UserWarning, match=r"skipped corrupt image .*train/a/cut\.jpg .*1 skipped so far"):
        batches = [b for epoch in range(2) for b in loader.batches(epoch)]
    assert len(batches) == 2 and all(v.shape == (9, 8, 8, 3) for b in batches for v in b)  # full batches
    assert loader.skipped == 1  # met once per epoch, counted once


def test_stream_refuses_a_pipe_that_replaced_an_image_after_the_scan(stream_files, tmp_path, no_hang):
    import shutil

    folder = shutil.copytree(stream_files["twelve"], tmp_path / "d")
    loader = _stream_loader(folder, skip_corrupt=False, workers=0, batch=12)
    victim = folder / "train" / "b" / "2.png"
    victim.unlink()
    os.mkfifo(victim)
    with pytest.raises(DataError, match=r"cannot decode .*train/b/2\.png .*not a regular file \(a named pipe\)"):
        next(loader.batches(0))


def test_exports_of_a_binary_backbone(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    ckpt.save_atomic(build_backbone("binary-resnet18", width=0.125, cifar_stem=True).state_dict(), run / "backbone.pt")
    meta = {"backbone": "binary-resnet18", "width": 0.125, "cifar_stem": True, "image_size": 8,
            "data_image_size": 8, "mean": [0.5] * 3, "std": [0.5] * 3, "method": "simclr", "data": "digits"}
    (run / "backbone.json").write_text(json.dumps(meta))
    rc = main(["export", str(run), "--format", "torchvision"])
    _one_line_error(capsys, rc, "is a binary-resnet18, which has no torchvision counterpart")
    assert not (run / "backbone-torchvision.pt").exists()
    pytest.importorskip("safetensors")
    from selfsup.runs import load_safetensors

    assert main(["export", str(run), "--format", "safetensors"]) == 0
    _, described = load_safetensors(run / "backbone.safetensors")
    assert described.layout == "selfsup" and described.backbone == "binary-resnet18"


def _report_run(files, tmp_path: Path, metrics: str, evals: dict[str, str] | None = None) -> Path:
    import shutil

    run = shutil.copytree(files["run"], tmp_path / "run")
    (run / "metrics.jsonl").write_text(metrics)
    for name, text in (evals or {}).items():
        (run / name).write_text(text)
    return run


REPORT_ARGS = ["--device", "cpu", "--points", "20", "--queries", "2", "--k", "2"]
GOOD_ROW = '{"epoch": 1, "step": 11, "loss": 4.5, "lr": 0.1}\n'


def test_report_out_that_is_a_folder_or_under_a_file(files, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = _report_run(files, tmp_path, GOOD_ROW)
    rc = main(["report", str(run), "--out", str(tmp_path), *REPORT_ARGS])
    _one_line_error(capsys, rc, f"--out '{tmp_path}' is a folder; pass the HTML file to write")
    (tmp_path / "afile").write_text("x")
    rc = main(["report", str(run), "--out", str(tmp_path / "afile" / "r.html"), *REPORT_ARGS])
    _one_line_error(capsys, rc, "which is a file, not a folder")


def test_report_leaves_out_odd_metrics_lines_and_eval_files_with_a_note(files, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    metrics = (GOOD_ROW + '[1, 2]\n{"epoch": "two", "loss": 1.0}\n{"epoch": 3, "loss": NaN, "lr": "fast"}\n'
               '{"epoch": 4, "loss": 2.0, "l')  # a last line cut short
    evals = {"eval_knn.json": '"just a string"', "eval_linear.json": '{"protocol": "linear", "top1": "high"}',
             "eval_cut.json": '{"top1": 5'}
    run = _report_run(files, tmp_path, metrics, evals)
    assert main(["report", str(run), *REPORT_ARGS]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for where in ("metrics.jsonl line 2 is a JSON list", "metrics.jsonl line 3: 'epoch' must be a whole number",
                  "metrics.jsonl line 4: lr='fast' not a number", "metrics.jsonl line 4: loss=nan (not finite)",
                  "metrics.jsonl line 5 is not valid JSON", "eval_knn.json is not an evaluation result",
                  "eval_linear.json is not an evaluation result", "eval_cut.json is not readable JSON"):
        assert where in err, where
    page = (run / "report" / "index.html").read_text()
    assert "Notes on the input files" in page and "line 2 is a JSON list" in page


def test_report_of_a_metrics_file_with_no_usable_line(files, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = _report_run(files, tmp_path, '{"epoch": true, "loss": 1}\n')
    rc = main(["report", str(run), *REPORT_ARGS])
    _one_line_error(capsys, rc, "has no complete epoch yet; report after the first epoch (")
    rc = main(["report", str(run), *REPORT_ARGS])
    assert "metrics.jsonl line 1: 'epoch' must be a whole number >= 0, got True" in capsys.readouterr().err


def _capped(code: str, limit_gb: float) -> subprocess.CompletedProcess:
    """Run ``code`` in a child Python whose address space is capped, so work that does not fit fails
    there (MemoryError) instead of swapping this machine; the child reports its peak RSS."""
    prelude = (f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({int(limit_gb * 2**30)},) * 2)\n"
               "import atexit; atexit.register(lambda: print('PEAK_MB', resource.getrusage("
               "resource.RUSAGE_SELF).ru_maxrss // 1024))\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, env=env,
                          timeout=120)


def test_digits_at_4096_pixels_is_refused_with_the_estimate_before_allocating():
    t0 = time.perf_counter()
    r = _capped("from selfsup.data import load_data\nload_data('digits', image_size=4096)", limit_gb=8)
    seconds = time.perf_counter() - t0
    assert r.returncode == 1 and "MemoryError" not in r.stderr, r.stderr
    assert "DataError: digits at data.image_size=4096: 1797 images of 4096x4096 need about 196.5 GiB" in r.stderr
    assert "lower data.image_size" in r.stderr
    peak_mb = int(r.stdout.split("PEAK_MB")[1])
    assert peak_mb < 1024 and seconds < 60, (peak_mb, seconds)  # nothing near the 84 GiB of pixels


def test_pretrain_on_digits_at_4096_pixels_is_one_line(tmp_path, capsys):
    rc = main(["pretrain", "--out", str(tmp_path / "out"), "--data", "digits", *FAST,
               "--set", "data.image_size=4096"])
    _one_line_error(capsys, rc, "of memory to decode")


def test_a_folder_that_does_not_fit_under_a_memory_limit_is_refused(stream_files, tmp_path):
    code = (f"from selfsup.data import load_data\n"
            f"load_data({str(stream_files['twelve'])!r}, image_size=4096, cache_dir={str(tmp_path)!r})")
    r = _capped(code, limit_gb=1)  # 12 images of 4096^2 need 1.1 GiB: the ulimit is the limit that counts
    assert r.returncode == 1 and "MemoryError" not in r.stderr, r.stderr
    assert "twelve at image_size=4096: 12 images of 4096x4096 need about 1.1 GiB" in r.stderr
    assert int(r.stdout.split("PEAK_MB")[1]) < 700
