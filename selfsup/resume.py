"""A pre-training run's folder as the run starts: locked, refused when it already holds another
run, or read back on ``--resume`` (the saved settings, then the weights, optimiser, RNG and the
position within the run)."""
from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import torch
from torch import nn

from . import checkpoint as ckpt
from . import distributed as D
from .config import Config, from_dict
from .errors import CheckpointError, ConfigError
from .loop import Position, fresh_out, lock_folder, log, refuse_existing
from .runs import CHECKPOINT, load_run, make_consistent


def open_folder(cfg: Config, resume: bool, expect: dict, held: ExitStack) -> tuple[Config, Path, dict | None]:
    """The run's folder, locked; on resume its checkpoint and the saved settings, which hold
    except where the run is computed (device, progress bar, time limit)."""
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
