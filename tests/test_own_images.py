"""One's own images as ``--data`` (issue 25 §1): class folders without splits, any tree of
unlabelled images, list files; mixed sizes, formats and modes decoded at one size. Built from
real CIFAR-10 JPEGs rewritten at random sizes (skipped without the shared archive)."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.augment import simclr_view
from selfsup.cli import main
from selfsup.config import resolve
from selfsup.data import DataError, decode_image, load_data
from selfsup.feed import default_image_size
from selfsup.stream import ImageStream, StreamLoader

SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
pytestmark = pytest.mark.skipif(not SHARED_CIFAR.exists(),
                                reason=f"{SHARED_CIFAR} not found (the shared CIFAR-10 JPEG archive)")

PER_CLASS = 20  # 10 classes x 20 = 200 real images
FORMATS = ["jpeg", "png-palette", "png-rgba", "png-16bit", "jpeg-gray", "webp", "tiff", "bmp"]
CORRUPT = {"sub/broken.jpg": b"\xff\xd8\xff\xe0 not a jpeg at all", "empty.png": b"",
           "deep/er/cut.png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00"}
FAST = ["--epochs", "1", "--device", "cpu", "--no-progress", "--set", "model.width=0.125", "train.batch_size=32",
        "data.image_size=16", "data.workers=1", "eval.knn_k=5"]


@pytest.fixture(scope="module")
def cifar() -> dict[str, list[Image.Image]]:
    """The first PER_CLASS test images of each CIFAR-10 class (32x32 RGB)."""
    found: dict[str, list[Image.Image]] = {}
    with tarfile.open(SHARED_CIFAR, "r|gz") as tf:
        for m in tf:
            parts = m.name.split("/")
            if m.isfile() and parts[1] == "test" and len(found.setdefault(parts[2], [])) < PER_CLASS:
                found[parts[2]].append(Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB"))
            if len(found) == 10 and all(len(v) == PER_CLASS for v in found.values()):
                break
    return found


def _save(im: Image.Image, path: Path, fmt: str) -> Path:
    """``im`` written as ``fmt`` (see FORMATS); -> the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ext = {"jpeg": ".jpg", "jpeg-gray": ".jpeg", "webp": ".webp", "tiff": ".tif", "bmp": ".bmp"}.get(fmt, ".png")
    path = path.with_suffix(ext)
    if fmt == "png-palette":
        im = im.convert("P", palette=Image.Palette.ADAPTIVE)
    elif fmt == "png-rgba":
        im = im.convert("RGBA")
    elif fmt == "png-16bit":
        im = Image.fromarray(np.asarray(im.convert("L")).astype(np.uint16) * 257)  # I;16
    elif fmt == "jpeg-gray":
        im = im.convert("L")
    im.save(path)
    return path


def _upright_test_image() -> Image.Image:
    """40 wide x 60 tall: red top half, blue bottom half, as it should be seen."""
    a = np.zeros((60, 40, 3), np.uint8)
    a[:30, :, 0] = 255
    a[30:, :, 2] = 255
    return Image.fromarray(a)


def _rotated_jpeg(path: Path) -> Path:
    """The upright test image stored turned on its side, with EXIF orientation 6 to turn it back."""
    exif = Image.Exif()
    exif[0x0112] = 6
    _upright_test_image().transpose(Image.Transpose.ROTATE_90).save(path, exif=exif, quality=95)
    return path


def _write_mixed(root: Path, images: list[Image.Image], seed: int) -> None:
    """Each image at a random size (20-300 px a side) in a format of FORMATS, nested up to two
    folders deep under ``root``."""
    rng = np.random.default_rng(seed)
    for i, im in enumerate(images):
        w, h = (int(v) for v in rng.integers(20, 301, 2))
        where = ["", "a", "a/b", "c"][i % 4]
        _save(im.resize((w, h), Image.Resampling.BILINEAR), root / where / f"{i:03d}", FORMATS[i % len(FORMATS)])


@pytest.fixture(scope="module")
def folders(cifar, tmp_path_factory) -> dict[str, Path]:
    """'good': 201 unlabelled images (one EXIF-rotated); 'bad': the same plus CORRUPT; 'classes':
    <class>/<image> (some nested), all of mixed sizes and formats."""
    base = tmp_path_factory.mktemp("own")
    everything = [im for ims in cifar.values() for im in ims]
    _write_mixed(base / "good", everything, 0)
    _rotated_jpeg(base / "good" / "c" / "rotated.jpg")
    shutil.copytree(base / "good", base / "bad")
    for rel, data in CORRUPT.items():
        (base / "bad" / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / "bad" / rel).write_bytes(data)
    for k, (name, ims) in enumerate(cifar.items()):
        _write_mixed(base / "classes" / name, ims, k + 1)
    return {"good": base / "good", "bad": base / "bad", "classes": base / "classes", "base": base}


