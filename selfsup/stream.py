"""Streaming data for datasets that do not fit in memory (ImageNet-1k: 1.28 M JPEGs).

The images stay on disk, in an image folder or in uncompressed ``.tar`` shards. DataLoader
worker processes decode them and take each view's random-resized crop *at decode time*: the
crop box is drawn from the image's header size, JPEG ``draft()`` lets libjpeg decode at the
smallest DCT scale (1/2, 1/4, 1/8) that still covers every box at its output size, and one PIL
resize maps the box to the output side. What crosses to the device is one uint8
(B, S_v, S_v, 3) batch per view; the rest of the recipe (flip, colour, blur, solarize,
normalise) runs batched on the device in :mod:`selfsup.augment` as it does for in-memory data.

The order is the in-memory loader's: each epoch is a seeded permutation of the whole index
(:func:`selfsup.loader.epoch_permutation`), every rank takes its contiguous share of each global
batch, and the DataLoader hands each batch to one worker, so every image is decoded exactly
once per epoch across workers and ranks (the last partial global batch is dropped). The crops
of a batch are a pure function of (seed, epoch, the batch's images), whichever worker decodes it.

A folder is listed by :func:`selfsup.data.scan_image_folder`, so the in-memory path's rules
hold: links are followed only inside the folder and never from train/ into another split, and
only regular files are read (a named pipe named ``x.png`` is refused, never opened). An image
that cannot be decoded stops the run with one error naming it; with ``skip_corrupt``
(``--skip-corrupt``, ``data.skip_corrupt``) it is replaced, for that step, by the next image of
the index that decodes, and counted (:attr:`StreamLoader.skipped`), with a warning per file.
"""
from __future__ import annotations

import dataclasses
import glob
import io
import math
import os
import tarfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .augment import Augment, ViewConfig, sample_crop_boxes
from .data import (LIST_SUFFIXES, DataError, is_hidden_name, is_image_name, open_regular, scan_image_folder, to_rgb,
                   training_images, upright, worker_init)
from .loader import epoch_permutation

#: Normalisation for streamed data (there is no decoded array to measure): ImageNet's.
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
#: With skip_corrupt, how many further images of the index are tried in place of a corrupt one.
SUBSTITUTE_TRIES = 16
#: Warnings named one corrupt file each; after these, only the count grows.
_NAMED_WARNINGS = 20


