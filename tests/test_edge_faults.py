"""Faults at a run's edges (issue 28): data that fails mid-run, data that changed before a
resume, and a run folder edited by hand (config.yaml, metrics.jsonl)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from PIL import Image

from selfsup import checkpoint as ckpt
from selfsup.cli import main
from selfsup.errors import DataError
from selfsup.loader import epoch_permutation
from selfsup.resume import check_same_data
from selfsup.stream import ImageStream

# digits at 8 pixels, a 16-channel ResNet: 22 steps per epoch, seconds per run
TINY = ["--data", "digits", "--batch-size", "64", "--device", "cpu", "--no-progress",
        "--set", "data.image_size=8", "model.width=0.125", "eval.knn_every=0", "optim.warmup_epochs=1"]
CPU = ["--device", "cpu", "--no-progress"]


def _write_images(root, n: int):
    """``n`` small PNGs of a few sizes, each a colour of its own with a stripe (views differ)."""
    for i in range(n):
        d = root / "train" / f"c{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        im = Image.new("RGB", (20 + i % 5, 18 + i % 3), (i * 3 % 256, 255 - i, 40 + i % 7 * 30))
        im.paste((255, 255, 255), (i % 10, 0, i % 10 + 3, 18))
        im.save(d / f"{i:03d}.png")
    return root


def _weights(run) -> dict:
    return ckpt.load(run / "checkpoint.pt")["model"]


def _losses(run) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def _first_read_in_epoch_3(n: int, batch: int) -> tuple[int, int, int]:
    """A seed, an image and its step in epoch 3 such that the image is first read there, after
    that epoch's first step: the epochs before drop it with their last partial batch."""
    used = n // batch * batch
    for seed in range(500):
        perms = [epoch_permutation(n, seed, e).tolist() for e in range(3)]
        for image in perms[0][used:]:
            if image in perms[1][used:] and batch <= perms[2].index(image) < used:
                return seed, image, perms[2].index(image) // batch
    raise AssertionError("no seed reads an image first in epoch 3")


