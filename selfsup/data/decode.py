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
import multiprocessing.synchronize
import os
import signal
import stat
import sys
import warnings
from collections import deque
from typing import IO, Callable

import numpy as np
from PIL import Image, ImageOps

from ..errors import Interrupted
from .datasets import DataError

log = logging.getLogger(__package__)  # "selfsup.data": one logger for the whole package

CHUNK = 1024  # images per decode task: big enough to amortise process round trips


def open_regular(path: str, inside: str | None = None) -> IO[bytes]:
    """``open(path, 'rb')`` for a regular file only: a named pipe would block the read for ever.
    ``inside`` (a real folder path): the file opened must lie in it, as it did when listed; a
    file swapped since for a link to elsewhere is refused (:class:`DataError`)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # opening a FIFO must not wait either
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(f"{path} is not a regular file (a {file_kind(mode)})")
        if inside is not None:
            real = opened_path(fd, path)
            if os.path.commonpath([real, inside]) != inside:
                raise DataError(f"{path} is now a symbolic link to {real}, outside {inside}: it changed after the "
                                "folder was listed, and is not read")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def opened_path(fd: int, path: str) -> str:
    """The real path of the file open as ``fd`` (Linux: what the kernel opened, so a link swapped in
    after the open does not matter; elsewhere the real path of ``path`` if it is still that file)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        real = os.path.realpath(path)
        st, mine = os.stat(real), os.fstat(fd)
        return real if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino) else os.path.abspath(path)


def worker_init() -> None:
    """Start of a forked worker (decoding, streaming): SIGTERM/SIGINT are the parent's to handle,
    and the worker dies with its parent (Linux), so a killed run leaves no worker behind."""
    parent = os.getppid()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):  # not Linux: the worker ends when it next talks to its parent
        return
    if os.getppid() != parent:  # the parent died before prctl: nobody would send the signal
        os._exit(1)


def file_kind(mode: int) -> str:
    """What a non-regular file is, for messages: 'named pipe', 'socket', ..."""
    kinds = {stat.S_ISFIFO: "named pipe", stat.S_ISSOCK: "socket", stat.S_ISCHR: "character device",
             stat.S_ISBLK: "block device"}
    return next((name for test, name in kinds.items() if test(mode)), "special file")


def decode_image(src: bytes | str, image_size: int | None) -> np.ndarray:
    """Encoded bytes or a file path -> (H, W, 3) uint8 RGB, turned upright (EXIF orientation); with
    ``image_size``, the shorter side resized to it and the centre cropped to a square."""
    with io.BytesIO(src) if isinstance(src, bytes) else open_regular(src) as f, Image.open(f) as im:
        if image_size is not None:
            im.draft("RGB", (image_size, image_size))  # lets libjpeg scale big JPEGs down while decoding
        rgb = to_rgb(upright(im))
        if image_size is not None:
            rgb = centre_square(rgb, image_size)
        return np.asarray(rgb)  # (H, W, 3) uint8


def upright(im: Image.Image) -> Image.Image:
    """``im`` as it is meant to be seen: rotated/flipped by its EXIF orientation (a phone's portrait
    photo), or ``im`` itself when it has none."""
    if orientation(im) in (1, None):
        return im
    return ImageOps.exif_transpose(im)


def orientation(im: Image.Image) -> int | None:
    """The EXIF orientation tag (1 = upright; 5-8 swap width and height), None if absent or unreadable."""
    try:
        return im.getexif().get(0x0112)
    except Exception:  # noqa: BLE001 - a broken EXIF block is no reason to refuse the pixels
        return None


def centre_square(im: Image.Image, size: int) -> Image.Image:
    """The centred square of ``im``'s shorter side, resized to ``size`` x ``size`` (bicubic, one resampling)."""
    w, h = im.size
    if (w, h) == (size, size):
        return im
    m = min(w, h)
    box = ((w - m) / 2, (h - m) / 2, (w + m) / 2, (h + m) / 2)
    return im.resize((size, size), Image.Resampling.BICUBIC, box=box)


