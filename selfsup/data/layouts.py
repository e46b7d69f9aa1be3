"""Folders of one's own images: class folders without splits, any tree of unlabelled images, and
list files (``.txt``/``.csv``) naming images; their seeded hold-out and their decoding.

How a folder without ``train/`` is read (:func:`folder_layout`), after the split layout
(``<root>/train/<class>/<image>``, :mod:`.folders`) and the CIFAR / STL-10 releases:

* **class folders** ``<root>/<class>/.../<image>``: no image directly in ``<root>`` and at least
  two top-level folders, each holding images (at any depth); the top-level folder names the class;
* **unlabelled images**: anything else (images at the top, one folder, ...): every image under
  ``<root>``, at any depth, labelled -1.

A top-level ``test/`` or ``val/`` without ``train/`` is refused (a split layout missing its
training split), and a folder with images at its top is never read as a wrapper of a dataset.

Both are listed by :func:`~.folders.scan_image_folder`, so its symbolic-link and regular-file rules
hold. A labelled layout's test split is a stratified hold-out (:func:`holdout_mask`).
"""
from __future__ import annotations

import csv
import hashlib
import math
import os
import stat
from pathlib import Path

import numpy as np

from .datasets import DataError, Decoded
from .decode import Decoder, file_kind, sort_out, stack
from .folders import IMAGE_EXTENSIONS, SPLITS, is_image_name, scan_image_folder

LIST_SUFFIXES = (".txt", ".csv")
Files = list[tuple[str, int, int]]  # (path relative to the root, size, mtime_ns) per image


def folder_layout(root: Path) -> tuple[str, Files, list[str] | None]:
    """-> ('classes' | 'images', the images under ``root``, their class names or None)."""
    dirs, files = scan_image_folder(root, ("",))
    images = [f for f in files if is_image_name(f[0])]
    expected = (f"expected {root}/train/<class>/<image> (with test/ or val/), {root}/<class>/<image>, or any "
                f"images under it (extensions: {' '.join(sorted(IMAGE_EXTENSIONS))})")
    if not images:
        what = "it is empty" if not files and dirs == [""] else f"{len(files)} other files"
        raise DataError(f"no dataset found in folder {root}: no images in it ({what}); {expected}")
    tops = sorted(d for d in dirs if d and "/" not in d)
    split = next((t for t in tops if t in SPLITS), None)
    if split is not None:  # a split layout that lacks train/, not a class named 'test'
        raise DataError(f"{root} has {split}/ but no train/ beside it: the split layout needs "
                        f"{root}/train/<class>/<image>; add train/, or pass the {split}/ folder itself")
    if any("/" not in rel for rel, _, _ in images) or len(tops) < 2:
        return "images", images, None
    labels = [rel.split("/", 1)[0] for rel, _, _ in images]
    empty = sorted(set(tops) - set(labels))
    if empty:
        raise DataError(f"class folder {root / empty[0]} has no images (read as the class layout "
                        f"{root}/<class>/<image>: no image at the top, {len(tops)} folders); add images or remove "
                        "the folder")
    return "classes", images, labels


