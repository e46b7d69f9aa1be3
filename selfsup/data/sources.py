"""What a source on disk is (:func:`inspect_source`) and how it is decoded (:func:`decode_source`)."""
from __future__ import annotations

import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from .archives import ARCHIVE_SUFFIXES, dataset_name, decode_archive
from .datasets import DataError, Decoded
from .folders import FolderCollector, is_hidden_name, is_image_name, scan_image_folder
from .memory import check_memory
from .releases import CIFAR100_FILES, decode_cifar, decode_stl


@dataclass
class Source:
    """A data source on disk, as found by :func:`inspect_source`: its format and fingerprint."""

    path: Path  # absolute; the file or the folder the user named
    fmt: str | None  # 'folder' | 'cifar10' | 'cifar100' | 'stl10' for folders; None for archives (found on read)
    root: Path | None = None  # for folders: where the dataset's files are (the path or its one top folder)
    files: list[tuple[str, int, int]] = field(default_factory=list)  # (relpath from root, size, mtime_ns)
    dirs: list[str] = field(default_factory=list)  # relpaths of folders under root (image folders only)
    count: int = 0  # number of files, when known up front
    size: int = 0  # total bytes
    mtime_ns: int = 0  # newest modification time


def inspect_source(path: Path) -> Source:
    """What ``path`` (absolute) holds; folders are listed now, archives only when decoded."""
    if path.is_dir():
        return _inspect_dir(path)
    if not path.is_file():
        raise DataError(f"data source {str(path)!r} is neither a file nor a folder")
    low = path.name.lower()
    if not low.endswith(ARCHIVE_SUFFIXES) and not (zipfile.is_zipfile(path) or tarfile.is_tarfile(path)):
        raise DataError(f"data source {str(path)!r} is a file but not a .tar, .tar.gz/.tgz or .zip archive; pass "
                        "an image folder, an archive of one, or 'digits', 'cifar10', 'cifar100', 'stl10'")
    st = path.stat()
    return Source(path, None, size=st.st_size, mtime_ns=st.st_mtime_ns)


def _dir_kind(d: Path) -> str | None:
    if (d / "batches.meta").is_file() and (d / "data_batch_1").is_file():
        return "cifar10"
    if all((d / n).is_file() for n in CIFAR100_FILES):
        return "cifar100"
    if (d / "train_X.bin").is_file():
        return "stl10"
    if (d / "train").is_dir():
        return "folder"
    return None


def _inspect_dir(path: Path) -> Source:
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
    src = Source(path, kind, root)
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


def decode_source(src: Source, *, image_size: int | None, skip_corrupt: bool, unlabeled: bool,
                  scratch: Path) -> Decoded:
    """Decode ``src`` into arrays (may be views of scratch files until ``cleanup``)."""
    if src.fmt is None:
        return decode_archive(src.path, image_size=image_size, skip_corrupt=skip_corrupt, unlabeled=unlabeled,
                              scratch=scratch)
    root = src.root
    assert root is not None
    if src.fmt in ("cifar10", "cifar100"):
        def read(name: str) -> bytes:
            try:
                return (root / name).read_bytes()
            except FileNotFoundError:
                raise DataError(f"{src.fmt.upper()} file {name!r} is missing from {root}") from None

        return decode_cifar(read, src.fmt, str(root), image_size)
    if src.fmt == "stl10":
        return decode_stl(root, image_size, unlabeled)

    if image_size is not None:  # the decoded list and the split arrays built from it
        check_memory(sum(is_image_name(rel) for rel, _, _ in src.files), image_size, 2,
                     f"{root} at image_size={image_size}")
    collector = FolderCollector(str(root), image_size)
    try:
        for d in src.dirs:
            collector.add_dir(d.split("/"))
        for rel, _, _ in src.files:
            collector.add_file(rel.split("/"), str(root / rel))
        return collector.finish(skip_corrupt, dataset=dataset_name(src.path))
    finally:
        collector.close()
