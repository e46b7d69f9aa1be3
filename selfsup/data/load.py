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
from .download import REMOTES, fetch
from .releases import BUILTIN_SIZES, DIGITS_SIZE, load_digits
from .sources import decode_source, inspect_source

log = logging.getLogger(__package__)  # "selfsup.data": one logger for the whole package


def load_data(
    spec: str | os.PathLike,
    *,
    image_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    unlabeled: bool = False,
    skip_corrupt: bool = False,
    download: bool = True,
) -> DataSplits:
    """Load a data source (see :mod:`selfsup.data`), decoding it on the first call only.

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

    key = cache_key(src, image_size, skip_corrupt)
    entry = cache / f"{safe_name(src.path.name)}-{key[:16]}"
    meta = read_meta(entry, key)
    if meta is not None:
        if unlabeled and meta["format"] != "stl10":
            raise DataError(_no_unlabeled(text, meta["format"]))
        if not unlabeled or "unlabeled" in meta["splits"]:
            try:
                splits = open_cache(entry, meta, unlabeled)
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
    decoded = decode_source(src, image_size=image_size, skip_corrupt=skip_corrupt, unlabeled=unlabeled,
                            scratch=cache)
    try:
        if decoded.skipped:
            warnings.warn(_skipped_message(decoded.skipped, str(src.path), decoded.skipped_examples), stacklevel=2)
        meta = make_meta(src, key, decoded, image_size, skip_corrupt)
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
    return splits


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
