"""Image folders ``<root>/{train,test|val}/<class>/<image>``: naming rules, safe listing, collection.

:func:`scan_image_folder` lists a folder on disk, following symbolic links only where that is
safe; :class:`FolderCollector` turns the members of a folder or an archive into labelled splits.
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import numpy as np

from .datasets import DataError, Decoded
from .decode import Decoder, file_kind, sort_out, stack

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff"})
SPLITS = ("train", "test", "val")  # folder names; 'val' stands in for a missing 'test'


def is_image_name(name: str) -> bool:
    """Whether a file name has one of :data:`IMAGE_EXTENSIONS` (any case)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def is_hidden_name(name: str) -> bool:
    """Whether a file or folder name is never data: dot files and macOS litter (__MACOSX/, ._foo.jpg)."""
    return name.startswith(".") or name == "__MACOSX"


def scan_image_folder(root: Path, splits: tuple[str, ...] = SPLITS
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
                    raise DataError(f"{root / rel} is not a regular file (a {file_kind(st.st_mode)}); only regular "
                                    "files are read as images, remove it")
            stack.extend(reversed(subdirs))  # depth first, in name order
    return dirs, files


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _outside(link: Path, real: str, real_root: str) -> str:
    return (f"{link} leads to {real}, outside the dataset folder {real_root}; symbolic links are followed only "
            "inside it (move or copy the files in)")


class FolderCollector:
    """Gathers ``<prefix>/<split>/<class>/.../<image>`` members and decodes them as they arrive."""

    def __init__(self, label: str, image_size: int | None, archive: bool = False, total: int | None = None):
        self.label = label
        self.sep = ":" if archive else "/"
        self.image_size = image_size
        self.decoder = Decoder(image_size, label, total)
        self.items: list[tuple[tuple[str, ...], str, str, str]] = []  # (prefix, split, class, relname) per image
        self.class_dirs: set[tuple[tuple[str, ...], str, str]] = set()
        self.loose: dict[tuple[tuple[str, ...], str], str] = {}  # images lying directly in a split folder

    @staticmethod
    def _locate(parts: list[str]) -> tuple[tuple[str, ...], str, str] | None:
        for k, p in enumerate(parts[:-1]):  # the split folder needs a class folder after it
            if p in SPLITS:
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
                if p in SPLITS:
                    self.loose.setdefault((tuple(parts[:k]), p), "/".join(parts))
            return
        self.class_dirs.add(where)
        self.items.append((*where, "/".join(parts)))
        self.decoder.add(payload)

    def close(self) -> None:
        self.decoder.close()

    def _where(self, *parts: str) -> str:
        return self.label + self.sep + "/".join(p for p in parts if p)

    def finish(self, skip_corrupt: bool, dataset: str) -> Decoded:
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
        good, bad = sort_out(self.label, chosen, lambda i: self._where(self.items[i][3]), arrays, errors,
                             skip_corrupt)
        splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for s in wanted:
            idx = [i for i in good if self.items[i][1] == s]
            if not idx:
                raise DataError(f"no decodable images left in {self._where(pre, s)}")
            # Sorted by (class, path) so the order never depends on archive or filesystem order.
            idx.sort(key=lambda i: (index[self.items[i][2]], self.items[i][3]))
            labels = np.array([index[self.items[i][2]] for i in idx], np.int64)
            splits["train" if s == "train" else "test"] = (stack(arrays, idx), labels)
        return Decoded("folder", dataset, classes, splits, split_names={"test": held_out} if held_out else {},
                       skipped=len(bad), skipped_examples=[self._where(self.items[i][3]) for i in bad[:20]])
