"""Bad input, tried: each case gets a one-line error naming what is wrong (exit 2, no traceback)
or a documented recovery. The files are built by tests/bad_inputs.py.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from selfsup import checkpoint as ckpt
from selfsup.backbones import build_backbone
from selfsup.cli import main
from selfsup.config import ConfigError, resolve
from selfsup.data import load_data

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
    return paths


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
    "batch of one": (["--batch-size", "1"], "train.batch_size must be at least 2"),
    "batch larger than the data": (["--batch-size", "100000"], "fewer than one batch of 100000"),
    "negative time limit": (["--max-minutes", "-5"], "train.max_minutes must be >= 0"),
    "moco queue not whole batches": (["--method", "moco", "--batch-size", "64", "--set", "moco.queue_size=100"],
                                     "must be a multiple of the keys queued per step"),
    # unknown names, with a did-you-mean where one is close
    "unknown key": (["--set", "train.epoch=3"], "unknown config key 'train.epoch'; did you mean 'train.epochs'?"),
    "unknown section": (["--set", "trian.epochs=3"], "unknown config key 'trian'; did you mean 'train'?"),
    "set without =": (["--set", "optim.lr"], "--set expects key=value, got 'optim.lr'"),
    "unknown method": (["--method", "simclrr"], "unknown method 'simclrr'; did you mean 'simclr'?"),
    "unknown preset": (["--preset", "cifar10-simclr-smal"], "did you mean 'cifar10-simclr-small'?"),
    "unknown backbone": (["--backbone", "vgg16"], "model.backbone 'vgg16' unknown; choose resnet18"),
    "unknown device": (["--device", "tpu"], "train.device 'tpu' unknown"),
    "unknown optimiser": (["--set", "optim.name=adam"], "optim.name 'adam' unknown; choose lars, sgd or adamw"),
    "unknown precision": (["--set", "train.precision=fp16"], "train.precision must be auto, bf16 or fp32"),
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
    "images of mixed sizes": ("mixed_sizes", "have different sizes", "pass image_size to resize"),
    "undecodable image": ("corrupt", "junk.png", "--skip-corrupt"),
    "test class missing from train": ("extra_test_class", "class folder(s) that train/ lacks (zebra)", ""),
    "empty folder": ("empty_dir", "no dataset found in folder", "train/<class>/<image>"),
    "file that is not an archive": ("not_archive", "is a file but not a .tar", ""),
}


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
    "eval with k = 0": (["eval", "knn", "--checkpoint", "{run}", "--data", "digits", "--k", "0"],
                        "--k must be positive, got 0"),
    "eval on data without a test split": (["eval", "knn", "--checkpoint", "{run}", "--data", "{only_train}",
                                           "--device", "cpu"], "has no labelled test split"),
    "export to an unknown format": (["export", "{run}", "--format", "onnx"], "invalid choice: 'onnx'"),
    "report with too few points": (["report", "{run}", "--points", "1"], "--points must be at least 2"),
    "unknown command": (["train"], "invalid choice: 'train'"),
}


@pytest.mark.parametrize("args,message", OTHER_CASES.values(), ids=OTHER_CASES.keys())
def test_other_commands(args, message, files, tmp_path, capsys):
    args = [a.format(tmp=tmp_path, **files) for a in args]
    _one_line_error(capsys, main(args), message)


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
