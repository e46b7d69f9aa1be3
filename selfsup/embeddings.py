"""``selfsup embed``: one embedding per image of a source, written as .csv, .npy or .parquet.

A source is listed first (:func:`list_images`), then decoded batch by batch, so a folder larger
than memory never sits in memory whole:

* ``digits``, ``cifar10``, ``cifar100``, ``stl10`` and the CIFAR / STL-10 releases: the data
  package's decoded (memory-mapped) arrays; an image's path is ``<split>/<index>``;
* a folder ``<root>/{train,test|val}/<class>/<image>`` (possibly in one top folder): the images
  of one split (``train`` unless ``split`` says otherwise), labelled by their class folder;
* class folders ``<root>/<class>/<image>`` (every image, hold-out included, labelled by its
  class folder), any other folder (every image under it, recursively, unlabelled) and a list
  file (``.txt``/``.csv``, with its labels if it has them): the images the data package lists
  (:func:`selfsup.data.sources.inspect_source`, :func:`selfsup.data.scan_image_folder`'s symlink
  and regular-file rules);
* a .tar/.tar.gz/.zip archive of the split layout: its members in archive order (zip: by name),
  read in one pass to list them and one more to decode them.

Files are decoded by a thread pool (PIL releases the GIL), each to the run's data size, one
batch ahead of the device; each batch then goes through the run's evaluation view
(:func:`selfsup.evaluate.extract_features`) and, for ``features="head"``, its projection head.
"""
from __future__ import annotations

import concurrent.futures
import csv
import io
import os
import sys
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .data import LIST_SUFFIXES, DataError, decode_image, is_hidden_name, is_image_name, load_data, scan_image_folder
from .data.archives import ARCHIVE_SUFFIXES
from .data.sources import inspect_source
from .device import resolve_device
from .errors import ConfigError
from .evaluate import apply_head, extract_features
from .files import write_atomic, write_text_atomic
from .runs import load_backbone
from .train import load_projector

BUILTIN = ("digits", "cifar10", "cifar100", "stl10")
FORMATS = (".csv", ".npy", ".parquet")
FEATURES = ("backbone", "head")


class Embeddings(NamedTuple):
    """What :func:`embed` returns: ``vectors, paths, labels = selfsup.embed(run, source)``."""
    vectors: np.ndarray         # (N, D) float32, in listing order
    paths: list[str]            # relative to the data root, as listed
    labels: list[str] | None    # class names; None where the source has no labels


@dataclass
class Listing:
    """The images of a source in order, and where to read them from (exactly one of
    ``pixels``, ``folder``, ``archive``)."""
    where: str                          # the source, for messages
    paths: list[str]
    labels: list[str] | None
    pixels: np.ndarray | None = None    # in-memory sources: (N, H, W, 3) uint8, maybe a memmap
    folder: Path | None = None          # files: ``folder / path``
    archive: Path | None = None         # archive members: ``members[i]`` holds image i
    members: list[str] | None = None
    skipped: list[str] = field(default_factory=list)  # images left out by batches(skip_corrupt=True)

    def __len__(self) -> int:
        return len(self.paths)

    def batches(self, size: int, batch_size: int, indices: list[int] | None = None,
                skip_corrupt: bool = False) -> Iterator[tuple[list[int], np.ndarray]]:
        """(indices, uint8 (B, S, S, 3)) batches of the images at ``indices`` (sorted; default all),
        in order; files are decoded to ``size`` (in-memory images keep the size they were loaded
        at). An image that cannot be decoded stops with its name, or with ``skip_corrupt`` is left
        out of its batch and named in :attr:`skipped`."""
        indices = list(range(len(self))) if indices is None else indices
        if self.pixels is not None:
            for lo in range(0, len(indices), batch_size):
                yield indices[lo:lo + batch_size], np.asarray(self.pixels[indices[lo:lo + batch_size]])
            return
        workers = min(8, os.cpu_count() or 1)
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            pending: list[tuple[int, concurrent.futures.Future]] = []
            for i, src in self._payloads(indices):
                pending.append((i, pool.submit(_decode, src, size, f"{self.where}: {self.paths[i]}", skip_corrupt)))
                if len(pending) == 2 * batch_size:  # one batch decoding ahead of the one handed out
                    yield from self._kept(pending[:batch_size])
                    pending = pending[batch_size:]
            for lo in range(0, len(pending), batch_size):
                yield from self._kept(pending[lo:lo + batch_size])

    def _kept(self, chunk: list[tuple[int, concurrent.futures.Future]]) -> Iterator[tuple[list[int], np.ndarray]]:
        decoded = [(i, f.result()) for i, f in chunk]
        self.skipped += [self.paths[i] for i, image in decoded if image is None]
        kept = [(i, image) for i, image in decoded if image is not None]
        if kept:
            yield [i for i, _ in kept], np.stack([image for _, image in kept])

    def _payloads(self, indices: list[int]) -> Iterator[tuple[int, bytes | str]]:
        if self.folder is not None:
            yield from ((i, str(self.folder / self.paths[i])) for i in indices)
            return
        assert self.archive is not None and self.members is not None
        wanted = {self.members[i]: i for i in indices}
        for name, read in _archive_files(self.archive):
            if name in wanted:
                yield wanted[name], read()


