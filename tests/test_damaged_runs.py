"""Issue 28: messages that were wrong about a run folder, tried on real files and a real full disk."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from selfsup import labels as L
from selfsup.cli import main
from selfsup.runs import BackboneSpec
from selfsup.semisup import PLAN, StudentConfig, student_patch

sys.path.insert(0, str(Path(__file__).parent))
from test_faults import TINY, small_disk  # noqa: E402,F401 (small_disk: the real tmpfs fixture)


def test_a_full_disk_before_the_first_checkpoint_says_none_was_written(small_disk, capsys):
    out = small_disk("96k") / "run"
    assert main(["pretrain", "--out", str(out), "--epochs", "1", *TINY]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "No space left on device" in err[0], err
    assert "no checkpoint had been written yet; start again with more free space" in err[0]
    assert "intact" not in err[0] and "--resume" not in err[0]
    assert not (out / "checkpoint.pt").exists()


def test_semisup_refuses_its_arguments_before_writing_its_plan(tmp_path, capsys):
    out = tmp_path / "recipe"
    command = ["semisup", "--data", "digits", "--out", str(out), "--labels", "0%", "--device", "cpu"]
    for _ in range(2):  # the same folder again: the same refusal, not "already holds a semisup run"
        assert main(command) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("selfsup")]
        assert len(err) == 1 and "--labels 0%: a fraction must be in (0%, 100%]" in err[0], err
        assert not (out / PLAN).exists()
    assert main(["semisup", "--data", "digits", "--out", str(out), "--pretrained", str(tmp_path / "nope")]) == 2
    assert "--pretrained" in capsys.readouterr().err and not (out / PLAN).exists()


def test_a_labels_file_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_bytes(b"\xef\xbb\xbf3\r\n7\r\n")  # as Notepad saves UTF-8
    assert L.read_indices(path, 10).tolist() == [3, 7]
    assert L.select(str(path), np.arange(10) % 2, 2).tolist() == [3, 7]


def test_a_vit_student_gets_a_patch_size_that_fits_its_views():
    resnet = BackboneSpec(backbone="resnet18", width=0.5, cifar_stem=True, image_size=32, mean=(0.5,) * 3,
                          std=(0.5,) * 3)
    assert student_patch(StudentConfig(student="vit_tiny"), resnet) == 4  # CIFAR: 8 x 8 patches
    assert student_patch(StudentConfig(student="vit_tiny"), BackboneSpec(**{**vars(resnet), "image_size": 224})) == 16
    assert student_patch(StudentConfig(student="vit_tiny"), BackboneSpec(**{**vars(resnet), "image_size": 8})) == 1
    vit = BackboneSpec(**{**vars(resnet), "backbone": "vit_small", "width": 1.0, "patch_size": 8})
    assert student_patch(StudentConfig(student="vit_tiny"), vit) == 8  # its ViT teacher's
    assert student_patch(StudentConfig(student="vit_tiny", patch_size=2), vit) == 2
