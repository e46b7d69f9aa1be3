"""The official releases: CIFAR-10/100 python pickles, STL-10 binaries, and the bundled digits.

CIFAR pickles are read by an unpickler that builds only plain containers and numpy arrays, so a
data file cannot run code; STL-10's binaries are memory-mapped, not copied.
"""
from __future__ import annotations

import functools
import io
import pickle
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from .datasets import DataError, DataSplits, Decoded, ImageDataset
from .decode import resize_all
from .memory import check_memory

DIGITS_SIZE = 32  # the side digits are resized to when image_size is not given
CIFAR10_FILES = frozenset({"batches.meta", "test_batch"} | {f"data_batch_{i}" for i in range(1, 6)})
CIFAR100_FILES = frozenset({"meta", "train", "test"})
STL_FILES = frozenset({"train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "unlabeled_X.bin",
                       "class_names.txt"})
_STL_SIZE = 96
#: the side of each built-in source's images when no image_size is given (CIFAR's pickles hold 32x32)
BUILTIN_SIZES: dict[str, int] = {"digits": DIGITS_SIZE, "cifar10": 32, "cifar100": 32, "stl10": _STL_SIZE}
_STL_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


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


def decode_cifar(read: Callable[[str], bytes], fmt: str, label: str, image_size: int | None) -> Decoded:
    """Decode the CIFAR-10 or -100 (``fmt``) python release, whose files ``read(name)`` returns."""
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
        check_memory(len(train[0]) + len(test[0]), image_size, 1, f"{label} at image_size={image_size}")
        splits = {s: (resize_all(x, image_size), y) for s, (x, y) in splits.items()}
    return Decoded(fmt, fmt, classes, splits)


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


def decode_stl(root: Path, image_size: int | None, unlabeled: bool, label: str | None = None) -> Decoded:
    """Decode the STL-10 binary release in ``root`` (its unlabeled split only if asked)."""
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
        check_memory(sum(len(x) for x, _ in splits.values()), image_size, 1, f"{label} at image_size={image_size}")
        splits = {s: (resize_all(x, image_size), y) for s, (x, y) in splits.items()}
    return Decoded("stl10", "stl10", classes, splits)


def load_digits(size: int) -> DataSplits:
    """scikit-learn's 8x8 digits as RGB ``size`` x ``size`` images, split 80/20 (stratified, seed 0)."""
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
    check_memory(len(digits.images), size, 7 / 3, f"digits at data.image_size={size}")
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