def read_list(path: Path) -> tuple[Files, list[str] | None]:
    """The images a list file names, relative to its folder (or absolute), and their labels.

    ``.txt``: one path per line. ``.csv``: ``path[,label]``. Blank lines and lines starting with
    ``#`` are skipped; a first row whose path has no image extension is a header. Every row has a
    label or none does; a missing file, a non-image name or a file listed twice stops the run
    with the list file, the line number and the path.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read list file {path}: {e}") from None
    if path.suffix.lower() == ".csv":
        reader = csv.reader(text.splitlines())
        rows = [(reader.line_num, [c.strip() for c in row]) for row in reader]
    else:
        rows = [(n, [line.strip()]) for n, line in enumerate(text.splitlines(), 1)]
    rows = [(n, cells) for n, cells in rows if any(cells) and not cells[0].startswith("#")]
    if rows and not is_image_name(rows[0][1][0]):
        rows = rows[1:]  # a header such as 'path,label'
    if not rows:  # e.g. notes.txt: said as inspect_source says it of any other file
        raise DataError(f"data source {str(path)!r} is a file but not a .tar, .tar.gz/.tgz or .zip archive, nor a "
                        "list of images: no line names an image file; a list holds one image path per line "
                        "(.txt) or path[,label] rows (.csv), relative to its folder")
    files: Files = []
    labels: list[str] = []
    first: dict[str, int] = {}  # real path -> the line that named it
    labelled = len(rows[0][1]) > 1
    for n, cells in rows:
        where = f"list file {path}, line {n}"
        if len(cells) > 2 or (len(cells) > 1) != labelled or (labelled and not cells[1]):
            raise DataError(f"{where}: expected {'path,label' if labelled else 'a path'} (as on line "
                            f"{rows[0][0]}), got {','.join(cells)!r}")
        rel = cells[0]
        full = path.parent / rel
        if not is_image_name(rel):
            raise DataError(f"{where}: {rel!r} is not an image file name (extensions: "
                            f"{' '.join(sorted(IMAGE_EXTENSIONS))})")
        try:
            st = os.stat(full)
        except OSError as e:
            raise DataError(f"{where}: {rel!r} {'not found' if isinstance(e, FileNotFoundError) else e.strerror} "
                            f"({full})") from None
        if not stat.S_ISREG(st.st_mode):
            raise DataError(f"{where}: {rel!r} is not a regular file (a {file_kind(st.st_mode)}); only regular "
                            "files are read as images")
        real = os.path.realpath(full)
        if first.setdefault(real, n) != n:
            raise DataError(f"{where}: {rel!r} is listed again (first on line {first[real]}); list each image once")
        files.append((rel, st.st_size, st.st_mtime_ns))
        labels.append(cells[1] if labelled else "")
    return files, labels if labelled else None


def holdout_mask(names: list[str], labels: list[str], fraction: float) -> np.ndarray:
    """(N,) bool: the stratified hold-out, round(fraction x n) images of each class of n (half up),
    always leaving one for training. Which ones is seeded by the paths alone (the smallest sha256
    of each class's names), so it is the same on every run and for eval, whatever train.seed, and
    adding an image moves at most one other."""
    test = np.zeros(len(names), bool)
    by_class: dict[str, list[int]] = {}
    for i, c in enumerate(labels):
        by_class.setdefault(c, []).append(i)
    for idx in by_class.values():
        k = min(len(idx) - 1, math.floor(fraction * len(idx) + 0.5))
        ranked = sorted(idx, key=lambda i: hashlib.sha256(names[i].encode()).digest())
        test[ranked[:k]] = True
    return test


def training_images(path: Path, holdout: float) -> tuple[str, list[str]]:
    """The layout of a list file or of a folder without ``train/``, and the paths of its training
    images (all of them, less a labelled layout's hold-out): what streaming reads."""
    if path.is_dir():
        layout, files, labels = folder_layout(path)
        root = path
    else:
        (files, labels), layout, root = read_list(path), "list", path.parent
    rels = [rel for rel, _, _ in files]
    held = holdout_mask(rels, labels, holdout) if labels else np.zeros(len(rels), bool)
    return layout, [str(root / rel) for rel, h in zip(rels, held) if not h]


def decode_listed(root: Path, files: Files, labels: list[str] | None, *, fmt: str, label: str, dataset: str,
                  image_size: int | None, skip_corrupt: bool, holdout: float) -> Decoded:
    """Decode the images ``files`` under ``root``: one unlabelled train split, or, with labels, a
    train split and the hold-out as the test split (classes sorted by name)."""
    rels = [rel for rel, _, _ in files]
    decoder = Decoder(image_size, label, total=len(rels))
    try:
        for rel in rels:
            decoder.add(str(root / rel))
        arrays, errors = decoder.finish()
    finally:
        decoder.close()

    def name(i: int) -> str:
        return str(root / rels[i])

    good, bad = sort_out(label, list(range(len(rels))), name, arrays, errors, skip_corrupt)
    classes = sorted(set(labels)) if labels else []
    index = {c: k for k, c in enumerate(classes)}
    test = holdout_mask(rels, labels, holdout) if labels else np.zeros(len(rels), bool)
    splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, held in (("train", False), ("test", True)):
        idx = [i for i in good if test[i] == held]
        if labels:
            idx.sort(key=lambda i: index[labels[i]])  # stable: listing order within a class
        if not idx:
            if split == "train":
                raise DataError(f"no decodable images left in {label}")
            continue
        y = np.array([index[labels[i]] for i in idx] if labels else [-1] * len(idx), np.int64)  # (n,)
        splits[split] = (stack(arrays, idx), y)
    return Decoded(fmt, dataset, classes, splits, split_names={"test": "holdout"}, skipped=len(bad),
                   skipped_examples=[name(i) for i in bad[:20]])
