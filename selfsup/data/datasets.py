"""The containers every source ends up in, and the error every bad input raises.

:class:`ImageDataset` is one split, :class:`DataSplits` the splits of one source, and
:class:`Decoded` the arrays a reader (folder, archive, CIFAR, STL-10) produces before
:mod:`selfsup.data.cache` writes and reopens them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import DataError  # noqa: F401 (defined there; imported from here too)

_MEAN_STD_SAMPLES = 10_000


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
    chosen_size: int | None = None  # the side load_data's default_size picked: a folder of mixed sizes
    cache_key: str | None = None  # the decoded cache's key: the files' identity (paths, sizes, times) and settings


@dataclass
class Decoded:
    """A source decoded into arrays (possibly views of scratch files until :meth:`cleanup`)."""

    fmt: str
    dataset: str  # display name, e.g. 'cifar10'
    classes: list[str]
    splits: dict[str, tuple[np.ndarray, np.ndarray]]  # 'train'/'test'/'unlabeled' -> (images, labels)
    split_names: dict[str, str] = field(default_factory=dict)  # e.g. {'test': 'val'}
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def cleanup(self) -> None:
        """Run the cleanups (delete scratch files), once the arrays are no longer needed."""
        for fn in self.cleanups:
            fn()
        self.cleanups.clear()
