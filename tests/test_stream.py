"""The streaming loader (issue 8): every image exactly once per epoch across workers and ranks,
crops at decode time that are a pure function of (seed, epoch, image), tar shards, and a
training run that streams."""
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.augment import simclr_view
from selfsup.cli import main
from selfsup.data import DataError
from selfsup.stream import Crops, ImageStream, StreamLoader, decode_crops

N = 24


def _solid(i: int) -> Image.Image:
    """Image i: a solid colour that names it (PNG is lossless, so any crop still does)."""
    return Image.new("RGB", (12 + i % 5, 10 + i % 3), (i, 255 - i, 7))


def _folder(root, n=N):
    for i in range(n):
        d = root / "train" / f"c{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        _solid(i).save(d / f"{i:03d}.png")
    return root


def _ids(batch: torch.Tensor) -> list[int]:
    return batch[:, 0, 0, 0].tolist()  # (B, S, S, 3) uint8: the red channel is the image id


@pytest.mark.parametrize("workers", [0, 2])
def test_every_image_exactly_once_per_epoch_across_workers_and_ranks(tmp_path, workers):
    stream = ImageStream(_folder(tmp_path))
    views = [simclr_view(8), simclr_view(6)]
    loaders = [StreamLoader(stream, views, 8, torch.device("cpu"), seed=3, rank=r, world_size=2, workers=workers)
               for r in range(2)]
    orders = []
    for epoch in range(2):
        seen = []
        for loader in loaders:
            for batch in loader.batches(epoch):
                assert [tuple(v.shape) for v in batch] == [(4, 8, 8, 3), (4, 6, 6, 3)]
                assert _ids(batch[0]) == _ids(batch[1])  # the views of one image stay together
                seen += _ids(batch[0])
        assert sorted(seen) == list(range(N)), f"epoch {epoch}: {sorted(seen)}"
        orders.append(seen)
    assert orders[0] != orders[1]  # a new permutation each epoch


