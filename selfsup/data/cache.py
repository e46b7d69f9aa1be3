"""The decoded-array cache: ``cache_dir/<name>-<key>/`` holds one ``.npy`` per split and ``meta.json``.

The key covers the source's fingerprint (:class:`~selfsup.data.sources.Source`) and the
options that change the arrays; ``meta.json`` is written last, so an entry cut short is never
used, and older entries of the same source and options are removed once a new one is written.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import IO

import numpy as np

from ..files import remove_temporaries, write_atomic, write_text_atomic
from .datasets import DataSplits, Decoded, ImageDataset
from .sources import Source

log = logging.getLogger(__package__)  # "selfsup.data": one logger for the whole package

CACHE_VERSION = 2  # 2: EXIF orientation applied; resizing crops the centre square instead of squashing


def default_cache_dir() -> Path:
    """$SELFSUP_CACHE, or ~/.cache/selfsup."""
    env = os.environ.get("SELFSUP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "selfsup"


def cache_key(src: Source, image_size: int | None, skip_corrupt: bool, holdout: float = 0.1) -> str:
    """The entry's key: sha256 of the source's fingerprint, its files (and labels) and the options
    (``holdout`` only where there is one: class folders, labelled lists)."""
    h = hashlib.sha256(json.dumps([CACHE_VERSION, str(src.path), str(src.root), src.fmt, src.size, src.mtime_ns,
                                   image_size, bool(skip_corrupt), holdout if src.labels else None]).encode())
    for k, (rel, size, mtime_ns) in enumerate(src.files):  # folders: any added, removed or rewritten file counts
        h.update(f"\0{rel}\0{size}\0{mtime_ns}\0{src.labels[k] if src.labels else ''}".encode())
    return h.hexdigest()


def safe_name(name: str) -> str:
    """``name`` reduced to characters safe in a folder name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:60] or "data"


def make_meta(src: Source, key: str, dec: Decoded, image_size: int | None, skip_corrupt: bool,
              mixed_sizes: bool = False) -> dict:
    """The ``meta.json`` of an entry: what was decoded, from where, with which options
    (``mixed_sizes``: the images differ in size, so ``image_size`` was the default's)."""
    return {
        "version": CACHE_VERSION,
        "key": key,
        "format": dec.fmt,
        "dataset": dec.dataset,
        "source": str(src.path),
        "source_size": src.size,
        "source_mtime": src.mtime_ns / 1e9,
        "image_size": image_size,
        "skip_corrupt": bool(skip_corrupt),
        "mixed_sizes": mixed_sizes,
        "classes": dec.classes,
        "splits": {s: {"n": int(len(lab)), "name": dec.split_names.get(s, s)}
                   for s, (_, lab) in dec.splits.items()},
        "skipped": dec.skipped,
        "skipped_examples": dec.skipped_examples[:20],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def read_meta(entry: Path, key: str) -> dict | None:
    """An entry's ``meta.json`` if it is complete and of this version and key, else None."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("version") != CACHE_VERSION or meta.get("key") != key:
        return None
    return meta


def open_cache(entry: Path, meta: dict, unlabeled: bool) -> DataSplits:
    """The splits of a written entry, memory-mapped."""
    def split(s: str) -> ImageDataset | None:
        info = meta["splits"].get(s)
        if info is None:
            return None
        # Memory-mapped so a big dataset costs no RAM until touched (mmap cannot map 0 bytes).
        images = np.load(entry / f"{s}.npy", mmap_mode="r" if info["n"] else None)
        labels = np.load(entry / f"{s}_labels.npy")
        if len(images) != info["n"] or len(labels) != info["n"]:
            raise ValueError(f"{s} has {len(images)} images, meta.json says {info['n']}")
        return ImageDataset(images, labels, list(meta["classes"]), f"{meta['dataset']}/{info['name']}")

    train = split("train")
    if train is None:
        raise KeyError("no train split")
    return DataSplits(train, split("test"), split("unlabeled") if unlabeled else None)


def splits_in_memory(dec: Decoded, meta: dict, unlabeled: bool) -> DataSplits:
    """The splits straight from the decoded arrays, when the cache cannot be written."""
    def split(s: str) -> ImageDataset | None:
        if s not in dec.splits:
            return None
        images, labels = dec.splits[s]
        return ImageDataset(np.ascontiguousarray(images), labels, list(dec.classes),
                            f"{dec.dataset}/{meta['splits'][s]['name']}")

    return DataSplits(split("train"), split("test"), split("unlabeled") if unlabeled else None)


def write_cache(entry: Path, dec: Decoded, meta: dict) -> None:
    """Write an entry: every split's arrays, then ``meta.json``, each atomically."""
    entry.mkdir(parents=True, exist_ok=True)
    remove_temporaries(entry)  # of a write killed half-way (SIGKILL): never read, only in the way
    for s, (images, labels) in dec.splits.items():
        write_atomic(entry / f"{s}.npy", lambda f: _write_npy(f, images))
        write_atomic(entry / f"{s}_labels.npy", lambda f: _write_npy(f, labels))
    # Last, so a cache interrupted half-way has no meta.json and is never used.
    write_text_atomic(json.dumps(meta, indent=1), entry / "meta.json")


def _write_npy(f: IO[bytes], array: np.ndarray) -> None:
    if array.flags.c_contiguous:
        np.save(f, array)
        return
    # np.save writes a strided array element by element; write ~64 MiB C-order slabs
    # instead, so a transposed memmap (STL-10) is never pulled into RAM whole.
    header = np.lib.format.header_data_from_array_1_0(array)
    header["fortran_order"] = False
    step = max(1, (64 << 20) // max(1, array[:1].nbytes))
    np.lib.format.write_array_header_2_0(f, header)
    for i in range(0, len(array), step):
        f.write(np.ascontiguousarray(array[i:i + step]).data)


def remove_stale(cache: Path, entry: Path, meta: dict) -> None:
    """Delete older caches of the same source and options, which can never be hit again."""
    try:
        prefix = entry.name[:-16]  # '<source name>-'
        siblings = [d for d in cache.iterdir() if d.is_dir() and d != entry and d.name.startswith(prefix)]
    except OSError:
        return
    for d in siblings:
        try:
            old = json.loads((d / "meta.json").read_text())
        except (OSError, ValueError):
            continue
        if all(old.get(k) == meta[k] for k in ("source", "image_size", "skip_corrupt")):
            log.info("removing stale data cache %s", d)
            shutil.rmtree(d, ignore_errors=True)
