"""Image sources, decoded once into uint8 arrays and cached on disk.

Every source ends up as an ``(N, H, W, 3)`` uint8 array plus int64 labels:

* ``digits`` -- scikit-learn's bundled 8x8 digits (the built-in default, no files needed);
* an image folder ``<root>/{train,test|val}/<class>/<image>``, possibly inside one top folder
  (symbolic links are followed inside ``<root>`` only, never from one split into another; only
  regular files are read);
* a ``.tar``/``.tar.gz``/``.tgz``/``.zip`` archive of such a folder (read without extracting; a
  member listed twice is refused, and so is an image member that expands to more than 64 MiB,
  ``$SELFSUP_MAX_IMAGE_MB``);
* the CIFAR-10/100 python release (archive or extracted folder), or the names ``cifar10``/``cifar100``;
* the STL-10 binary release (archive or ``stl10_binary/`` folder), or the name ``stl10``.

Everything except ``digits`` is written to ``cache_dir/<name>-<key>/`` as ``.npy`` files and
memory-mapped on later runs, so only the first run pays for decoding. The key covers the
source's path, size and modification times, ``image_size`` and ``skip_corrupt``, so editing the
source or changing those options decodes again.

Resizing (``image_size``) uses PIL bicubic resampling to a square ``image_size x image_size``,
ignoring the aspect ratio; PIL antialiases when shrinking. Before resizing digits, a folder, CIFAR
or STL-10, the decoded size (with the path's temporaries) is compared with the memory available
(:func:`available_memory`), and work that cannot fit is refused with the estimate; archives, whose
image count is known only once read, are not checked. Images are converted to RGB:
grayscale is replicated, an alpha channel is dropped (not composited), 16-bit grayscale keeps its
top 8 bits, and multi-frame files (GIF, TIFF) use their first frame.
"""

from __future__ import annotations

import bz2
import concurrent.futures as cf
import errno
import functools
import gzip
import hashlib
import http.client
import io
import json
import logging
import lzma
import multiprocessing
import os
import pickle
import re
import secrets
import shutil
import stat
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, Iterator

import numpy as np
from PIL import Image

__all__ = ["DataError", "ImageDataset", "DataSplits", "load_data", "default_cache_dir", "IMAGE_EXTENSIONS"]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff"})

_CACHE_VERSION = 1
_SPLITS = ("train", "test", "val")  # folder names; 'val' stands in for a missing 'test'
_MEAN_STD_SAMPLES = 10_000
_DIGITS_SIZE = 32
_CHUNK = 1024  # images per decode task: big enough to amortise process round trips
_IMAGE_MEMBER_LIMIT = 64 << 20  # bytes one image member of an archive may expand to (SELFSUP_MAX_IMAGE_MB)
_CIFAR_MEMBER_LIMIT = 256 << 20  # CIFAR-100's train file, the biggest, holds 50000 x 3072 bytes of pixels
_ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".zip")
_CIFAR10_FILES = frozenset({"batches.meta", "test_batch"} | {f"data_batch_{i}" for i in range(1, 6)})
_CIFAR100_FILES = frozenset({"meta", "train", "test"})
_STL_FILES = frozenset({"train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "unlabeled_X.bin",
                        "class_names.txt"})
_STL_SIZE = 96
_STL_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


@dataclass(frozen=True)
class _Remote:
    url: str
    md5: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


