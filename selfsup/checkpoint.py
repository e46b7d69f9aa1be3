"""Checkpoints that are never half-written and never execute code when loaded.

Saving writes to a temporary file in the same folder, fsyncs it, renames it over the target
and fsyncs the folder (:func:`selfsup.files.write_atomic`), so a crash at any moment leaves
either the old or the new file.
Loading uses ``torch.load(weights_only=True)``: tensors and plain containers only.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError  # noqa: F401 (defined there; imported from here too)
# The writer lives in files.py; write_bytes_atomic, write_text_atomic and remove_temporaries
# stay importable from here, where the run's code has always found them.
from .files import remove_temporaries, write_atomic, write_bytes_atomic, write_text_atomic  # noqa: F401

FORMAT = "selfsup-checkpoint"  # the "format" entry of every run checkpoint (pre-training, fine-tuning, ...)


def is_run_state(state: Any) -> bool:
    """Whether a loaded checkpoint is a selfsup run's (config, model, meta), not a bare state_dict."""
    return isinstance(state, dict) and state.get("format") == FORMAT


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` that leaves either the old or the new file, never a partial one.

    It serialises to memory first, then writes the bytes. A full disk then raises ``OSError``
    (ENOSPC) from the write itself; ``torch.save`` straight into the file raises a
    ``RuntimeError`` ("unexpected pos") instead, which no caller could tell from a bug."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomic(path, lambda f: f.write(buffer.getbuffer()))


def load(path: str | Path) -> Any:
    """Load a checkpoint with ``weights_only=True``; a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"refusing to load '{path}': it holds objects other than tensors and plain "
            f"containers, which could run code when unpickled ({first[:200]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint '{path}' is unreadable or truncated: "
                              f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__}") from None


def load_weights(module: torch.nn.Module, weights: dict, path: str | Path, what: str) -> None:
    """``module.load_state_dict(weights)`` (strict), or one line naming what does not fit.

    ``what`` describes ``module`` ("a simclr model with a resnet18 (width 0.25)"), so the error
    reads as the mismatch of architectures or methods it usually is.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shapes = [f"{k} {tuple(weights[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in weights and hasattr(weights[k], "shape") and tuple(weights[k].shape) != tuple(v.shape)]
    problems = []
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es), e.g. {shapes[0]} (saved vs expected)")
    if missing:
        problems.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
    if problems:
        raise CheckpointError(f"'{path}' does not fit {what}: {'; '.join(problems)}; it was saved "
                              f"from another architecture or method")
    module.load_state_dict(weights)


def check_expected(saved: dict, expect: dict, path: str | Path) -> None:
    """Compare dotted settings (``{"model.backbone": "resnet50"}``) with a saved run's config."""
    for key, want in expect.items():
        have: Any = saved
        for part in key.split("."):
            have = have.get(part) if isinstance(have, dict) else None
        if have != want:
            raise CheckpointError(f"'{path}' was saved by a run with {key}={have!r}, not {want!r}; "
                                  f"resume it without changing {key}, or start a new run in another --out")
