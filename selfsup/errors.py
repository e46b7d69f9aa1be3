"""Every error the library raises on purpose, in one place; this module imports nothing from
selfsup, so any module may raise any of them.

Each carries a one-line message naming the file, setting or value at fault and how to fix it;
the CLI prints it as ``selfsup: error: ...`` (exit 2, or 1 for :class:`TrainingError`).
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value, key, preset or file is wrong; the message says which."""


class DataError(ValueError):
    """Bad data input; message is one clear actionable line."""


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, untrusted or does not fit the model."""


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, a clash with an existing run folder, ...)."""


class Interrupted(Exception):
    """The run stopped on a signal (after writing its checkpoint, when training had begun);
    ``exit_code`` is 143 or 130; ``resume``: the command that continues it."""

    def __init__(self, stopped: str, exit_code: int, resume: str = ""):
        super().__init__(f"{stopped}. Continue with: {resume}" if resume else stopped)
        self.stopped, self.exit_code, self.resume = stopped, exit_code, resume

    def continued_by(self, resume: str) -> Interrupted:
        """The same stop, continued by another command (a recipe's, around its step's)."""
        return Interrupted(self.stopped, self.exit_code, resume)
