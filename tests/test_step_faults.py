"""Fine-tuning, distillation and the semisup recipe survive faults as pre-training does: one run
per folder, a stop signal checkpoints and --resume continues exactly, SIGKILL at any moment
resumes to the uninterrupted result, a rerun never appends to old metrics."""
from __future__ import annotations

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
from selfsup import semisup as S
from selfsup.cli import main
from selfsup.runguard import LOCK, RunLock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from stops import signal_at_call  # noqa: E402
PRE = ["--data", "digits", "--batch-size", "64", "--device", "cpu", "--no-progress", "--epochs", "1",
       "--set", "data.image_size=8", "model.width=0.125", "model.proj_layers=3", "eval.knn_every=0",
       "eval.knn_k=20", "optim.warmup_epochs=0"]
# 1437 labelled digits at batch 64: 23 steps per epoch (the last of 29 images), 3 epochs
# a checkpoint every epoch, so that a kill can land after one (the default is every 10)
FT = ["--labels", "100%", "--epochs", "3", "--batch-size", "64", "--device", "cpu", "--set", "eval_every=3",
      "checkpoint_every=1"]
DS = ["--epochs", "2", "--batch-size", "64", "--device", "cpu", "--set", "eval_every=2", "checkpoint_every=1"]


def _same_run(a: Path, b: Path) -> None:
    """Two finished runs hold the same weights and logged the same losses and test top-1."""
    sa, sb = ckpt.load(a / "checkpoint.pt"), ckpt.load(b / "checkpoint.pt")
    assert sa["epoch"] == sb["epoch"] and "partial_epoch" not in sa and "partial_epoch" not in sb
    for key in sa["model"]:
        assert torch.equal(sa["model"][key], sb["model"][key]), key
    rows = lambda d: [(m["epoch"], m["loss"], m.get("test_top1"))  # noqa: E731
                      for m in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]
    assert rows(a) == rows(b)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A pre-training run, and an uninterrupted fine-tuning and distillation from it."""
    root = tmp_path_factory.mktemp("steps")
    pre, ft, ds = root / "pre", root / "ft", root / "ds"
    assert main(["pretrain", "--out", str(pre), *PRE]) == 0
    assert main(["finetune", "--checkpoint", str(pre), "--out", str(ft), *FT]) == 0
    assert main(["distill", "--teacher", str(ft), "--out", str(ds), *DS]) == 0
    return {"pre": pre, "ft": ft, "ds": ds}


def _command(kind: str, runs: dict[str, Path], out: Path) -> list[str]:
    if kind == "finetune":
        return ["finetune", "--checkpoint", str(runs["pre"]), "--out", str(out), *FT]
    return ["distill", "--teacher", str(runs["ft"]), "--out", str(out), *DS]


def _signal_at_step(monkeypatch, call: int, sig: signal.Signals) -> None:
    """Deliver ``sig`` to this process during the step number ``call`` (1-based)."""
    signal_at_call(monkeypatch, S, "backward_step", call, sig)


@pytest.mark.parametrize("kind,sig,code,call", [("finetune", signal.SIGTERM, 143, 30),
                                                ("distill", signal.SIGINT, 130, 5)])
def test_a_stop_signal_checkpoints_mid_epoch_and_resume_matches(kind, sig, code, call, runs, tmp_path,
                                                                monkeypatch, capsys):
    out = tmp_path / kind
    _signal_at_step(monkeypatch, call, sig)
    assert main(_command(kind, runs, out)) == code
    err = capsys.readouterr().err
    assert f"stopped by {sig.name}" in err and f"selfsup {kind} --out {out} --resume" in err, err
    state = ckpt.load(out / "checkpoint.pt")
    done, step = divmod(call, 23)
    assert state["epoch"] == done and state["partial_epoch"]["steps"] == step and state["step"] == call
    assert not (out / LOCK).exists() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    monkeypatch.undo()
    assert main([kind, "--out", str(out), "--resume", "--device", "cpu"]) == 0
    _same_run(runs["ft" if kind == "finetune" else "ds"], out)


@pytest.mark.parametrize("kind", ["finetune", "distill"])
def test_sigkill_at_random_moments_then_resume_ends_with_the_uninterrupted_result(kind, runs, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    rng = random.Random(11 if kind == "finetune" else 12)
    out = tmp_path / kind
    kills = 0
    for attempt in range(3):  # killed twice at a random moment of training, then run to the end
        resume = (out / "checkpoint.pt").exists()
        args = [kind, "--out", str(out), "--resume", "--device", "cpu"] if resume else _command(kind, runs, out)
        proc = subprocess.Popen([sys.executable, "-m", "selfsup", *args], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if attempt < 2:
            for line in proc.stdout:  # training starts after this line (start-up takes seconds)
                if "steps/epoch" in line:
                    break
            time.sleep(rng.uniform(0.0, 1.5))  # well under a second per epoch: saves included
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
            kills += proc.returncode == -signal.SIGKILL
            if (out / "checkpoint.pt").exists():
                ckpt.load(out / "checkpoint.pt")  # never partial: loads, or raises here
            continue
        printed = proc.communicate(timeout=180)[0]
        assert proc.returncode == 0, printed
    assert kills >= 1
    _same_run(runs["ft" if kind == "finetune" else "ds"], out)
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []


def test_two_runs_on_one_folder_and_a_rerun_into_an_unfinished_one(runs, tmp_path, capsys):
    out = tmp_path / "ft"
    with RunLock(out):  # another live run holds the folder
        assert main(_command("finetune", runs, out)) == 1
    assert "is in use by another run" in capsys.readouterr().err
    # a run killed before its first checkpoint left metric lines; a fresh start drops them
    (out / "metrics.jsonl").write_text('{"epoch": 1, "loss": 9.0}\n{"epoch": 2, "loss": 9.0}\n')
    assert main(_command("finetune", runs, out)) == 0
    _same_run(runs["ft"], out)
    assert main(_command("finetune", runs, out)) == 1  # now it holds a finished run
    err = capsys.readouterr().err
    assert "already holds a run" in err and "pass --resume to continue it" in err


def test_resume_extends_a_run_and_refuses_other_changes_by_name(runs, tmp_path, capsys):
    out = tmp_path / "ft"
    args = ["finetune", "--checkpoint", str(runs["pre"]), "--out", str(out), "--labels", "10", "--epochs", "1",
            "--batch-size", "32", "--device", "cpu"]
    assert main(args) == 0
    resume = ["finetune", "--out", str(out), "--resume", "--device", "cpu"]
    capsys.readouterr()
    for extra, key in [(["--set", "optimizer=sgd"], "optimizer"), (["--labels", "20"], "labels"),
                       (["--checkpoint", str(runs["ft"])], "checkpoint"), (["--batch-size", "16"], "batch_size")]:
        assert main(resume + extra) == 2
        err = capsys.readouterr().err
        assert f"{key} cannot change on resume" in err and len(err.strip().splitlines()) == 1, err
    assert main(resume + ["--epochs", "0"]) == 2
    assert main(resume) == 0  # finished: its result again, nothing trained
    assert "nothing to resume" in capsys.readouterr().out
    assert main(resume + ["--epochs", "2", "--lr", "0.01"]) == 0
    printed = capsys.readouterr().out
    assert "resume: epochs 1 -> 2; the lr schedule now follows the new length" in printed and "resume: lr" in printed
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert ckpt.load(out / "checkpoint.pt")["config"]["epochs"] == 2


def test_resume_names_the_command_of_another_kind_of_run(runs, tmp_path, capsys):
    assert main(["finetune", "--out", str(runs["pre"]), "--resume", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "holds a pretrain run, not a finetune run" in err and f"selfsup pretrain --out {runs['pre']} --resume" in err
    assert main(["pretrain", "--out", str(runs["ds"]), "--resume", "--device", "cpu", "--no-progress"]) == 2
    assert f"holds a distill run, not a pretrain run; continue it with selfsup distill --out {runs['ds']}" \
        in capsys.readouterr().err
    assert main(["distill", "--out", str(tmp_path / "none"), "--resume", "--device", "cpu"]) == 2
    assert "no checkpoint.pt" in capsys.readouterr().err
    assert main(["distill", "--resume", "--device", "cpu"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err
    assert main(["finetune", "--out", str(tmp_path / "x")]) == 2
    assert "--checkpoint is required" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_a_stop_signal_before_training_begins_stops_at_once(command, runs, tmp_path, monkeypatch, capsys):
    """While the data is read there is no step to finish: the signal stops the run there."""
    from selfsup import train

    def load(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the signal should have stopped the run")

    if command == "pretrain":
        monkeypatch.setattr(train, "load_images", load)
        args = ["pretrain", "--out", str(tmp_path / "run"), *PRE]
    else:
        monkeypatch.setattr(S, "load_data", load)
        args = _command("finetune", runs, tmp_path / "run")
    assert main(args) == 143
    err = capsys.readouterr().err
    assert "stopped by SIGTERM before training began" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run" / "checkpoint.pt").exists() and not (tmp_path / "run" / LOCK).exists()


def test_semisup_stopped_in_a_step_resumes_to_the_uninterrupted_table(tmp_path, monkeypatch, capsys):
    sets = ["pretrain.data.image_size=8", "pretrain.model.width=0.125", "pretrain.train.epochs=1",
            "pretrain.train.batch_size=64", "pretrain.eval.knn_k=20", "pretrain.optim.warmup_epochs=0",
            "finetune.epochs=2", "finetune.batch_size=16", "distill.epochs=1", "distill.batch_size=64"]
    recipe = ["semisup", "--data", "digits", "--labels", "5", "--device", "cpu", "--no-progress", "--set", *sets]
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert main([*recipe, "--out", str(ref)]) == 0
    _signal_at_step(monkeypatch, 5, signal.SIGTERM)  # the fine-tuning's 5th step (4 per epoch)
    assert main([*recipe, "--out", str(out)]) == 143
    err = capsys.readouterr().err
    assert f"Continue with: selfsup semisup --out {out} --resume" in err, err
    assert ckpt.load(out / "finetune" / "checkpoint.pt")["partial_epoch"]["steps"] == 1
    monkeypatch.undo()
    assert main([*recipe, "--out", str(out)]) == 1
    assert "already holds a semisup run" in capsys.readouterr().err
    assert main(["semisup", "--out", str(out), "--resume", "--labels", "10"]) == 2
    assert "--labels cannot change" in capsys.readouterr().err
    assert main(["semisup", "--out", str(out), "--resume", "--device", "cpu"]) == 0
    rows = lambda d: [(r["step"], r["top1"]) for r in json.loads((d / "results.json").read_text())["rows"]]  # noqa: E731
    assert rows(out) == rows(ref)
    for step in ("finetune", "supervised", "distill"):
        _same_run(ref / step, out / step)
    assert main(["semisup", "--out", str(out), "--resume", "--device", "cpu"]) == 0  # finished: the table again
    assert rows(out) == rows(ref)
