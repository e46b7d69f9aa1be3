"""Labelled subsets of a training split for semi-supervised protocols (SimCLRv2 §3, SimCLR §4).

A request is a class-balanced fraction (``"1%"``, ``"10%"``), a count per class (``"50"``) or a
file of training-image indices, one per line, as SimCLR's published 1 % / 10 % ImageNet lists.
Fractions and counts are drawn from a seed; the chosen indices are written to the run folder
(:data:`LABELS_FILE`) so every later step, and every rerun, trains on the same images.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .data import DataError
from .files import write_text_atomic

LABELS_FILE = "labels.txt"


def parse_request(spec: str) -> tuple[float | None, int | None]:
    """A request that is not a file, checked before any data is read: a fraction (``"1%"`` ->
    ``(1.0, None)``) or a count per class (``"50"`` -> ``(None, 50)``)."""
    spec = str(spec).strip()
    if spec.endswith("%"):
        try:
            percent = float(spec[:-1])
        except ValueError:
            raise DataError(f"--labels '{spec}' is not a percentage; use e.g. 1% or 10%") from None
        if not 0 < percent <= 100:
            raise DataError(f"--labels {spec}: a fraction must be in (0%, 100%]")
        return percent, None
    if not re.fullmatch(r"\d+", spec):
        raise DataError(f"--labels '{spec}' is neither a fraction (1%), a count per class (50) nor "
                        f"an existing file of image indices")
    if int(spec) < 1:
        raise DataError(f"--labels {spec}: the count per class must be at least 1")
    return None, int(spec)


def _per_class(spec: str, counts: np.ndarray) -> np.ndarray:
    """How many images of each class a fraction or count asks for; (C,) int."""
    percent, n = parse_request(spec)
    if percent is not None:
        want = np.rint(counts * percent / 100).astype(np.int64)
        if want.min() < 1:
            c = int(want.argmin())
            raise DataError(f"--labels {spec} gives no image of class {c} ({counts[c]} images); "
                            f"ask for a larger fraction or a count per class such as 1")
        return want
    if n > counts.min():
        c = int(counts.argmin())
        raise DataError(f"--labels {spec}: class {c} has only {counts[c]} training images; ask for "
                        f"at most {counts.min()} per class")
    return np.full(len(counts), n, dtype=np.int64)


def read_indices(path: str | Path, num_images: int) -> np.ndarray:
    """Indices listed in ``path`` (one integer per line; blank lines and ``#`` comments skipped)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not an index
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); a "
                        "label file lists image indices, one per line") from None
    except OSError as e:
        raise DataError(f"cannot read the label file {path}: {e.strerror or e}") from None
    seen: dict[int, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        if not re.fullmatch(r"\d+", text):
            raise DataError(f"{path}:{lineno}: '{text}' is not an image index (a whole number >= 0)")
        i = int(text)
        if i >= num_images:
            raise DataError(f"{path}:{lineno}: index {i} is out of range; the training split has "
                            f"{num_images} images (0..{num_images - 1})")
        if i in seen:
            raise DataError(f"{path}:{lineno}: index {i} is listed twice (first on line {seen[i]})")
        seen[i] = lineno
    if not seen:
        raise DataError(f"{path}: lists no image index")
    return np.array(sorted(seen), dtype=np.int64)


def select(spec: str, labels: np.ndarray, num_classes: int, *, seed: int = 0) -> np.ndarray:
    """Sorted indices (M,) into a training split with ``labels`` (N,) that ``spec`` asks for.

    Fractions and counts take, for each class, the first images of a seeded permutation of
    that class, so the subset depends only on (spec, seed, labels).
    """
    labels = np.asarray(labels)
    spec = str(spec).strip()
    if Path(spec).is_file():
        idx = read_indices(spec, len(labels))
        unlabelled = idx[labels[idx] < 0]
        if len(unlabelled):
            raise DataError(f"{spec}: image {unlabelled[0]} has no label (the split is unlabelled there)")
        return idx
    counts = np.bincount(labels[labels >= 0], minlength=num_classes)  # (C,)
    if counts.min() == 0:
        raise DataError(f"--labels {spec}: class {int(counts.argmin())} has no training image")
    want = _per_class(spec, counts)
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:want[c]] for c in range(num_classes)]
    return np.sort(np.concatenate(chosen))


def write_indices(path: str | Path, indices: np.ndarray, *, about: str) -> None:
    """Write ``indices`` in the format :func:`read_indices` reads, with a comment saying whence."""
    write_text_atomic(f"# {about}\n" + "".join(f"{i}\n" for i in indices), path)
