"""The pieces every training loop is built from: pre-training (``train.py``) and SimCLRv2's
fine-tuning and distillation (``semisup.py``) differ only in what they hand in.

- the run folder: a fresh name, its lock, no overwriting of another run, its metrics file;
- the device: flushed denormals on a CPU, the seed, the autocast dtype;
- :class:`Schedule` — linear warm-up then cosine decay, per step;
- :class:`EpochSums` — one epoch's running sums on the device, its means and its mid-epoch state;
- :class:`Loop` and :func:`run_epochs` — the epoch loop: step, stop cleanly on a signal,
  evaluate, log one JSON line, checkpoint (:func:`save_checkpoint`).
"""
from __future__ import annotations

import json
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import checkpoint as ckpt
from . import distributed as D
from .device import autocast_dtype, configure_cuda
from .errors import ConfigError, DataError, Interrupted, TrainingError
from .optim import clip_gradients, cosine, set_lr, set_weight_decay, warmup_cosine
from .runguard import EXIT_CODES, RunLock, StopSignals
from .runs import CHECKPOINT, CONFIG, METRICS, BackboneSpec, save_run


def log(msg: str) -> None:
    """Print on rank 0 only."""
    if D.is_main():
        print(msg, flush=True)


# ---------------------------------------------------------------------------------------------
# The run folder and the device


def fresh_out(name: str) -> Path:
    """``runs/<name>-<time>``: a new folder per run, so repeating a command never clobbers one."""
    stamp = D.broadcast_object(time.strftime("%Y%m%d-%H%M%S"))
    return Path("runs") / f"{name}-{stamp}"


@contextmanager
def guarded() -> Iterator[tuple[StopSignals, ExitStack]]:
    """What every long command runs under: stop signals that checkpoint (not under torchrun: it
    also sends SIGTERM to tear down a group after a rank died, when the survivors sit in a
    collective that never returns, so only the default action ends them) and a stack that holds
    the run lock (:func:`lock_folder`) and whatever else closes with the run."""
    with StopSignals(enabled=not D.launched_by_torchrun()) as stop, ExitStack() as held:
        yield stop, held


def lock_folder(out: Path, held: ExitStack) -> None:
    """Hold ``out``'s run lock as long as ``held`` and drop temporaries a killed save left. Call
    it before looking at the folder, so two runs cannot both decide to start there."""
    for parent in (out, *out.parents):
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"--out '{out}': '{parent}' is a file, not a folder; choose another --out")
    if D.is_main():
        held.enter_context(RunLock(out))
        ckpt.remove_temporaries(out)


def refuse_existing(out: Path, hint: str) -> None:
    """A fresh run never writes over another's checkpoint; ``hint`` says what to do instead."""
    if (out / CHECKPOINT).exists():
        raise TrainingError(f"'{out}' already holds a run ({CHECKPOINT}); {hint}")


