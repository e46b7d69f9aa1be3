"""A run's folder as the run starts, for every long command (``pretrain``, ``finetune``,
``distill``): locked, refused when it already holds another run, or read back on ``--resume``
(the saved settings with the changes resume allows, then the weights, optimiser, RNG and the
position within the run).

:func:`open_run` and :func:`restore` are the mechanism every command shares; :func:`open_folder`
and :func:`apply_changes` are pre-training's settings on top of it.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint as ckpt
from . import distributed as D
from .config import Config, apply_updates, flatten, from_dict, nest, validate
from .data import DataSplits
from .errors import CheckpointError, ConfigError, DataError
from .loop import Position, fresh_out, lock_folder, log, refuse_existing
from .presets import load_yaml
from .runs import CHECKPOINT, CONFIG, load_run, make_consistent, saved_config
from .stream import ImageStream

#: The command that wrote a run checkpoint, by its ``kind`` entry (pre-training writes none).
PRETRAIN = "pretrain"


def run_kind(state: dict) -> str:
    """``pretrain``, ``finetune`` or ``distill``: the command whose ``--resume`` continues ``state``."""
    return state.get("kind") or PRETRAIN


def open_run(out: Path, resume: bool, held: ExitStack, kind: str) -> dict | None:
    """``out`` locked for as long as ``held``. A fresh run: refused when ``out`` holds another
    run's checkpoint, and None. On resume: the checkpoint, which must be a ``kind`` run's, with
    ``backbone.pt`` / ``backbone.json`` re-derived from it when a save was cut short."""
    lock_folder(out, held)
    if not resume:
        refuse_existing(out, "pass --resume to continue it or choose another --out")
        return None
    if not (out / CHECKPOINT).exists():
        raise CheckpointError(f"--resume: no {CHECKPOINT} in '{out}' to resume from; start the run "
                              f"without --resume")
    _, state = load_run(out, who="--resume:", kind="training")
    if run_kind(state) != kind:
        raise CheckpointError(f"--resume: '{out}' holds a {run_kind(state)} run, not a {kind} run; continue it "
                              f"with selfsup {run_kind(state)} --out {out} --resume")
    saved_config(state, out / CHECKPOINT, "--resume:", "to continue with")
    if not isinstance(state.get("epoch"), int) or isinstance(state["epoch"], bool) or state["epoch"] < 0:
        raise CheckpointError(f"--resume: '{out / CHECKPOINT}' holds no count of epochs done ('epoch': "
                              f"{state.get('epoch')!r}) to continue from")
    repaired = make_consistent(out, state) if D.is_main() else None
    if repaired:
        log(f"repaired '{out}': {repaired}; rewrote it from {CHECKPOINT} (epoch {state['epoch']})")
    return state


def check_changes(before: dict, after: dict, asked: Iterable[str], resumable: tuple[str, ...], out: Path,
                  *, epochs_key: str, epochs_done: int) -> list[str]:
    """The ``asked`` keys whose value differs between a run's flattened settings ``before`` and
    ``after`` the changes of a ``--resume``; refuses the first one not in ``resumable`` by name,
    and fewer epochs than ``out`` has trained. Logs what changed."""
    changed = [k for k in asked if before.get(k) != after.get(k)]
    for key in changed:
        if key not in resumable:
            raise ConfigError(f"--resume continues '{out}' with its own settings: {key} cannot change on resume "
                              f"(only {', '.join(resumable)} can); start a new run in another --out to change it")
    if after[epochs_key] < epochs_done:
        raise ConfigError(f"--resume: {epochs_key} {after[epochs_key]} is fewer than the {epochs_done} epochs "
                          f"'{out}' has already trained")
    for key in changed:
        note = "; the lr schedule now follows the new length" if key == epochs_key else ""
        log(f"resume: {key} {before[key]} -> {after[key]}{note}")
    return changed


#: What ``--resume`` may change (with --epochs, --set or --config): the run's length, to extend it
#: (the lr schedule then follows the new length), and the lr schedule's own settings, which the
#: loop sets at every step. Everything else is the run's (optimiser state such as momentum and
#: weight decay comes back from the checkpoint), so a change to it is refused by name.
RESUMABLE = ("train.epochs", "optim.lr", "optim.final_lr", "optim.warmup_epochs", "optim.lr_scaling",
             "train.checkpoint_every", "train.log_every", "eval.data")


def apply_changes(saved: Any, changes: dict, out: Path, epochs_done: int, *,
                  resumable: tuple[str, ...] = RESUMABLE, epochs_key: str = "train.epochs",
                  check: Callable[[Any], None] = validate) -> Any:
    """A resumed run's settings ``saved`` (a settings dataclass: pre-training's :class:`Config` by
    default, or a fine-tuning's with its own ``resumable``, ``epochs_key`` and ``check``) with
    ``changes`` (dotted keys) applied, or a refusal of the first key that differs from the run's and
    cannot change on resume (:func:`check_changes`)."""
    changed_cfg = copy.deepcopy(saved)
    for key, value in changes.items():
        apply_updates(changed_cfg, nest(key, value))
    check(changed_cfg)
    check_changes(flatten(dataclasses.asdict(saved)), flatten(dataclasses.asdict(changed_cfg)), changes, resumable,
                  out, epochs_key=epochs_key, epochs_done=epochs_done)
    return changed_cfg


#: Settings of where a run is computed, which a resume always takes from its command.
WHERE = ("out", "train.device", "train.progress", "train.max_minutes")


def hand_edits(out: Path, saved: Config, changes: dict) -> dict:
    """The settings of ``out``'s ``config.yaml`` edited by hand since the checkpoint's ``saved``
    ones, except those ``changes`` (the command line) sets: the :data:`RESUMABLE` ones, to apply
    as if passed with --set (logged); any other is refused by file and key."""
    path = out / CONFIG
    if not path.is_file():
        return {}
    try:
        data = load_yaml(path)
        if not isinstance(data, dict):
            raise ConfigError(f"it holds a YAML {type(data).__name__}, not the run's settings")
        on_disk = flatten(dataclasses.asdict(from_dict(data)))
    except ConfigError as e:
        raise ConfigError(f"--resume: '{path}' cannot be read back ({e}); fix it, or delete it to resume with the "
                          f"checkpoint's settings") from None
    before = flatten(dataclasses.asdict(saved))
    edits = {k: v for k, v in on_disk.items() if k not in WHERE and k not in changes and before.get(k) != v}
    for key, value in edits.items():
        if key not in RESUMABLE:
            raise ConfigError(f"{path}: {key} was edited to {value} but the checkpoint was trained with "
                              f"{before.get(key)}; resume cannot change it (put it back, or start a new run)")
        log(f"resume: {key} = {value} taken from '{path}' (edited by hand)")
    return edits


def data_identity(source: str, images, splits: DataSplits | None = None) -> dict:
    """What a checkpoint records of the data it trained on, so a resume on other data is refused
    (:func:`check_same_data`): the source and the image count of ``images`` (a uint8 array or an
    :class:`~selfsup.stream.ImageStream`); the decoded images' side and the cache key of
    ``splits`` (which files, their sizes and times), or a stream's index (a digest of its file
    names, or of its shards and members)."""
    identity = {"source": str(source), "images": len(images)}
    if isinstance(images, ImageStream):
        digest = hashlib.sha256("\n".join(images.files or images.shards).encode())
        digest.update(images.members.tobytes())
        identity["index"] = digest.hexdigest()
    else:
        identity["image_size"] = [int(side) for side in images.shape[1:3]]
        if splits is not None and splits.cache_key:  # the files' paths, sizes and times
            identity["cache_key"] = splits.cache_key
    return identity


def check_same_data(state: dict, now: dict, allow: bool) -> None:
    """Refuse to resume ``state`` on data whose identity ``now`` (source, image count and size,
    the cache key of its files, a stream's index) differs from the one its checkpoint records, naming what changed; ``allow``:
    log it and go on. A checkpoint without the record (an older selfsup) resumes as before."""
    then = state.get("data")
    if not isinstance(then, dict):
        return
    fields = {"source": "data.source {}", "images": "{} images", "image_size": "images of {} pixels",
              "index": "index {}", "cache_key": "files (names, sizes, times) {}"}
    changed = [f"{fields[k].format(_shown(then.get(k)))} then, {fields[k].format(_shown(now.get(k)))} now"
               for k in fields if k in then and k in now and then[k] != now[k]]  # fields both record
    if not changed:
        return
    what = f"the data changed since the checkpoint: {'; '.join(changed)} (data.source {now.get('source')})"
    if not allow:
        raise DataError(f"--resume: {what}; pass --data-changed-ok to continue anyway")
    log(f"resume: {what}; continuing on the new data (--data-changed-ok)")


def _shown(value: Any) -> str:
    """A data identity field as a message shows it: a size as HxW, a digest's first 12 digits."""
    if isinstance(value, (list, tuple)):
        return "x".join(str(v) for v in value)
    return value[:12] if isinstance(value, str) and len(value) == 64 else str(value)


def open_folder(cfg: Config, resume: bool, expect: dict, held: ExitStack,
                changes: dict | None = None) -> tuple[Config, Path, dict | None]:
    """The run's folder, locked; on resume its checkpoint and the saved settings, which hold
    except where the run is computed (device, progress bar, time limit) and for the
    :data:`RESUMABLE` ``changes`` (dotted keys), of the command line or edited by hand in the
    folder's ``config.yaml`` (:func:`hand_edits`)."""
    if not cfg.out:  # a fresh folder per run, so repeating a command never clobbers a run
        if resume:
            raise ConfigError("--resume needs --out DIR, the run to continue")
        cfg.out = str(fresh_out(cfg.preset or cfg.method))
    out = Path(cfg.out)
    state = open_run(out, resume, held, PRETRAIN)
    if state is None:
        return cfg, out, None
    saved = from_dict(state["config"])  # the run's own settings; where it runs may change
    ckpt.check_expected(saved.to_dict(), expect, out / CHECKPOINT)
    changes = {**hand_edits(out, saved, changes or {}), **(changes or {})}
    saved.out = cfg.out
    saved.train.device, saved.train.progress = cfg.train.device, cfg.train.progress
    saved.train.max_minutes = cfg.train.max_minutes
    if changes:
        saved = apply_changes(saved, changes, out, int(state["epoch"]))
    return saved, out, state


def restore(state: dict, out: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
            generator: torch.Generator, steps_per_epoch: int, epochs: int, what: str,
            scaler: torch.amp.GradScaler | None = None) -> Position:
    """The saved weights (of ``what``, named if they do not fit), optimiser, this rank's
    augmentation RNG and fp16's loss scale (:func:`loop.resumable`); where in the run of
    ``epochs`` to continue."""
    ckpt.load_weights(model, state["model"], out / CHECKPOINT, what)
    if "optimizer" not in state or "generator" not in state:  # a fine-tuning an older selfsup saved at its end only
        if int(state["epoch"]) < epochs:
            raise CheckpointError(f"--resume: '{out / CHECKPOINT}' holds no optimiser state to continue from "
                                  f"(an older selfsup saved it at the run's end only); start a new run")
        return Position(int(state["epoch"]))
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and "grad_scaler" in state:  # else (a run saved in another precision) it starts afresh
        scaler.load_state_dict(state["grad_scaler"])
    generators = state.get("generators", [state["generator"]])
    if len(generators) == D.world_size():  # else the fresh per-rank seeds: augmentations cannot repeat
        generator.set_state(generators[D.rank()])
    else:
        log(f"the run was saved on {len(generators)} ranks and continues on {D.world_size()}: the "
            f"augmentations will differ from an uninterrupted run's")
    partial = state.get("partial_epoch") or {}
    start = Position(int(state["epoch"]), int(partial.get("steps", 0)), partial)
    where = f", step {start.step}/{steps_per_epoch} of epoch {start.epoch + 1}" if start.step else ""
    log(f"resuming '{out}' at epoch {start.epoch}/{epochs}{where}")
    return start
