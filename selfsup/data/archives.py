"""Reading a ``.tar``/``.tar.gz``/``.zip`` dataset without extracting it.

Members are iterated once, front to back; a member listed twice is refused, and so is one
that expands past its limit (64 MiB for an image, ``$SELFSUP_MAX_IMAGE_MB``). Image members
go to a :class:`~selfsup.data.folders.FolderCollector`, CIFAR pickles are read into memory,
STL-10 binaries are extracted to a scratch folder.
"""
from __future__ import annotations

import bz2
import functools
import gzip
import lzma
import os
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterator

from .datasets import DataError, Decoded
from .folders import FolderCollector, is_hidden_name, is_image_name
from .releases import CIFAR10_FILES, CIFAR100_FILES, STL_FILES, decode_cifar, decode_stl

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".zip")
_IMAGE_MEMBER_LIMIT = 64 << 20  # bytes one image member of an archive may expand to (SELFSUP_MAX_IMAGE_MB)
_CIFAR_MEMBER_LIMIT = 256 << 20  # CIFAR-100's train file, the biggest, holds 50000 x 3072 bytes of pixels


def dataset_name(path: Path) -> str:
    """A source's display name: its file or folder name without an archive suffix."""
    name = path.name
    for suffix in ARCHIVE_SUFFIXES:
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
    if low.endswith(".zip") or (not low.endswith(ARCHIVE_SUFFIXES) and zipfile.is_zipfile(path)):
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


def decode_archive(path: Path, *, image_size: int | None, skip_corrupt: bool, unlabeled: bool,
                   scratch: Path) -> Decoded:
    """Decode an archive of an image folder, of the CIFAR python release or of the STL-10 binaries."""
    collector = FolderCollector(str(path), image_size, archive=True)
    raw: dict[str, bytes] = {}  # CIFAR pickles, by member path
    stl: dict[str, Path] = {}  # STL-10 binaries, extracted to a scratch folder
    stl_dir: Path | None = None
    result: Decoded | None = None
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
                if base in CIFAR10_FILES or base in CIFAR100_FILES:
                    raw[member] = _read_member(m, path, _CIFAR_MEMBER_LIMIT, "a CIFAR batch file")
                elif base in STL_FILES:
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
            fmt = "cifar10" if "batches.meta" in bases else "cifar100" if CIFAR100_FILES <= bases else None
            if fmt is not None:
                label = f"{path}:{folder}" if folder else str(path)

                def read(name: str, folder: str = folder, label: str = label, fmt: str = fmt) -> bytes:
                    try:
                        return raw[f"{folder}/{name}" if folder else name]
                    except KeyError:
                        raise DataError(f"{fmt.upper()} file {name!r} is missing from {label}") from None

                result = decode_cifar(read, fmt, label, image_size)
                break
        if result is None and "train_X.bin" in stl:
            assert stl_dir is not None
            result = decode_stl(stl_dir, image_size, unlabeled, label=str(path))
            # The arrays may be views of the extracted files: delete them only after caching.
            result.cleanups.append(functools.partial(shutil.rmtree, stl_dir, ignore_errors=True))
            stl_dir = None
        if result is None:
            result = collector.finish(skip_corrupt, dataset=dataset_name(path))
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
