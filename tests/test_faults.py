"""Runs that survive faults: stop signals, SIGKILL, a full disk, two runs on one folder, mismatches."""
from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from selfsup import checkpoint as ckpt
from selfsup import train
from selfsup.cli import main
from selfsup.runguard import LOCK, Interrupted, RunLock
from selfsup.errors import TrainingError

# 22 steps per epoch (digits train split at batch 64); knn only at the end keeps epochs short
TINY = ["--data", "digits", "--batch-size", "64", "--device", "cpu", "--no-progress",
        "--set", "data.image_size=8", "model.width=0.125", "eval.knn_every=0", "eval.knn_k=20",
        "train.checkpoint_every=1", "optim.warmup_epochs=1", "train.log_every=5"]
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from stops import signal_at_call  # noqa: E402


def _assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = ckpt.load(a / "checkpoint.pt"), ckpt.load(b / "checkpoint.pt")
    assert sa["epoch"] == sb["epoch"] and "partial_epoch" not in sa and "partial_epoch" not in sb
    for key in sa["model"]:
        assert torch.equal(sa["model"][key], sb["model"][key]), key
    losses = lambda d: [json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses(a) == losses(b)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted 2-epoch run, the weights every interrupted one must end with."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(["pretrain", "--out", str(out), "--epochs", "2", *TINY]) == 0
    return out


def _kill_self_at(monkeypatch, call: int, sig: signal.Signals) -> None:
    """Deliver ``sig`` to this process during training step number ``call`` (1-based)."""
    signal_at_call(monkeypatch, train, "train_step", call, sig)


@pytest.mark.parametrize("sig,code,call", [(signal.SIGTERM, 143, 30), (signal.SIGINT, 130, 22)])
def test_stop_signal_checkpoints_mid_epoch_and_resume_matches(sig, code, call, reference, tmp_path,
                                                              monkeypatch, capsys):
    out = tmp_path / "run"
    _kill_self_at(monkeypatch, call, sig)
    assert main(["pretrain", "--out", str(out), "--epochs", "2", *TINY]) == code
    err = capsys.readouterr().err
    assert f"stopped by {sig.name}" in err and f"selfsup pretrain --out {out} --resume" in err
    state = ckpt.load(out / "checkpoint.pt")
    if call == 22:  # the signal came in the last step of epoch 1: an ordinary epoch-end checkpoint
        assert state["epoch"] == 1 and "partial_epoch" not in state
    else:           # step 30 = step 8 of epoch 2: the position within the epoch is stored
        assert state["epoch"] == 1 and state["partial_epoch"]["steps"] == 8 and state["step"] == 30
    assert not (out / LOCK).exists()                              # the lock is released on the way out
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL     # and the handlers restored
    monkeypatch.undo()
    assert main(["pretrain", "--out", str(out), "--resume", "--device", "cpu", "--no-progress"]) == 0
    _assert_same_weights(reference, out)


def test_resume_from_an_old_mid_epoch_checkpoint_with_spread_sum(reference, tmp_path, monkeypatch, capsys):
    """Checkpoints written before the backbone monitors hold the old embedding spread's running
    sum (``spread_sum``) and no ``sums``: they resume to the same weights and metrics."""
    out = tmp_path / "run"
    _kill_self_at(monkeypatch, 30, signal.SIGTERM)
    assert main(["pretrain", "--out", str(out), "--epochs", "2", *TINY]) == 143
    monkeypatch.undo()
    state = ckpt.load(out / "checkpoint.pt")
    partial = state["partial_epoch"]
    del partial["sums"]
    partial["spread_sum"] = torch.tensor(0.5)
    ckpt.save_atomic(state, out / "checkpoint.pt")
    assert main(["pretrain", "--out", str(out), "--resume", "--device", "cpu", "--no-progress"]) == 0
    _assert_same_weights(reference, out)
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert "spread_sum" not in last and "embedding_std" not in last and last["effective_rank"] > 2


def test_sigkill_at_random_moments_then_resume_ends_with_uninterrupted_weights(reference, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    rng = random.Random(9)
    for trial in range(2):
        out = tmp_path / f"trial{trial}"
        for attempt in range(3):  # killed twice at a random moment of training, then run to the end
            resume = (out / "checkpoint.pt").exists()
            args = ["--out", str(out), "--resume", "--device", "cpu", "--no-progress"] if resume else \
                   ["--out", str(out), "--epochs", "2", *TINY]
            proc = subprocess.Popen([sys.executable, "-m", "selfsup", "pretrain", *args], cwd=REPO, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if attempt < 2:
                for line in proc.stdout:  # training starts after this line (start-up takes seconds)
                    if "steps/epoch" in line:
                        break
                time.sleep(rng.uniform(0.0, 2.5))  # ~1 s per epoch: anywhere in epochs 1-2, saves included
                proc.send_signal(signal.SIGKILL)
                proc.communicate()
                if (out / "checkpoint.pt").exists():
                    ckpt.load(out / "checkpoint.pt")  # never partial: loads, or raises here
                continue  # a temporary file of a save cut short may remain; the next run removes it
            printed = proc.communicate(timeout=120)[0]
            assert proc.returncode == 0, printed
        _assert_same_weights(reference, out)
        assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real, saves = torch.save, {"n": 0}

    def save(obj, f, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] > 2:  # epoch 1's checkpoint and backbone go through; epoch 2's do not
            f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    assert main(["pretrain", "--out", str(out), "--epochs", "2", *TINY]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "previous checkpoint there is intact" in err[0]
    assert ckpt.load(out / "checkpoint.pt")["epoch"] == 1
    assert "conv1.weight" in ckpt.load(out / "backbone.pt")
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")] and not (out / LOCK).exists()


def test_second_run_on_a_locked_folder_refuses_with_pid_and_host(tmp_path, capsys):
    out = tmp_path / "run"
    with RunLock(out):
        assert main(["pretrain", "--out", str(out), "--epochs", "1", *TINY]) == 1
        err = capsys.readouterr().err
        assert f"pid {os.getpid()}" in err and "is in use by another run" in err
    assert not (out / LOCK).exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket
    (tmp_path / LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": "x"}))
    with RunLock(tmp_path) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    (tmp_path / LOCK).write_text('{"pid": 1')  # cut short by a kill while being written: stale too
    with RunLock(tmp_path):
        pass
    (tmp_path / LOCK).write_text(json.dumps({"pid": dead.pid, "host": "another-host", "since": "x"}))
    with pytest.raises(TrainingError, match="another-host"):  # cannot be checked from here: honoured
        RunLock(tmp_path).acquire()


def test_resume_with_another_method_or_architecture_names_the_mismatch(reference, tmp_path, capsys):
    assert main(["pretrain", "--out", str(reference), "--resume", "--method", "moco"]) == 2
    assert "method='simclr', not 'moco'" in capsys.readouterr().err
    assert main(["pretrain", "--out", str(reference), "--resume", "--backbone", "resnet50"]) == 2
    assert "model.backbone='resnet18', not 'resnet50'" in capsys.readouterr().err
    # a backbone.pt whose metadata names another architecture
    (tmp_path / "backbone.pt").write_bytes((reference / "backbone.pt").read_bytes())
    meta = json.loads((reference / "backbone.json").read_text())
    (tmp_path / "backbone.json").write_text(json.dumps({**meta, "backbone": "resnet50"}))
    assert main(["eval", "knn", "--checkpoint", str(tmp_path), "--data", "digits", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "does not fit a resnet50" in err and "shape mismatch" in err and "another architecture" in err


def test_interrupted_carries_the_exit_code():
    assert Interrupted("x", 143).exit_code == 143 and not issubclass(Interrupted, TrainingError)


@pytest.fixture
def small_disk(tmp_path):
    """A real, small filesystem (tmpfs), for the real full-disk errors; skipped where this process
    cannot mount one (not root, or in a container without the capability)."""
    mounted = []

    def make(size: str) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()[:80]}): the real full-disk test needs root")
        mounted.append(where)
        return where

    yield make
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _fill(disk: Path) -> None:
    """Write one file until the filesystem is full (ENOSPC for real)."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_a_real_full_disk_while_checkpointing_is_one_line_and_leaves_no_partial_file(small_disk, capsys):
    """torch.save raises RuntimeError ("unexpected pos") on a full disk; the checkpoint is now
    serialised in memory first, so the write fails with ENOSPC, named in one line."""
    out = small_disk("96k") / "run"
    assert main(["pretrain", "--out", str(out), "--epochs", "1", *TINY]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "could not write the checkpoint" in err[0] and "No space left on device" in err[0], err
    assert not (out / "checkpoint.pt").exists() and not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert not (out / LOCK).exists()


def test_a_real_full_disk_while_repairing_keeps_the_checkpoint(small_disk, capsys):
    disk = small_disk("8m")
    out = disk / "run"
    assert main(["pretrain", "--out", str(out), "--epochs", "1", *TINY]) == 0
    (out / "backbone.pt").unlink()  # a save cut short between the two files
    before = (out / "checkpoint.pt").read_bytes()
    _fill(disk)
    resume = ["pretrain", "--out", str(out), "--resume", "--device", "cpu", "--no-progress"]
    capsys.readouterr()
    assert main(resume) == 1  # not even the lock fits
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "could not write the run lock" in err[0] and "No space left on device" in err[0], err
    assert not (out / LOCK).exists() and (out / "checkpoint.pt").read_bytes() == before
    filler = disk / "filler"
    os.truncate(filler, filler.stat().st_size - 16384)  # room for the lock, not for the backbone
    assert main(resume) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "could not repair" in err[0] and "No space left on device" in err[0], err
    assert (out / "checkpoint.pt").read_bytes() == before and not (out / LOCK).exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    (disk / "filler").unlink()
    assert main(["pretrain", "--out", str(out), "--resume", "--device", "cpu", "--no-progress"]) == 0
    assert "conv1.weight" in ckpt.load(out / "backbone.pt")


@pytest.mark.parametrize("where", ["read-only", "a file", "under a file"])
def test_an_unusable_out_folder_is_one_line(where, small_disk, tmp_path, capsys):
    """Real failures: a read-only filesystem (tmpfs mounted ro), and --out naming a file or a
    path under one."""
    if where == "read-only":
        disk = small_disk("1m")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        out, message = disk / "run", "Read-only file system"
    else:
        (tmp_path / "f").write_text("x")
        out = tmp_path / "f" if where == "a file" else tmp_path / "f" / "run"
        message = f"'{tmp_path / 'f'}' is a file, not a folder"
    assert main(["pretrain", "--out", str(out), "--epochs", "1", *TINY]) in (1, 2)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and message in err[0], err


def test_eval_on_a_read_only_run_folder_gives_its_result_in_the_one_line(small_disk, capsys):
    disk = small_disk("8m")
    out = disk / "run"
    assert main(["pretrain", "--out", str(out), "--epochs", "1", *TINY]) == 0
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    capsys.readouterr()
    assert main(["eval", "knn", "--checkpoint", str(out), "--data", "digits", "--k", "20", "--device", "cpu"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "knn top-1" in err[0] and "% computed, but could not write" in err[0] \
        and "Read-only file system" in err[0], err


def test_a_real_full_disk_for_every_other_write_is_one_line_and_keeps_the_previous_file(small_disk, capsys):
    """Evaluation JSON, the report, an export and config.yaml on a full tmpfs: each command fails
    in one line naming the file, and the version written before is intact."""
    disk = small_disk("8m")
    out = disk / "run"
    assert main(["pretrain", "--out", str(out), "--epochs", "1", *TINY]) == 0
    knn = ["eval", "knn", "--checkpoint", str(out), "--data", "digits", "--k", "20", "--device", "cpu"]
    report = ["report", str(out), "--device", "cpu", "--points", "20", "--queries", "2", "--k", "2"]
    export = ["export", str(out), "--format", "safetensors"]
    for command in (knn, report, export):
        assert main(command) == 0
    files = ["eval_knn.json", "report/index.html", "backbone.safetensors", "config.yaml", "checkpoint.pt"]
    before = {f: (out / f).read_bytes() for f in files}
    _fill(disk)
    capsys.readouterr()
    for command, message in [(knn, "% computed, but could not write"), (report, "cannot write the report"),
                             (export, "could not write the export")]:
        assert main(command) == 1, command
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("selfsup")]
        assert len(err) == 1 and message in err[0] and "No space left on device" in err[0], err
    filler = disk / "filler"
    os.truncate(filler, filler.stat().st_size - 4096)  # one page: the lock fits, config.yaml does not
    resume = ["pretrain", "--out", str(out), "--resume", "--device", "cpu", "--no-progress", "--epochs", "2"]
    assert main(resume) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("selfsup")]
    assert len(err) == 1 and f"'{out / 'config.yaml'}': No space left on device" in err[0], err
    assert {f: (out / f).read_bytes() for f in files} == before
    assert not [p for p in out.rglob("*.tmp")] and not (out / LOCK).exists()
    filler.unlink()
    assert main(resume) == 0 and ckpt.load(out / "checkpoint.pt")["epoch"] == 2


def test_a_metrics_line_that_cannot_be_written_costs_no_trained_epoch(tmp_path, monkeypatch, capsys):
    """During epoch 2 metrics.jsonl becomes a folder (a real IsADirectoryError on the append): the
    epoch's line is a warning, and its checkpoint is written all the same."""
    out = tmp_path / "run"
    real, calls = train.train_step, {"n": 0}

    def step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 23:  # the first step of epoch 2 (22 steps per epoch)
            (out / "metrics.jsonl").unlink()
            (out / "metrics.jsonl").mkdir()
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", step)
    assert main(["pretrain", "--out", str(out), "--epochs", "2", *TINY]) == 0
    printed = capsys.readouterr().out
    assert f"warning: could not append epoch 2 to '{out / 'metrics.jsonl'}'" in printed and "training goes on" in printed
    assert ckpt.load(out / "checkpoint.pt")["epoch"] == 2