class ImageStream:
    """The index of a streamable source: the files of an image folder or of a list file
    (``.txt``/``.csv``), or the members of ``.tar`` shards (a .tar file, a glob such as
    ``shards/train-*.tar``, or a folder of them).

    A folder with a ``train/`` subfolder streams ``train/``; class folders and a labelled list
    stream all but their hold-out (``holdout``, as :func:`selfsup.data.load_data` holds it out);
    otherwise every image under the folder. Labels are not read: streaming is for pre-training.
    ``skip_corrupt``: replace an image that cannot be decoded and count it (see the module
    docstring) instead of stopping.
    """

    def __init__(self, source: str | os.PathLike, *, skip_corrupt: bool = False, holdout: float = 0.1):
        spec = str(source)
        path = Path(spec)
        listed = path.is_file() and path.name.lower().endswith(LIST_SUFFIXES)
        shards = sorted(glob.glob(spec)) if any(c in spec for c in "*?[") else []
        if not shards and path.is_dir():
            shards = sorted(str(p) for p in path.iterdir() if p.suffix == ".tar" and p.is_file())
        if not shards and path.is_file() and not listed:
            shards = [spec]
        self.shards: list[str] = shards
        self.skip_corrupt = bool(skip_corrupt)
        self.files: list[str] = []
        self.root: str | None = None  # a folder's real path: a file read must still lie inside it
        self.members = np.zeros((0, 3), dtype=np.int64)  # (N, 3): shard, data offset, size
        if shards:
            self.members = self._index_shards(shards)
        elif path.is_dir() and (path / "train").is_dir():
            # The other splits are listed too, so that no link leads into them.
            _, found = scan_image_folder(path)
            self.files = sorted(str(path / rel) for rel, _, _ in found
                                if is_image_name(rel) and rel.startswith("train/"))
        elif path.is_dir() or listed:
            self.files = training_images(path, holdout)[1]
        else:
            raise DataError(f"data.stream: '{spec}' is neither an image folder nor .tar shards "
                            f"(a .tar file, a folder of them, or a glob like 'shards/train-*.tar')")
        if self.files and path.is_dir():
            self.root = os.path.realpath(path)
        if not len(self):
            raise DataError(f"data.stream: no images found in '{spec}'")
        self._open: dict[int, object] = {}  # per process: the shard files it has open

    def _index_shards(self, shards: list[str]) -> np.ndarray:
        rows = []
        for s, shard in enumerate(shards):
            members, damage = _shard_members(shard)
            rows += [(s, offset, size) for offset, size in members]
            if damage is None:
                continue
            if not self.skip_corrupt:
                raise DataError(f"data.stream: {damage}; write the shard again, or pass --skip-corrupt "
                                f"(data.skip_corrupt) to stream its readable members only")
            warnings.warn(f"data.stream: {damage}; streaming its {len(members)} readable member(s) because "
                          f"skip_corrupt is set", stacklevel=3)
        return np.asarray(rows, dtype=np.int64).reshape(-1, 3)

    def __len__(self) -> int:
        return len(self.files) or len(self.members)

    def read(self, i: int) -> bytes:
        """The encoded bytes of image ``i``, from its file (regular files only) or its shard."""
        if self.files:
            with open_regular(self.files[i], self.root) as f:  # a link swapped in since listing is refused
                return f.read()
        shard, offset, size = (int(v) for v in self.members[i])
        f = self._open.get(shard)
        if f is None:
            f = self._open[shard] = open(self.shards[shard], "rb")
        f.seek(offset)
        return f.read(size)

    def name(self, i: int) -> str:
        """Image ``i`` as a user can find it: its path, or its shard and member offset."""
        if self.files:
            return self.files[i]
        shard, offset, _ = (int(v) for v in self.members[i])
        return f"the member at byte {offset} of {self.shards[shard]}"

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": {}}  # file handles stay in the process that opened them

    def sample(self, n: int, size: int, seed: int) -> np.ndarray:
        """A fixed sample of ``n`` images (fewer if the stream has fewer), chosen by ``seed``, each
        its central square resized to ``size``: uint8 (n, size, size, 3), decoded once (the
        label-free monitors of a streamed run). An image that cannot be decoded is passed over."""
        order = np.random.default_rng(seed).permutation(len(self))
        view, out = ViewConfig(size=size), []
        for i in order:
            if len(out) == n:
                break
            try:
                with Image.open(io.BytesIO(self.read(int(i)))) as raw, upright(raw) as im:
                    w, h = im.size
                    side = min(w, h)
                    out.append(_crop(im, [view], [[(w - side) // 2, (h - side) // 2, side, side]])[0])
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
                continue
        if not out:
            raise DataError(f"data.stream: none of the images could be decoded for the monitors (first: {self.name(0)})")
        return np.stack(out)  # (n, S, S, 3)


def _shard_members(shard: str) -> tuple[list[tuple[int, int]], str | None]:
    """The (data offset, size) of a shard's image members, and what is wrong with the shard
    (None: nothing): empty, a bad header (tarfile stops there silently), or cut short."""
    size = os.path.getsize(shard)
    if size == 0:
        return [], f"shard {shard} is empty"
    with open(shard, "rb") as f:
        magic = f.read(6)
    if magic[:2] == b"\x1f\x8b" or magic[:3] == b"BZh" or magic == b"\xfd7zXZ\x00":
        raise DataError(f"data.stream: '{shard}' is a compressed .tar, not an uncompressed one; streaming "
                        f"seeks to each image, so decompress the shards first (gunzip)")
    rows: list[tuple[int, int]] = []
    end = 0  # where the next header should be
    try:
        with tarfile.open(shard, mode="r:") as tf:  # uncompressed only: members are read by seeking
            for m in tf:
                if m.offset_data + m.size > size:
                    return rows, (f"shard {shard} is truncated: member {m.name} needs "
                                  f"{m.offset_data + m.size - size} bytes past the end")
                if m.isfile() and is_image_name(m.name) and not any(is_hidden_name(p) for p in m.name.split("/")):
                    rows.append((m.offset_data, m.size))
                end = m.offset_data + -(-m.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            end = tf.offset  # where the members stopped: the end-of-archive blocks, if nothing is wrong
    except tarfile.ReadError:  # a bad first header, or the data stops before the next header
        pass
    if end >= size:
        return rows, f"shard {shard} is truncated: it stops at byte {size}, before its end-of-archive marker"
    with open(shard, "rb") as f:
        f.seek(end)
        block = f.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE and block.strip(b"\0"):
        return rows, f"shard {shard} is truncated: its header at byte {end} is cut short"
    if block.strip(b"\0"):
        return rows, f"shard {shard}: bad tar header at byte {end}, the members after it are unreadable"
    return rows, None


def decode_crops(src: bytes | str, views: list[ViewConfig], generator: torch.Generator,
                 boxes: list[list[float]] | None = None) -> list[np.ndarray]:
    """Decode one image into each view's random-resized crop at the view's output size.

    The boxes (x0, y0, w, h), one per view, are drawn as :func:`selfsup.augment.sample_crop_boxes`
    draws them on the device, in the full-resolution frame (unless given); the JPEG is then
    decoded at the coarsest scale at which every box still has at least its output side in
    pixels. -> V uint8 arrays (S_v, S_v, 3).
    """
    if isinstance(src, str):
        with open_regular(src) as f:  # never a named pipe
            src = f.read()
    with Image.open(io.BytesIO(src)) as raw, upright(raw) as im:
        width, height = im.size
        if boxes is None:
            boxes = [sample_crop_boxes(1, height, width, v.scale, v.ratio, generator)[0].tolist() for v in views]
        return _crop(im, views, boxes)


def _crop(im: Image.Image, views: list[ViewConfig], boxes: list[list[float]]) -> list[np.ndarray]:
    width, height = im.size
    shrink = min(min(w, h) / v.size for (_, _, w, h), v in zip(boxes, views))
    if shrink >= 2:
        im.draft("RGB", (math.ceil(width / shrink), math.ceil(height / shrink)))
    rgb = to_rgb(im)
    sx, sy = rgb.size[0] / width, rgb.size[1] / height
    return [np.asarray(rgb.resize((v.size, v.size), Image.Resampling.BILINEAR,
                                  box=(x0 * sx, y0 * sy, (x0 + w) * sx, (y0 + h) * sy)))
            for (x0, y0, w, h), v in zip(boxes, views)]


def device_view(view: ViewConfig) -> ViewConfig:
    """The part of ``view`` left for the device once the crop was taken at decode time: the
    whole (already output-sized) image, flipped, coloured, blurred, ... as before."""
    return dataclasses.replace(view, scale=(1.0, 1.0), ratio=(1.0, 1.0))


@dataclasses.dataclass
class _Batch:
    """What a worker hands back for one batch: each image's view crops, the images it skipped
    (skip_corrupt), or the one-line error that stops the run (raised in the main process, so
    it is not wrapped in a worker traceback)."""
    crops: list[list[np.ndarray]]
    skipped: list[tuple[str, str]]  # (image, why)
    error: str | None = None


class _Corrupt(Exception):
    """Image i of the index cannot be read or decoded (message: why)."""


class Crops(torch.utils.data.Dataset):
    """A batch of (epoch, index) -> each image's view crops. The boxes of a batch are drawn
    together, per image size and view, from a generator seeded by (seed, epoch, the batch's
    indices): the same whichever worker decodes the batch."""

    def __init__(self, stream: ImageStream, views: list[ViewConfig], seed: int):
        self.stream, self.views, self.seed = stream, views, seed

    def __len__(self) -> int:
        return len(self.stream)

    def __getitem__(self, key: tuple[int, int]) -> _Batch:
        return self.__getitems__([key])

    def __getitems__(self, keys: list[tuple[int, int]]) -> _Batch:
        epoch, indices = keys[0][0], [i for _, i in keys]
        g = torch.Generator().manual_seed(hash((self.seed, epoch, *indices)) & (2**63 - 1))
        crops: list[list[np.ndarray] | None] = [None] * len(indices)
        skipped: list[tuple[str, str]] = []
        todo, tries = list(range(len(indices))), 0  # batch positions still to fill; substitutes tried
        while todo:
            failed = self._fill(crops, todo, indices, g)
            for k, (i, why) in failed.items():
                if not self.stream.skip_corrupt:
                    return _Batch([], skipped, f"data.stream: cannot decode {self.stream.name(i)} ({why}); fix "
                                               f"or delete it, or pass --skip-corrupt (data.skip_corrupt) to skip it")
                skipped.append((self.stream.name(i), why))
                indices[k] = (i + 1) % len(self.stream)  # its place goes to the next image of the index
            tries += bool(failed)
            if failed and tries > SUBSTITUTE_TRIES:
                return _Batch([], skipped, f"data.stream: {len(skipped)} images in a row could not be decoded, "
                                           f"e.g. {skipped[0][0]} ({skipped[0][1]}); is the source readable?")
            todo = list(failed)
        return _Batch(crops, skipped)  # type: ignore[arg-type]

    def _fill(self, crops: list, todo: list[int], indices: list[int], g: torch.Generator) -> dict[int, tuple]:
        """Decode the images at batch positions ``todo`` into ``crops``; -> {position: (index, why)}."""
        failed: dict[int, tuple[int, str]] = {}
        images: dict[int, Image.Image] = {}
        for k in todo:
            try:
                images[k] = self._open(indices[k])
            except _Corrupt as e:
                failed[k] = (indices[k], str(e))
        try:
            by_size: dict[tuple[int, int], list[int]] = {}
            for k, im in images.items():
                by_size.setdefault(im.size, []).append(k)
            boxes: dict[int, list[list[float]]] = {k: [] for k in images}  # per image, per view
            for (width, height), members in by_size.items():
                for v in self.views:  # one draw per size and view: no per-image torch overhead
                    drawn = sample_crop_boxes(len(members), height, width, v.scale, v.ratio, g).tolist()
                    for k, box in zip(members, drawn):
                        boxes[k].append(box)
            for k, im in images.items():
                try:
                    crops[k] = _crop(im, self.views, boxes[k])
                except (OSError, ValueError, SyntaxError) as e:  # truncated data shows only when decoded
                    failed[k] = (indices[k], f"{type(e).__name__}: {e}")
        finally:
            for im in images.values():
                im.close()
        return failed

    def _open(self, i: int) -> Image.Image:
        try:
            return upright(Image.open(io.BytesIO(self.stream.read(i))))  # EXIF-rotated: decoded here, no draft
        except (OSError, ValueError, SyntaxError) as e:  # PIL's UnidentifiedImageError is an OSError
            raise _Corrupt(f"{type(e).__name__}: {e}") from None


class _RankBatches(torch.utils.data.Sampler):
    """This rank's (epoch, index) lists, one per step of the epoch set before iterating."""

    def __init__(self, n: int, global_batch: int, seed: int, rank: int, world_size: int):
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.local_batch, self.rank = global_batch // world_size, rank
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return self.n // self.global_batch - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        perm = epoch_permutation(self.n, self.seed, self.epoch).tolist()
        for step in range(self.start, self.n // self.global_batch):
            lo = step * self.global_batch + self.rank * self.local_batch
            yield [(self.epoch, i) for i in perm[lo:lo + self.local_batch]]


def _init_worker(worker_id: int) -> None:
    worker_init()  # the loop stops the run on a signal; a worker dies with its parent


def _collate(batch: _Batch) -> tuple[list[Tensor], list[tuple[str, str]], str | None]:
    if batch.error is not None:
        return [], batch.skipped, batch.error
    views = [torch.from_numpy(np.stack(view)) for view in zip(*batch.crops)]  # V x (B, S_v, S_v, 3) uint8
    return views, batch.skipped, None


class StreamLoader:
    """:class:`selfsup.loader.DeviceLoader`'s interface over an :class:`ImageStream`: ``batches``
    yields, per step, one uint8 (B_local, S_v, S_v, 3) batch per view, already cropped; pair it
    with :func:`device_augmentations` of the method's views."""

    def __init__(self, stream: ImageStream, views: list[ViewConfig], global_batch: int, device: torch.device,
                 *, seed: int = 0, rank: int = 0, world_size: int = 1, workers: int | None = None):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by the {world_size} ranks")
        if len(stream) < global_batch:
            raise DataError(f"data.stream: {len(stream)} images, fewer than one batch of {global_batch}; "
                            f"lower train.batch_size")
        if workers is None:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            workers = max(1, min(8, cores // world_size))
        self.n, self.global_batch, self.device = len(stream), global_batch, device
        self.corrupt: set[str] = set()  # the corrupt images skipped so far (skip_corrupt)
        self.sampler = _RankBatches(self.n, global_batch, seed, rank, world_size)
        self.loader = torch.utils.data.DataLoader(
            Crops(stream, views, seed), batch_sampler=self.sampler, num_workers=workers,
            collate_fn=_collate, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
            worker_init_fn=_init_worker,
            prefetch_factor=4 if workers > 0 else None)

    def __len__(self) -> int:
        return self.n // self.global_batch

    @property
    def skipped(self) -> int:
        """How many distinct corrupt images were skipped so far (skip_corrupt)."""
        return len(self.corrupt)

    def batches(self, epoch: int, start: int = 0) -> Iterator[list[Tensor]]:
        self.sampler.epoch, self.sampler.start = epoch, start
        for views, skipped, error in self.loader:
            for name, why in skipped:
                if name in self.corrupt:
                    continue
                self.corrupt.add(name)
                if len(self.corrupt) <= _NAMED_WARNINGS:
                    last = len(self.corrupt) == _NAMED_WARNINGS
                    warnings.warn(f"skipped corrupt image {name} ({why}) because skip_corrupt is set (the next image "
                                  f"of the index took its place); {len(self.corrupt)} skipped so far"
                                  + ("; later ones are only counted" if last else ""), stacklevel=2)
            if error is not None:
                raise DataError(error)
            yield [v.to(self.device, non_blocking=True) for v in views]


def device_augmentations(augmentations: list[Augment]) -> list[Augment]:
    """The method's augmentations without the crop, which :class:`StreamLoader` has taken."""
    return [Augment(device_view(a.cfg)) for a in augmentations]
