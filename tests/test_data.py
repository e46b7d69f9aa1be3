"""Tests for selfsup.data: every source is built here, tiny, under tmp_path."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import tarfile
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selfsup.data import DataError, DataSplits, ImageDataset, default_cache_dir, load_data
from selfsup.data import decode as data_decode
from selfsup.data import download as data_download
from selfsup.data import load as data_load

CLASSES = ["cat", "dog", "owl"]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _pixels(seed: int, size: tuple[int, int] = (6, 5)) -> np.ndarray:
    """A distinct (H, W, 3) uint8 image per seed."""
    h, w = size
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _make_folder(root: Path, held_out: str = "test", size: tuple[int, int] = (6, 5)) -> dict[str, list[np.ndarray]]:
    """<root>/{train,<held_out>}/<class>/NN.png; returns the expected RGB images per split, in load order."""
    expected: dict[str, list[np.ndarray]] = {"train": [], held_out: []}
    seed = 0
    for split, per_class in (("train", 3), (held_out, 2)):
        for c in CLASSES:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                seed += 1
                rgb = _pixels(seed, size)
                if split == "train" and c == "dog" and i == 0:
                    # grayscale file: loads with the gray value in all three channels
                    gray = rgb[..., 0]
                    Image.fromarray(gray, "L").save(d / f"{i:02d}.png")
                    rgb = np.repeat(gray[..., None], 3, axis=-1)
                elif split == "train" and c == "owl" and i == 1:
                    # RGBA file: the alpha channel is dropped
                    alpha = np.full(rgb.shape[:2] + (1,), 77, np.uint8)
                    Image.fromarray(np.concatenate([rgb, alpha], -1), "RGBA").save(d / f"{i:02d}.png")
                else:
                    Image.fromarray(rgb).save(d / f"{i:02d}.png")
                expected[split].append(rgb)
    return expected


def _tar(src: Path, dest: Path, arcname: str | None = None) -> Path:
    with tarfile.open(dest, "w:gz") as tf:
        tf.add(src, arcname=arcname or src.name)
    return dest


def _zip(src: Path, dest: Path) -> Path:
    with zipfile.ZipFile(dest, "w") as zf:
        for p in sorted(src.rglob("*")):
            zf.write(p, p.relative_to(src.parent).as_posix())
    return dest


def _assert_same(a: DataSplits, b: DataSplits) -> None:
    for x, y in ((a.train, b.train), (a.test, b.test)):
        np.testing.assert_array_equal(x.images, y.images)
        np.testing.assert_array_equal(x.labels, y.labels)
        assert x.classes == y.classes


def _cifar_image(n: int) -> np.ndarray:
    """(32, 32, 3) image whose every pixel encodes its own (h, w, c) and the image number."""
    h, w, c = np.meshgrid(np.arange(32), np.arange(32), np.arange(3), indexing="ij")
    return ((h * 7 + w * 3 + c * 50 + n * 11) % 256).astype(np.uint8)


def _cifar_rows(images: list[np.ndarray]) -> np.ndarray:
    # The release stores each image as its R plane, then G, then B, each 32x32 row-major.
    return np.stack([im.transpose(2, 0, 1).reshape(-1) for im in images])


def _dump(obj: object, path: Path) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def _make_cifar10(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    _dump({b"label_names": names, b"num_cases_per_batch": 2}, d / "batches.meta")
    train_x, train_y = [], []
    for b in range(1, 6):
        ims = [_cifar_image(2 * b), _cifar_image(2 * b + 1)]
        labels = [b % 10, (b + 3) % 10]
        _dump({b"batch_label": b"training batch", b"labels": labels, b"data": _cifar_rows(ims),
               b"filenames": [b"a.png", b"b.png"]}, d / f"data_batch_{b}")
        train_x += ims
        train_y += labels
    test_ims = [_cifar_image(100 + i) for i in range(3)]
    _dump({b"labels": [7, 8, 9], b"data": _cifar_rows(test_ims)}, d / "test_batch")
    return np.stack(train_x), np.array(train_y), np.stack(test_ims), np.array([7, 8, 9])


STL_TRAIN_Y = [1, 10, 3, 4]


def _stl_image(n: int) -> np.ndarray:
    h, w, c = np.meshgrid(np.arange(96), np.arange(96), np.arange(3), indexing="ij")
    return ((h * 5 + w * 2 + c * 60 + n * 13) % 256).astype(np.uint8)


def _make_stl(root: Path) -> Path:
    d = root / "stl10_binary"
    d.mkdir(parents=True)

    def write_x(name: str, ids: list[int]) -> None:
        # Column-major per channel: the file holds (N, C, W, H).
        np.stack([_stl_image(i).transpose(2, 1, 0) for i in ids]).tofile(d / name)

    write_x("train_X.bin", [0, 1, 2, 3])
    np.array(STL_TRAIN_Y, np.uint8).tofile(d / "train_y.bin")
    write_x("test_X.bin", [10, 11])
    np.array([2, 9], np.uint8).tofile(d / "test_y.bin")
    write_x("unlabeled_X.bin", [20, 21, 22])
    (d / "class_names.txt").write_text("\n".join(["airplane", "bird", "car", "cat", "deer", "dog", "horse",
                                                  "monkey", "ship", "truck"]) + "\n")
    return d


# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------


def test_digits_shapes_split_and_determinism():
    s = load_data("digits")
    assert s.train.images.shape == (1437, 32, 32, 3) and s.test.images.shape == (360, 32, 32, 3)
    assert s.train.images.dtype == np.uint8 and s.train.labels.dtype == np.int64
    assert s.train.classes == [str(i) for i in range(10)] and s.unlabeled is None
    assert s.train.name == "digits/train" and s.test.name == "digits/test"
    assert s.train.image_size == (32, 32)
    # gray replicated to RGB, full 0..255 range
    assert np.array_equal(s.train.images[..., 0], s.train.images[..., 2]) and s.train.images.max() == 255
    again = load_data("digits")
    _assert_same(s, again)
    train_rows = {r.tobytes() for r in s.train.images}
    assert not train_rows & {r.tobytes() for r in s.test.images}  # the 1797 digits are all distinct
    # stratified: every class keeps ~20% in test
    for c in range(10):
        n_test, n_all = (s.test.labels == c).sum(), (s.test.labels == c).sum() + (s.train.labels == c).sum()
        assert abs(n_test / n_all - 0.2) < 0.02


def test_digits_image_size_and_errors():
    s = load_data("DIGITS", image_size=16)
    assert s.train.images.shape[1:] == (16, 16, 3)
    assert s.train.images.flags.c_contiguous
    with pytest.raises(DataError, match="unlabeled"):
        load_data("digits", unlabeled=True)
    with pytest.raises(DataError, match="image_size"):
        load_data("digits", image_size=0)


# --------------------------------------------------------------------------------------------
# image folders and archives
# --------------------------------------------------------------------------------------------


def test_image_folder(tmp_path):
    root = tmp_path / "pets"
    expected = _make_folder(root)
    s = load_data(root, cache_dir=tmp_path / "cache")
    assert s.train.classes == CLASSES and s.test.classes == CLASSES
    assert s.train.images.shape == (9, 6, 5, 3) and s.test.images.shape == (6, 6, 5, 3)
    np.testing.assert_array_equal(s.train.labels, [0, 0, 0, 1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(s.test.labels, [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(s.train.images, np.stack(expected["train"]))
    np.testing.assert_array_equal(s.test.images, np.stack(expected["test"]))
    assert s.train.name == "pets/train" and s.test.name == "pets/test" and s.unlabeled is None
    with pytest.raises(DataError, match="unlabeled=True needs STL-10.*is an image folder"):
        load_data(root, cache_dir=tmp_path / "cache", unlabeled=True)


def test_image_folder_top_folder_val_and_resize(tmp_path):
    expected = _make_folder(tmp_path / "wrap" / "pets", held_out="val")
    s = load_data(tmp_path / "wrap", cache_dir=tmp_path / "cache")  # one top folder around the layout
    np.testing.assert_array_equal(s.test.images, np.stack(expected["val"]))
    assert s.test.name == "wrap/val"  # named after the path given
    small = load_data(tmp_path / "wrap", image_size=4, cache_dir=tmp_path / "cache")
    assert small.train.images.shape == (9, 4, 4, 3) and small.test.image_size == (4, 4)


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_archives_match_folder(tmp_path, kind):
    root = tmp_path / "src" / "pets"
    _make_folder(root)
    (root / "README.txt").write_text("not an image")  # ignored
    folder = load_data(root, cache_dir=tmp_path / "cache")
    archive = _tar(root, tmp_path / "pets.tar.gz") if kind == "tar.gz" else _zip(root, tmp_path / "pets.zip")
    s = load_data(archive, cache_dir=tmp_path / "cache")
    _assert_same(folder, s)
    assert s.train.name == "pets/train"


def test_archive_order_does_not_matter_and_macos_litter_is_ignored(tmp_path):
    root = tmp_path / "src" / "pets"
    _make_folder(root)
    folder = load_data(root, cache_dir=tmp_path / "cache")
    arc = tmp_path / "shuffled.tar"
    files = sorted(p for p in root.rglob("*.png"))
    with tarfile.open(arc, "w") as tf:
        for p in reversed(files):
            tf.add(p, arcname="pets/" + p.relative_to(root).as_posix())
        info = tarfile.TarInfo("__MACOSX/pets/train/cat/._00.png")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"xyz"))
    _assert_same(folder, load_data(arc, cache_dir=tmp_path / "cache"))


def test_symlinked_class_folder(tmp_path):
    root = tmp_path / "pets"
    _make_folder(root)
    elsewhere = root / "pool" / "owl"  # inside the dataset folder: links are followed only there
    elsewhere.parent.mkdir()
    (root / "train" / "owl").rename(elsewhere)
    (root / "train" / "owl").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "loop").symlink_to(elsewhere, target_is_directory=True)  # a cycle must not hang the walk
    s = load_data(root, cache_dir=tmp_path / "cache")
    assert s.train.classes == CLASSES and len(s.train) == 9


def test_folder_errors(tmp_path):
    cache = tmp_path / "cache"
    root = tmp_path / "pets"
    _make_folder(root)
    (root / "train" / "emu").mkdir()
    with pytest.raises(DataError, match=r"class folder .*train/emu has no images"):
        load_data(root, cache_dir=cache)
    (root / "train" / "emu").rmdir()

    (root / "test" / "yak").mkdir()
    Image.fromarray(_pixels(99)).save(root / "test" / "yak" / "0.png")
    with pytest.raises(DataError, match=r"test/ has class folder\(s\) that train/ lacks \(yak\)"):
        load_data(root, cache_dir=cache)
    (root / "test" / "yak" / "0.png").unlink()
    (root / "test" / "yak").rmdir()

    Image.fromarray(_pixels(7, (9, 9))).save(root / "train" / "cat" / "big.png")
    with pytest.raises(DataError, match=r"different sizes .*pass image_size"):
        load_data(root, cache_dir=cache)
    assert load_data(root, image_size=5, cache_dir=cache).train.images.shape == (10, 5, 5, 3)

    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no images found in .*empty"):
        load_data(empty, cache_dir=cache)
    with pytest.raises(DataError, match="no dataset found in folder"):
        load_data(tmp_path / "empty" / "train", cache_dir=cache)


def test_unknown_spec_and_non_archive_file(tmp_path):
    with pytest.raises(DataError) as e:
        load_data(str(tmp_path / "nope"), cache_dir=tmp_path)
    assert str(e.value) == (f"data source '{tmp_path / 'nope'}' not found: expected 'digits', 'cifar10', "
                            "'cifar100', 'stl10', an image folder, or a .tar/.tar.gz/.zip archive")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="not a .tar"):
        load_data(tmp_path / "notes.txt", cache_dir=tmp_path)


def test_corrupt_image_fails_or_is_skipped(tmp_path):
    root = tmp_path / "pets"
    _make_folder(root)
    bad = root / "train" / "dog" / "zz_broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(DataError, match=r"1 image\(s\) .*zz_broken\.jpg.*skip_corrupt=True \(--skip-corrupt\)"):
        load_data(root, cache_dir=tmp_path / "cache")
    with pytest.warns(UserWarning, match="skipped 1 corrupt image"):
        s = load_data(root, cache_dir=tmp_path / "cache", skip_corrupt=True)
    assert len(s.train) == 9
    [entry] = [d for d in (tmp_path / "cache").iterdir() if (d / "meta.json").exists()]
    assert '"skipped": 1' in (entry / "meta.json").read_text()
    with pytest.warns(UserWarning, match="skipped 1 corrupt image"):  # said again when the cache is reused
        load_data(root, cache_dir=tmp_path / "cache", skip_corrupt=True)


def test_truncated_archive(tmp_path):
    root = tmp_path / "src" / "pets"
    _make_folder(root)
    arc = _tar(root, tmp_path / "pets.tar.gz")
    cut = tmp_path / "cut.tar.gz"
    for frac in (0.3, 0.5, 0.7, 0.9, 0.99):
        cut.write_bytes(arc.read_bytes()[: int(arc.stat().st_size * frac)])
        with pytest.raises(DataError, match=r"could not read archive .*cut\.tar\.gz"):
            load_data(cut, cache_dir=tmp_path / "cache")
    # A plain tar cut exactly at a member boundary looks like a clean end to tarfile.
    plain = tmp_path / "pets.tar"
    with tarfile.open(plain, "w") as tf:
        tf.add(root, arcname="pets")
    with tarfile.open(plain) as tf:
        last = tf.getmembers()[-1].offset
    cut = tmp_path / "cut.tar"
    cut.write_bytes(plain.read_bytes()[:last])
    with pytest.raises(DataError, match=r"could not read archive .*cut\.tar.*end-of-archive"):
        load_data(cut, cache_dir=tmp_path / "cache")
    badzip = tmp_path / "bad.zip"
    badzip.write_bytes(b"PK\x03\x04 garbage")
    with pytest.raises(DataError, match=r"could not read archive .*bad\.zip"):
        load_data(badzip, cache_dir=tmp_path / "cache")


def test_process_pool_decode_matches_serial(tmp_path, monkeypatch):
    root = tmp_path / "pets"
    _make_folder(root)
    monkeypatch.setenv("SELFSUP_DECODE_WORKERS", "1")
    serial = load_data(root, cache_dir=tmp_path / "c1")
    monkeypatch.setattr(data_decode, "CHUNK", 2)  # several chunks, so the worker pool starts
    monkeypatch.setenv("SELFSUP_DECODE_WORKERS", "2")
    started = []
    real = data_decode.cf.ProcessPoolExecutor
    monkeypatch.setattr(data_decode.cf, "ProcessPoolExecutor", lambda *a, **k: started.append(1) or real(*a, **k))
    pooled = load_data(_tar(root, tmp_path / "pets.tar.gz"), cache_dir=tmp_path / "c2")
    assert started
    _assert_same(serial, pooled)


# --------------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------------


def test_cache_reused_then_invalidated(tmp_path, monkeypatch, caplog):
    root = tmp_path / "pets"
    _make_folder(root)
    cache = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="selfsup.data")
    first = load_data(root, cache_dir=cache)
    assert "decoding" in caplog.text
    entries = [d for d in cache.iterdir() if d.is_dir()]
    assert len(entries) == 1
    assert {p.name for p in entries[0].iterdir()} == {"meta.json", "train.npy", "train_labels.npy", "test.npy",
                                                      "test_labels.npy"}

    def no_decoding(*a, **k):
        raise AssertionError("decoded again although the cache is valid")

    monkeypatch.setattr(data_load, "decode_source", no_decoding)
    caplog.clear()
    second = load_data(root, cache_dir=cache)
    assert "using cached" in caplog.text
    _assert_same(first, second)
    assert isinstance(second.train.images, np.memmap) and not second.train.images.flags.writeable
    monkeypatch.undo()

    # Changing a file (new size and mtime) invalidates the cache and drops the stale entry.
    img = root / "train" / "cat" / "00.png"
    new = _pixels(1234)
    Image.fromarray(new).save(img, compress_level=0)
    third = load_data(root, cache_dir=cache)
    np.testing.assert_array_equal(third.train.images[0], new)
    assert len([d for d in cache.iterdir() if d.is_dir()]) == 1

    # A half-written entry (no meta.json) is never used.
    meta = next(d for d in cache.iterdir() if d.is_dir()) / "meta.json"
    meta.unlink()
    monkeypatch.setattr(data_load, "decode_source", no_decoding)
    with pytest.raises(AssertionError, match="decoded again"):
        load_data(root, cache_dir=cache)


def test_cache_touch_invalidates_archive(tmp_path, monkeypatch):
    root = tmp_path / "src" / "pets"
    _make_folder(root)
    arc = _tar(root, tmp_path / "pets.tar.gz")
    load_data(arc, cache_dir=tmp_path / "cache")
    calls = []
    real = data_load.decode_source
    monkeypatch.setattr(data_load, "decode_source", lambda *a, **k: calls.append(1) or real(*a, **k))
    load_data(arc, cache_dir=tmp_path / "cache")
    assert calls == []
    st = arc.stat()
    os.utime(arc, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    load_data(arc, cache_dir=tmp_path / "cache")
    assert calls == [1]
    load_data(arc, image_size=3, cache_dir=tmp_path / "cache")  # another image_size is another entry
    assert calls == [1, 1]


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SELFSUP_CACHE", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("SELFSUP_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "selfsup"


# --------------------------------------------------------------------------------------------
# CIFAR python release
# --------------------------------------------------------------------------------------------


def test_cifar10_folder_and_archive(tmp_path):
    train_x, train_y, test_x, test_y = _make_cifar10(tmp_path / "dl")
    for spec in (tmp_path / "dl" / "cifar-10-batches-py", tmp_path / "dl",
                 _tar(tmp_path / "dl" / "cifar-10-batches-py", tmp_path / "cifar-10-python.tar.gz")):
        s = load_data(spec, cache_dir=tmp_path / "cache")
        np.testing.assert_array_equal(s.train.images, train_x)  # NHWC, pixel (h, w, c) where it belongs
        np.testing.assert_array_equal(s.train.labels, train_y)
        np.testing.assert_array_equal(s.test.images, test_x)
        np.testing.assert_array_equal(s.test.labels, test_y)
        assert s.train.classes[:2] == ["airplane", "automobile"] and len(s.train.classes) == 10
        assert s.train.name == "cifar10/train"
    s = load_data(tmp_path / "dl", image_size=8, cache_dir=tmp_path / "cache")
    assert s.train.images.shape == (10, 8, 8, 3)


def test_cifar100_folder(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    names = [f"class{i}".encode() for i in range(100)]
    _dump({b"fine_label_names": names, b"coarse_label_names": [b"x"] * 20}, d / "meta")
    ims = [_cifar_image(i) for i in range(4)]
    _dump({b"data": _cifar_rows(ims[:3]), b"fine_labels": [5, 99, 0], b"coarse_labels": [1, 2, 3]}, d / "train")
    _dump({b"data": _cifar_rows(ims[3:]), b"fine_labels": [42], b"coarse_labels": [4]}, d / "test")
    s = load_data(d, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(s.train.images, np.stack(ims[:3]))
    np.testing.assert_array_equal(s.train.labels, [5, 99, 0])
    np.testing.assert_array_equal(s.test.labels, [42])
    assert len(s.train.classes) == 100 and s.train.classes[99] == "class99" and s.test.name == "cifar100/test"


def test_cifar_pickle_may_not_run_code(tmp_path):
    _make_cifar10(tmp_path)
    d = tmp_path / "cifar-10-batches-py"
    (d / "test_batch").write_bytes(pickle.dumps({b"data": os.getcwd}, protocol=2))
    with pytest.raises(DataError, match=r"test_batch is not a readable CIFAR batch file"):
        load_data(d, cache_dir=tmp_path / "cache")
    (d / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"'data_batch_3' is missing"):
        load_data(d, cache_dir=tmp_path / "cache")


def _fake_response(payload: bytes):
    class Response(io.BytesIO):
        headers = {"Content-Length": str(len(payload))}

    return Response(payload)


def test_cifar10_download(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"is not there and downloading is off.*--data /path/to/cifar-10-python\.tar\.gz"):
        load_data("cifar10", cache_dir=cache, download=False)

    def offline(url, timeout=None):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(data_download, "urlopen", offline)
    with pytest.raises(DataError, match=r"could not download https://.*no route to host.*pass --data"):
        load_data("cifar10", cache_dir=cache)
    assert not list((cache / "downloads").glob("*"))  # no partial file left behind

    train_x, _, _, _ = _make_cifar10(tmp_path / "src")
    payload = _tar(tmp_path / "src" / "cifar-10-batches-py", tmp_path / "fake.tar.gz").read_bytes()
    monkeypatch.setattr(data_download, "urlopen", lambda url, timeout=None: _fake_response(payload))
    with pytest.raises(DataError, match="md5"):  # the fake is not the real archive
        load_data("cifar10", cache_dir=cache)
    monkeypatch.setitem(data_download.REMOTES, "cifar10",
                        data_download.Remote(data_download.REMOTES["cifar10"].url, hashlib.md5(payload).hexdigest()))
    s = load_data("cifar10", cache_dir=cache)
    np.testing.assert_array_equal(s.train.images, train_x)
    monkeypatch.setattr(data_download, "urlopen", offline)
    _assert_same(s, load_data("cifar10", cache_dir=cache, download=False))  # present and verified: no network


# --------------------------------------------------------------------------------------------
# STL-10 binary release
# --------------------------------------------------------------------------------------------


def test_stl10_folder_and_archive(tmp_path):
    d = _make_stl(tmp_path / "dl")
    arc = _tar(d, tmp_path / "stl10_binary.tar.gz")
    for spec in (d, arc):
        cache = tmp_path / f"cache-{spec.name}"
        s = load_data(spec, cache_dir=cache)
        assert s.unlabeled is None
        np.testing.assert_array_equal(s.train.images, np.stack([_stl_image(i) for i in range(4)]))
        np.testing.assert_array_equal(s.train.labels, np.array(STL_TRAIN_Y) - 1)
        np.testing.assert_array_equal(s.test.images, np.stack([_stl_image(10), _stl_image(11)]))
        np.testing.assert_array_equal(s.test.labels, [1, 8])
        assert s.train.classes[2] == "car" and s.train.name == "stl10/train"
        assert isinstance(s.train.images, np.memmap)

        u = load_data(spec, cache_dir=cache, unlabeled=True)  # not in the first cache: decoded again
        np.testing.assert_array_equal(u.unlabeled.images, np.stack([_stl_image(i) for i in (20, 21, 22)]))
        np.testing.assert_array_equal(u.unlabeled.labels, [-1, -1, -1])
        assert u.unlabeled.name == "stl10/unlabeled"
        assert load_data(spec, cache_dir=cache).unlabeled is None
    assert not [p for p in (tmp_path / "cache-stl10_binary.tar.gz").iterdir() if p.name.startswith(".extract")]
    with pytest.raises(DataError, match="unlabeled=True needs STL-10"):
        load_data("digits", unlabeled=True)
    small = load_data(d, image_size=32, cache_dir=tmp_path / "cache-small")
    assert small.train.images.shape == (4, 32, 32, 3)


# --------------------------------------------------------------------------------------------
# ImageDataset
# --------------------------------------------------------------------------------------------


def test_image_dataset_validation_and_mean_std():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 4, 5, 3), dtype=np.uint8)
    ds = ImageDataset(images, np.arange(20) % 2, ["a", "b"], "toy")
    assert len(ds) == 20 and ds.image_size == (4, 5) and ds.labels.dtype == np.int64
    mean, std = ds.mean_std()
    x = images.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(mean, x.mean(0), atol=1e-9)
    np.testing.assert_allclose(std, x.std(0), atol=1e-9)
    assert "n=20" in repr(ds)
    with pytest.raises(DataError, match=r"uint8 array of shape \(N, H, W, 3\)"):
        ImageDataset(images.astype(np.float32), np.zeros(20), ["a"])
    with pytest.raises(DataError, match="labels must lie in"):
        ImageDataset(images, np.full(20, 2), ["a", "b"])


# --------------------------------------------------------------------------------------------
# the shared real archive
# --------------------------------------------------------------------------------------------

# Decoding the 60k-JPEG CIFAR-10 copy takes ~6 s on two cores, too slow for this file;
# the integration tests exercise it.


def test_resizing_keeps_the_centre_square_and_default_size_takes_mixed_sizes(tmp_path):
    stripes = np.zeros((10, 30, 3), np.uint8)  # (H, W, 3): red | green | blue thirds
    stripes[:, :10, 0] = stripes[:, 10:20, 1] = stripes[:, 20:, 2] = 255
    Image.fromarray(stripes).save(tmp_path / "wide.png")
    square = data_decode.decode_image(str(tmp_path / "wide.png"), 5)
    assert square.shape == (5, 5, 3) and (square[..., 1] > 200).all() and (square[..., 0] < 60).all()

    root = tmp_path / "pets"
    _make_folder(root)
    Image.fromarray(_pixels(7, (9, 9))).save(root / "train" / "cat" / "big.png")
    with pytest.raises(DataError, match=r"different sizes \(5x6 for .*pass image_size"):
        load_data(root, cache_dir=tmp_path / "cache")  # no size to default to
    split = load_data(root, default_size=4, cache_dir=tmp_path / "cache")  # the split layout takes it too
    assert split.chosen_size == 4 and split.train.images.shape[1:] == (4, 4, 3)
    s = load_data(root / "train", default_size=4, holdout=0.34, cache_dir=tmp_path / "cache")  # class folders
    assert s.chosen_size == 4 and s.train.images.shape == (7, 4, 4, 3) and s.test.images.shape == (3, 4, 4, 3)
    _make_folder(tmp_path / "same")
    uniform = load_data(tmp_path / "same", default_size=4, cache_dir=tmp_path / "cache")
    assert uniform.chosen_size is None and uniform.train.image_size == (6, 5)  # one size: kept as it is
    with pytest.raises(DataError, match="holdout must be a fraction"):
        load_data(root, holdout=1.0, cache_dir=tmp_path / "cache")