def test_data_failing_mid_run_checkpoints_then_resumes_to_uninterrupted_weights(tmp_path, capsys):
    """A streamed file that cannot be read in epoch 3 stops the run after a checkpoint of the steps
    done; --resume once the file is repaired ends with the weights of a run on intact data."""
    n, batch = 70, 16  # 4 steps an epoch; 6 images dropped with the last partial batch
    seed, image, step = _first_read_in_epoch_3(n, batch)
    data = _write_images(tmp_path / "data", n)
    args = ["pretrain", "--method", "simclr", "--data", str(data), "--epochs", "3", "--batch-size", str(batch), *CPU,
            "--set", "data.stream=true", "data.workers=0", "aug.size=16", "model.width=0.125",
            f"train.seed={seed}", "eval.knn_every=0"]
    reference, out = tmp_path / "reference", tmp_path / "run"
    assert main([*args, "--out", str(reference)]) == 0

    bad = ImageStream(data).files[image]
    good = tmp_path / "good.png"
    shutil.copy(bad, good)
    with open(bad, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not an image any more")
    assert main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"cannot decode {bad}" in err and f"step {step}/4 of epoch 3" in err
    assert f"continue with: selfsup pretrain --out {out} --resume" in err and len(err.strip().splitlines()) == 1
    state = ckpt.load(out / "checkpoint.pt")
    assert state["epoch"] == 2 and state["partial_epoch"]["steps"] == step == state["step"] - 8

    shutil.copy(good, bad)  # repaired
    assert main(["pretrain", "--out", str(out), "--resume", *CPU]) == 0
    a, b = _weights(reference), _weights(out)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert _losses(reference) == _losses(out)


def test_resume_on_changed_data_is_refused_by_name_unless_allowed(tmp_path, capsys):
    data = _write_images(tmp_path / "data", 40)
    out = tmp_path / "run"
    assert main(["pretrain", "--data", str(data), "--epochs", "1", "--batch-size", "16", *CPU, "--out", str(out),
                 "--set", f"data.cache_dir={tmp_path / 'cache'}", "model.width=0.125", "eval.knn_every=0"]) == 0
    before = ckpt.load(out / "checkpoint.pt")["data"]
    assert before["source"] == str(data) and len(before["image_size"]) == 2
    for path in sorted((data / "train").rglob("*.png"))[:8]:
        path.unlink()
    resume = ["pretrain", "--out", str(out), "--resume", "--epochs", "2", *CPU]
    assert main(resume) == 2
    err = capsys.readouterr().err
    assert f"--resume: the data changed since the checkpoint: {before['images']} images then, " \
           f"{before['images'] - 8} images now; files (names, sizes, times) " in err
    assert err.rstrip().endswith(f"(data.source {data}); pass --data-changed-ok to continue anyway")
    assert ckpt.load(out / "checkpoint.pt")["epoch"] == 1  # untouched
    assert main([*resume, "--data-changed-ok"]) == 0
    assert "continuing on the new data (--data-changed-ok)" in capsys.readouterr().out
    state = ckpt.load(out / "checkpoint.pt")
    assert state["epoch"] == 2 and state["data"]["images"] == before["images"] - 8


def test_resume_after_an_image_was_rewritten_in_place_is_refused(tmp_path, capsys):
    """Same count, same size: the cache key (the files' names, sizes and times) still tells."""
    data = _write_images(tmp_path / "data", 40)
    out = tmp_path / "run"
    assert main(["pretrain", "--data", str(data), "--epochs", "1", "--batch-size", "16", *CPU, "--out", str(out),
                 "--set", f"data.cache_dir={tmp_path / 'cache'}", "model.width=0.125", "eval.knn_every=0"]) == 0
    assert len(ckpt.load(out / "checkpoint.pt")["data"]["cache_key"]) == 64
    first = sorted((data / "train").rglob("*.png"))[0]
    first.write_bytes(sorted((data / "train").rglob("*.png"))[1].read_bytes())  # another image's bytes
    assert main(["pretrain", "--out", str(out), "--resume", "--epochs", "2", *CPU]) == 2
    err = capsys.readouterr().err
    assert "the data changed since the checkpoint: files (names, sizes, times)" in err and "images then" not in err


def test_resume_from_a_checkpoint_without_a_data_record_goes_on(tmp_path):
    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), "--epochs", "1", *TINY]) == 0
    state = ckpt.load(out / "checkpoint.pt")
    del state["data"]  # as an older selfsup wrote it
    ckpt.save_atomic(state, out / "checkpoint.pt")
    assert main(["pretrain", "--out", str(out), "--resume", "--epochs", "2", *CPU]) == 0
    assert ckpt.load(out / "checkpoint.pt")["epoch"] == 2


def _edit_config(out, section: str, key: str, value) -> None:
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    cfg[section][key] = value
    (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def test_hand_edited_config_yaml_is_honoured_when_resumable_and_refused_otherwise(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), "--epochs", "1", *TINY]) == 0
    momentum = yaml.safe_load((out / "config.yaml").read_text())["optim"]["momentum"]
    _edit_config(out, "optim", "momentum", 0.5)
    resume = ["pretrain", "--out", str(out), "--resume", *CPU]
    assert main(resume) == 2
    assert (f"{out / 'config.yaml'}: optim.momentum was edited to 0.5 but the checkpoint was trained with "
            f"{momentum}; resume cannot change it (put it back, or start a new run)") in capsys.readouterr().err
    _edit_config(out, "optim", "momentum", momentum)
    _edit_config(out, "train", "epochs", 2)  # resumable: as if passed with --set
    assert main(resume) == 0
    printed = capsys.readouterr().out
    assert f"resume: train.epochs = 2 taken from '{out / 'config.yaml'}' (edited by hand)" in printed
    state = ckpt.load(out / "checkpoint.pt")
    assert state["epoch"] == 2 and state["config"]["train"]["epochs"] == 2
    # the command line wins over the file
    _edit_config(out, "train", "epochs", 5)
    assert main([*resume, "--epochs", "3"]) == 0
    assert ckpt.load(out / "checkpoint.pt")["epoch"] == 3


