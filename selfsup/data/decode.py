"""Decoding encoded images into (H, W, 3) uint8 arrays, in worker processes when there are many.

:func:`decode_image` and :func:`to_rgb` are the one conversion every path uses (the cache, the
streaming loader, :func:`selfsup.api.extract_features`); :func:`open_regular` is the one way an
image file is opened, so a named pipe is never read.
"""
from __future__ import annotations

import concurrent.futures as cf
import io
import logging
import multiprocessing
import os
import stat
import sys
import warnings
from collections import deque
from typing import IO

import numpy as np
from PIL import Image

from .datasets import DataError

log = logging.getLogger(__package__)  # "selfsup.data": one logger for the whole package

CHUNK = 1024  # images per decode task: big enough to amortise process round trips


def open_regular(path: str) -> IO[bytes]:
    """``open(path, 'rb')`` for a regular file only: a named pipe would block the read for ever."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # opening a FIFO must not wait either
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(f"{path} is not a regular file (a {file_kind(mode)})")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def file_kind(mode: int) -> str:
    """What a non-regular file is, for messages: 'named pipe', 'socket', ..."""
    kinds = {stat.S_ISFIFO: "named pipe", stat.S_ISSOCK: "socket", stat.S_ISCHR: "character device",
             stat.S_ISBLK: "block device"}
    return next((name for test, name in kinds.items() if test(mode)), "special file")


def decode_image(src: bytes | str, image_size: int | None) -> np.ndarray:
    """Encoded bytes or a file path -> (H, W, 3) uint8 RGB, resized to a square ``image_size`` if given."""
    with io.BytesIO(src) if isinstance(src, bytes) else open_regular(src) as f, Image.open(f) as im:
        if image_size is not None:
            im.draft("RGB", (image_size, image_size))  # lets libjpeg scale big JPEGs down while decoding
        rgb = to_rgb(im)
        if image_size is not None and rgb.size != (image_size, image_size):
            rgb = rgb.resize((image_size, image_size), Image.Resampling.BICUBIC)
        return np.asarray(rgb)  # (H, W, 3) uint8


def to_rgb(im: Image.Image) -> Image.Image:
    """``im`` as loaded RGB: grayscale replicated, alpha dropped, 16-bit keeping its top byte."""
    if im.mode == "RGB":
        im.load()
        return im
    if im.mode.startswith("I;16") or im.mode == "I":
        # PIL's own conversion clips 16-bit values at 255; keep the top byte instead.
        a = np.asarray(im).astype(np.uint32)
        if im.mode.startswith("I;16") or a.max(initial=0) > 255:
            a = a >> 8
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # converting such palettes straight to RGB makes PIL warn
    return im.convert("RGB")


def resize_all(images: np.ndarray, size: int) -> np.ndarray:
    """(N, h, w, 3) uint8 -> (N, size, size, 3) uint8, bicubic; works on strided memmap views."""
    out = np.empty((len(images), size, size, 3), np.uint8)
    step = 1024
    for i in range(0, len(images), step):
        block = np.ascontiguousarray(images[i:i + step])  # bounded copy even for a transposed memmap
        for j, img in enumerate(block):
            out[i + j] = np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BICUBIC))
    return out


def _num_workers() -> int:
    env = os.environ.get("SELFSUP_DECODE_WORKERS", "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise DataError(f"SELFSUP_DECODE_WORKERS must be a whole number, got {env!r}") from None
    if not sys.platform.startswith("linux"):
        return 1  # the pool relies on fork(), which is only dependable on Linux
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


class Decoder:
    """Decodes images in submission order, in forked worker processes once there are enough of them.

    Threads do not help here: small images spend most of their time in Python-level PIL
    overhead that holds the GIL, so two threads were slower than one when measured.
    """

    def __init__(self, image_size: int | None, label: str):
        self.image_size = image_size
        self.label = label
        self.workers = _num_workers()
        self.pending: list[bytes | str] = []
        self.futures: deque[cf.Future] = deque()
        self.pool: cf.ProcessPoolExecutor | None = None
        self.arrays: list[np.ndarray | None] = []
        self.errors: list[str | None] = []

    def add(self, payload: bytes | str) -> None:
        self.pending.append(payload)
        if len(self.pending) >= CHUNK:
            self._flush()

    def _flush(self) -> None:
        batch, self.pending = self.pending, []
        if not batch:
            return
        if self.pool is None and self.workers > 1 and len(batch) >= CHUNK:
            self.pool = cf.ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("fork"))
        if self.pool is not None:
            try:
                with warnings.catch_warnings():
                    # Python >= 3.12 warns about fork() in a threaded process; the workers only
                    # run PIL and numpy, none of the locks a parent thread could be holding.
                    warnings.filterwarnings("ignore", message=".*use of fork.*", category=DeprecationWarning)
                    self.futures.append(self.pool.submit(_decode_chunk, batch, self.image_size))
            except (OSError, RuntimeError, AssertionError) as e:  # e.g. inside a daemon process: no children
                log.debug("decoding in this process: no worker pool (%s)", e)
                if self.futures:
                    raise
                self.close()
                self.workers = 1
        if self.pool is None:
            self._store(_decode_chunk(batch, self.image_size))
            return
        while len(self.futures) > 2 * self.workers:  # bound the encoded bytes held in flight
            self._collect()

    def _collect(self) -> None:
        try:
            result = self.futures.popleft().result()
        except cf.process.BrokenProcessPool as e:
            raise DataError(f"a worker process died while decoding {self.label} (out of memory?); set "
                            "SELFSUP_DECODE_WORKERS=1 to decode in this process instead") from e
        self._store(result)

    def _store(self, result: tuple[np.ndarray | list, list[str | None]]) -> None:
        arrays, errors = result
        self.arrays.extend(list(arrays))
        self.errors.extend(errors)

    def finish(self) -> tuple[list[np.ndarray | None], list[str | None]]:
        if self.pool is not None:
            self._flush()
        while self.futures:
            self._collect()
        self._flush()  # only does work when no pool was ever started
        self.close()
        return self.arrays, self.errors

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


def _decode_chunk(payloads: list[bytes | str],
                  image_size: int | None) -> tuple[np.ndarray | list, list[str | None]]:
    """Decode encoded images (bytes, or file paths); runs in worker processes."""
    arrays: list[np.ndarray | None] = []
    errors: list[str | None] = []
    for p in payloads:
        try:
            arrays.append(decode_image(p, image_size))
            errors.append(None)
        except Exception as e:  # noqa: BLE001 - any decoder failure marks just this file as bad
            arrays.append(None)
            errors.append(f"{type(e).__name__}: {e}")
    first = arrays[0] if arrays else None
    if first is not None and all(a is not None and a.shape == first.shape for a in arrays):
        return np.stack(arrays), errors  # one array pickles far faster than a thousand
    return arrays, errors
