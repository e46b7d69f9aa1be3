"""``load_data``: inspect a source, use its cache entry or decode it and write one."""
from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np

from .cache import (cache_key, default_cache_dir, make_meta, open_cache, read_meta, remove_stale, safe_name,
                    splits_in_memory, write_cache)
from .datasets import DataError, DataSplits
from .decode import peek_size
from .download import REMOTES, fetch
from .folders import is_image_name
from .memory import check_memory
from .releases import BUILTIN_SIZES, DIGITS_SIZE, load_digits
from .sources import IMAGE_FILE_FORMATS, Source, decode_source, describe_layout, inspect_source

log = logging.getLogger(__package__)  # "selfsup.data": one logger for the whole package


def load_data(
    spec: str | os.PathLike,
    *,
    image_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    unlabeled: bool = False,
    skip_corrupt: bool = False,
    download: bool = True,
    default_size: int | None = None,
    holdout: float = 0.1,
) -> DataSplits:
    """Load a data source (see :mod:`selfsup.data`), decoding it on the first call only.

    ``image_size`` resizes every image's shorter side to that and crops the centre square (digits
    default to 32; other sources keep their native size, which must then be the same for all
    images). ``default_size``: the side used instead when ``image_size`` is None and the images of
    a folder or a list differ in size (None, and for an archive: refuse them, asking for
    image_size); the result's
    ``chosen_size`` says when it was used. ``holdout``: the fraction of each class held out as the
    test split of class folders and labelled lists. ``unlabeled`` also loads STL-10's unlabeled
    split. ``skip_corrupt`` leaves out images that fail to decode (with a warning) instead of
    failing. ``download=False`` never touches the network for ``cifar10``/``cifar100``/``stl10``.
    """
    image_size, default_size = _check_image_size(image_size), _check_image_size(default_size)
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0 <= holdout < 1:
        raise DataError(f"holdout must be a fraction in [0, 1), got {holdout!r}")
    text = os.fspath(spec) if isinstance(spec, os.PathLike) else spec
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"data source must be a name or a path, got {spec!r}")
    name = text.strip().lower()
    if name == "digits":
        if unlabeled:
            raise DataError(_no_unlabeled(text, "digits"))
        return load_digits(image_size or DIGITS_SIZE)

    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if name in REMOTES:
        # A name wins over a same-named folder in the working directory; pass ./cifar10 for that.
        path = fetch(name, cache, download)
    else:
        path = Path(text).expanduser()
        if not path.exists():
            raise DataError(f"data source {text!r} not found: expected 'digits', 'cifar10', 'cifar100', "
                            "'stl10', an image folder, or a .tar/.tar.gz/.zip archive")
    src = inspect_source(path.resolve())
    files = src.fmt in IMAGE_FILE_FORMATS  # images on disk, listed: their sizes can be read up front
    if files:
        log.info("data: %s read as %s", src.path, describe_layout(src, holdout))
    if src.fmt not in IMAGE_FILE_FORMATS:
        default_size = None  # archives and releases: their sizes are known only once decoded

    def entry_for(size: int | None) -> tuple[str, Path]:
        key = cache_key(src, size, skip_corrupt, holdout)
        return key, cache / f"{safe_name(src.path.name)}-{key[:16]}"

    # A folder of mixed sizes decoded at default_size has the entry of image_size=default_size.
    defaulted = image_size is None and default_size is not None
    for size, mixed in [(image_size, False)] + ([(default_size, True)] if defaulted else []):
        key, entry = entry_for(size)
        splits = _cached(key, entry, src, text, unlabeled, mixed)
        if splits is not None:
            splits.chosen_size, splits.cache_key = (size if mixed else None), key
            return splits

    size, mixed = image_size, False
    if files:
        n = sum(is_image_name(rel) for rel, _, _ in src.files)
        shape: int | tuple[int, int] | None = image_size
        if image_size is None:
            shape = _native_size(src, default_size)
            if isinstance(shape, int):
                size, mixed = shape, True
        h, w = (shape, shape) if isinstance(shape, int) else shape
        log.info("decoding %d images of %s at %dx%d%s: the cache will hold %.1f MiB", n, src.path, w, h,
                 " (shorter side resized, centre cropped)" if size else " (their own size)", n * h * w * 3 / 2**20)
        # The decoded list and the split arrays built from it: refused here when it cannot fit.
        check_memory(n, (h, w), 2, f"{src.root} at image_size={size}" if size else f"{src.root} at {w}x{h}")
    key, entry = entry_for(size)

    if not files:
        log.info("decoding %s%s ...", src.path, f" ({src.count} files)" if src.count else "")
    t0 = time.perf_counter()
    decoded = decode_source(src, image_size=size, skip_corrupt=skip_corrupt, unlabeled=unlabeled, scratch=cache,
                            holdout=holdout)
    try:
        if decoded.skipped:
            warnings.warn(_skipped_message(decoded.skipped, str(src.path), decoded.skipped_examples), stacklevel=2)
        meta = make_meta(src, key, decoded, size, skip_corrupt, mixed)
        try:
            write_cache(entry, decoded, meta)
            splits = open_cache(entry, meta, unlabeled)
            where = f"cached in {entry}"
        except OSError as e:
            warnings.warn(f"could not write the data cache to {entry} ({e}); continuing without it, so the "
                          "next run decodes again (set SELFSUP_CACHE or cache_dir to a writable folder)",
                          stacklevel=2)
            splits = splits_in_memory(decoded, meta, unlabeled)
            where = "not cached"
        else:
            remove_stale(cache, entry, meta)
    finally:
        decoded.cleanup()
    # Checked only now: an archive's format is known once read, and the cache is then already useful.
    if unlabeled and decoded.fmt != "stl10":
        raise DataError(_no_unlabeled(text, decoded.fmt))
    log.info("decoded %s in %.1f s (%s); %s", src.path, time.perf_counter() - t0, _describe(splits), where)
    splits.chosen_size, splits.cache_key = (size if mixed else None), key
    return splits


