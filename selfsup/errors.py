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
    """The run stopped on a signal after writing its checkpoint; ``exit_code`` is 143 or 130."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
