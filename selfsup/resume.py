"""A pre-training run's folder as the run starts: locked, refused when it already holds another
run, or read back on ``--resume`` (the saved settings, then the weights, optimiser, RNG and the
position within the run)."""
from __future__ import annotations

import copy
from contextlib import ExitStack
from pathlib import Path

import torch
from torch import nn

from . import checkpoint as ckpt
from . import distributed as D
from .config import Config, apply_updates, flatten, from_dict, nest, validate
from .errors import CheckpointError, ConfigError
from .loop import Position, fresh_out, lock_folder, log, refuse_existing
from .runs import CHECKPOINT, load_run, make_consistent


#: What ``--resume`` may change (with --epochs, --set or --config): the run's length, to extend it
#: (the lr schedule then follows the new length), and the lr schedule's own settings, which the
#: loop sets at every step. Everything else is the run's (optimiser state such as momentum and
#: weight decay comes back from the checkpoint), so a change to it is refused by name.
RESUMABLE = ("train.epochs", "optim.lr", "optim.final_lr", "optim.warmup_epochs", "optim.lr_scaling",
             "train.checkpoint_every", "train.log_every")


def apply_changes(saved: Config, changes: dict, out: Path, epochs_done: int) -> Config:
    """A resumed run's settings with ``changes`` (dotted keys) applied, or a refusal of the first
    key whose value differs from the run's and that cannot change on resume; says what changed."""
    changed_cfg = copy.deepcopy(saved)
    for key, value in changes.items():
        apply_updates(changed_cfg, nest(key, value))
    before, after = flatten(saved.to_dict()), flatten(changed_cfg.to_dict())
    changed = [k for k in changes if before.get(k) != after.get(k)]
    for key in changed:
        if key not in RESUMABLE:
            raise ConfigError(f"--resume continues '{out}' with its own settings: {key} cannot change on resume "
                              f"(only {', '.join(RESUMABLE)} can); start a new run in another --out to change it")
    validate(changed_cfg)
    if changed_cfg.train.epochs < epochs_done:
        raise ConfigError(f"--resume: train.epochs {changed_cfg.train.epochs} is fewer than the {epochs_done} epochs "
                          f"'{out}' has already trained")
    for key in changed:
        note = "; the lr schedule now follows the new length" if key == "train.epochs" else ""
        log(f"resume: {key} {before[key]} -> {after[key]}{note}")
    return changed_cfg


def open_folder(cfg: Config, resume: bool, expect: dict, held: ExitStack,
                changes: dict | None = None) -> tuple[Config, Path, dict | None]:
    """The run's folder, locked; on resume its checkpoint and the saved settings, which hold
    except where the run is computed (device, progress bar, time limit) and for the
    :data:`RESUMABLE` ``changes`` (dotted keys)."""
    if not cfg.out:  # a fresh folder per run, so repeating a command never clobbers a run
        if resume:
            raise ConfigError("--resume needs --out DIR, the run to continue")
        cfg.out = str(fresh_out(cfg.preset or cfg.method))
    out = Path(cfg.out)
    lock_folder(out, held)
    if not resume:
        refuse_existing(out, "pass --resume to continue it or choose another --out")
        return cfg, out, None
    if not (out / CHECKPOINT).exists():
        raise CheckpointError(f"--resume: no {CHECKPOINT} in '{out}' to resume from; start the run "
                              f"without --resume")
    _, state = load_run(out, who="--resume:", kind="training")
    repaired = make_consistent(out, state) if D.is_main() else None
    if repaired:
        log(f"repaired '{out}': {repaired}; rewrote it from {CHECKPOINT} (epoch {state['epoch']})")
    saved = from_dict(state["config"])  # the run's own settings; where it runs may change
    ckpt.check_expected(saved.to_dict(), expect, out / CHECKPOINT)
    saved.out = cfg.out
    saved.train.device, saved.train.progress = cfg.train.device, cfg.train.progress
    saved.train.max_minutes = cfg.train.max_minutes
    if changes:
        saved = apply_changes(saved, changes, out, int(state["epoch"]))
    return saved, out, state


def resume_state(cfg: Config, out: Path, state: dict, model: nn.Module, optimizer: torch.optim.Optimizer,
            generator: torch.Generator, steps_per_epoch: int) -> Position:
    """The saved weights, optimiser and augmentation RNG; where in the run to continue."""
    ckpt.load_weights(model, state["model"], out / CHECKPOINT,
                      f"a {cfg.method} model with a {cfg.model.backbone} (width {cfg.model.width:g})")
    optimizer.load_state_dict(state["optimizer"])
    generators = state.get("generators", [state["generator"]])
    if len(generators) == D.world_size():  # else the fresh per-rank seeds: augmentations cannot repeat
        generator.set_state(generators[D.rank()])
    else:
        log(f"the run was saved on {len(generators)} ranks and continues on {D.world_size()}: the "
            f"augmentations will differ from an uninterrupted run's")
    partial = state.get("partial_epoch") or {}
    start = Position(int(state["epoch"]), int(partial.get("steps", 0)), partial)
    where = f", step {start.step}/{steps_per_epoch} of epoch {start.epoch + 1}" if start.step else ""
    log(f"resuming '{out}' at epoch {start.epoch}/{cfg.train.epochs}{where}")
    return start
