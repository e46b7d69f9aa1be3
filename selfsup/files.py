"""Files that are never half-written: the one atomic writer of the library.

A write goes to a temporary file in the target's folder (``.<name>.<random>.tmp``), is flushed
and fsynced, renamed over the target, and the folder is fsynced, so a crash at any moment leaves
either the old or the new file. Callers pass what to write: bytes, text, or a function that
writes to the open file (``torch.save``, ``np.save``), so this module needs nothing but the
standard library.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Callable

__all__ = ["write_atomic", "write_bytes_atomic", "write_text_atomic", "remove_temporaries"]


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """temp file in the same folder -> ``write(f)`` -> fsync -> rename over ``path`` -> fsync the folder.

    Creates the folder if needed; if ``write`` raises, the temporary file is removed and
    ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the result is an ordinary file
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # e.g. ENOSPC: named by the file meant, not by the temporary one
        Path(tmp).unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut only once the folder is synced
    finally:
        os.close(dir_fd)


def write_bytes_atomic(data: bytes, path: str | Path) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`write_atomic`)."""
    write_atomic(path, lambda f: f.write(data))


def write_text_atomic(text: str, path: str | Path) -> None:
    """Write ``text`` as UTF-8 to ``path`` atomically (see :func:`write_atomic`)."""
    write_bytes_atomic(text.encode(), path)


def remove_temporaries(folder: str | Path) -> list[str]:
    """Delete the temporary files of writes cut short by a kill (call only while holding the
    folder's run lock, when no write can be in flight); returns their names."""
    removed = []
    for tmp in Path(folder).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
        removed.append(tmp.name)
    return removed
