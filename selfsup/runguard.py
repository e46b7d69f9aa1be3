"""What keeps a run folder safe on a shared machine: one run per folder, and a clean stop.

* :class:`RunLock` — ``<out>/run.lock`` is flock-ed by the owner and holds its pid and host. A
  second run on the same folder refuses; a lock whose process is gone (same host, pid not
  alive) is stale and taken over, atomically, so a run killed with SIGKILL never blocks its own
  resume and two runs taking it over never both win.
* :class:`StopSignals` — SIGTERM (cluster pre-emption) and SIGINT (Ctrl-C) during training only
  raise a flag; the loop finishes the current step, checkpoints and raises :class:`Interrupted`.
  Before training begins (reading data, building the model) and after it ends, where there is no
  step to finish, they raise :class:`Interrupted` at once. A second SIGINT interrupts at once
  (KeyboardInterrupt), for a user who really wants out. Single-process runs only: under torchrun
  the signals keep their default action (see ``train.pretrain``).
"""
from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import Interrupted, TrainingError
from .runs import LOCK

__all__ = ["EXIT_CODES", "LOCK", "Interrupted", "RunLock", "StopSignals"]

#: Exit codes of a run stopped by a signal after its checkpoint: 128 + the signal number,
#: as a shell reports a process killed by that signal.
EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}


_HELD: set[int] = set()  # the fds of the locks this process holds


def _close_inherited() -> None:
    """In a forked child (DataLoader or decode worker): close the parent's lock fds, so a child
    outliving a killed parent does not keep its run folder locked."""
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class RunLock:
    """An exclusive, pid/host-stamped lock file in the run folder (``with RunLock(out): ...``).

    Exclusion is an ``fcntl.flock`` on ``run.lock``, held open for the run's duration: the kernel
    grants it to one process only and drops it when that process dies, so two processes taking
    over the same stale lock cannot both win (unlink-then-``O_EXCL`` could: a slow one unlinked
    the winner's fresh file). The pid/host stamp written under the lock names the owner in the
    refusal, and keeps the old rule for a lock nobody holds: another host's, or a live pid's
    (a process that does not use flock), is honoured; a dead pid's or an unreadable one is stale.
    """

    def __init__(self, out: str | Path):
        self.path = Path(out) / LOCK
        self.held = False
        self._fd: int | None = None
        self._pid = 0

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):  # retried only when the file was replaced between open and flock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._in_use(self._wait_for_owner()) from None
            except BaseException:
                os.close(fd)
                raise
            try:
                if not self._same_file(fd):  # released (unlinked) by its owner while we opened it
                    os.close(fd)
                    continue
                owner = self._owner()
                if owner is not None and owner.get("pid") != os.getpid() and not self._stale(owner):
                    raise self._in_use(owner)
                me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(me).encode(), 0)
            except OSError as e:  # e.g. a full disk: give the lock up (unlinked while held) and say so
                self.path.unlink(missing_ok=True)
                os.close(fd)
                raise TrainingError(f"could not write the run lock '{self.path}': {e.strerror or e}; "
                                    f"nothing in the folder was changed") from None
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            self.held = True
            self._pid = os.getpid()
            _HELD.add(fd)
            return
        raise TrainingError(f"could not take the lock {self.path}; another run keeps creating it")

    def _same_file(self, fd: int) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def _wait_for_owner(self) -> dict | None:
        """The holder's stamp; it may still be writing it, so wait a moment for a live one."""
        owner = None
        for _ in range(50):
            owner = self._owner()
            if owner is not None and not self._stale(owner):
                break
            time.sleep(0.01)
        return owner

    def _in_use(self, owner: dict | None) -> Exception:
        who = (f"pid {owner.get('pid')} on {owner.get('host')}, since {owner.get('since')}" if owner
               else "its owner is still writing the lock")
        return TrainingError(
            f"'{self.path.parent}' is in use by another run ({who}); choose another --out, or "
            f"if that run is dead delete {self.path}")

    def _owner(self) -> dict | None:
        """The lock's content; None when it is unreadable (a writer killed mid-write: stale)."""
        try:
            owner = json.loads(self.path.read_text())
            return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None
        except (OSError, ValueError):
            return None

    @staticmethod
    def _stale(owner: dict) -> bool:
        # Another host's pid cannot be checked from here: such a lock is honoured.
        return owner.get("host") == socket.gethostname() and not _pid_alive(owner["pid"])

    def release(self) -> None:
        if self.held and self._pid == os.getpid():  # a forked child has no lock to give up
            # Unlinked while still locked: a process that opened the old file sees it replaced.
            self.path.unlink(missing_ok=True)
            _HELD.discard(self._fd)
            os.close(self._fd)
            self._fd = None
            self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class StopSignals:
    """Turns SIGTERM/SIGINT into a request the loop honours between steps.

    Installs handlers only in the main thread (Python delivers signals there), only when
    ``enabled``, and restores the previous ones on exit, so a notebook's Ctrl-C behaves as
    before once training returns.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.received: signal.Signals | None = None
        self.deferred = False  # training steps are running: a signal waits for the current one
        self.phase = "before training began: nothing was trained, and no checkpoint was written or changed"
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now, without a checkpoint
        self.received = signal.Signals(signum)
        if not self.deferred:  # no step to finish: stop here
            raise Interrupted(f"stopped by {self.received.name} {self.phase}", EXIT_CODES[self.received])
        print(f"selfsup: {self.received.name} received: finishing the current step and writing a "
              f"checkpoint (Ctrl-C again to stop at once)", flush=True)

    @contextmanager
    def deferring(self) -> Iterator[None]:
        """While training steps run: a signal is a request the loop honours between steps."""
        self.deferred = True
        try:
            yield
        finally:
            self.deferred = False
            self.phase = "after training ended: its last checkpoint had been written"

    @property
    def requested(self) -> bool:
        return self.received is not None

    def __enter__(self) -> StopSignals:
        if self.enabled and threading.current_thread() is threading.main_thread():
            for sig in EXIT_CODES:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
