"""End-to-end runs on tiny data: the CLI, resume, refusals, non-finite losses."""
import json
import subprocess
import sys

import pytest
import torch

from selfsup import checkpoint as ckpt
from selfsup import losses
from selfsup.cli import main
from selfsup.errors import TrainingError
from selfsup.loop import save_checkpoint
from selfsup.runs import BackboneSpec

TINY = ["--data", "digits", "--batch-size", "64", "--device", "cpu", "--no-progress",
        "--set", "data.image_size=8", "model.width=0.125", "eval.knn_every=1", "eval.knn_k=20",
        "train.checkpoint_every=1", "optim.warmup_epochs=1", "train.log_every=5"]


def test_cli_run_writes_metrics_config_and_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--method", "simclr", "--out", str(out), "--epochs", "2", *TINY]) == 0
    printed = capsys.readouterr().out
    assert "kNN top-1 at random initialisation" in printed and "kNN top-1 after training" in printed
    assert "eff. rank" in printed and "feature std" in printed  # the collapse monitors, every epoch
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    for m in lines:
        assert {"loss", "lr", "images_per_s", "seconds", "knn_top1", "knn_features", "linear_top1",
                "feature_std", "effective_rank"} <= m.keys()
        assert m["loss"] > 0 and 0 <= m["knn_top1"] <= 100
    assert "method: simclr" in (out / "config.yaml").read_text()
    state = ckpt.load(out / "checkpoint.pt")
    assert state["epoch"] == 2 and state["format"] == "selfsup-checkpoint"
    weights = ckpt.load(out / "backbone.pt")
    assert "conv1.weight" in weights and not any(k.startswith("fc.") for k in weights)

    # evaluation from the run folder, and of the same network untrained
    assert main(["eval", "knn", "--checkpoint", str(out), "--data", "digits", "--k", "20", "--device", "cpu"]) == 0
    assert json.loads((out / "eval_knn.json").read_text())["top1"] > 0
    assert main(["eval", "linear", "--checkpoint", str(out / "checkpoint.pt"), "--data", "digits",
                 "--epochs", "5", "--device", "cpu", "--random-init"]) == 0
    assert json.loads((out / "eval_linear_simclr_random_init.json").read_text())["random_init"] is True

    # a second run into the same folder is refused rather than overwriting it
    assert main(["pretrain", "--out", str(out), "--epochs", "2", *TINY]) == 1
    assert "already holds a run" in capsys.readouterr().err


def test_resume_equals_uninterrupted_run_bit_for_bit(tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(["pretrain", "--out", str(full), "--epochs", "3", *TINY]) == 0
    # the same run stopped after its first epoch (max-minutes 0 stops at the first epoch end) ...
    assert main(["pretrain", "--out", str(split), "--epochs", "3", "--max-minutes", "0", *TINY]) == 0
    assert ckpt.load(split / "checkpoint.pt")["epoch"] == 1
    # ... and resumed
    assert main(["pretrain", "--out", str(split), "--resume", "--device", "cpu", "--no-progress"]) == 0
    a, b = ckpt.load(full / "checkpoint.pt"), ckpt.load(split / "checkpoint.pt")
    assert a["epoch"] == b["epoch"] == 3
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k in sa:
            assert torch.equal(sa[k], sb[k])
    la = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (split / "metrics.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in la] == [m["loss"] for m in lb]
    # the online linear probe resumes exactly too
    for key, value in a["online_linear"]["classifier"].items():
        assert torch.equal(value, b["online_linear"]["classifier"][key]), key
    assert [m["linear_top1"] for m in la] == [m["linear_top1"] for m in lb]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real = losses.nt_xent

    def poisoned(z1, z2, t):
        calls["n"] += 1
        loss = real(z1, z2, t)
        return loss * float("nan") if calls["n"] > 22 else loss  # 22 steps per epoch at batch 64

    monkeypatch.setitem(losses.CONTRASTIVE_LOSSES, "nt_xent", poisoned)
    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), "--epochs", "3", "--set", "train.checkpoint_every=1", *TINY]) == 1
    err = capsys.readouterr().err
    # stopped at the first bad step (the 23rd call), not at the epoch's end, naming what is kept
    assert calls["n"] == 23, calls
    assert "loss became nan at step 1/22 of epoch 2" in err
    assert f"the checkpoint '{out / 'checkpoint.pt'}' written before it is kept" in err
    assert ckpt.load(out / "checkpoint.pt")["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt.load(out / "backbone.pt").values() if v.is_floating_point())


def test_non_finite_loss_before_any_checkpoint_says_there_is_none(tmp_path, monkeypatch, capsys):
    real = losses.nt_xent
    monkeypatch.setitem(losses.CONTRASTIVE_LOSSES, "nt_xent", lambda z1, z2, t: real(z1, z2, t) * float("inf"))
    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), "--epochs", "2", *TINY]) == 1
    err = capsys.readouterr().err
    assert "loss became inf at step 1/22 of epoch 1" in err and "there is no checkpoint in" in err
    assert not (out / "checkpoint.pt").exists() and not (out / "backbone.pt").exists()