def truncate_metrics(path: Path, epochs_done: int) -> None:
    """Drop metric lines of epochs that the checkpoint does not contain (all of them on a fresh
    start), a last line cut short by a kill, and (with a warning naming it) a line that is not
    UTF-8 text."""
    if not path.exists():
        return

    def epoch_of(line: str) -> float:
        try:
            return json.loads(line).get("epoch", 0)
        except (ValueError, AttributeError):  # a partial line written as the process was killed, or not an object
            return math.inf

    keep = []
    for n, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            log(f"warning: '{path}' line {n} is not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                f"dropped it")
            continue
        if line.strip() and epoch_of(line) <= epochs_done:
            keep.append(line)
    ckpt.write_text_atomic("".join(line + "\n" for line in keep), path)


def prepare_device(device: torch.device, precision: str, seed: int, cudnn_benchmark: bool = True) -> torch.dtype | None:
    """Set the device up (:func:`device.configure_cuda` on CUDA), seed the global RNG and return
    the autocast dtype of ``precision`` on ``device``."""
    if device.type == "cpu":  # denormals in near-zero activations slow CPU math several-fold (seen: SimSiam 6x)
        torch.set_flush_denormal(True)
    if device.type == "cuda":
        log(f"CUDA: {configure_cuda(cudnn_benchmark)}")
    torch.manual_seed(seed)
    dtype = autocast_dtype(precision, device)
    if precision == "auto" and dtype == torch.float16:
        log(f"precision auto: fp16 with a gradient scaler ({torch.cuda.get_device_name(device)} has no native bf16)")
    return dtype


def kept_checkpoint(out: Path) -> str:
    """What a run that stops now leaves behind: the checkpoint that really exists, or none."""
    if (out / CHECKPOINT).exists():
        return f"the checkpoint '{out / CHECKPOINT}' written before it is kept, untouched"
    return f"there is no checkpoint in '{out}' (none had been written yet)"


def nonfinite_stop(what: str, out: Path, advice: tuple[str, str]) -> TrainingError:
    """The error that stops a run on a non-finite loss: where, what is kept, what to do
    (``advice``: with a checkpoint to resume from, and without one)."""
    return TrainingError(f"{what}; nothing was saved after it: {kept_checkpoint(out)}. "
                         f"{advice[0] if (out / CHECKPOINT).exists() else advice[1]}")


def non_finite_entries(state: dict[str, Tensor]) -> list[str]:
    """The keys of floating tensors in ``state`` that hold a NaN or an infinity (one host read)."""
    keys = [k for k, v in state.items() if isinstance(v, Tensor) and v.is_floating_point()]
    if not keys:
        return []
    finite = torch.stack([torch.isfinite(state[k]).all() for k in keys]).cpu()
    return [k for k, ok in zip(keys, finite.tolist()) if not ok]


def save_checkpoint(out: Path, model: nn.Module, spec: BackboneSpec, *, config: dict, epoch: int,
                    **extra) -> None:
    """``checkpoint.pt`` (format, settings, epochs done, ``model``'s weights, then ``extra``) and
    ``model.backbone`` alone with ``spec``; each atomic (:func:`runs.save_run`). Weights with a
    NaN or an infinity are never written over a good checkpoint."""
    weights = model.state_dict()
    bad = non_finite_entries(weights)
    if bad:
        raise TrainingError(f"not saving: {len(bad)} weight tensor(s) hold NaN or inf (first: {bad[0]}); "
                            f"{kept_checkpoint(out)}")
    state = {"format": ckpt.FORMAT, "version": 1, "config": config, "epoch": epoch, "model": weights, **extra}
    save_run(out, state, model.backbone, spec)


def resumable(step: int, optimizer: torch.optim.Optimizer, generators: list[Tensor], partial: dict | None,
              scaler: torch.amp.GradScaler | None = None) -> dict:
    """What a checkpoint holds besides the weights so that ``--resume`` continues the run exactly
    (:func:`resume.restore`): the global step, the optimiser, each rank's augmentation RNG,
    mid-epoch the partial epoch (:meth:`EpochSums.partial`) and, in fp16, the loss scale."""
    extra = {"step": step, "optimizer": optimizer.state_dict(), "generator": generators[0], "generators": generators}
    if partial is not None:
        extra["partial_epoch"] = partial
    if scaler is not None:
        extra["grad_scaler"] = scaler.state_dict()
    return extra


def start_folder(out: Path, config_text: str, epochs_done: int) -> None:
    """The folder as a run (re)starts: its settings in ``config.yaml``, and no metric lines of
    epochs its checkpoint does not hold (a fresh start: none)."""
    out.mkdir(parents=True, exist_ok=True)
    ckpt.write_text_atomic(config_text, out / CONFIG)
    truncate_metrics(out / METRICS, epochs_done)


# ---------------------------------------------------------------------------------------------
# One step's pieces


def backward_step(optimizer: torch.optim.Optimizer, loss: Tensor, clip_grad: float = 0.0,
                  clip_mode: str = "global", frozen: Iterable[Tensor] = (),
                  scaler: torch.amp.GradScaler | None = None) -> None:
    """Backward, drop the gradients of ``frozen`` parameters (:meth:`Method.frozen_now`), (clip
    the gradient norm to ``clip_grad`` if > 0, globally or per parameter:
    :func:`optim.clip_gradients`,) optimiser step. ``scaler`` (fp16): the loss is scaled for
    backward and the gradients unscaled before clipping; a step with inf/NaN gradients is skipped
    and the scale lowered, as ``torch.amp.GradScaler`` does."""
    optimizer.zero_grad(set_to_none=True)
    (loss if scaler is None else scaler.scale(loss)).backward()
    for p in frozen:  # the optimiser skips a parameter without a gradient
        p.grad = None
    if scaler is not None:
        scaler.unscale_(optimizer)
    if clip_grad > 0:
        clip_gradients([p for g in optimizer.param_groups for p in g["params"]], clip_grad, clip_mode)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()


@dataclass(frozen=True)
class Schedule:
    """The learning rate of each step: linear warm-up, then cosine to ``final_lr``; and, when
    ``final_weight_decay`` is set, the decayed groups' weight decay on a cosine from
    ``weight_decay`` to it (DINO's ViT recipe)."""
    epochs: int
    steps_per_epoch: int
    warmup_steps: int
    peak_lr: float
    final_lr: float = 0.0
    warmup_cut: bool = False  # the warm-up asked for was longer than the run: cut to the run
    weight_decay: float = 0.0
    final_weight_decay: float | None = None  # None: the optimiser's weight decay stays as built

    @classmethod
    def create(cls, epochs: int, steps_per_epoch: int, warmup_epochs: float, peak_lr: float,
               final_lr: float = 0.0, weight_decay: float = 0.0, final_weight_decay: float | None = None) -> Schedule:
        asked, total = round(warmup_epochs * steps_per_epoch), epochs * steps_per_epoch
        return cls(epochs, steps_per_epoch, min(asked, total), peak_lr, final_lr, asked > total,
                   weight_decay, final_weight_decay)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def lr(self, step: int) -> float:
        return warmup_cosine(step, self.total_steps, self.warmup_steps, self.peak_lr, self.final_lr)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set ``step``'s lr (and weight decay, if scheduled) on ``optimizer``; returns the lr."""
        lr = self.lr(step)
        set_lr(optimizer, lr)
        if self.final_weight_decay is not None:
            set_weight_decay(optimizer, cosine(step, self.total_steps, self.weight_decay, self.final_weight_decay))
        return lr


def accumulate_scalars(sums: dict[str, Tensor], output: dict[str, Tensor]) -> None:
    """Add every 0-dim output of a step besides the loss (e.g. SwAV's ``code_entropy``) to
    ``sums``; the epoch logs their means. On the device: nothing is read back."""
    for key, value in output.items():
        if key != "loss" and value.dim() == 0:
            sums[key] = sums[key] + value.float() if key in sums else value.float()


@dataclass
class EpochSums:
    """One epoch's running sums on the device: the loss and every other 0-dim output of a step
    (e.g. SwAV's ``code_entropy``), whose means the epoch logs. Nothing is read back to the host
    until :meth:`mean_loss` / :meth:`means`."""
    loss: Tensor
    scalars: dict[str, Tensor] = field(default_factory=dict)

    @classmethod
    def start(cls, device: torch.device, partial: dict) -> EpochSums:
        """Zero, or the sums a mid-epoch checkpoint saved (``partial``, on resume)."""
        sums = cls(torch.zeros((), device=device))
        if partial:  # old checkpoints' spread_sum is not read: dropped
            sums.loss += partial["loss_sum"].to(device)
            sums.scalars = {k: v.to(device) for k, v in partial.get("sums", {}).items()}
        return sums

    def add(self, output: dict[str, Tensor]) -> None:
        self.loss += output["loss"]
        accumulate_scalars(self.scalars, output)

    def mean_loss(self, steps: int) -> float:
        return D.all_reduce_mean(self.loss / steps).item()

    def means(self, steps: int) -> dict[str, float]:
        return {k: D.all_reduce_mean(self.scalars[k] / steps).item() for k in sorted(self.scalars)}

    def partial(self, steps: int, seconds: float, train_seconds: float) -> dict:
        """What a mid-epoch checkpoint keeps, so a resume skips those batches and logs the same
        epoch metrics."""
        return {"steps": steps, "loss_sum": self.loss.cpu(), "sums": {k: v.cpu() for k, v in self.scalars.items()},
                "seconds": seconds, "train_seconds": train_seconds}


class FiniteWatch:
    """Stops a loop at the first step whose loss is NaN or infinite, without a host sync per step.

    On a CPU the step has run when it returns, so its flag is read at once. On CUDA each step's
    flag goes to pinned host memory with a non-blocking copy and an event; a flag is read only
    once its event has passed (:meth:`poll`), or, before anything is saved or logged, all of
    them (:meth:`flush`)."""

    def __init__(self, device: torch.device, steps_per_epoch: int, advice: tuple[str, str], out: Path):
        self.cuda = device.type == "cuda"
        self.steps, self.advice, self.out = steps_per_epoch, advice, out
        self.pending: deque = deque()  # (global step, loss, host flag, event)

    def add(self, step: int, loss: Tensor) -> None:
        ok = torch.isfinite(loss.detach())
        if not self.cuda:
            if not bool(ok):
                self.fail(step, loss)
            return
        host = torch.empty((), dtype=torch.bool, pin_memory=True)
        host.copy_(ok, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.pending.append((step, loss, host, event))
        self.poll(block=False)

    def poll(self, block: bool) -> None:
        while self.pending and (block or self.pending[0][3].query()):
            step, loss, host, event = self.pending.popleft()
            event.synchronize()
            if not bool(host):
                self.fail(step, loss)

    def flush(self) -> None:
        self.poll(block=True)

    def fail(self, step: int, loss: Tensor) -> None:
        epoch, i = divmod(step, self.steps)
        raise nonfinite_stop(f"loss became {loss.float().item()} at step {i + 1}/{self.steps} of epoch {epoch + 1}, "
                             f"so the run stopped there", self.out, self.advice)


# ---------------------------------------------------------------------------------------------
# The epoch loop


@dataclass
class Position:
    """Where a loop starts: epochs done, steps done in the next one, and that epoch's saved sums."""
    epoch: int = 0
    step: int = 0
    partial: dict = field(default_factory=dict)


def _nothing(*args) -> dict:
    return {}


@dataclass
class Loop:
    """One training loop: what it steps, evaluates, saves and says."""
    out: Path
    model: nn.Module                                      # set to train mode at each epoch's start
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    device: torch.device
    batches: Callable[[int, int], Iterable]               # (epoch, first step) -> that epoch's items
    step: Callable[[int, Any, float], dict[str, Tensor]]  # (global step, item, lr) -> detached outputs
    save: Callable[[int, int, dict | None], None]         # (epochs done, global step, partial epoch)
    images_per_epoch: int                                 # for the img/s figure
    nonfinite_advice: tuple[str, str]                     # what to do when the loss is nan / inf: with a
                                                          # checkpoint to resume from, and without one
    evaluate: Callable[[int, bool], dict] = _nothing      # (epoch, last) -> metrics; every rank calls
    describe: Callable[[dict], str] = lambda m: ""        # the log line's text after "img/s"
    warnings: Callable[[dict], list[str]] = lambda m: []  # lines logged after it
    checkpoint_every: int = 0                             # epochs; 0: at the last epoch (or a stop) only
    max_minutes: float | None = None                      # stop at the first epoch end after this long
    stop: StopSignals = field(default_factory=lambda: StopSignals(enabled=False))
    resume_command: str = ""                              # named by Interrupted
    writer: Any = None                                    # a TensorBoard SummaryWriter
    progress: Any = None                                  # a tqdm bar counting steps
    log_every: int = 1                                    # steps between progress-bar updates (a sync)


def run_epochs(loop: Loop, start: Position | None = None) -> dict:
    """Train from ``start`` to the last epoch, or the first epoch end past ``max_minutes``.
    Returns the epochs' metrics (each epoch's updating the last's)."""
    with loop.stop.deferring():  # a stop signal from here on finishes its step first
        return _run_epochs(loop, start or Position())


def _run_epochs(loop: Loop, start: Position) -> dict:
    result: dict = {}
    train_seconds = float(start.partial.get("train_seconds", 0.0))
    epochs, steps = loop.schedule.epochs, loop.schedule.steps_per_epoch
    for epoch in range(start.epoch, epochs):
        first = start.step if epoch == start.epoch else 0  # > 0 only when resuming mid-epoch
        sums, seconds, lr = _epoch(loop, epoch, first, start.partial if first else {}, train_seconds)
        train_seconds += seconds
        metrics = _epoch_metrics(loop, epoch, sums, seconds, lr)
        last = epoch + 1 == epochs or (
            loop.max_minutes is not None and train_seconds >= 60 * loop.max_minutes)
        metrics.update(loop.evaluate(epoch, last))
        if D.is_main():
            _report(loop, metrics, sorted(sums.scalars))
        stopping = not last and loop.stop.requested
        if last or stopping or (loop.checkpoint_every and (epoch + 1) % loop.checkpoint_every == 0):
            loop.save(epoch + 1, (epoch + 1) * steps, None)
        if stopping:
            raise _interrupted(loop, f"the end of epoch {epoch + 1}")
        result.update(metrics)
        if last:
            if epoch + 1 < epochs:
                log(f"stopping after {train_seconds / 60:.1f} minutes (train.max_minutes)")
            break
    return result


def _epoch(loop: Loop, epoch: int, first: int, partial: dict,
           train_seconds: float) -> tuple[EpochSums, float, float]:
    """The steps of ``epoch`` from step ``first``: its sums, seconds and last lr. On a stop
    signal before its last step: a mid-epoch checkpoint, then :class:`Interrupted`."""
    loop.model.train()
    steps = loop.schedule.steps_per_epoch
    sums = EpochSums.start(loop.device, partial)
    watch = FiniteWatch(loop.device, steps, loop.nonfinite_advice, loop.out)
    t0 = time.perf_counter() - float(partial.get("seconds", 0.0))
    lr, done = 0.0, first
    try:
        for i, item in enumerate(loop.batches(epoch, first), start=first):
            step = epoch * steps + i
            lr = loop.schedule.apply(loop.optimizer, step)
            output = loop.step(step, item, lr)
            sums.add(output)
            watch.add(step, output["loss"])
            done = i + 1
            if loop.progress is not None and (i + 1) % loop.log_every == 0:
                loop.progress.set_postfix(loss=f"{output['loss'].item():.4f}", lr=f"{lr:.3g}", refresh=False)  # syncs
                loop.progress.update(loop.log_every)
            if i + 1 < steps and loop.stop.requested:
                watch.flush()
                seconds = time.perf_counter() - t0
                loop.save(epoch, step + 1, sums.partial(i + 1, seconds, train_seconds + seconds))
                raise _interrupted(loop, f"step {i + 1}/{steps} of epoch {epoch + 1}")
    except DataError as e:  # a streamed file that became unreadable: keep the steps done, as a stop does
        watch.flush()
        seconds = time.perf_counter() - t0
        raise _data_failed(loop, e, epoch, done, sums.partial(done, seconds, train_seconds + seconds)) from None
    watch.flush()
    return sums, time.perf_counter() - t0, lr


def _epoch_metrics(loop: Loop, epoch: int, sums: EpochSums, seconds: float, lr: float) -> dict:
    """The epoch's JSON line before evaluation; a non-finite loss stops the run."""
    steps = loop.schedule.steps_per_epoch
    mean_loss = sums.mean_loss(steps)
    if not math.isfinite(mean_loss):  # another rank's (each rank's own steps are watched)
        raise nonfinite_stop(f"loss became {mean_loss} in epoch {epoch + 1}", loop.out, loop.nonfinite_advice)
    metrics = {"epoch": epoch + 1, "step": (epoch + 1) * steps, "loss": mean_loss, "lr": lr,
               "images_per_s": loop.images_per_epoch / seconds, "seconds": seconds}
    metrics.update(sums.means(steps))
    return metrics


def _report(loop: Loop, metrics: dict, scalars: list[str]) -> None:
    """The epoch's line in metrics.jsonl (and TensorBoard), its log line and its warnings."""
    try:
        with open(loop.out / METRICS, "a") as f:
            f.write(json.dumps(metrics) + "\n")
    except OSError as e:  # a log line must not cost the trained epoch: warn, and go on to its checkpoint
        log(f"warning: could not append epoch {metrics['epoch']} to '{loop.out / METRICS}': {e.strerror or e}; "
            f"training goes on (the epoch's figures are in this log)")
    if loop.writer is not None:
        for key, value in metrics.items():
            if key not in ("epoch", "step", "knn_features"):
                loop.writer.add_scalar(f"train/{key}", value, metrics["step"])
        loop.writer.flush()
    extra = "".join(f" {k} {metrics[k]:.4g}" for k in scalars)
    log(f"epoch {metrics['epoch']}/{loop.schedule.epochs} loss {metrics['loss']:.4f} lr {metrics['lr']:.4g} "
        f"{metrics['images_per_s']:.0f} img/s{loop.describe(metrics)}{extra}")
    for warning in loop.warnings(metrics):
        log(warning)


def _data_failed(loop: Loop, error: DataError, epoch: int, done: int, partial: dict) -> DataError:
    """A data error after ``done`` steps of ``epoch``: the checkpoint of those steps first (as on a
    stop signal; with nothing trained, or across ranks, where the others wait in a collective,
    none), then the error with where the checkpoint is and the command that continues the run."""
    if D.world_size() > 1 or (epoch == 0 and done == 0):
        return error
    steps = loop.schedule.steps_per_epoch
    loop.save(epoch, epoch * steps + done, partial if done else None)
    where = f"step {done}/{steps} of epoch {epoch + 1}" if done else f"the end of epoch {epoch}"
    return DataError(f"{error}. The run stopped after {where}, saved in '{loop.out / CHECKPOINT}'; once the data "
                     f"is repaired, continue with: {loop.resume_command}")


def _interrupted(loop: Loop, where: str) -> Interrupted:
    received = loop.stop.received
    return Interrupted(f"stopped by {received.name} after {where}; the checkpoint in '{loop.out}' is saved",
                       EXIT_CODES[received], loop.resume_command)