def test_a_non_utf8_line_in_metrics_is_dropped_with_a_warning_on_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), "--epochs", "1", *TINY]) == 0
    metrics = out / "metrics.jsonl"
    metrics.write_bytes(b'{"epoch": 0, "note": "\xff\xfe"}\n' + metrics.read_bytes())
    assert main(["pretrain", "--out", str(out), "--resume", "--epochs", "2", *CPU]) == 0
    captured = capsys.readouterr()
    assert f"warning: '{metrics}' line 1 is not UTF-8 text (byte 0xff at column 23); dropped it" in captured.out
    assert "Traceback" not in captured.err
    assert [json.loads(x)["epoch"] for x in metrics.read_text(encoding="utf-8").splitlines()] == [1, 2]


@pytest.mark.parametrize("text", ["optim: [unclosed", "- a list\n"])
def test_an_unreadable_config_yaml_refuses_resume_naming_the_file(text, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), "--epochs", "1", *TINY]) == 0
    (out / "config.yaml").write_text(text)
    assert main(["pretrain", "--out", str(out), "--resume", "--epochs", "2", *CPU]) == 2
    err = capsys.readouterr().err
    assert f"'{out / 'config.yaml'}' cannot be read back" in err and "delete it" in err


def test_a_stream_whose_files_changed_but_not_their_count_is_named(capsys):
    then = {"source": "shards/", "images": 9, "index": "a" * 64}
    with pytest.raises(DataError, match=r"index aaaaaaaaaaaa then, index bbbbbbbbbbbb now \(data.source shards/\)"):
        check_same_data({"data": then}, {**then, "index": "b" * 64}, allow=False)
    check_same_data({"data": then}, {**then, "index": "b" * 64}, allow=True)
    assert "continuing on the new data" in capsys.readouterr().out
    check_same_data({}, then, allow=False)  # an older checkpoint: no record, no check


def test_finetune_resume_on_changed_data_is_refused_by_name_unless_allowed(tmp_path, capsys):
    """The steps record their data too: a fine-tuning resumed after its training images changed."""
    data = _write_images(tmp_path / "data", 36)
    for i in range(9):  # a labelled test split beside train/
        d = data / "test" / f"c{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 18), (i * 20, 90, 255 - i * 20)).save(d / f"{i:03d}.png")
    sets = ["--set", f"data.cache_dir={tmp_path / 'cache'}", "data.image_size=16", "model.width=0.125",
            "eval.knn_every=0"]
    pre = tmp_path / "pre"
    assert main(["pretrain", "--data", str(data), "--epochs", "1", "--batch-size", "12", *CPU, "--out", str(pre),
                 *sets]) == 0
    out = tmp_path / "ft"
    step = ["--device", "cpu", "--out", str(out)]
    assert main(["finetune", "--checkpoint", str(pre), "--data", str(data), "--labels", "6", "--epochs", "1",
                 "--batch-size", "12", *step]) == 0
    recorded = ckpt.load(out / "checkpoint.pt")["data"]
    assert recorded["images"] == 36 and len(recorded["cache_key"]) == 64
    for path in sorted((data / "train").rglob("*.png"))[:3]:
        path.unlink()
    assert main(["finetune", "--resume", "--epochs", "2", *step]) == 2
    assert "the data changed since the checkpoint: 36 images then, 33 images now" in capsys.readouterr().err
    assert ckpt.load(out / "checkpoint.pt")["epoch"] == 1  # untouched
    assert main(["finetune", "--resume", "--epochs", "2", "--data-changed-ok", *step]) == 0
    assert ckpt.load(out / "checkpoint.pt")["epoch"] == 2