def test_non_finite_weights_are_never_written_over_a_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), "--epochs", "1", *TINY]) == 0
    good = (out / "checkpoint.pt").read_bytes(), (out / "backbone.pt").read_bytes()
    state = ckpt.load(out / "checkpoint.pt")
    net = torch.nn.Module()  # save_checkpoint is the one writer every loop's save goes through
    net.backbone = torch.nn.Linear(2, 2)
    with torch.no_grad():
        net.backbone.weight[0, 0] = float("nan")
    with pytest.raises(TrainingError, match=r"not saving: 1 weight tensor\(s\) hold NaN or inf \(first: backbone.weight\); "
                                            r"the checkpoint .* written before it is kept"):
        save_checkpoint(out, net, BackboneSpec.from_json(state["meta"], out / "checkpoint.pt"), config=state["config"], epoch=2)
    assert ((out / "checkpoint.pt").read_bytes(), (out / "backbone.pt").read_bytes()) == good


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_checkpoint_with_pickled_object_is_refused(tmp_path, capsys):
    bad = tmp_path / "backbone.pt"
    torch.save({"conv1.weight": torch.zeros(1), "x": Payload()}, bad)
    with pytest.raises(ckpt.CheckpointError, match="refusing to load"):
        ckpt.load(bad)
    (tmp_path / "backbone.json").write_text(json.dumps({"backbone": "resnet18", "width": 0.125, "cifar_stem": True}))
    assert main(["eval", "knn", "--checkpoint", str(bad), "--data", "digits"]) == 2
    err = capsys.readouterr()
    assert "refusing to load" in err.err and "this must never run" not in err.out


def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "c.pt"
    ckpt.save_atomic({"a": torch.ones(2)}, target)

    def boom(obj, f):
        f.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        ckpt.save_atomic({"a": torch.zeros(2)}, target)
    assert torch.equal(ckpt.load(target)["a"], torch.ones(2))  # the old checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]      # and no temporary is left


@pytest.mark.parametrize("args,message", [
    (["pretrain", "--method", "nope", "--data", "digits"], "unknown method 'nope'"),
    (["pretrain", "--data", "/does/not/exist"], "data source '/does/not/exist' not found"),
    (["pretrain", "--data", "digits", "--batch-size", "1"], "batch_size must be at least 2"),
    (["pretrain", "--preset", "nope"], "unknown preset 'nope'"),
    (["pretrain", "--data", "digits", "--set", "optim.lr=abc"], "optim.lr: expected float"),
    (["eval", "knn", "--checkpoint", "/no/such/run", "--data", "digits"], "does not exist"),
])
def test_bad_arguments_give_one_line_and_no_traceback(args, message, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "selfsup", *args, *(["--out", str(tmp_path / "o")] if args[0] == "pretrain" else [])],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr


@pytest.mark.parametrize("damage", ["missing", "stale", "description missing"])
def test_resume_repairs_a_backbone_cut_off_from_its_checkpoint(damage, tmp_path, capsys):
    """A save cut short between checkpoint.pt and backbone.pt (SIGKILL, full disk) is repaired by
    --resume, even of a finished run, so an eval never reads another epoch's weights."""
    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), "--epochs", "1", *TINY]) == 0
    want = ckpt.load(out / "backbone.pt")
    if damage == "missing":
        (out / "backbone.pt").unlink()
    elif damage == "stale":
        torch.save({k: v + 1 if v.is_floating_point() else v for k, v in want.items()}, out / "backbone.pt")
    else:
        (out / "backbone.json").unlink()
    capsys.readouterr()
    assert main(["pretrain", "--out", str(out), "--resume", "--device", "cpu", "--no-progress"]) == 0
    assert f"repaired '{out}'" in capsys.readouterr().out
    got = ckpt.load(out / "backbone.pt")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert json.loads((out / "backbone.json").read_text())["backbone"] == "resnet18"


def test_resume_extends_a_run_changes_its_lr_and_refuses_other_changes_by_name(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), "--epochs", "1", *TINY]) == 0
    resume = ["pretrain", "--out", str(out), "--resume", "--device", "cpu", "--no-progress"]
    assert main([*resume, "--set", "model.width=0.5"]) == 2
    assert "model.width cannot change on resume (only train.epochs, optim.lr" in capsys.readouterr().err
    assert main([*resume, "--batch-size", "32"]) == 2
    assert "train.batch_size cannot change on resume" in capsys.readouterr().err
    capsys.readouterr()
    assert main([*resume, "--epochs", "2", "--set", "optim.lr=0.1"]) == 0
    printed = capsys.readouterr().out
    assert "resume: train.epochs 1 -> 2; the lr schedule now follows the new length" in printed
    assert "resume: optim.lr" in printed and "-> 0.1" in printed
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    state = ckpt.load(out / "checkpoint.pt")
    assert state["epoch"] == 2 and state["config"]["train"]["epochs"] == 2 and state["config"]["optim"]["lr"] == 0.1
    assert main([*resume, "--epochs", "1"]) == 2
    assert "train.epochs 1 is fewer than the 2 epochs" in capsys.readouterr().err
    assert main([*resume, "--set", "model.width=0.125"]) == 0  # the run's own value: no change, no refusal