_REMOTES = {
    "cifar10": _Remote("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
    "cifar100": _Remote("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                        "eb9058c3a382ffc7106e4002c42a8d85"),
    "stl10": _Remote("http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz", "91f7769df0f17e558f3565bffb0c7dfb"),
}
_urlopen = urllib.request.urlopen  # module-level so tests can fake the network


class DataError(ValueError):
    """Bad data input; message is one clear actionable line."""


# --------------------------------------------------------------------------------------------
# Public containers
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class ImageDataset:
    """Images with labels: ``images`` (N, H, W, 3) uint8, ``labels`` (N,) int64 (-1 = unlabelled)."""

    images: np.ndarray  # (N, H, W, 3) uint8, C-contiguous; may be a read-only np.memmap
    labels: np.ndarray  # (N,) int64
    classes: list[str]
    name: str = ""
    _stats: tuple | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        what = f"ImageDataset {self.name!r}" if self.name else "ImageDataset"
        im = self.images
        if not isinstance(im, np.ndarray) or im.ndim != 4 or im.shape[-1] != 3 or im.dtype != np.uint8:
            desc = f"{im.dtype} {im.shape}" if isinstance(im, np.ndarray) else type(im).__name__
            raise DataError(f"{what}: images must be a uint8 array of shape (N, H, W, 3), got {desc}")
        if not im.flags.c_contiguous:
            self.images = np.ascontiguousarray(im)
        labels = np.asarray(self.labels)
        if labels.shape != (len(im),) or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{what}: labels must be {len(im)} integers (one per image), "
                            f"got {labels.dtype} {labels.shape}")
        self.labels = labels.astype(np.int64, copy=False)
        self.classes = [str(c) for c in self.classes]
        if len(labels) and (labels.min() < -1 or labels.max() >= len(self.classes)):
            raise DataError(f"{what}: labels must lie in -1..{len(self.classes) - 1} for "
                            f"{len(self.classes)} classes, got {labels.min()}..{labels.max()}")

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        h, w = self.image_size
        return f"ImageDataset(name={self.name!r}, n={len(self)}, size={h}x{w}, classes={len(self.classes)})"

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of every image."""
        return int(self.images.shape[1]), int(self.images.shape[2])

    def mean_std(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """Per-channel mean and std in [0, 1] units, from an evenly spaced subsample of <= 10k images."""
        if self._stats is None:
            n = len(self)
            if n == 0:
                raise DataError(f"cannot compute mean/std of the empty dataset {self.name!r}")
            # Evenly spaced rather than the first k: files are sorted by class.
            idx = np.unique(np.linspace(0, n - 1, num=min(n, _MEAN_STD_SAMPLES)).round().astype(np.int64))
            h, w = self.image_size
            step = max(1, (4 << 20) // (h * w))  # ~4M pixels per chunk keeps temporaries small
            total = np.zeros(3, np.uint64)
            total_sq = np.zeros(3, np.uint64)
            for i in range(0, len(idx), step):
                chunk = np.asarray(self.images[idx[i:i + step]])  # (k, H, W, 3) uint8
                total += chunk.sum(axis=(0, 1, 2), dtype=np.uint64)
                # 255**2 fits in uint16, so the squares are exact without a float copy
                total_sq += np.square(chunk, dtype=np.uint16).sum(axis=(0, 1, 2), dtype=np.uint64)
            count = float(len(idx) * h * w)
            mean = total.astype(np.float64) / count
            var = np.maximum(total_sq.astype(np.float64) / count - mean**2, 0.0)
            m, s = mean / 255.0, np.sqrt(var) / 255.0
            self._stats = (tuple(float(v) for v in m), tuple(float(v) for v in s))
        return self._stats


@dataclass
class DataSplits:
    """The splits of one source."""

    train: ImageDataset
    test: ImageDataset | None  # labelled held-out split: 'test', or 'val' when there is no 'test'
    unlabeled: ImageDataset | None  # only STL-10 'unlabeled', and only when requested


def default_cache_dir() -> Path:
    """$SELFSUP_CACHE, or ~/.cache/selfsup."""
    env = os.environ.get("SELFSUP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "selfsup"


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def load_data(
    spec: str | os.PathLike,
    *,
    image_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    unlabeled: bool = False,
    skip_corrupt: bool = False,
    download: bool = True,
) -> DataSplits:
    """Load a data source (see the module docstring), decoding it on the first call only.

    ``image_size`` resizes every image to a square of that side (digits default to 32; other
    sources keep their native size, which must then be the same for all images).
    ``unlabeled`` also loads STL-10's unlabeled split. ``skip_corrupt`` leaves out images that
    fail to decode (with a warning) instead of failing. ``download=False`` never touches the
    network for ``cifar10``/``cifar100``/``stl10``.
    """
    image_size = _check_image_size(image_size)
    text = os.fspath(spec) if isinstance(spec, os.PathLike) else spec
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"data source must be a name or a path, got {spec!r}")
    name = text.strip().lower()
    if name == "digits":
        if unlabeled:
            raise DataError(_no_unlabeled(text, "digits"))
        return _load_digits(image_size or _DIGITS_SIZE)

    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if name in _REMOTES:
        # A name wins over a same-named folder in the working directory; pass ./cifar10 for that.
        path = _fetch(name, cache, download)
    else:
        path = Path(text).expanduser()
        if not path.exists():
            raise DataError(f"data source {text!r} not found: expected 'digits', 'cifar10', 'cifar100', "
                            "'stl10', an image folder, or a .tar/.tar.gz/.zip archive")
    src = _inspect(path.resolve())

    key = _cache_key(src, image_size, skip_corrupt)
    entry = cache / f"{_safe_name(src.path.name)}-{key[:16]}"
    meta = _read_meta(entry, key)
    if meta is not None:
        if unlabeled and meta["format"] != "stl10":
            raise DataError(_no_unlabeled(text, meta["format"]))
        if not unlabeled or "unlabeled" in meta["splits"]:
            try:
                splits = _open_cache(entry, meta, unlabeled)
            except (OSError, ValueError, KeyError, EOFError) as e:
                log.warning("data cache %s is unreadable (%s); decoding %s again", entry, e, src.path)
            else:
                log.info("using cached %s from %s (%s)", src.path, entry, _describe(splits))
                if meta.get("skipped"):
                    examples = meta.get("skipped_examples", [])
                    warnings.warn(_skipped_message(meta["skipped"], str(src.path), examples), stacklevel=2)
                return splits

    log.info("decoding %s%s ...", src.path, f" ({src.count} files)" if src.count else "")
    t0 = time.perf_counter()
    decoded = _decode_source(src, image_size=image_size, skip_corrupt=skip_corrupt, unlabeled=unlabeled,
                             scratch=cache)
    try:
        if decoded.skipped:
            warnings.warn(_skipped_message(decoded.skipped, str(src.path), decoded.skipped_examples), stacklevel=2)
        meta = _make_meta(src, key, decoded, image_size, skip_corrupt)
        try:
            _write_cache(entry, decoded, meta)
            splits = _open_cache(entry, meta, unlabeled)
            where = f"cached in {entry}"
        except OSError as e:
            warnings.warn(f"could not write the data cache to {entry} ({e}); continuing without it, so the "
                          "next run decodes again (set SELFSUP_CACHE or cache_dir to a writable folder)",
                          stacklevel=2)
            splits = _splits_in_memory(decoded, meta, unlabeled)
            where = "not cached"
        else:
            _remove_stale(cache, entry, meta)
    finally:
        decoded.cleanup()
    # Checked only now: an archive's format is known once read, and the cache is then already useful.
    if unlabeled and decoded.fmt != "stl10":
        raise DataError(_no_unlabeled(text, decoded.fmt))
    log.info("decoded %s in %.1f s (%s); %s", src.path, time.perf_counter() - t0, _describe(splits), where)
    return splits


def _no_unlabeled(spec: str, fmt: str) -> str:
    kind = {"folder": "an image folder", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "digits": "digits"}
    return (f"unlabeled=True needs STL-10, the only source with an unlabeled split, but {spec!r} is "
            f"{kind.get(fmt, fmt)}; drop unlabeled (--unlabeled / data.unlabeled)")


def _check_image_size(image_size: object) -> int | None:
    if image_size is None:
        return None
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or not 1 <= image_size <= 4096:
        raise DataError(f"image_size must be a whole number of pixels between 1 and 4096, got {image_size!r}")
    return int(image_size)


def _describe(splits: DataSplits) -> str:
    parts = [f"{d.name.rsplit('/', 1)[-1]} {len(d)}" for d in (splits.train, splits.test, splits.unlabeled)
             if d is not None]
    h, w = splits.train.image_size
    return ", ".join(parts) + f" images of {h}x{w}"


def _skipped_message(count: int, source: str, examples: list[str]) -> str:
    return (f"skipped {count} corrupt image(s) in {source} because skip_corrupt is set "
            f"(e.g. {', '.join(examples[:5])})")


def available_memory() -> int | None:
    """Bytes this process can still allocate: /proc/meminfo's MemAvailable (or the free pages
    sysconf reports), lowered by a cgroup memory limit and an address-space ulimit. None: unknown."""
    limits = []
    try:
        with open("/proc/meminfo") as f:
            limits += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    if not limits:
        try:
            limits.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit, usage = (Path(limit_file).read_text().strip(), int(Path(usage_file).read_text()))
            if limit != "max" and int(limit) < 1 << 60:
                limits.append(max(0, int(limit) - usage))
        except (OSError, ValueError):
            continue
        break
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            with open("/proc/self/statm") as f:
                vm = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            limits.append(max(0, soft - vm))
    except (ImportError, OSError, ValueError, IndexError):
        pass
    return min(limits) if limits else None


def _check_memory(n: int, size: int, copies: float, what: str) -> None:
    """Refuse, before allocating, ``n`` uint8 RGB images of ``size``^2 held ``copies`` times at the
    peak of their decoding (measured per path: the result plus its temporaries)."""
    images = n * size * size * 3
    need, free = int(images * copies), available_memory()
    if free is not None and need > free:
        gb = lambda b: f"{b / 2**30:.1f} GiB"  # noqa: E731
        raise DataError(f"{what}: {n} images of {size}x{size} need about {gb(need)} of memory to decode ({gb(images)} "
                        f"of uint8 pixels, {copies:.3g}x that at the peak), but only {gb(free)} is available; lower "
                        "data.image_size, or stream the source from disk (data.stream=true)")


# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------


def _load_digits(size: int) -> DataSplits:
    (xtr, ytr), (xte, yte) = _digits_arrays(size)
    classes = [str(i) for i in range(10)]
    return DataSplits(ImageDataset(xtr, ytr, classes, "digits/train"),
                      ImageDataset(xte, yte, classes, "digits/test"), None)


@functools.lru_cache(maxsize=4)
def _digits_arrays(size: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    # sklearn is imported here because it is slow to import and only digits needs it
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # Peak, in N*S^2 bytes: gray (1), its RGB copy (3) and both splits' copies (3) = 7/3 of the RGB pixels.
    _check_memory(len(digits.images), size, 7 / 3, f"digits at data.image_size={size}")
    gray = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8) 0..16 -> 0..255
    if size != gray.shape[1]:
        gray = np.stack([np.asarray(Image.fromarray(g).resize((size, size), Image.Resampling.BICUBIC))
                         for g in gray])
    images = np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=-1))  # (1797, S, S, 3) uint8
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=0.2, random_state=0,
                                           stratify=labels)
    out = []
    for idx in (np.sort(train_idx), np.sort(test_idx)):
        x, y = images[idx], labels[idx]
        # Shared between calls through the lru_cache: freeze them so no caller can corrupt the next.
        x.flags.writeable = False
        y.flags.writeable = False
        out.append((x, y))
    return out[0], out[1]


# --------------------------------------------------------------------------------------------
# Downloads
# --------------------------------------------------------------------------------------------


def _fetch(name: str, cache: Path, download: bool) -> Path:
    """Path of the verified official archive for ``name``, downloading it if needed."""
    remote = _REMOTES[name]
    dest = cache / "downloads" / remote.filename
    hint = (f"Download it elsewhere and pass --data /path/to/{remote.filename} (or its extracted folder)")
    stale = dest.is_file()
    if stale:
        if _verified(dest, remote.md5):
            return dest
        log.warning("%s does not have the official checksum; downloading it again", dest)
    if not download:
        problem = "does not have the official md5 checksum" if stale else "is not there"
        raise DataError(f"{name}: {dest} {problem} and downloading is off. {hint}")
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s to %s", remote.url, dest)
        md5 = hashlib.md5(usedforsecurity=False)
        from tqdm import tqdm

        with _urlopen(remote.url, timeout=60) as resp, open(tmp, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=remote.filename, disable=None) as bar:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
                    md5.update(chunk)
                    bar.update(len(chunk))
        if md5.hexdigest() != remote.md5:
            raise DataError(f"could not download {remote.url}: the file's md5 is {md5.hexdigest()}, expected "
                            f"{remote.md5} (corrupted transfer). {hint}")
        os.replace(tmp, dest)
        _mark_verified(dest, remote.md5)
        return dest
    except (OSError, EOFError, ValueError, http.client.HTTPException) as e:  # URLError, timeouts: OSError
        if isinstance(e, DataError):
            raise
        reason = getattr(e, "reason", None) or e
        raise DataError(f"could not download {remote.url}: {reason}. {hint}") from e
    finally:
        tmp.unlink(missing_ok=True)


def _verified(path: Path, md5: str) -> bool:
    """True if ``path`` has checksum ``md5``; remembered in a side file so big archives hash once."""
    st = path.stat()
    stamp = path.with_name(path.name + ".md5ok")
    want = {"md5": md5, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    try:
        if json.loads(stamp.read_text()) == want:
            return True
    except (OSError, ValueError):
        pass
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    if digest.hexdigest() != md5:
        return False
    _mark_verified(path, md5)
    return True


def _mark_verified(path: Path, md5: str) -> None:
    st = path.stat()
    try:
        _atomic_write_text(path.with_name(path.name + ".md5ok"),
                           json.dumps({"md5": md5, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))
    except OSError:
        pass  # only an optimisation


# --------------------------------------------------------------------------------------------
# Source inspection and cache keys
# --------------------------------------------------------------------------------------------


@dataclass
class _Source:
    path: Path  # absolute; the file or the folder the user named
    fmt: str | None  # 'folder' | 'cifar10' | 'cifar100' | 'stl10' for folders; None for archives (found on read)
    root: Path | None = None  # for folders: where the dataset's files are (the path or its one top folder)
    files: list[tuple[str, int, int]] = field(default_factory=list)  # (relpath from root, size, mtime_ns)
    dirs: list[str] = field(default_factory=list)  # relpaths of folders under root (image folders only)
    count: int = 0  # number of files, when known up front
    size: int = 0  # total bytes
    mtime_ns: int = 0  # newest modification time


def _inspect(path: Path) -> _Source:
    if path.is_dir():
        return _inspect_dir(path)
    if not path.is_file():
        raise DataError(f"data source {str(path)!r} is neither a file nor a folder")
    low = path.name.lower()
    if not low.endswith(_ARCHIVE_SUFFIXES) and not (zipfile.is_zipfile(path) or tarfile.is_tarfile(path)):
        raise DataError(f"data source {str(path)!r} is a file but not a .tar, .tar.gz/.tgz or .zip archive; pass "
                        "an image folder, an archive of one, or 'digits', 'cifar10', 'cifar100', 'stl10'")
    st = path.stat()
    return _Source(path, None, size=st.st_size, mtime_ns=st.st_mtime_ns)


def _dir_kind(d: Path) -> str | None:
    if (d / "batches.meta").is_file() and (d / "data_batch_1").is_file():
        return "cifar10"
    if all((d / n).is_file() for n in _CIFAR100_FILES):
        return "cifar100"
    if (d / "train_X.bin").is_file():
        return "stl10"
    if (d / "train").is_dir():
        return "folder"
    return None


def _inspect_dir(path: Path) -> _Source:
    kind, root = _dir_kind(path), path
    if kind is None:
        # An unpacked archive usually wraps everything in one top folder.
        found = [(k, d) for d in sorted(path.iterdir())
                 if d.is_dir() and not is_hidden_name(d.name) and (k := _dir_kind(d)) is not None]
        if len(found) > 1:
            names = ", ".join(d.name for _, d in found)
            raise DataError(f"folder {path} holds several datasets ({names}); pass one of them, "
                            f"e.g. {found[0][1]}")
        if not found:
            raise DataError(f"no dataset found in folder {path}: expected {path}/train/<class>/<image> with test/ "
                            "or val/ beside train/ (optionally inside one top folder), the CIFAR-10/100 python "
                            "batches, or the STL-10 binary files")
        kind, root = found[0]
    src = _Source(path, kind, root)
    if kind == "folder":
        src.dirs, src.files = scan_image_folder(root)
    else:
        for p in sorted(root.iterdir()):
            if p.is_file() and not is_hidden_name(p.name):
                st = p.stat()
                src.files.append((p.name, st.st_size, st.st_mtime_ns))
    src.count = len(src.files)
    src.size = sum(f[1] for f in src.files)
    src.mtime_ns = max((f[2] for f in src.files), default=0)
    return src


def scan_image_folder(root: Path, splits: tuple[str, ...] = _SPLITS
                      ) -> tuple[list[str], list[tuple[str, int, int]]]:
    """List the folders and files of ``root/<split>/...``, following symlinks safely.

    -> (folders, files): relative paths from ``root``, and (relative path, size, mtime_ns) per
    file. The split ``""`` stands for ``root`` itself (every file under it, as streaming reads a
    folder without ``train/``).

    Symlinked class folders are common in prepared datasets, so links are followed, but only to
    places inside ``root`` (by real path), each real folder once per split (a loop or a second
    link to it is read once), and never into another split: a link that would pull test/ images
    into train/, or one file reached through links in two splits, is refused. Dangling links and
    link loops are refused by name; anything that is not a regular file or a folder (a named pipe,
    a socket, a device) is refused by name when it has an image extension and skipped otherwise,
    and decoding opens only regular files (:func:`open_regular`).
    """
    dirs: list[str] = []
    files: list[tuple[str, int, int]] = []
    real_root = os.path.realpath(root)
    for s in splits:
        if (root / s).is_symlink() and not (root / s).exists():
            raise DataError(f"{root / s} is a broken symbolic link (to {os.readlink(root / s)}); fix or remove it")
    tops = {s: os.path.realpath(root / s) for s in splits if (root / s).is_dir()}
    for s, top in tops.items():
        for t, other in tops.items():
            if s < t and (_within(top, other) or _within(other, top)):
                raise DataError(f"{root / s} and {root / t} are the same folder or one holds the other (through a "
                                "symbolic link); a split must not contain another split's images")
    owner: dict[str, str] = {}  # real path of each image reached through a link -> its split
    for split, real_top in tops.items():
        if not _within(real_top, real_root):
            raise DataError(_outside(root / split, real_top, real_root))
        seen: set[str] = set()
        stack = [(split, real_top, False)]  # (folder, its real path, reached through a link)
        while stack:
            rel_dir, real_dir, linked = stack.pop()
            if real_dir in seen:
                continue
            seen.add(real_dir)
            dirs.append(rel_dir)
            try:
                entries = sorted((e for e in os.scandir(root / rel_dir) if not is_hidden_name(e.name)),
                                 key=lambda e: e.name)
            except OSError as e:
                raise DataError(f"cannot list {root / rel_dir}: {e.strerror or e}") from None
            subdirs = []
            for e in entries:
                rel = f"{rel_dir}/{e.name}" if rel_dir else e.name
                link = e.is_symlink()
                real = os.path.realpath(e.path) if link else f"{real_dir}/{e.name}"
                try:
                    st = os.stat(e.path)
                except OSError as err:
                    if not link:
                        raise DataError(f"cannot read {root / rel}: {err.strerror or err}") from None
                    problem = "a symbolic link loop" if err.errno == errno.ELOOP else "a broken symbolic link"
                    raise DataError(f"{root / rel} is {problem} (to {os.readlink(e.path)}); fix or remove it") from None
                if link:  # (a plain entry lies in its folder, which passed these checks)
                    if not _within(real, real_root):
                        raise DataError(_outside(root / rel, real, real_root))
                    others = [t for t, top in tops.items() if t != split and (_within(real, top) or (
                        stat.S_ISDIR(st.st_mode) and _within(top, real)))]  # inside another split, or holding it
                    if others:
                        raise DataError(f"{root / rel} leads to {real}, inside the {others[0]}/ split or holding "
                                        "it; a split must not contain another split's images (remove the link)")
                if stat.S_ISDIR(st.st_mode):
                    subdirs.append((rel, real, linked or link))
                elif stat.S_ISREG(st.st_mode):
                    # Without a link on its way a file lies in its own split (the checks above).
                    if (linked or link) and is_image_name(e.name):
                        if owner.setdefault(real, split) != split:
                            raise DataError(f"{root / rel} is the file {real}, which is also in {owner[real]}/; a "
                                            "split must not contain another split's images")
                    files.append((rel, st.st_size, st.st_mtime_ns))
                elif is_image_name(e.name):
                    raise DataError(f"{root / rel} is not a regular file (a {_file_kind(st.st_mode)}); only regular "
                                    "files are read as images, remove it")
            stack.extend(reversed(subdirs))  # depth first, in name order
    return dirs, files


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _outside(link: Path, real: str, real_root: str) -> str:
    return (f"{link} leads to {real}, outside the dataset folder {real_root}; symbolic links are followed only "
            "inside it (move or copy the files in)")


def _file_kind(mode: int) -> str:
    kinds = {stat.S_ISFIFO: "named pipe", stat.S_ISSOCK: "socket", stat.S_ISCHR: "character device",
             stat.S_ISBLK: "block device"}
    return next((name for test, name in kinds.items() if test(mode)), "special file")


def is_image_name(name: str) -> bool:
    """Whether a file name has one of :data:`IMAGE_EXTENSIONS` (any case)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def is_hidden_name(name: str) -> bool:
    """Whether a file or folder name is never data: dot files and macOS litter (__MACOSX/, ._foo.jpg)."""
    return name.startswith(".") or name == "__MACOSX"