def test_crops_depend_on_seed_epoch_and_batch_not_on_the_worker(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(root / f"{i}.png")
    stream, views = ImageStream(root), [simclr_view(8)]
    runs = [[b[0] for b in StreamLoader(stream, views, 4, torch.device("cpu"), seed=1, workers=w).batches(0)]
            for w in (0, 2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    other_epoch = [b[0] for b in StreamLoader(stream, views, 4, torch.device("cpu"), seed=1, workers=0).batches(1)]
    assert not all(torch.equal(a, b) for a, b in zip(runs[0], other_epoch))


def test_decode_time_crop_of_a_large_jpeg_uses_draft_and_gives_the_output_size():
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    smooth = np.kron(rng.integers(0, 256, (15, 20, 3)), np.ones((25, 25, 1))).astype(np.uint8)  # (375, 500, 3)
    Image.fromarray(smooth).save(buf, format="JPEG", quality=95)
    full = simclr_view(32, scale=(1.0, 1.0), ratio=(500 / 375, 500 / 375))  # the whole image
    crops = decode_crops(buf.getvalue(), [full, simclr_view(16)], torch.Generator().manual_seed(0))
    assert [c.shape for c in crops] == [(32, 32, 3), (16, 16, 3)] and crops[0].dtype == np.uint8
    reference = np.asarray(Image.fromarray(smooth).resize((32, 32), Image.Resampling.BILINEAR))
    assert np.abs(crops[0].astype(int) - reference.astype(int)).mean() < 12  # draft's DCT scaling is close


def test_tar_shards_stream_every_member_once(tmp_path):
    for s in range(3):
        with tarfile.open(tmp_path / f"train-{s}.tar", "w") as tf:
            for i in range(s * 8, s * 8 + 8):
                buf = io.BytesIO()
                _solid(i).save(buf, format="PNG")
                info = tarfile.TarInfo(f"c/{i:03d}.png")
                info.size = len(buf.getvalue())
                tf.addfile(info, io.BytesIO(buf.getvalue()))
    stream = ImageStream(str(tmp_path / "train-*.tar"))
    assert len(stream) == N and len(ImageStream(tmp_path)) == N
    seen = [i for b in StreamLoader(stream, [simclr_view(6)], 6, torch.device("cpu"), workers=2).batches(0)
            for i in _ids(b[0])]
    assert sorted(seen) == list(range(N))


def test_compressed_shards_and_empty_folders_are_refused(tmp_path):
    with tarfile.open(tmp_path / "a.tar.gz", "w:gz") as tf:
        tf.addfile(tarfile.TarInfo("x.png"), io.BytesIO(b""))
    with pytest.raises(DataError, match="uncompressed"):
        ImageStream(tmp_path / "a.tar.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        ImageStream(tmp_path / "empty")


def test_pretrain_streams_from_an_image_folder(tmp_path):
    out = tmp_path / "run"
    assert main(["pretrain", "--method", "simclr", "--data", str(_folder(tmp_path / "data", 32)), "--out", str(out),
                 "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--no-progress",
                 "--set", "data.stream=true", "data.workers=1", "aug.size=16", "model.width=0.125"]) == 0
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["step"] == 4 and np.isfinite(metrics["loss"])


def test_class_folders_and_list_files_stream_all_but_the_hold_out(tmp_path):
    for i in range(N):  # <root>/<class>/<image>: no train/, so class folders with a 10 % hold-out
        d = tmp_path / "pets" / f"c{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        _solid(i).save(d / f"{i:03d}.png")
    assert len(ImageStream(tmp_path / "pets")) == N - 3  # one of each class's 8
    assert len(ImageStream(tmp_path / "pets", holdout=0.0)) == N
    (tmp_path / "list.txt").write_text("\n".join(f"pets/c0/{i:03d}.png" for i in range(0, N, 3)))
    (tmp_path / "list.csv").write_text("path,label\n" + "\n".join(
        f"pets/c{i % 3}/{i:03d}.png,c{i % 3}" for i in range(N)))
    assert len(ImageStream(tmp_path / "list.txt")) == 8 and len(ImageStream(tmp_path / "list.csv")) == N - 3
    (tmp_path / "bad.txt").write_text("pets/c0/000.png\npets/c0/nope.png\n")
    with pytest.raises(DataError, match=r"bad\.txt, line 2: 'pets/c0/nope\.png' not found"):
        ImageStream(tmp_path / "bad.txt")



def _shard(path, n=6):
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for i in range(n):
            buf = io.BytesIO()
            _solid(i).save(buf, "PNG")
            info = tarfile.TarInfo(f"{i:03d}.png")
            info.size = len(buf.getvalue())
            tf.addfile(info, io.BytesIO(buf.getvalue()))
    return path


def test_damaged_shards_are_named_and_skipped_only_with_skip_corrupt(tmp_path):
    with tarfile.open(_shard(tmp_path / "ref.tar")) as tf:
        offsets = [m.offset for m in tf]
    bad = _shard(tmp_path / "bad" / "a.tar")
    raw = bytearray(bad.read_bytes())
    raw[offsets[3]:offsets[3] + 100] = b"\xff" * 100  # the 4th member's header (its name) garbled
    bad.write_bytes(bytes(raw))
    short = _shard(tmp_path / "short" / "a.tar")
    short.write_bytes(short.read_bytes()[:offsets[4] + 532])  # the 5th member's data cut short
    empty = tmp_path / "empty" / "a.tar"
    empty.parent.mkdir()
    empty.write_bytes(b"")
    cases = [(bad, f"shard {bad}: bad tar header at byte {offsets[3]}, the members after it are unreadable", 3),
             (short, f"shard {short} is truncated: member 004.png needs", 4),
             (empty, f"shard {empty} is empty", 0)]
    for shard, message, kept in cases:
        _shard(shard.parent / "b.tar")  # a good shard beside it
        with pytest.raises(DataError) as e:
            ImageStream(shard.parent)
        assert message in str(e.value) and "gunzip" not in str(e.value)
        with pytest.warns(UserWarning, match=f"{message}.*readable member"):
            stream = ImageStream(shard.parent, skip_corrupt=True)
        assert len(stream) == kept + 6
        assert [Image.open(io.BytesIO(stream.read(i))).size for i in range(len(stream))]


def test_a_file_swapped_for_a_link_outside_the_root_after_listing_is_refused(tmp_path):
    root = _folder(tmp_path / "data", 8)
    secret = tmp_path / "secret.png"
    _solid(99).save(secret)
    strict, skipping = ImageStream(root), ImageStream(root, skip_corrupt=True)
    victim = strict.files[2]
    os.remove(victim)
    os.symlink(secret, victim)  # swapped after the listing
    with pytest.raises(DataError, match="is now a symbolic link to .*secret.png, outside"):
        strict.read(2)
    batch = Crops(strict, [simclr_view(6)], 0).__getitems__([(0, 2)])
    assert "symbolic link" in batch.error and victim in batch.error
    batch = Crops(skipping, [simclr_view(6)], 0).__getitems__([(0, 2)])  # counted; the next image instead
    assert batch.error is None and len(batch.crops) == 1 and [name for name, _ in batch.skipped] == [victim]
    os.remove(victim)
    os.symlink(strict.files[3], victim)  # a link inside the folder is still read
    assert strict.read(2) == Path(strict.files[3]).read_bytes()