def _decode(src: bytes | str, size: int, where: str, skip_corrupt: bool = False) -> np.ndarray | None:
    try:
        return decode_image(src, size)  # (S, S, 3) uint8
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        if skip_corrupt:
            return None
        raise DataError(f"cannot decode {where} ({type(e).__name__}: {e}); fix or delete it, or pass "
                        "--skip-corrupt to leave it out") from None


def _archive_files(path: Path) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """(member name, read its bytes) of every file member: tar in archive order, zip by name."""
    try:
        low = path.name.lower()  # the suffix decides, as for load_data: a .tar may end in a zip member
        if low.endswith(".zip") or (not low.endswith(ARCHIVE_SUFFIXES) and zipfile.is_zipfile(path)):
            with zipfile.ZipFile(path) as zf:
                for info in sorted(zf.infolist(), key=lambda i: i.filename):
                    if not info.is_dir():
                        yield info.filename, lambda info=info: zf.read(info)
            return
        with tarfile.open(path, mode="r|*") as tf:  # stream mode: one pass, no seeks (tar.gz)
            for m in tf:
                if m.isfile():
                    yield m.name, lambda m=m: tf.extractfile(m).read()
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
        raise DataError(f"cannot read the archive {path}: {e}") from None


def _split_member(name: str, split: str) -> tuple[str, str] | None:
    """``[prefix/]<split>/<class>/.../<image>`` -> (path from the split folder on, class)."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts or any(is_hidden_name(p) for p in parts) or not is_image_name(parts[-1]):
        return None
    for k, p in enumerate(parts[:-2]):
        if p == split:
            return "/".join(parts[k:]), parts[k + 1]
    return None


def _in_memory(spec: str, split: str, image_size: int | None) -> Listing:
    if split not in ("train", "test", "unlabeled"):
        raise ConfigError(f"--split {split!r}: {spec} has the splits train and test (stl10: also unlabeled)")
    splits = load_data(spec, image_size=image_size, unlabeled=split == "unlabeled")
    data = {"train": splits.train, "test": splits.test, "unlabeled": splits.unlabeled}[split]
    if data is None:
        raise DataError(f"{spec} has no {split} split")
    labels = np.asarray(data.labels)
    names = [data.classes[c] if c >= 0 else "" for c in labels.tolist()] if (labels >= 0).any() else None
    return Listing(spec, [f"{split}/{i}" for i in range(len(data))], names, pixels=data.images)


def list_images(source: str, split: str | None = None, *, image_size: int | None = None) -> Listing:
    """The images of ``source`` in order (see the module docstring); ``split`` (default train)
    picks a split of a split layout; ``image_size``: the size in-memory sources are loaded at."""
    path = Path(source).expanduser()
    if source.strip().lower() in BUILTIN and not path.exists():
        return _in_memory(source, split or "train", image_size)
    if not path.exists():
        raise DataError(f"data source {source!r} not found: expected 'digits', 'cifar10', 'cifar100', 'stl10', "
                        "an image folder, or a .tar/.tar.gz/.zip archive of one")
    path = path.resolve()
    if path.is_file() and not path.name.lower().endswith(LIST_SUFFIXES):
        listed = [(name, *found) for name, _ in _archive_files(path)
                  if (found := _split_member(name, split or "train")) is not None]
        if not listed:  # the CIFAR / STL-10 releases, or an error that names what was expected
            return _in_memory(str(path), split or "train", image_size)
        names, seen = [name for name, _, _ in listed], set()
        for name in names:
            if name in seen:
                raise DataError(f"{path} lists the member {name} twice; repack the archive")
            seen.add(name)
        return Listing(str(path), [p for _, p, _ in listed], [c for _, _, c in listed], archive=path,
                       members=names)
    try:
        src = inspect_source(path)
    except DataError:
        src = None  # not a known layout: a folder of images, read whole and unlabelled
    if src is not None and src.fmt in ("classes", "images", "list"):  # every image it names, with its class if any
        if split is not None:
            raise ConfigError(f"--split {split}: {path} is not a split layout (train/, test/); leave --split out "
                              "to embed every image it holds")
        return Listing(str(src.root), [rel for rel, _, _ in src.files], src.labels, folder=src.root)
    if src is None or src.fmt not in ("folder", "cifar10", "cifar100", "stl10"):
        if split is not None:
            raise ConfigError(f"--split {split}: {path} has no {split}/ folder; leave --split out to embed every "
                              "image under it")
        _, files = scan_image_folder(path, ("",))
        return Listing(str(path), [rel for rel, _, _ in files if is_image_name(rel)], None, folder=path)
    if src.fmt != "folder":
        return _in_memory(str(path), split or "train", image_size)
    assert src.root is not None
    found = [(rel, parts[1]) for rel, _, _ in src.files
             if len(parts := rel.split("/")) >= 3 and parts[0] == (split or "train") and is_image_name(rel)]
    return Listing(str(src.root), [rel for rel, _ in found], [c for _, c in found], folder=src.root)


def embed(run: str | Path, source: str | None = None, *, split: str | None = None, features: str = "backbone",
          normalize: bool = False, random_init: bool = False, skip_corrupt: bool = False, batch_size: int = 256,
          device: str = "auto", progress: bool = False) -> Embeddings:
    """Embeddings of every image of ``source`` (default: the run's own data source) by the run's
    backbone (``features="head"``: its projection head on top), L2-normalised if ``normalize``;
    ``random_init``: by the same networks untrained (seeded 0), the baseline of a trained run;
    ``skip_corrupt``: images that cannot be decoded get no row (named in a warning) instead of
    stopping. ``progress``: a bar on stderr when it is a terminal."""
    if features not in FEATURES:
        raise ConfigError(f"features must be backbone or head, got {features!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch size must be a whole number >= 1, got {batch_size!r}")
    if random_init:
        torch.manual_seed(0)
    backbone, spec = load_backbone(run, random_init=random_init)
    head = load_projector(run, random_init=random_init) if features == "head" else None
    source = source or spec.data
    if not source:
        raise ConfigError(f"'{run}' does not record its data source; pass --data")
    listing = list_images(str(source), split, image_size=spec.data_image_size)
    if not len(listing):
        raise DataError(f"no images in {listing.where}" + (f" under {split or 'train'}/<class>/"
                                                           if listing.labels is not None else ""))
    dev = resolve_device(device)
    backbone.to(dev)
    if head is not None:
        head.to(dev)
    bar = None
    if progress and sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=len(listing), unit="img", dynamic_ncols=True)
    out, kept = [], []
    for rows, batch in listing.batches(spec.data_image_size or spec.image_size, batch_size,
                                       skip_corrupt=skip_corrupt):  # (B, H, W, 3) uint8
        kept += rows
        f = extract_features(backbone, batch, size=spec.image_size, mean=spec.mean, std=spec.std, device=dev,
                             batch_size=len(batch))  # (B, F)
        if head is not None:
            f = apply_head(head, f)  # (B, D)
        if normalize:
            f = F.normalize(f, dim=1)
        out.append(f.float().cpu().numpy())
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    if listing.skipped:
        print(f"warning: {len(listing.skipped)} image(s) could not be decoded and were left out (skip_corrupt): "
              f"{', '.join(listing.skipped[:5])}{', ...' if len(listing.skipped) > 5 else ''}", file=sys.stderr)
    if not kept:
        raise DataError(f"none of the {len(listing)} images in {listing.where} could be decoded")
    labels = None if listing.labels is None else [listing.labels[i] for i in kept]
    return Embeddings(np.concatenate(out), [listing.paths[i] for i in kept], labels)


def check_output(out: str | Path) -> str:
    """The format of ``out`` (its suffix), or a one-line error before any work is done."""
    out = Path(out)
    fmt = out.suffix.lower()
    if fmt not in FORMATS:
        raise ConfigError(f"--out '{out}': unknown format {fmt or '(no suffix)'}; use .csv, .npy or .parquet")
    if fmt == ".parquet":
        _pyarrow()
    if out.is_dir():
        raise ConfigError(f"--out '{out}' is a folder; pass the file to write, e.g. {out / ('embeddings' + fmt)}")
    parent = out.parent
    above = next((p for p in [parent, *parent.parents] if p.exists()), None)
    if above is not None and not above.is_dir():
        raise ConfigError(f"--out '{out}' lies under '{above}', which is a file, not a folder")
    if not parent.is_dir():
        raise ConfigError(f"--out '{out}': the folder '{parent}' does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"--out '{out}': the folder '{parent}' is not writable")
    return fmt


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise ConfigError("a .parquet output needs pyarrow: pip install pyarrow "
                          "(or pip install 'selfsup[parquet]'); or write .csv or .npy") from None
    return pyarrow


def write_embeddings(result: Embeddings, out: str | Path) -> Path:
    """Write ``result`` to ``out`` in the format of its suffix, atomically (see the README):
    .csv ``path,[label,]f0..f{D-1}``; .npy the (N, D) array with ``<stem>.paths.txt`` (and
    ``<stem>.labels.txt``) beside it, written first; .parquet ``path, [label,] embedding``."""
    out = Path(out)
    fmt = check_output(out)
    vectors, paths, labels = result
    try:
        if fmt == ".csv":
            write_atomic(out, lambda f: _write_csv(f, result))
        elif fmt == ".npy":
            for name, lines in (("paths", paths), ("labels", labels)):
                if lines is None:
                    continue
                if any("\n" in s or "\r" in s for s in lines):
                    raise DataError(f"a {name[:-1]} holds a line break, which {name}.txt cannot hold; "
                                    "write .csv or .parquet")
                write_text_atomic("".join(f"{s}\n" for s in lines), out.with_suffix(f".{name}.txt"))
            write_atomic(out, lambda f: np.save(f, vectors))
        else:
            pa = _pyarrow()
            columns = {"path": pa.array(paths, pa.string())}
            if labels is not None:
                columns["label"] = pa.array(labels, pa.string())
            columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
            write_atomic(out, lambda f: pa.parquet.write_table(pa.table(columns), f))
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(out)) from None  # the file asked for, not a temporary
    return out


def _write_csv(f, result: Embeddings) -> None:
    vectors, paths, labels = result
    text = io.TextIOWrapper(f, encoding="utf-8", newline="")
    w = csv.writer(text)
    w.writerow(["path", *(["label"] if labels is not None else []), *(f"f{j}" for j in range(vectors.shape[1]))])
    for i, row in enumerate(vectors.tolist()):
        w.writerow([paths[i], *([labels[i]] if labels is not None else []), *(f"{v:.9g}" for v in row)])
    text.flush()
    text.detach()  # the atomic writer syncs and closes the file itself


def embed_to_file(run: str | Path, source: str | None, out: str | Path, **options) -> Embeddings:
    """``selfsup embed``: :func:`embed` into ``out``; its name is checked before any work."""
    check_output(out)
    result = embed(run, source, **options)
    write_embeddings(result, out)
    return result