def _cache_key(src: _Source, image_size: int | None, skip_corrupt: bool) -> str:
    h = hashlib.sha256(json.dumps([_CACHE_VERSION, str(src.path), str(src.root), src.size, src.mtime_ns,
                                   image_size, bool(skip_corrupt)]).encode())
    for rel, size, mtime_ns in src.files:  # folders: any added, removed or rewritten file counts
        h.update(f"\0{rel}\0{size}\0{mtime_ns}".encode())
    return h.hexdigest()


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:60] or "data"


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------


@dataclass
class _Decoded:
    fmt: str
    dataset: str  # display name, e.g. 'cifar10'
    classes: list[str]
    splits: dict[str, tuple[np.ndarray, np.ndarray]]  # 'train'/'test'/'unlabeled' -> (images, labels)
    split_names: dict[str, str] = field(default_factory=dict)  # e.g. {'test': 'val'}
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def cleanup(self) -> None:
        for fn in self.cleanups:
            fn()
        self.cleanups.clear()


def _make_meta(src: _Source, key: str, dec: _Decoded, image_size: int | None, skip_corrupt: bool) -> dict:
    return {
        "version": _CACHE_VERSION,
        "key": key,
        "format": dec.fmt,
        "dataset": dec.dataset,
        "source": str(src.path),
        "source_size": src.size,
        "source_mtime": src.mtime_ns / 1e9,
        "image_size": image_size,
        "skip_corrupt": bool(skip_corrupt),
        "classes": dec.classes,
        "splits": {s: {"n": int(len(lab)), "name": dec.split_names.get(s, s)}
                   for s, (_, lab) in dec.splits.items()},
        "skipped": dec.skipped,
        "skipped_examples": dec.skipped_examples[:20],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _read_meta(entry: Path, key: str) -> dict | None:
    try:
        meta = json.loads((entry / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("version") != _CACHE_VERSION or meta.get("key") != key:
        return None
    return meta


def _open_cache(entry: Path, meta: dict, unlabeled: bool) -> DataSplits:
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


def _splits_in_memory(dec: _Decoded, meta: dict, unlabeled: bool) -> DataSplits:
    def split(s: str) -> ImageDataset | None:
        if s not in dec.splits:
            return None
        images, labels = dec.splits[s]
        return ImageDataset(np.ascontiguousarray(images), labels, list(dec.classes),
                            f"{dec.dataset}/{meta['splits'][s]['name']}")

    return DataSplits(split("train"), split("test"), split("unlabeled") if unlabeled else None)


def _write_cache(entry: Path, dec: _Decoded, meta: dict) -> None:
    entry.mkdir(parents=True, exist_ok=True)
    for s, (images, labels) in dec.splits.items():
        _atomic_save(entry / f"{s}.npy", images)
        _atomic_save(entry / f"{s}_labels.npy", labels)
    # Last, so a cache interrupted half-way has no meta.json and is never used.
    _atomic_write_text(entry / "meta.json", json.dumps(meta, indent=1))


def _tmp_beside(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = _tmp_beside(path)
    try:
        if array.flags.c_contiguous:
            with open(tmp, "wb") as f:
                np.save(f, array)
        else:
            # np.save writes a strided array element by element; write ~64 MiB C-order slabs
            # instead, so a transposed memmap (STL-10) is never pulled into RAM whole.
            header = np.lib.format.header_data_from_array_1_0(array)
            header["fortran_order"] = False
            step = max(1, (64 << 20) // max(1, array[:1].nbytes))
            with open(tmp, "wb") as f:
                np.lib.format.write_array_header_2_0(f, header)
                for i in range(0, len(array), step):
                    f.write(np.ascontiguousarray(array[i:i + step]).data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = _tmp_beside(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _remove_stale(cache: Path, entry: Path, meta: dict) -> None:
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


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def _decode_source(src: _Source, *, image_size: int | None, skip_corrupt: bool, unlabeled: bool,
                   scratch: Path) -> _Decoded:
    """Decode ``src`` into arrays (may be views of scratch files until ``cleanup``)."""
    if src.fmt is None:
        return _decode_archive(src.path, image_size=image_size, skip_corrupt=skip_corrupt, unlabeled=unlabeled,
                               scratch=scratch)
    root = src.root
    assert root is not None
    if src.fmt in ("cifar10", "cifar100"):
        def read(name: str) -> bytes:
            try:
                return (root / name).read_bytes()
            except FileNotFoundError:
                raise DataError(f"{src.fmt.upper()} file {name!r} is missing from {root}") from None

        return _cifar(read, src.fmt, str(root), image_size)
    if src.fmt == "stl10":
        return _stl(root, image_size, unlabeled)

    if image_size is not None:  # the decoded list and the split arrays built from it
        _check_memory(sum(is_image_name(rel) for rel, _, _ in src.files), image_size, 2,
                      f"{root} at image_size={image_size}")
    collector = _FolderCollector(str(root), image_size)
    try:
        for d in src.dirs:
            collector.add_dir(d.split("/"))
        for rel, _, _ in src.files:
            collector.add_file(rel.split("/"), str(root / rel))
        return collector.finish(skip_corrupt, dataset=_dataset_name(src.path))
    finally:
        collector.close()


def _dataset_name(path: Path) -> str:
    name = path.name
    for suffix in _ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _clean_parts(name: str) -> list[str] | None:
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts or any(is_hidden_name(p) for p in parts):
        return None
    return parts


@dataclass
class _Member:
    name: str
    is_dir: bool
    size: int
    open: Callable[[], IO[bytes]]


def _iter_archive(path: Path) -> Iterator[_Member]:
    low = path.name.lower()
    # The suffix decides: sniffing alone could mistake a plain .tar ending in a .zip member for a zip.
    if low.endswith(".zip") or (not low.endswith(_ARCHIVE_SUFFIXES) and zipfile.is_zipfile(path)):
        with zipfile.ZipFile(path) as zf:
            for info in sorted(zf.infolist(), key=lambda i: i.filename):
                yield _Member(info.filename, info.is_dir(), info.file_size, functools.partial(zf.open, info))
        return
    # Stream mode reads the archive once front to back: no index pass, no seeks. tarfile itself
    # takes a stream that stops at a header boundary for a clean end, and checks no gzip trailer,
    # so decompress with the gzip/bz2/lzma modules (they do) and check for the end marker below.
    with _open_decompressed(path) as raw:
        stream = _CountingReader(raw)
        with tarfile.open(fileobj=stream, mode="r|") as tf:
            for m in tf:
                if m.isdir() or m.isfile():
                    yield _Member(m.name, m.isdir(), m.size, functools.partial(tf.extractfile, m))
            end = tf.offset  # where iteration stopped: should be the zero block that ends a tar
        while stream.read(1 << 20):  # drain, so the decompressor verifies its checksum and length
            pass
        if stream.count < end + tarfile.BLOCKSIZE:
            raise tarfile.ReadError(f"the tar data stops after {stream.count} bytes without its end-of-archive "
                                    "marker")


def _open_decompressed(path: Path) -> IO[bytes]:
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic[:2] == b"\x1f\x8b":
        return gzip.open(path, "rb")
    if magic[:3] == b"BZh":
        return bz2.open(path, "rb")
    if magic == b"\xfd7zXZ\x00":
        return lzma.open(path, "rb")
    return open(path, "rb")


class _CountingReader:
    """File-like wrapper that counts the bytes read through it."""

    def __init__(self, f: IO[bytes]):
        self.f = f
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.count += len(b)
        return b


def _decode_archive(path: Path, *, image_size: int | None, skip_corrupt: bool, unlabeled: bool,
                    scratch: Path) -> _Decoded:
    collector = _FolderCollector(str(path), image_size, archive=True)
    raw: dict[str, bytes] = {}  # CIFAR pickles, by member path
    stl: dict[str, Path] = {}  # STL-10 binaries, extracted to a scratch folder
    stl_dir: Path | None = None
    result: _Decoded | None = None
    seen: set[str] = set()  # member paths, normalised: one listed twice would be read twice
    try:
        try:
            for m in _iter_archive(path):
                parts = _clean_parts(m.name)
                if parts is None:
                    continue
                if m.is_dir:
                    collector.add_dir(parts)
                    continue
                member = "/".join(parts)
                if member in seen:
                    raise DataError(f"archive {path} holds the member {member!r} twice; a dataset lists each file "
                                    "once, so create the archive again (e.g. not by appending with tar -r)")
                seen.add(member)
                base = parts[-1]
                if base in _CIFAR10_FILES or base in _CIFAR100_FILES:
                    raw[member] = _read_member(m, path, _CIFAR_MEMBER_LIMIT, "a CIFAR batch file")
                elif base in _STL_FILES:
                    if base == "unlabeled_X.bin" and not unlabeled:
                        continue  # 2.7 GB that nobody asked for
                    if stl_dir is None:
                        stl_dir = _scratch_dir(scratch)
                    stl[base] = stl_dir / base
                    with m.open() as f:
                        _copy_out(f, stl[base])
                elif is_image_name(base):
                    collector.add_file(parts, _read_member(m, path, _image_member_limit(), "an image"))
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError, OSError) as e:
            raise DataError(f"could not read archive {path}: {type(e).__name__}: {e} (is it truncated or "
                            "corrupt? download or create it again)") from e

        by_folder: dict[str, set[str]] = {}
        for key in raw:
            folder, _, base = key.rpartition("/")
            by_folder.setdefault(folder, set()).add(base)
        for folder, bases in sorted(by_folder.items()):
            fmt = "cifar10" if "batches.meta" in bases else "cifar100" if _CIFAR100_FILES <= bases else None
            if fmt is not None:
                label = f"{path}:{folder}" if folder else str(path)

                def read(name: str, folder: str = folder, label: str = label, fmt: str = fmt) -> bytes:
                    try:
                        return raw[f"{folder}/{name}" if folder else name]
                    except KeyError:
                        raise DataError(f"{fmt.upper()} file {name!r} is missing from {label}") from None

                result = _cifar(read, fmt, label, image_size)
                break
        if result is None and "train_X.bin" in stl:
            assert stl_dir is not None
            result = _stl(stl_dir, image_size, unlabeled, label=str(path))
            # The arrays may be views of the extracted files: delete them only after caching.
            result.cleanups.append(functools.partial(shutil.rmtree, stl_dir, ignore_errors=True))
            stl_dir = None
        if result is None:
            result = collector.finish(skip_corrupt, dataset=_dataset_name(path))
        return result
    finally:
        collector.close()
        if stl_dir is not None:
            shutil.rmtree(stl_dir, ignore_errors=True)


def _image_member_limit() -> int:
    """The most bytes one image member of an archive may expand to: $SELFSUP_MAX_IMAGE_MB, default 64 MiB."""
    env = os.environ.get("SELFSUP_MAX_IMAGE_MB", "").strip()
    if not env:
        return _IMAGE_MEMBER_LIMIT
    try:
        mb = float(env)
    except ValueError:
        mb = -1.0
    if not 0 < mb < float("inf"):
        raise DataError(f"SELFSUP_MAX_IMAGE_MB must be a positive number of MiB, got {env!r}")
    return int(mb * (1 << 20))


def _read_member(m: _Member, archive: Path, limit: int, what: str) -> bytes:
    """A member's bytes, refused by name (before reading) when it expands to more than ``limit``."""
    def refuse(size: int) -> DataError:
        return DataError(f"archive {archive}: member {m.name!r} expands to {size / (1 << 20):.1f} MiB, more than "
                         f"the {limit / (1 << 20):g} MiB allowed for {what}; it is corrupt or not a dataset "
                         f"file{' (SELFSUP_MAX_IMAGE_MB raises the limit)' if what == 'an image' else ''}")

    if m.size > limit:  # the size the archive declares
        raise refuse(m.size)
    with m.open() as f:
        data = f.read(limit + 1)  # and never more than the limit, whatever it declared
    if len(data) > limit:
        raise refuse(len(data))
    return data


def _scratch_dir(scratch: Path) -> Path:
    try:
        scratch.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".extract-", dir=scratch))
    except OSError:
        return Path(tempfile.mkdtemp(prefix="selfsup-extract-"))


def _copy_out(src: IO[bytes], dest: Path) -> None:
    # Read errors mean a bad archive and are left to the caller; write errors are ours.
    def fail(e: OSError) -> DataError:
        return DataError(f"could not extract to {dest}: {e}; free some disk space or set SELFSUP_CACHE / "
                         "cache_dir to a roomier folder")

    try:
        out = open(dest, "wb")
    except OSError as e:
        raise fail(e) from e
    with out:
        while chunk := src.read(1 << 22):
            try:
                out.write(chunk)
            except OSError as e:
                raise fail(e) from e


# --------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------


class _FolderCollector:
    """Gathers ``<prefix>/<split>/<class>/.../<image>`` members and decodes them as they arrive."""

    def __init__(self, label: str, image_size: int | None, archive: bool = False):
        self.label = label
        self.sep = ":" if archive else "/"
        self.image_size = image_size
        self.decoder = _Decoder(image_size, label)
        self.items: list[tuple[tuple[str, ...], str, str, str]] = []  # (prefix, split, class, relname) per image
        self.class_dirs: set[tuple[tuple[str, ...], str, str]] = set()
        self.loose: dict[tuple[tuple[str, ...], str], str] = {}  # images lying directly in a split folder

    @staticmethod
    def _locate(parts: list[str]) -> tuple[tuple[str, ...], str, str] | None:
        for k, p in enumerate(parts[:-1]):  # the split folder needs a class folder after it
            if p in _SPLITS:
                return tuple(parts[:k]), p, parts[k + 1]
        return None

    def add_dir(self, parts: list[str]) -> None:
        where = self._locate(parts)
        if where is not None:
            self.class_dirs.add(where)

    def add_file(self, parts: list[str], payload: bytes | str) -> None:
        if not is_image_name(parts[-1]):
            if len(parts) > 1:
                self.add_dir(parts[:-1])  # a class folder holding only non-images is still reported
            return
        where = self._locate(parts[:-1]) if len(parts) > 1 else None
        if where is None:
            for k, p in enumerate(parts[:-1]):
                if p in _SPLITS:
                    self.loose.setdefault((tuple(parts[:k]), p), "/".join(parts))
            return
        self.class_dirs.add(where)
        self.items.append((*where, "/".join(parts)))
        self.decoder.add(payload)

    def close(self) -> None:
        self.decoder.close()

    def _where(self, *parts: str) -> str:
        return self.label + self.sep + "/".join(p for p in parts if p)

    def finish(self, skip_corrupt: bool, dataset: str) -> _Decoded:
        arrays, errors = self.decoder.finish()
        prefixes = {p for p, s, _ in self.class_dirs if s == "train"}
        if not prefixes:
            hint = ""
            if self.loose:
                example = next(iter(self.loose.values()))
                hint = (f" (images such as {self._where(example)} lie directly in a split folder, without a "
                        "class folder)")
            raise DataError(f"no images found in {self.label} under train/<class>/: expected "
                            f"<root>/train/<class>/<image> with test/ or val/ beside train/{hint}; image "
                            f"extensions: {' '.join(sorted(IMAGE_EXTENSIONS))}")
        depth = min(len(p) for p in prefixes)
        tops = sorted(p for p in prefixes if len(p) == depth)
        if len(tops) > 1:
            names = ", ".join("/".join(p) + "/" for p in tops)
            raise DataError(f"{self.label} holds several datasets ({names}); pass just one of them")
        prefix = tops[0]
        pre = "/".join(prefix)
        splits_here = {s for p, s, _ in self.class_dirs if p == prefix}
        held_out = "test" if "test" in splits_here else "val" if "val" in splits_here else None
        wanted = ["train"] + ([held_out] if held_out else [])

        classes = sorted({c for p, s, c in self.class_dirs if p == prefix and s == "train"})
        index = {c: i for i, c in enumerate(classes)}
        if held_out:
            extra = sorted({c for p, s, c in self.class_dirs if p == prefix and s == held_out} - set(index))
            if extra:
                raise DataError(f"{held_out}/ has class folder(s) that train/ lacks ({', '.join(extra[:5])}), e.g. "
                                f"{self._where(pre, held_out, extra[0])}; every {held_out} class needs a "
                                "train folder of the same name")
        with_images = {(s, c) for p, s, c, _ in self.items if p == prefix}
        for p, s, c in sorted(self.class_dirs):
            if p == prefix and s in wanted and (s, c) not in with_images:
                raise DataError(f"class folder {self._where(pre, s, c)} has no images (extensions: "
                                f"{' '.join(sorted(IMAGE_EXTENSIONS))}); add images or remove the folder")

        chosen = [i for i, (p, s, _, _) in enumerate(self.items) if p == prefix and s in wanted]
        bad = [i for i in chosen if errors[i] is not None]
        if bad and not skip_corrupt:
            shown = "; ".join(f"{self._where(self.items[i][3])} ({errors[i]})" for i in bad[:5])
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise DataError(f"{len(bad)} image(s) in {self.label} could not be decoded: {shown}{more}. Fix or "
                            "delete them, or pass skip_corrupt=True (--skip-corrupt) to leave them out")
        good = [i for i in chosen if errors[i] is None]
        sizes: dict[tuple[int, ...], int] = {}
        for i in good:
            sizes.setdefault(arrays[i].shape, i)
        if len(sizes) > 1:
            (s1, i1), (s2, i2) = list(sizes.items())[:2]
            first, second = self._where(self.items[i1][3]), self._where(self.items[i2][3])
            raise DataError(f"images in {self.label} have different sizes ({s1[1]}x{s1[0]} for {first}, "
                            f"{s2[1]}x{s2[0]} for {second}); pass image_size to resize them all to one square size")

        splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for s in wanted:
            idx = [i for i in good if self.items[i][1] == s]
            if not idx:
                raise DataError(f"no decodable images left in {self._where(pre, s)}")
            # Sorted by (class, path) so the order never depends on archive or filesystem order.
            idx.sort(key=lambda i: (index[self.items[i][2]], self.items[i][3]))
            h, w, _ = arrays[idx[0]].shape
            images = np.empty((len(idx), h, w, 3), np.uint8)  # (N, H, W, 3) uint8
            for j, i in enumerate(idx):
                images[j] = arrays[i]
            labels = np.array([index[self.items[i][2]] for i in idx], np.int64)
            splits["train" if s == "train" else "test"] = (images, labels)
        return _Decoded("folder", dataset, classes, splits, split_names={"test": held_out} if held_out else {},
                        skipped=len(bad), skipped_examples=[self._where(self.items[i][3]) for i in bad[:20]])


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


class _Decoder:
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
        if len(self.pending) >= _CHUNK:
            self._flush()

    def _flush(self) -> None:
        batch, self.pending = self.pending, []
        if not batch:
            return
        if self.pool is None and self.workers > 1 and len(batch) >= _CHUNK:
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
            arrays.append(_decode_image(p, image_size))
            errors.append(None)
        except Exception as e:  # noqa: BLE001 - any decoder failure marks just this file as bad
            arrays.append(None)
            errors.append(f"{type(e).__name__}: {e}")
    first = arrays[0] if arrays else None
    if first is not None and all(a is not None and a.shape == first.shape for a in arrays):
        return np.stack(arrays), errors  # one array pickles far faster than a thousand
    return arrays, errors


def open_regular(path: str) -> IO[bytes]:
    """``open(path, 'rb')`` for a regular file only: a named pipe would block the read for ever."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # opening a FIFO must not wait either
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(f"{path} is not a regular file (a {_file_kind(mode)})")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _decode_image(src: bytes | str, image_size: int | None) -> np.ndarray:
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


def _resize_all(images: np.ndarray, size: int) -> np.ndarray:
    """(N, h, w, 3) uint8 -> (N, size, size, 3) uint8, bicubic; works on strided memmap views."""
    out = np.empty((len(images), size, size, 3), np.uint8)
    step = 1024
    for i in range(0, len(images), step):
        block = np.ascontiguousarray(images[i:i + step])  # bounded copy even for a transposed memmap
        for j, img in enumerate(block):
            out[i + j] = np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BICUBIC))
    return out


# --------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 python release
# --------------------------------------------------------------------------------------------


def _numpy_global(name: str) -> object:
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            mod = __import__(module, fromlist=[name])
            return getattr(mod, name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"numpy has no {name}")


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and numpy arrays: a data file must not run code."""

    def find_class(self, module: str, name: str) -> object:
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("_reconstruct", "scalar"):
            return _numpy_global(name)
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module in ("numpy.dtypes",) and name.endswith("DType"):
            return getattr(__import__("numpy.dtypes", fromlist=[name]), name)
        if (module, name) == ("_codecs", "encode"):  # how protocol 2 stores bytes when written by Python 3
            return super().find_class(module, name)
        if module in ("builtins", "copyreg") and name in ("bytearray", "_reconstructor", "object"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected object {module}.{name}")


def _unpickle(data: bytes, what: str) -> dict:
    try:
        obj = _CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - every unpickling failure means the same thing here
        raise DataError(f"{what} is not a readable CIFAR batch file ({type(e).__name__}: {e}); download "
                        "the python release again") from e
    if not isinstance(obj, dict):
        raise DataError(f"{what} is not a CIFAR batch file (holds a {type(obj).__name__}, expected a dict)")
    # Python 2 pickles come back with bytes keys; normalise so files re-pickled under Python 3 work too.
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_batch(data: bytes, what: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(data, what)
    if "data" not in d or label_key not in d:
        raise DataError(f"{what} lacks the 'data' or {label_key!r} entry; is it a "
                        f"{'CIFAR-10' if label_key == 'labels' else 'CIFAR-100'} file?")
    x = np.asarray(d["data"])
    y = np.asarray(d[label_key], dtype=np.int64)
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or y.shape != (len(x),):
        raise DataError(f"{what} holds data {x.dtype} {x.shape} and {y.shape} labels; expected uint8 (N, 3072) "
                        "and N labels")
    # Each row is the R plane, then G, then B, each 32x32 row-major: (N, 3, 32, 32) -> NHWC.
    return np.ascontiguousarray(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)), y


def _cifar(read: Callable[[str], bytes], fmt: str, label: str, image_size: int | None) -> _Decoded:
    if fmt == "cifar10":
        meta = _unpickle(read("batches.meta"), f"{label}/batches.meta")
        names_key, label_key = "label_names", "labels"
        parts = [_cifar_batch(read(f"data_batch_{i}"), f"{label}/data_batch_{i}", label_key) for i in range(1, 6)]
        train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        test = _cifar_batch(read("test_batch"), f"{label}/test_batch", label_key)
    else:
        meta = _unpickle(read("meta"), f"{label}/meta")
        names_key, label_key = "fine_label_names", "fine_labels"
        train = _cifar_batch(read("train"), f"{label}/train", label_key)
        test = _cifar_batch(read("test"), f"{label}/test", label_key)
    if names_key not in meta:
        raise DataError(f"{label}: the meta file lacks {names_key!r}; is this the {fmt.upper()} python release?")
    classes = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in meta[names_key]]
    for what, (_, y) in (("train", train), ("test", test)):
        if len(y) and (y.min() < 0 or y.max() >= len(classes)):
            raise DataError(f"{label}: {what} labels span {y.min()}..{y.max()} but there are {len(classes)} classes")
    splits = {"train": train, "test": test}
    if image_size is not None and image_size != 32:
        _check_memory(len(train[0]) + len(test[0]), image_size, 1, f"{label} at image_size={image_size}")
        splits = {s: (_resize_all(x, image_size), y) for s, (x, y) in splits.items()}
    return _Decoded(fmt, fmt, classes, splits)


# --------------------------------------------------------------------------------------------
# STL-10 binary release
# --------------------------------------------------------------------------------------------


def _stl_images(path: Path) -> np.ndarray:
    """Memory-mapped (N, 96, 96, 3) view of an STL-10 *_X.bin file (no copy)."""
    per = 3 * _STL_SIZE * _STL_SIZE
    size = path.stat().st_size
    if size == 0 or size % per:
        raise DataError(f"{path} has {size} bytes, not a whole number of 96x96x3 images; is it truncated?")
    raw = np.memmap(path, dtype=np.uint8, mode="r", shape=(size // per, 3, _STL_SIZE, _STL_SIZE))
    # Stored column-major per channel, i.e. (N, C, W, H); swap to (N, H, W, C).
    return raw.transpose(0, 3, 2, 1)


def _stl_labels(path: Path, n: int) -> np.ndarray:
    y = np.fromfile(path, dtype=np.uint8).astype(np.int64) - 1  # stored 1..10
    if len(y) != n:
        raise DataError(f"{path} has {len(y)} labels for {n} images; the STL-10 files do not match")
    if n and (y.min() < 0 or y.max() > 9):
        raise DataError(f"{path} holds labels outside 1..10; is it an STL-10 label file?")
    return y


def _stl(root: Path, image_size: int | None, unlabeled: bool, label: str | None = None) -> _Decoded:
    label = label or str(root)

    def need(name: str) -> Path:
        p = root / name
        if not p.is_file():
            raise DataError(f"STL-10 file {name!r} is missing from {label}")
        return p

    names_file = root / "class_names.txt"
    classes = ([line.strip() for line in names_file.read_text().splitlines() if line.strip()]
               if names_file.is_file() else list(_STL_CLASSES))
    splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for s in ("train", "test"):
        x = _stl_images(need(f"{s}_X.bin"))
        splits[s] = (x, _stl_labels(need(f"{s}_y.bin"), len(x)))
    if unlabeled:
        x = _stl_images(need("unlabeled_X.bin"))
        splits["unlabeled"] = (x, np.full(len(x), -1, np.int64))
    if image_size is not None and image_size != _STL_SIZE:
        _check_memory(sum(len(x) for x, _ in splits.values()), image_size, 1, f"{label} at image_size={image_size}")
        splits = {s: (_resize_all(x, image_size), y) for s, (x, y) in splits.items()}
    return _Decoded("stl10", "stl10", classes, splits)
