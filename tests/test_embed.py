"""`selfsup embed` and `selfsup.embed`: one row per image, in listing order, in every format."""
from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import selfsup
from selfsup.cli import main
from selfsup.data import load_data
from selfsup.train import load_projector

TINY = ["--data", "digits", "--batch-size", "64", "--device", "cpu", "--no-progress",
        "--set", "data.image_size=8", "model.width=0.125", "eval.knn_k=20", "optim.warmup_epochs=1"]
HAS_PYARROW = importlib.util.find_spec("pyarrow") is not None


PRINTED: dict[str, str] = {}  # what the fixture's pre-training printed


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("embed") / "run"
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert main(["pretrain", "--out", str(out), "--epochs", "1", *TINY]) == 0
    PRINTED["pretrain"] = printed.getvalue()
    return out


def test_pretraining_ends_by_naming_its_folder_and_the_next_commands(run):
    last = PRINTED["pretrain"].strip().splitlines()[-4:]
    assert last == [f"run saved in {run}", f"next:  selfsup embed {run} --data digits --out embeddings.parquet",
                    f"       selfsup report {run} --data digits", f"       selfsup export {run}"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A small split layout of real digit images, PNG and JPEG, with one file under two names."""
    root = tmp_path_factory.mktemp("images") / "data"
    digits = load_data("digits", image_size=16)
    for split, data in (("train", digits.train), ("test", digits.test)):
        for c in (0, 1, 2):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for j, i in enumerate(np.flatnonzero(data.labels == c)[:10 if split == "train" else 3]):
                Image.fromarray(data.images[i]).save(d / f"{j:02d}.{'png' if j % 2 else 'jpg'}")
    (root / "train" / "class2" / "99-copy.png").write_bytes((root / "train" / "class0" / "01.png").read_bytes())
    return root


def read_csv(path: Path) -> tuple[list[str], list[list[str]], np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    first = header.index("f0")
    return header, [r[:first] for r in body], np.array([r[first:] for r in body], np.float32)


def test_folder_to_csv_npy_and_the_api_agree_row_by_row(run, folder, tmp_path):
    assert main(["embed", str(run), "--data", str(folder), "--out", str(tmp_path / "e.csv"), "--device", "cpu"]) == 0
    header, cells, vectors = read_csv(tmp_path / "e.csv")
    expected = sorted(p.relative_to(folder).as_posix() for p in (folder / "train").rglob("*.*"))
    assert header[:2] == ["path", "label"] and len(header) == 2 + vectors.shape[1]
    assert [c[0] for c in cells] == expected                       # the train split, in listing order
    assert [c[1] for c in cells] == [p.split("/")[1] for p in expected]
    dup = [expected.index("train/class0/01.png"), expected.index("train/class2/99-copy.png")]
    assert np.array_equal(vectors[dup[0]], vectors[dup[1]])        # same bytes, same row

    assert main(["embed", str(run), "--data", str(folder), "--out", str(tmp_path / "e.npy"), "--device", "cpu"]) == 0
    array = np.load(tmp_path / "e.npy")
    assert array.dtype == np.float32 and np.array_equal(array, vectors)
    assert (tmp_path / "e.paths.txt").read_text().splitlines() == expected
    assert (tmp_path / "e.labels.txt").read_text().splitlines() == [c[1] for c in cells]

    api = selfsup.embed(run, str(folder), device="cpu")
    assert api.paths == expected and api.labels == [c[1] for c in cells]
    assert np.array_equal(api.vectors, vectors)                     # the API's numbers are the file's
    test = selfsup.embed(run, str(folder), split="test", device="cpu", batch_size=4)
    assert len(test.paths) == 9 and all(p.startswith("test/") for p in test.paths)


def test_digits_normalize_and_head_features(run, tmp_path):
    out = tmp_path / "d.csv"
    assert main(["embed", str(run), "--data", "digits", "--out", str(out), "--normalize", "--batch-size", "100"]) == 0
    _, cells, vectors = read_csv(out)
    train = load_data("digits", image_size=8).train
    assert [c[0] for c in cells] == [f"train/{i}" for i in range(len(train))]
    assert [c[1] for c in cells] == [str(v) for v in train.labels]
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)

    backbone_dim = selfsup.load_backbone(run).num_features
    head = selfsup.embed(run, "digits", features="head", device="cpu")
    head_dim = load_projector(run)(torch.zeros(2, backbone_dim)).shape[1]
    assert head.vectors.shape == (len(train), head_dim) and head_dim != backbone_dim
    assert main(["embed", str(run), "--out", str(tmp_path / "h.npy"), "--features", "head"]) == 0  # the run's data
    assert np.allclose(np.load(tmp_path / "h.npy"), head.vectors, atol=1e-6)


def test_random_init_embeds_with_the_same_network_untrained(run):
    trained = selfsup.embed(run, "digits", device="cpu")
    untrained = selfsup.embed(run, "digits", device="cpu", random_init=True)
    assert untrained.vectors.shape == trained.vectors.shape and untrained.paths == trained.paths
    assert not np.allclose(untrained.vectors, trained.vectors, atol=1e-3)
    assert np.array_equal(untrained.vectors, selfsup.embed(run, "digits", device="cpu", random_init=True).vectors)


def test_unlabelled_nested_folder_and_an_archive_of_the_split_layout(run, folder, tmp_path):
    loose = tmp_path / "loose"
    (loose / "a" / "b").mkdir(parents=True)
    for name in ("z.png", "a/x.png", "a/b/y.jpg"):
        Image.open(folder / "train" / "class1" / "01.png").save(loose / name)
    (loose / "notes.txt").write_text("not an image")
    flat = selfsup.embed(run, str(loose), device="cpu")
    assert flat.labels is None and sorted(flat.paths) == ["a/b/y.jpg", "a/x.png", "z.png"]
    assert main(["embed", str(run), "--data", str(loose), "--out", str(tmp_path / "l.csv")]) == 0
    header, cells, _ = read_csv(tmp_path / "l.csv")
    assert header[:2] == ["path", "f0"] and [c[0] for c in cells] == flat.paths

    archive = tmp_path / "data.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(folder, arcname="data")
    from_tar = selfsup.embed(run, str(archive), device="cpu")
    from_dir = selfsup.embed(run, str(folder), device="cpu")
    assert sorted(from_tar.paths) == sorted(from_dir.paths)
    rows = dict(zip(from_dir.paths, from_dir.vectors))
    assert all(np.array_equal(rows[p], v) for p, v in zip(from_tar.paths, from_tar.vectors))


@pytest.mark.skipif(not HAS_PYARROW, reason="pyarrow not installed (pip install 'selfsup[parquet]')")
def test_parquet_holds_the_same_rows(run, folder, tmp_path):
    import pyarrow.parquet as pq

    out = tmp_path / "e.parquet"
    assert main(["embed", str(run), "--data", str(folder), "--out", str(out)]) == 0
    table = pq.read_table(out)
    api = selfsup.embed(run, str(folder), device="cpu")
    assert table.column("path").to_pylist() == api.paths and table.column("label").to_pylist() == api.labels
    assert np.array_equal(np.array(table.column("embedding").to_pylist(), np.float32), api.vectors)


def test_parquet_without_pyarrow_says_how_to_install_it(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "pyarrow", None)
    assert main(["embed", str(run), "--data", "digits", "--out", str(tmp_path / "e.parquet")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install pyarrow" in err[0] and "selfsup[parquet]" in err[0]
    assert not list(tmp_path.iterdir())


def _read_only_folder() -> Path | None:
    """A real folder where even root cannot create a file (chmod does not stop root): /sys."""
    try:
        (Path("/sys") / ".selfsup-probe").touch()
    except OSError:
        return Path("/sys")
    (Path("/sys") / ".selfsup-probe").unlink()
    return None


@pytest.mark.parametrize("case", ["missing run", "under a file", "missing folder", "suffix", "empty", "read-only"])
def test_bad_input_is_one_line_naming_the_path_and_writes_nothing(run, tmp_path, capsys, case):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "empty" / "train" / "cls").mkdir(parents=True)
    before = sorted(tmp_path.rglob("*"))
    target = {"missing run": (tmp_path / "nope", "digits", tmp_path / "e.csv"),
              "under a file": (run, "digits", tmp_path / "file.txt" / "e.csv"),
              "missing folder": (run, "digits", tmp_path / "no" / "e.csv"),
              "suffix": (run, "digits", tmp_path / "e.json"),
              "empty": (run, str(tmp_path / "empty"), tmp_path / "e.csv"),
              "read-only": (run, "digits", (_read_only_folder() or Path("/nonexistent-ro")) / "e.csv")}[case]
    if case == "read-only" and _read_only_folder() is None:
        pytest.skip("no read-only mount here to write into")
    named = {"missing run": "nope", "under a file": "file.txt", "missing folder": "no", "suffix": "e.json",
             "empty": "empty", "read-only": str(target[2].parent)}[case]
    rc = main(["embed", str(target[0]), "--data", target[1], "--out", str(target[2]), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc in (1, 2) and len(err) == 1 and named in err[0] and "Traceback" not in err[0], err
    assert sorted(tmp_path.rglob("*")) == before and not target[2].exists()


def test_a_failed_write_keeps_the_previous_file_whole(run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "e.csv"
    assert main(["embed", str(run), "--data", "digits", "--out", str(out)]) == 0
    good = out.read_bytes()

    def broken(f, result):  # half a file, then the disk fills up
        f.write(b"path,label,f0\ntrain/0,0,")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("selfsup.embeddings._write_csv", broken)
    assert main(["embed", str(run), "--data", "digits", "--out", str(out), "--normalize"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out) in err[0] and "No space left" in err[0]
    assert out.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["e.csv"]


def test_pretrain_help_lists_every_backbone(capsys):
    from selfsup.backbones import NAMES

    assert main(["pretrain", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in NAMES) and "vit_small" in text