def _rows(images: np.ndarray) -> list[str]:
    """Each image's digest, sorted: compares two sets of images whatever their order."""
    return sorted(hashlib.sha1(np.ascontiguousarray(im).tobytes()).hexdigest() for im in images)


def _one_line_error(capsys, rc: int, *parts: str) -> None:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("selfsup")]
    assert rc == 2 and "Traceback" not in err and len(errors) == 1, err
    assert all(p in errors[0] for p in parts), errors[0]


# --------------------------------------------------------------------------------------------
# decoding


def test_unlabelled_folder_decodes_every_image_at_the_stated_size(folders, tmp_path, caplog):
    caplog.set_level("INFO", logger="selfsup.data")
    s = load_data(folders["good"], default_size=24, cache_dir=tmp_path)
    assert s.train.images.shape == (201, 24, 24, 3) and s.chosen_size == 24
    assert s.test is None and s.train.classes == [] and (s.train.labels == -1).all()
    assert "good read as a folder of unlabelled images (any depth): 201 images, no labels" in caplog.text
    assert "at 24x24 (shorter side resized, centre cropped): the cache will hold 0.3 MiB" in caplog.text
    files = sorted(p for p in folders["good"].rglob("*") if p.is_file())
    assert _rows(s.train.images) == _rows([decode_image(str(p), 24) for p in files])
    again = load_data(folders["good"], default_size=24, cache_dir=tmp_path)  # from the cache
    assert isinstance(again.train.images, np.memmap) and again.chosen_size == 24
    assert load_data(folders["good"], image_size=24, cache_dir=tmp_path).chosen_size is None  # the same entry
    with pytest.raises(DataError, match=r"images in .*good have different sizes \(\d+x\d+ for .*pass image_size"):
        load_data(folders["good"], cache_dir=tmp_path)  # no size and no default: refused before decoding


def test_a_cache_bigger_than_half_the_memory_is_refused_before_decoding(folders, tmp_path, monkeypatch):
    monkeypatch.setattr("selfsup.data.memory.available_memory", lambda: 2 * 201 * 64 * 64 * 3 - 1)
    with pytest.raises(DataError, match=r"201 images of 64x64 need about 4\.7 MiB .*data\.stream=true"):
        load_data(folders["good"], default_size=64, cache_dir=tmp_path)
    monkeypatch.undo()
    monkeypatch.setenv("SELFSUP_DECODE_WORKERS", "2")  # and when it fits, a pool of two decodes it
    assert load_data(folders["good"], default_size=64, cache_dir=tmp_path).train.images.shape == (201, 64, 64, 3)


def test_modes_and_exif_orientation(tmp_path):
    up = decode_image(str(_rotated_jpeg(tmp_path / "r.jpg")), 16)  # (16, 16, 3): the centre square of 40x60
    assert up[2, 8, 0] > 200 and up[2, 8, 2] < 60 and up[13, 8, 2] > 200 and up[13, 8, 0] < 60  # red over blue
    ref = _upright_test_image().convert("L")
    for fmt in FORMATS:
        a = decode_image(str(_save(ref, tmp_path / fmt, fmt)), None)
        assert a.shape == (60, 40, 3) and a.dtype == np.uint8
        assert np.abs(a.astype(int) - np.asarray(ref)[..., None]).mean() < 4, fmt  # 16-bit keeps its top byte


def test_corrupt_images_stop_the_run_by_name_or_are_skipped_and_counted(folders, tmp_path):
    with pytest.raises(DataError, match=r"3 image\(s\) in .*bad could not be decoded: .*--skip-corrupt") as e:
        load_data(folders["bad"], default_size=16, cache_dir=tmp_path)
    assert all(str(folders["bad"] / rel) in str(e.value) for rel in CORRUPT)
    with pytest.warns(UserWarning, match="skipped 3 corrupt image"):
        s = load_data(folders["bad"], default_size=16, cache_dir=tmp_path, skip_corrupt=True)
    assert s.train.images.shape == (201, 16, 16, 3)


# --------------------------------------------------------------------------------------------
# class folders and list files