def _cached(key: str, entry: Path, src: Source, text: str, unlabeled: bool, mixed: bool) -> DataSplits | None:
    """The entry's splits if it is complete and usable (``mixed``: only an entry of mixed sizes)."""
    meta = read_meta(entry, key)
    if meta is None or (mixed and not meta.get("mixed_sizes")):
        return None
    if unlabeled and meta["format"] != "stl10":
        raise DataError(_no_unlabeled(text, meta["format"]))
    if unlabeled and "unlabeled" not in meta["splits"]:
        return None
    try:
        splits = open_cache(entry, meta, unlabeled)
    except (OSError, ValueError, KeyError, EOFError) as e:
        log.warning("data cache %s is unreadable (%s); decoding %s again", entry, e, src.path)
        return None
    log.info("using cached %s from %s (%s)", src.path, entry, _describe(splits))
    if meta.get("skipped"):
        warnings.warn(_skipped_message(meta["skipped"], str(src.path), meta.get("skipped_examples", [])),
                      stacklevel=3)
    return splits


def _native_size(src: Source, default_size: int | None) -> tuple[int, int] | int:
    """The (H, W) every image of ``src`` shares (read from the headers), or ``default_size`` when
    they differ; without a default, different sizes are refused naming two of them."""
    first: tuple[tuple[int, int], str] | None = None
    for rel, _, _ in src.files:
        wh = peek_size(str(src.root / rel)) if is_image_name(rel) else None
        if wh is None:
            continue  # not an image, or unreadable: decoding names it
        if first is None:
            first = (wh, rel)
        elif wh != first[0]:
            (w1, h1), (w2, h2) = first[0], wh
            sizes = f"{w1}x{h1} for {src.root / first[1]}, {w2}x{h2} for {src.root / rel}"
            if default_size is None:
                raise DataError(f"images in {src.path} have different sizes ({sizes}); pass image_size to resize "
                                "them all to one square size")
            log.info("images of different sizes (%s): data.image_size unset, so each is resized to %d on its "
                     "shorter side and centre-cropped to %dx%d", sizes, default_size, default_size, default_size)
            return default_size
    return (first[0][1], first[0][0]) if first else (1, 1)


def builtin_image_size(spec: str) -> int | None:
    """The side of the images ``load_data(spec)`` gives without ``image_size`` when ``spec`` names
    a built-in source (``digits``, ``cifar10``, ``cifar100``, ``stl10``); None for a path, whose
    images are known only once read."""
    return BUILTIN_SIZES.get(spec.strip().lower())


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
