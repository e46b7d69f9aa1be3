"""A real signal delivered at a chosen moment of training, for tests/test_faults.py and
tests/test_step_faults.py."""
from __future__ import annotations

import os
import signal


def signal_at_call(monkeypatch, module, name: str, call: int, sig: signal.Signals) -> None:
    """Deliver ``sig`` to this process during call number ``call`` (1-based) of ``module.name``
    (a function each training step calls once)."""
    real, calls = getattr(module, name), {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            os.kill(os.getpid(), sig)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