def peek_size(path: str) -> tuple[int, int] | None:
    """(width, height) of the image file ``path`` as decoded (upright), from its header only; None
    when it cannot be read (decoding then names it)."""
    try:
        with open_regular(path) as f, Image.open(f) as im:
            w, h = im.size
            return (h, w) if orientation(im) in (5, 6, 7, 8) else (w, h)
    except Exception:  # noqa: BLE001 - any failure is reported when the file is decoded
        return None


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

    def __init__(self, image_size: int | None, label: str, total: int | None = None):
        self.image_size = image_size
        self.label = label
        self.total = total  # images to come, for the progress bar (None: unknown, e.g. an archive)
        self.bar = None  # tqdm, on stderr when it is a terminal
        self.workers = _num_workers()
        # Images per task: CHUNK, fewer for big images (~32 MiB of pixels a task) and for a few
        # hundred images, so that every core gets a share (never under 32: process round trips).
        self.chunk = CHUNK
        if image_size is not None:
            self.chunk = min(self.chunk, max(32, (32 << 20) // (3 * image_size * image_size)))
        if total:
            self.chunk = min(self.chunk, max(32, -(-total // self.workers)))
        self.pending: list[bytes | str] = []
        self.futures: deque[cf.Future] = deque()
        self.pool: cf.ProcessPoolExecutor | None = None
        self.abort: multiprocessing.synchronize.Event | None = None  # set: the workers drop what is left
        self.arrays: list[np.ndarray | None] = []
        self.errors: list[str | None] = []

    def add(self, payload: bytes | str) -> None:
        self.pending.append(payload)
        if len(self.pending) >= self.chunk:
            self._flush()

    def _flush(self) -> None:
        batch, self.pending = self.pending, []
        if not batch:
            return
        started = self.pool is None and self.workers > 1 and len(batch) >= self.chunk
        if started:
            fork = multiprocessing.get_context("fork")
            self.abort = fork.Event()
            self.pool = cf.ProcessPoolExecutor(self.workers, mp_context=fork, initializer=_start_worker,
                                               initargs=(self.abort,))
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
            result = self.futures[0].result()  # queued while waiting: a signal here lets close() stop them
            self.futures.popleft()
        except cf.process.BrokenProcessPool as e:
            raise DataError(f"a worker process died while decoding {self.label} (out of memory?); set "
                            "SELFSUP_DECODE_WORKERS=1 to decode in this process instead") from e
        self._store(result)

    def _store(self, result: tuple[np.ndarray | list, list[str | None]]) -> None:
        arrays, errors = result
        self.arrays.extend(list(arrays))
        self.errors.extend(errors)
        if self.bar is None and sys.stderr is not None and sys.stderr.isatty():  # no tqdm off a terminal: its monitor
            from tqdm import tqdm  # thread's start swallows a stop signal (imported late: most runs never decode)

            self.bar = tqdm(total=self.total, desc=f"decoding {os.path.basename(self.label)}", unit="img",
                            leave=False, file=sys.stderr)
        if self.bar is not None:
            self.bar.update(len(errors))

    def finish(self) -> tuple[list[np.ndarray | None], list[str | None]]:
        if self.pool is not None:
            self._flush()
        while self.futures:
            self._collect()
        self._flush()  # only does work when no pool was ever started
        self.close()
        return self.arrays, self.errors

    def close(self) -> None:
        """Stop the workers; when decoding was cut short (a signal, an error), at once: their
        results are never used, so nothing half-decoded reaches the cache."""
        if self.pool is not None:
            if self.futures:  # each worker stops after its current image (killing one can hang the pool)
                self.abort.set()
                self.futures.clear()
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def sort_out(label: str, chosen: list[int], name: Callable[[int], str], arrays: list[np.ndarray | None],
             errors: list[str | None], skip_corrupt: bool) -> tuple[list[int], list[int]]:
    """The decoded images ``chosen`` split into (good, bad) indices. Undecodable ones stop the run,
    named, unless ``skip_corrupt``; good ones of different sizes stop it too (no image_size)."""
    bad = [i for i in chosen if errors[i] is not None]
    if bad and not skip_corrupt:
        shown = "; ".join(f"{name(i)} ({errors[i]})" for i in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise DataError(f"{len(bad)} image(s) in {label} could not be decoded: {shown}{more}. Fix or delete "
                        "them, or pass skip_corrupt=True (--skip-corrupt) to leave them out")
    good = [i for i in chosen if errors[i] is None]
    sizes: dict[tuple[int, ...], int] = {}
    for i in good:
        sizes.setdefault(arrays[i].shape, i)
    if len(sizes) > 1:
        (s1, i1), (s2, i2) = list(sizes.items())[:2]
        raise DataError(f"images in {label} have different sizes ({s1[1]}x{s1[0]} for {name(i1)}, "
                        f"{s2[1]}x{s2[0]} for {name(i2)}); pass image_size to resize them all to one square size")
    return good, bad


def stack(arrays: list[np.ndarray | None], idx: list[int]) -> np.ndarray:
    """``arrays[i]`` for i in ``idx`` as one (len(idx), H, W, 3) uint8 array."""
    h, w, _ = arrays[idx[0]].shape
    out = np.empty((len(idx), h, w, 3), np.uint8)  # (N, H, W, 3) uint8
    for j, i in enumerate(idx):
        out[j] = arrays[i]
    return out


_abort: multiprocessing.synchronize.Event | None = None  # in a worker: the pool's Decoder.abort


def _start_worker(abort: multiprocessing.synchronize.Event) -> None:
    global _abort
    _abort = abort
    worker_init()


def _decode_chunk(payloads: list[bytes | str],
                  image_size: int | None) -> tuple[np.ndarray | list, list[str | None]]:
    """Decode encoded images (bytes, or file paths); runs in worker processes."""
    arrays: list[np.ndarray | None] = []
    errors: list[str | None] = []
    for p in payloads:
        if _abort is not None and _abort.is_set():
            return [], []  # decoding was cut short: nobody reads this
        try:
            arrays.append(decode_image(p, image_size))
            errors.append(None)
        except Interrupted:  # a stop signal (decoding in this process) says nothing about the file
            raise
        except Exception as e:  # noqa: BLE001 - any decoder failure marks just this file as bad
            arrays.append(None)
            errors.append(f"{type(e).__name__}: {e}")
    first = arrays[0] if arrays else None
    if first is not None and all(a is not None and a.shape == first.shape for a in arrays):
        return np.stack(arrays), errors  # one array pickles far faster than a thousand
    return arrays, errors