def test_class_folders_hold_out_a_stratified_reproducible_test_split(folders, tmp_path):
    s = load_data(folders["classes"], image_size=16, cache_dir=tmp_path / "a")
    assert s.train.classes == sorted(p.name for p in folders["classes"].iterdir()) and len(s.train.classes) == 10
    assert np.bincount(s.test.labels).tolist() == [2] * 10  # 10 % of 20 per class
    assert np.bincount(s.train.labels).tolist() == [18] * 10 and s.test.name == "classes/holdout"
    assert not set(_rows(s.train.images)) & set(_rows(s.test.images))
    again = load_data(folders["classes"], image_size=16, cache_dir=tmp_path / "b")  # decoded anew
    np.testing.assert_array_equal(again.test.images, s.test.images)
    np.testing.assert_array_equal(again.test.labels, s.test.labels)
    quarter = load_data(folders["classes"], image_size=16, holdout=0.25, cache_dir=tmp_path / "a")
    assert np.bincount(quarter.test.labels).tolist() == [5] * 10  # another holdout, another entry
    assert len(ImageStream(folders["classes"])) == 180  # streaming leaves the hold-out out too


def test_list_files_txt_and_csv_with_labels(folders, tmp_path):
    lists = folders["base"]
    files = sorted(p.relative_to(lists).as_posix() for p in (lists / "classes").rglob("*") if p.is_file())
    (lists / "some.txt").write_text("# my photos\n" + "\n".join(files[:50]) + "\n\n")
    s = load_data(lists / "some.txt", image_size=16, cache_dir=tmp_path)
    assert len(s.train) == 50 and s.test is None and (s.train.labels == -1).all()
    rows = [f"{f},{f.split('/')[1]}" for f in files]
    (lists / "labelled.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    s = load_data(lists / "labelled.csv", image_size=16, cache_dir=tmp_path)
    assert s.train.classes == sorted({f.split("/")[1] for f in files})
    assert np.bincount(s.test.labels).tolist() == [2] * 10 and len(s.train) == 180
    (lists / "missing.csv").write_text("path,label\n" + "\n".join(rows[:3] + ["nope/x.jpg,cat"]) + "\n")
    with pytest.raises(DataError) as e:
        load_data(lists / "missing.csv", cache_dir=tmp_path)
    assert str(e.value) == (f"list file {lists / 'missing.csv'}, line 5: 'nope/x.jpg' not found "
                            f"({lists / 'nope/x.jpg'})")
    assert len(ImageStream(lists / "some.txt")) == 50 and len(ImageStream(lists / "labelled.csv")) == 180


# --------------------------------------------------------------------------------------------
# streaming, bad input, end to end


def test_stream_reads_the_unlabelled_folder_upright(folders):
    stream = ImageStream(folders["good"])
    assert len(stream) == 201
    loader = StreamLoader(stream, [simclr_view(12)], 67, torch.device("cpu"), workers=0)
    seen = [b[0].shape for b in loader.batches(0)]
    assert seen == [(67, 12, 12, 3)] * 3


def test_default_image_size_follows_the_model():
    assert default_image_size(resolve()) == 64  # CIFAR stem
    assert default_image_size(resolve(overrides={"model": {"cifar_stem": False}})) == 256
    assert default_image_size(resolve(overrides={"aug": {"size": 224}})) == 256
    assert default_image_size(resolve(overrides={"aug": {"size": 32}})) == 37


@pytest.mark.parametrize("case", ["empty folder", "no images", "missing list entry", "corrupt image"])
def test_bad_input_is_one_line(case, folders, tmp_path, capsys):
    base = tmp_path / "in"
    base.mkdir()
    if case == "empty folder":
        data, parts = base, ("no dataset found in folder", "it is empty")
    elif case == "no images":
        (base / "notes.md").write_text("hi")
        (base / "sub").mkdir()
        (base / "sub" / "x.txt").write_text("hi")
        data, parts = base, ("no dataset found in folder", "no images in it (2 other files)")
    elif case == "missing list entry":
        (base / "l.txt").write_text("a.png\n")
        data, parts = base / "l.txt", (f"list file {base / 'l.txt'}, line 1: 'a.png' not found",)
    else:
        data, parts = folders["bad"], ("3 image(s)", "broken.jpg", "--skip-corrupt")
    rc = main(["pretrain", "--data", str(data), "--out", str(tmp_path / "out"), *FAST])
    _one_line_error(capsys, rc, *parts)


@pytest.mark.parametrize("layout,extra", [("good", []), ("good", ["data.stream=true", "aug.size=16"]),
                                          ("classes", ["eval.knn_every=1"])])
def test_pretrain_end_to_end(layout, extra, folders, tmp_path):
    out = tmp_path / "run"
    assert main(["pretrain", "--data", str(folders[layout]), "--out", str(out), *FAST, *extra]) == 0
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert np.isfinite(metrics["loss"]) and ("knn_top1" in metrics) == (layout == "classes")


def test_layout_rules_at_their_edges(tmp_path):
    img = Image.new("RGB", (9, 7), (1, 2, 3))
    for rel in ["one/a.png", "one/b/c.png"]:  # a single folder: unlabelled, not one class
        (tmp_path / "single" / rel).parent.mkdir(parents=True, exist_ok=True)
        img.save(tmp_path / "single" / rel)
    assert load_data(tmp_path / "single", cache_dir=tmp_path / "c").train.classes == []
    for rel in ["top.png", "x/a.png", "x/b.png", "kaggle/train/cat/a.png"]:  # images at the top: no wrapper
        (tmp_path / "loose" / rel).parent.mkdir(parents=True, exist_ok=True)
        img.save(tmp_path / "loose" / rel)
    assert len(load_data(tmp_path / "loose", cache_dir=tmp_path / "c").train) == 4
    for rel in ["test/cat/a.png", "test/dog/b.png", "pics/c.png"]:
        (tmp_path / "nosplit" / rel).parent.mkdir(parents=True, exist_ok=True)
        img.save(tmp_path / "nosplit" / rel)
    with pytest.raises(DataError, match=r"nosplit has test/ but no train/ beside it"):
        load_data(tmp_path / "nosplit", cache_dir=tmp_path / "c")
    (tmp_path / "nosplit" / "test").rename(tmp_path / "nosplit" / "cats")
    (tmp_path / "nosplit" / "empty").mkdir()
    with pytest.raises(DataError, match=r"class folder .*nosplit/empty has no images"):
        load_data(tmp_path / "nosplit", cache_dir=tmp_path / "c")


def test_the_three_commands_on_a_mixed_unlabelled_folder(folders, tmp_path, capsys):
    """README's "Your own images": pretrain (with --skip-corrupt on the folder with broken files),
    embed to every format (rows in listing order; a duplicated file gives identical rows), report."""
    mine = tmp_path / "mine"
    shutil.copytree(folders["bad"], mine)
    shutil.copyfile(mine / "a" / "001.png", mine / "a" / "001-copy.png")  # a duplicate, as users have
    run = tmp_path / "runs" / "mine"
    assert main(["pretrain", "--data", str(mine), "--out", str(run), "--skip-corrupt", *FAST]) == 0
    printed = capsys.readouterr().out
    assert f"run saved in {run}" in printed and "uniform" in printed  # the label-free monitors, and what next
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"feature_std", "effective_rank", "alignment", "uniformity"} <= last.keys() and "knn_top1" not in last

    formats = [".csv", ".npy"] + ([".parquet"] if _has_pyarrow() else [])
    tables = {}
    for suffix in formats:
        out = tmp_path / f"mine{suffix}"
        assert main(["embed", str(run), "--data", str(mine), "--out", str(out), "--no-progress", "--skip-corrupt"]) == 0
        tables[suffix] = _read_embeddings(out)
    paths, vectors = tables[".npy"]
    assert len(paths) == len(vectors) == 200 + 1 + 1  # the good images, the rotated one, the duplicate
    assert not set(CORRUPT) & set(paths)  # the broken files get no row (--skip-corrupt), the rest keep their order
    assert "corrupt" in capsys.readouterr().err
    for suffix, (p, v) in tables.items():
        assert p == paths and np.allclose(v, vectors, atol=1e-6), suffix
    i, j = paths.index("a/001.png"), paths.index("a/001-copy.png")
    assert np.array_equal(vectors[i], vectors[j])

    assert main(["report", str(run), "--data", str(mine), "--device", "cpu"]) == 0
    page = (run / "report" / "index.html").read_text()
    assert "most similar pairs" in page.lower() and "no labels" in page


def _has_pyarrow() -> bool:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


def _read_embeddings(path: Path) -> tuple[list[str], np.ndarray]:
    if path.suffix == ".npy":
        return path.with_suffix(".paths.txt").read_text().splitlines(), np.load(path)
    if path.suffix == ".csv":
        import csv
        rows = list(csv.reader(path.open()))
        return [r[0] for r in rows[1:]], np.asarray([[float(x) for x in r[1:]] for r in rows[1:]], np.float32)
    import pyarrow.parquet as pq
    table = pq.read_table(path).to_pydict()
    return table["path"], np.asarray(table["embedding"], np.float32)
