"""What a source on disk is (:func:`inspect_source`) and how it is decoded (:func:`decode_source`)."""
from __future__ import annotations

import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from .archives import ARCHIVE_SUFFIXES, dataset_name, decode_archive
from .datasets import DataError, Decoded
from .folders import FolderCollector, is_hidden_name, is_image_name, scan_image_folder
from .layouts import LIST_SUFFIXES, decode_listed, folder_layout, read_list
from .releases import CIFAR100_FILES, decode_cifar, decode_stl

#: Formats whose images are files on disk, listed up front (their sizes can be read before decoding).
IMAGE_FILE_FORMATS = ("folder", "classes", "images", "list")
#: The layouts of one's own images (.layouts), which take a default size when their images differ in size.
OWN_IMAGE_FORMATS = ("classes", "images", "list")


@dataclass
class Source:
    """A data source on disk, as found by :func:`inspect_source`: its format and fingerprint."""

    path: Path  # absolute; the file or the folder the user named
    # 'folder' (train/<class>/...) | 'classes' | 'images' | 'list' | 'cifar10' | 'cifar100' | 'stl10';
    # None for archives (found on read)
    fmt: str | None
    root: Path | None = None  # where the dataset's files are (the path, its one top folder, a list's folder)
    files: list[tuple[str, int, int]] = field(default_factory=list)  # (relpath from root, size, mtime_ns)
    labels: list[str] | None = None  # 'classes' and labelled 'list': the class name of each file
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
    if low.endswith(LIST_SUFFIXES):
        files, labels = read_list(path)
        return _fingerprint(Source(path, "list", path.parent, files, labels=labels), extra=path)
    if not low.endswith(ARCHIVE_SUFFIXES) and not (zipfile.is_zipfile(path) or tarfile.is_tarfile(path)):
        raise DataError(f"data source {str(path)!r} is a file but not a .tar, .tar.gz/.tgz or .zip archive, nor a "
                        "list of images (.txt, .csv); pass an image folder, an archive of one, a list file, or "
                        "'digits', 'cifar10', 'cifar100', 'stl10'")
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
        # An unpacked archive usually wraps everything in one top folder (never one with images at its top).
        entries = [d for d in sorted(path.iterdir()) if not is_hidden_name(d.name)]
        wrapper = not any(is_image_name(d.name) and d.is_file() for d in entries)
        found = [(k, d) for d in entries if wrapper and d.is_dir() and (k := _dir_kind(d)) is not None]
        if len(found) > 1:
            names = ", ".join(d.name for _, d in found)
            raise DataError(f"folder {path} holds several datasets ({names}); pass one of them, "
                            f"e.g. {found[0][1]}")
        if not found:  # one's own images: class folders, or any tree of unlabelled images
            kind, files, labels = folder_layout(path)
            return _fingerprint(Source(path, kind, path, files, labels=labels))
        kind, root = found[0]
    src = Source(path, kind, root)
    if kind == "folder":
        src.dirs, src.files = scan_image_folder(root)
    else:
        for p in sorted(root.iterdir()):
            if p.is_file() and not is_hidden_name(p.name):
                st = p.stat()
                src.files.append((p.name, st.st_size, st.st_mtime_ns))
    return _fingerprint(src)


def _fingerprint(src: Source, extra: Path | None = None) -> Source:
    """Fill in the count, total size and newest mtime of ``src.files`` (and of the file ``extra``)."""
    stats = [(f[1], f[2]) for f in src.files]
    if extra is not None:
        st = extra.stat()
        stats.append((st.st_size, st.st_mtime_ns))
    src.count = len(src.files)
    src.size = sum(size for size, _ in stats)
    src.mtime_ns = max((mtime for _, mtime in stats), default=0)
    return src


def describe_layout(src: Source, holdout: float) -> str:
    """How ``src`` was read, for the log: its layout, images and classes."""
    n = sum(is_image_name(rel) for rel, _, _ in src.files)
    if src.fmt == "folder":
        return f"split layout {src.root}/<split>/<class>/<image>: {n} images"
    if src.fmt not in IMAGE_FILE_FORMATS:
        return f"{src.fmt} ({src.count} files)"
    what = {"classes": f"class folders {src.root}/<class>/<image>", "images": "a folder of unlabelled images (any "
            "depth)", "list": f"a list file of {'path,label rows' if src.labels else 'paths'}"}[src.fmt]
    if not src.labels:
        return f"{what}: {n} images, no labels (no kNN monitor or online probe)"
    return (f"{what}: {n} images in {len(set(src.labels))} classes; a stratified {holdout:.0%} hold-out (seeded "
            "by the paths) is the test split")


def decode_source(src: Source, *, image_size: int | None, skip_corrupt: bool, unlabeled: bool,
                  scratch: Path, holdout: float = 0.1) -> Decoded:
    """Decode ``src`` into arrays (may be views of scratch files until ``cleanup``); ``holdout``:
    the fraction of each class held out as the test split of class folders and labelled lists."""
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

    if src.fmt != "folder":
        return decode_listed(root, src.files, src.labels, fmt=src.fmt, label=str(src.path),
                             dataset=dataset_name(src.path), image_size=image_size, skip_corrupt=skip_corrupt,
                             holdout=holdout)
    collector = FolderCollector(str(root), image_size, total=sum(is_image_name(rel) for rel, _, _ in src.files))
    try:
        for d in src.dirs:
            collector.add_dir(d.split("/"))
        for rel, _, _ in src.files:
            collector.add_file(rel.split("/"), str(root / rel))
        return collector.finish(skip_corrupt, dataset=dataset_name(src.path))
    finally:
        collector.close()
