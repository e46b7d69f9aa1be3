"""Faults while data is read: a stop signal during decoding, damaged tar shards, a link swapped
under a stream, and the lock of a killed streamed run."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selfsup.data import load_data

REPO = Path(__file__).resolve().parents[1]


def _env(cache: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "SELFSUP_CACHE": str(cache), "OMP_NUM_THREADS": "1"}


def _png(i: int, size: int) -> bytes:
    buf = io.BytesIO()  # noise: it does not compress, so decoding it takes a while
    Image.fromarray(np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _folder(root: Path, n: int, size: int = 16) -> Path:
    root.mkdir(parents=True)
    kinds = [_png(i, size) for i in range(8)]
    for i in range(n):
        (root / f"{i:05d}.png").write_bytes(kinds[i % 8])
    return root


@pytest.mark.parametrize("sig,code,group,skip", [(signal.SIGTERM, 143, True, True),
                                                  (signal.SIGINT, 130, False, False)])
def test_a_signal_during_decoding_stops_at_once_and_caches_nothing(sig, code, group, skip, tmp_path):
    data, cache = _folder(tmp_path / "imgs", 3000, 128), tmp_path / "cache"  # ~1.5 s to decode on 2 cores
    args = ["--data", str(data), "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "64",
            "--device", "cpu", "--no-progress", "--set", "model.width=0.125", "eval.knn_every=0"]
    proc = subprocess.Popen([sys.executable, "-m", "selfsup", "pretrain", *args, *(["--skip-corrupt"] * skip)],
                            cwd=REPO, env=_env(cache), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    for line in proc.stdout:
        if "decoding 3000 images" in line:
            break
    time.sleep(0.5)  # the workers are decoding by now
    if group:  # as a terminal's Ctrl-C or a scheduler sends it: to the workers too
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    sent = time.monotonic()
    printed = proc.communicate(timeout=30)[0]
    assert proc.returncode == code, printed
    assert time.monotonic() - sent < 3 and "could not be decoded" not in printed
    assert not [p for p in cache.rglob("meta.json")]  # no entry a later run would trust
    splits = load_data(data, skip_corrupt=skip, cache_dir=cache)  # decodes again, every image
    assert len(splits.train) == 3000
    assert [json.loads(p.read_text())["skipped"] for p in cache.rglob("meta.json")] == [0]


def test_resume_right_after_a_sigkill_of_a_streamed_run_is_not_refused_as_in_use(tmp_path):
    data, out = _folder(tmp_path / "imgs", 64), tmp_path / "run"
    common = ["--out", str(out), "--device", "cpu", "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "selfsup", "pretrain", "--data", str(data), *common, "--epochs",
                             "50", "--batch-size", "8", "--set", "data.stream=true", "data.workers=2", "aug.size=16",
                             "model.width=0.125", "train.checkpoint_every=1"], cwd=REPO, env=_env(tmp_path / "cache"),
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "steps/epoch" in line:  # training, with its two DataLoader workers
            break
    deadline = time.monotonic() + 60
    while not (out / "checkpoint.pt").exists() and time.monotonic() < deadline:  # an epoch done: resumable
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    again = subprocess.Popen([sys.executable, "-m", "selfsup", "pretrain", "--resume", *common], cwd=REPO,
                             env=_env(tmp_path / "cache"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = ""
    for line in again.stdout:
        seen += line
        if "steps/epoch" in line:  # resumed and training: the lock was taken
            again.send_signal(signal.SIGTERM)
            break
    seen += again.communicate(timeout=60)[0]
    assert "is in use by another run" not in seen and again.returncode == 143, seen
    time.sleep(0.5)
    assert not [p for p in os.listdir("/proc") if p.isdigit() and _is_worker_of(p, str(data))]


def _is_worker_of(pid: str, data: str) -> bool:
    try:
        return data in Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return False


def test_a_signal_while_decoding_in_this_process_is_no_corrupt_image(tmp_path, monkeypatch):
    from selfsup.data import decode
    from selfsup.errors import Interrupted

    data, cache = _folder(tmp_path / "imgs", 40), tmp_path / "cache"
    real, calls = decode.decode_image, []

    def stopped_at_the_fifth(src, size):
        calls.append(src)
        if len(calls) == 5:  # as StopSignals' handler raises it, in the middle of an image
            raise Interrupted("stopped by SIGTERM", 143)
        return real(src, size)

    monkeypatch.setenv("SELFSUP_DECODE_WORKERS", "1")
    monkeypatch.setattr(decode, "decode_image", stopped_at_the_fifth)
    with pytest.raises(Interrupted):
        load_data(data, skip_corrupt=True, cache_dir=cache)
    assert not list(cache.rglob("meta.json"))
    assert len(load_data(data, skip_corrupt=True, cache_dir=cache).train) == 40
