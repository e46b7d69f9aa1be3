"""The official archives of ``cifar10``/``cifar100``/``stl10``: download once, verify by md5."""
from __future__ import annotations

import hashlib
import http.client
import json
import logging
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tqdm import tqdm

from ..files import write_atomic, write_text_atomic
from .datasets import DataError

log = logging.getLogger(__package__)  # "selfsup.data": one logger for the whole package


@dataclass(frozen=True)
class Remote:
    """Where an official archive lives, and its md5."""

    url: str
    md5: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


REMOTES = {
    "cifar10": Remote("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
    "cifar100": Remote("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                       "eb9058c3a382ffc7106e4002c42a8d85"),
    "stl10": Remote("http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz", "91f7769df0f17e558f3565bffb0c7dfb"),
}
#: Module-level so tests can fake the network.
urlopen = urllib.request.urlopen


def fetch(name: str, cache: Path, download: bool) -> Path:
    """Path of the verified official archive for ``name``, downloading it if needed."""
    remote = REMOTES[name]
    dest = cache / "downloads" / remote.filename
    hint = (f"Download it elsewhere and pass --data /path/to/{remote.filename} (or its extracted folder)")
    stale = dest.is_file()
    if stale:
        if _verified(dest, remote.md5):
            return dest
        log.warning("%s does not have the official checksum; downloading it again", dest)
    if not download:
        problem = "does not have the official md5 checksum" if stale else "is not there"
        raise DataError(f"{name}: {dest} {problem} and downloading is off. {hint}")

    def download_to(out: IO[bytes]) -> None:  # raising here leaves no partial file behind
        md5 = hashlib.md5(usedforsecurity=False)
        with urlopen(remote.url, timeout=60) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=remote.filename, disable=None) as bar:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
                    md5.update(chunk)
                    bar.update(len(chunk))
        if md5.hexdigest() != remote.md5:
            raise DataError(f"could not download {remote.url}: the file's md5 is {md5.hexdigest()}, expected "
                            f"{remote.md5} (corrupted transfer). {hint}")

    try:
        log.info("downloading %s to %s", remote.url, dest)
        write_atomic(dest, download_to)
        _mark_verified(dest, remote.md5)
        return dest
    except (OSError, EOFError, ValueError, http.client.HTTPException) as e:  # URLError, timeouts: OSError
        if isinstance(e, DataError):
            raise
        reason = getattr(e, "reason", None) or e
        raise DataError(f"could not download {remote.url}: {reason}. {hint}") from e


def _verified(path: Path, md5: str) -> bool:
    """True if ``path`` has checksum ``md5``; remembered in a side file so big archives hash once."""
    st = path.stat()
    stamp = path.with_name(path.name + ".md5ok")
    want = {"md5": md5, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    try:
        if json.loads(stamp.read_text()) == want:
            return True
    except (OSError, ValueError):
        pass
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    if digest.hexdigest() != md5:
        return False
    _mark_verified(path, md5)
    return True


def _mark_verified(path: Path, md5: str) -> None:
    st = path.stat()
    try:
        write_text_atomic(json.dumps({"md5": md5, "size": st.st_size, "mtime_ns": st.st_mtime_ns}),
                          path.with_name(path.name + ".md5ok"))
    except OSError:
        pass  # only an optimisation
