"""What keeps a run folder safe on a shared machine: one run per folder, and a clean stop.

* :class:`RunLock` — ``<out>/run.lock`` holds the owner's pid and host. A second run on the
  same folder refuses; a lock whose process is gone (same host, pid not alive) is stale and
  taken over, so a run killed with SIGKILL never blocks its own resume.
* :class:`StopSignals` — SIGTERM (cluster pre-emption) and SIGINT (Ctrl-C) only raise a flag;
  the loop finishes the current step, checkpoints and raises :class:`Interrupted`. A second
  SIGINT interrupts at once (KeyboardInterrupt), for a user who really wants out. Single-process
  runs only: under torchrun the signals keep their default action (see ``train.pretrain``).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

LOCK = "run.lock"

#: Exit codes of a run stopped by a signal after its checkpoint: 128 + the signal number,
#: as a shell reports a process killed by that signal.
EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}


def _training_error():
    from .train import TrainingError  # late import: train imports this module
    return TrainingError


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class RunLock:
    """An exclusive, pid/host-stamped lock file in the run folder (``with RunLock(out): ...``)."""

    def __init__(self, out: str | Path):
        self.path = Path(out) / LOCK
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):  # second try after removing a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and not self._stale(owner):
                    raise _training_error()(
                        f"'{self.path.parent}' is in use by another run (pid {owner.get('pid')} on "
                        f"{owner.get('host')}, since {owner.get('since')}); choose another --out, or "
                        f"if that run is dead delete {self.path}") from None
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise _training_error()(f"could not take the lock {self.path}; another run keeps creating it")

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
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Interrupted(Exception):
    """The run stopped on a signal after writing its checkpoint; ``exit_code`` is 143 or 130."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StopSignals:
    """Turns SIGTERM/SIGINT into a request the loop honours between steps.

    Installs handlers only in the main thread (Python delivers signals there), only when
    ``enabled``, and restores the previous ones on exit, so a notebook's Ctrl-C behaves as
    before once training returns.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.received: signal.Signals | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now, without a checkpoint
        self.received = signal.Signals(signum)
        print(f"selfsup: {self.received.name} received: finishing the current step and writing a "
              f"checkpoint (Ctrl-C again to stop at once)", flush=True)

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
