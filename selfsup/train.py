"""One training loop for every method: :func:`build_run` makes a :class:`Run` (the locked
folder, the data, the method, optimiser, loader, schedule and monitors) and :func:`fit` trains
it with the epoch loop of :mod:`selfsup.loop`; :func:`pretrain` is the two.

Per step: slice a uint8 batch on the device -> augment every view on the device -> forward
under autocast -> loss -> backward -> optimiser step -> the method's post-step hook. Metrics
are accumulated on the device and read back only every ``train.log_every`` steps and at the
end of each epoch (each read is a host-device synchronisation).
"""
from __future__ import annotations

import itertools
import shlex
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import checkpoint as ckpt
from . import distributed as D
from .backbones import build_backbone, is_vit
from .config import Config, dumps, from_dict
from .data import builtin_image_size
from .device import autocast, grad_scaler, resolve_device
from .epoch_end import MONITOR_IMAGES, Monitors, build_monitors, monitor_sample
from .errors import CheckpointError, ConfigError
from .feed import Images, build_loader, load_images
from .loader import DeviceLoader
from .loop import (Loop, Position, Schedule, backward_step, guarded, log, prepare_device, resumable, run_epochs,
                   save_checkpoint, start_folder)
from .methods import METHODS, Method, StepInfo, check_config
from .optim import build_optimizer, scale_lr
from .resume import check_same_data, data_identity, open_folder, restore
from .runguard import StopSignals
from .runs import CHECKPOINT, TENSORBOARD, BackboneSpec, load_backbone, load_run, saved_config
from .stream import ImageStream, StreamLoader


def build_method(cfg: Config) -> Method:
    m = cfg.model
    view_side = None  # a ViT learns its position embeddings for this side: the views' (as feed.load_images)
    if is_vit(m.backbone):
        view_side = cfg.aug.size or cfg.data.image_size or builtin_image_size(cfg.data.source)
        if view_side is None:
            raise ConfigError(f"model.backbone {m.backbone} needs the side of the training views before "
                              f"'{cfg.data.source}' is read, for its position embeddings: set aug.size "
                              f"(e.g. aug.size=224) or data.image_size")
    backbone = build_backbone(m.backbone, width=m.width, cifar_stem=m.cifar_stem, binary_weights=m.binary_weights,
                              zero_init_residual=m.zero_init_residual, patch_size=m.patch_size,
                              image_size=view_side, drop_path=m.drop_path, drop_path_subset=m.drop_path_subset,
                              freeze_patch_embed=m.freeze_patch_embed, grad_checkpointing=m.grad_checkpointing)
    if m.init_from:  # e.g. S2-BNN's step two from step one; before any teacher copies the backbone
        source, spec = load_backbone(m.init_from)
        try:
            backbone.load_state_dict(source.state_dict())
        except RuntimeError as e:
            raise CheckpointError(f"model.init_from '{m.init_from}' holds a {spec.backbone} (width "
                                  f"{spec.width}) that does not fit model.backbone {m.backbone} "
                                  f"(width {m.width}): {str(e).splitlines()[0]}") from None
    return METHODS[cfg.method].from_config(cfg, backbone)


def load_projector(path: str | Path, *, random_init: bool = False) -> nn.Module:
    """The projection head g of a run, from its ``checkpoint.pt`` (a run folder, the checkpoint,
    or the ``backbone.pt`` beside it), built as the run's method builds it (kNN on head features).
    ``random_init``: the same head untrained."""
    path, state = load_run(path, who="--features head:", kind="training", beside_backbone=True,
                           hint=f"; head features need the run's {CHECKPOINT}, which holds its projection head")
    cfg = from_dict(saved_config(state, path, "--features head:", "to rebuild its projection head from"))
    cfg.model.init_from = None  # the saved weights replace whatever the run started from
    method = build_method(cfg)
    if not hasattr(method, "projector"):
        raise ConfigError(f"method '{cfg.method}' has no projection head for --features head")
    if not random_init:
        ckpt.load_weights(method, state["model"], path, f"a {cfg.method} model as its config says")
    return method.projector


def backbone_spec(cfg: Config, size: int, mean, std) -> BackboneSpec:
    """What an evaluation needs to rebuild the backbone of a run of ``cfg`` and feed it as in
    training (``size``: the views' side; ``mean``, ``std``: their normalisation)."""
    return BackboneSpec(backbone=cfg.model.backbone, width=cfg.model.width, cifar_stem=cfg.model.cifar_stem,
                        binary_weights=cfg.model.binary_weights, image_size=size,
                        patch_size=cfg.model.patch_size if is_vit(cfg.model.backbone) else None,
                        data_image_size=cfg.data.image_size, mean=tuple(mean), std=tuple(std),
                        method=cfg.method, data=cfg.data.source)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, augmentations: list,
               batch: torch.Tensor, generator: torch.Generator,
               dtype: torch.dtype | None, clip_grad: float = 0.0,
               clip_mode: str = "global", frozen: list | tuple = (),
               scaler: torch.amp.GradScaler | None = None) -> dict[str, torch.Tensor]:
    """Augment the uint8 batch into views, forward, backward (dropping ``frozen`` parameters'
    gradients; fp16: scaled by ``scaler``), (clip the gradient norm to ``clip_grad`` if > 0,
    globally or per parameter: :func:`optim.clip_gradients`,) step. Returns detached outputs.

    ``batch``: uint8 (B, H, W, 3), or one per view (B, S_v, S_v, 3) already cropped (streamed).
    Nothing here reads a tensor back to the host: the step is queued, never waited for."""
    batches = batch if isinstance(batch, list) else [batch] * len(augmentations)  # streamed: one per view
    with torch.no_grad():
        views = [aug(b, generator) for aug, b in zip(augmentations, batches)]  # each (B, 3, S, S)
    with autocast(views[0].device, dtype):
        output = model(views)
    backward_step(optimizer, output["loss"], clip_grad, clip_mode, frozen, scaler)
    return {k: v.detach() for k, v in output.items()}


def peak_lr(cfg: Config) -> float:
    """optim.lr scaled to the global batch (optim.lr_scaling): the schedule's peak."""
    return scale_lr(cfg.optim.lr, cfg.train.batch_size, cfg.optim.lr_scaling)


def build_parts(cfg: Config, device: torch.device, size: int, mean, std) -> tuple[Method, torch.optim.Optimizer, list]:
    """``cfg``'s method on ``device`` (synchronised BN across ranks where it asks for it), its
    optimiser and its augmentations of ``size`` views normalised by ``mean``, ``std``."""
    method = build_method(cfg)
    sync_bn = cfg.model.sync_bn if cfg.model.sync_bn is not None else method.sync_bn_default
    if sync_bn and D.world_size() > 1:
        method = D.convert_sync_batchnorm(method)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    method = method.to(device, memory_format=memory_format)
    augmentations = method.augmentations(size, mean, std)
    optimizer = build_optimizer(cfg.optim.name, method.param_groups(peak_lr(cfg)), lr=cfg.optim.lr,
                                momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)
    return method, optimizer, augmentations


# ---------------------------------------------------------------------------------------------
# Building a run


@dataclass
class Run:
    """One pre-training run, built by :func:`build_run` and trained by :func:`fit`."""
    cfg: Config
    out: Path
    device: torch.device
    dtype: torch.dtype | None
    data: Images
    spec: BackboneSpec
    method: Method
    model: nn.Module           # the method, in DDP and/or compiled when asked for
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None  # fp16's loss scaling
    augmentations: list
    loader: DeviceLoader | StreamLoader
    schedule: Schedule
    generator: torch.Generator  # this rank's augmentation RNG
    monitors: Monitors
    start: Position
    stop: StopSignals
    held: ExitStack             # the run lock and what closes with the run
    data_id: dict               # what the checkpoint records of the data (:func:`resume.data_identity`)


def build_run(cfg: Config, *, resume: bool = False, expect: dict | None = None,
              stop: StopSignals, held: ExitStack, changes: dict | None = None, data_changed_ok: bool = False) -> Run:
    """Everything a run of ``cfg`` trains with. The folder is locked for as long as ``held``;
    ``resume``: the saved run continues (its settings, weights and position) on the same data
    (``data_changed_ok``: or on changed data), ``expect``: settings it must have. ``stop``: the
    signals :func:`fit` honours."""
    device = resolve_device(cfg.train.device)
    D.setup(str(device))
    cfg, out, state = open_folder(cfg, resume, expect or {}, held, changes)
    dtype = prepare_device(device, cfg.train.precision, cfg.train.seed, cfg.train.cudnn_benchmark)
    data = load_images(cfg)
    data_id = data_identity(cfg.data.source, data.images, data.splits)
    if state is not None:
        check_same_data(state, data_id, data_changed_ok)
    spec = backbone_spec(cfg, data.size, data.mean, data.std)
    method, optimizer, augmentations = build_parts(cfg, device, data.size, data.mean, data.std)
    loader, augmentations = build_loader(cfg, data.images, augmentations, device)
    schedule = _schedule(cfg, len(loader))
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed * 7919 + 1 + D.rank())
    scaler = grad_scaler(device, dtype)
    start = Position() if state is None else restore(
        state, out, method, optimizer, generator, len(loader), cfg.train.epochs,
        f"a {cfg.method} model with a {cfg.model.backbone} (width {cfg.model.width:g})", scaler)
    if D.is_main():
        start_folder(out, dumps(cfg), start.epoch)
    model = _wrap(method, augmentations, cfg, device)
    monitors = build_monitors(cfg, method, data.splits, len(data.images), (data.size, data.mean, data.std),
                              _monitor_sample(data, cfg), device, dtype, state)
    return Run(cfg, out, device, dtype, data, spec, method, model, optimizer, scaler, augmentations, loader,
               schedule, generator, monitors, start, stop, held, data_id)


def _monitor_sample(data: Images, cfg: Config):
    """The label-free monitors' fixed sample of the training images: part of the uint8 array, or
    decoded once from the stream at the views' side (rank 0 only: it alone monitors)."""
    if not D.is_main():
        return None
    if isinstance(data.images, ImageStream):
        log(f"decoding {min(MONITOR_IMAGES, len(data.images))} of the streamed images once, for the monitors")
        return data.images.sample(MONITOR_IMAGES, data.size, cfg.train.seed)
    return monitor_sample(data.images, cfg.train.seed)


def _schedule(cfg: Config, steps_per_epoch: int) -> Schedule:
    """Warm-up + cosine from the peak lr of the global batch (optim.lr_scaling) to optim.final_lr of it;
    the weight decay's cosine to optim.final_weight_decay if set."""
    peak = peak_lr(cfg)
    schedule = Schedule.create(cfg.train.epochs, steps_per_epoch, cfg.optim.warmup_epochs, peak,
                               cfg.optim.final_lr * peak, cfg.optim.weight_decay, cfg.optim.final_weight_decay)
    if schedule.warmup_cut:  # a short run of a long recipe: warm up over the whole run
        log(f"note: optim.warmup_epochs={cfg.optim.warmup_epochs:g} exceeds the run; warming up "
            f"over all {cfg.train.epochs} epochs")
    return schedule


def _wrap(method: Method, augmentations: list, cfg: Config, device: torch.device) -> nn.Module:
    """The method in DDP across ranks and, with train.compile, the model and the augmentations
    compiled (train.compile_mode).

    DDP: every step's graph is the same (frozen layers drop their gradients after backward,
    :meth:`Method.frozen_now`), so ``static_graph`` lets it skip the search for unused parameters
    and overlap its all-reduce with backward from the first step; ``gradient_as_bucket_view``
    makes the gradients views into its communication buckets (no copy in or out)."""
    model: nn.Module = method
    if D.world_size() > 1:
        model = nn.parallel.DistributedDataParallel(
            method, device_ids=[device.index] if device.type == "cuda" else None,
            static_graph=True, gradient_as_bucket_view=True)
    if cfg.train.compile:
        model = torch.compile(model, mode=cfg.train.compile_mode)
        for augment in augmentations:  # the pure part of each view; the random numbers stay eager
            augment.compile_apply(cfg.train.compile_mode)
    return model


# ---------------------------------------------------------------------------------------------
# Training a run


def fit(run: Run) -> dict:
    """Train ``run`` to its last epoch (or train.max_minutes); returns the last epoch's metrics,
    with ``knn_top1_init`` (kNN at random initialisation) on a fresh start."""
    cfg, schedule = run.cfg, run.schedule
    result: dict = {}
    if run.start.epoch == 0 and not run.start.step:
        result.update(run.monitors.initial())
    log(f"{cfg.method}: {len(run.data.images)} images, {schedule.steps_per_epoch} steps/epoch of "
        f"{cfg.train.batch_size} on {D.world_size()} x {run.device}, {cfg.train.epochs} epochs, "
        f"peak lr {schedule.peak_lr:.4g}")
    loop = _loop(run)
    result.update(run_epochs(loop, run.start))
    if loop.progress is not None:
        loop.progress.close()
    if "knn_top1" in result:
        log(f"kNN top-1 after training: {result['knn_top1']:.2f}%")
    out, data = shlex.quote(str(run.out)), shlex.quote(str(cfg.data.source))
    log(f"run saved in {out}\nnext:  selfsup embed {out} --data {data} --out embeddings.parquet\n"
        f"       selfsup report {out} --data {data}\n       selfsup export {out}")
    D.barrier()
    return result


def _loop(run: Run) -> Loop:
    """Pre-training's loop: its batches, step, checkpoint, monitors, log and stop signals."""
    cfg, out = run.cfg, run.out
    writer = _tensorboard(out) if cfg.train.tensorboard and D.is_main() else None
    if writer is not None:
        run.held.callback(writer.close)
    steps = run.schedule.steps_per_epoch
    progress = _progress(cfg, run.schedule.total_steps, run.start.epoch * steps + run.start.step)
    return Loop(out=out, model=run.model, optimizer=run.optimizer, schedule=run.schedule, device=run.device,
                batches=lambda epoch, first: _batches(run, epoch, first), step=_stepper(run),
                save=lambda epoch, step, partial: _save(run, epoch, step, partial),
                images_per_epoch=steps * cfg.train.batch_size,
                nonfinite_advice=(f"Resume from that checkpoint with a lower lr (selfsup pretrain --out {out} --resume "
                                  f"--set optim.lr=...), or start again in a new --out with a higher temperature "
                                  f"or train.precision=fp32",
                                  "Start again in a new --out with a lower optim.lr, a higher temperature or "
                                  "train.precision=fp32"),
                evaluate=run.monitors, describe=run.monitors.describe, warnings=run.monitors.warnings,
                checkpoint_every=cfg.train.checkpoint_every, max_minutes=cfg.train.max_minutes, stop=run.stop,
                resume_command=f"selfsup pretrain --out {out} --resume", writer=writer, progress=progress,
                log_every=cfg.train.log_every)


def _batches(run: Run, epoch: int, first: int):
    """(batch, image indices) of each step of ``epoch`` from step ``first``; indices only for the probe."""
    indices = run.loader.indices(epoch, first) if run.monitors.probe is not None else itertools.repeat(None)
    return zip(run.loader.batches(epoch, first), indices)


def _stepper(run: Run):
    """One training step of ``run``: hooks around :func:`train_step`, then the online probe's step."""
    method, probe, schedule = run.method, run.monitors.probe, run.schedule
    local_batch, seed = run.cfg.train.batch_size // D.world_size(), run.cfg.train.seed
    clip_grad, clip_mode = run.cfg.optim.clip_grad, run.cfg.optim.clip_grad_mode or method.clip_grad_mode_default

    def step(step: int, item: tuple, lr: float) -> dict[str, torch.Tensor]:
        batch, idx = item
        info = StepInfo(step, schedule.total_steps, schedule.steps_per_epoch, local_batch, seed)
        method.on_step_start(info)
        output = train_step(run.model, run.optimizer, run.augmentations, batch, run.generator, run.dtype,
                            clip_grad, clip_mode, method.frozen_now(), run.scaler)
        method.on_step_end(info)
        if probe is not None:  # its own backward on detached features, after the method's step
            probe.step(idx, lr / run.schedule.peak_lr)
        return output
    return step


def _save(run: Run, epoch: int, step: int, partial: dict | None = None) -> None:
    """Checkpoint first, then the backbone alone; both atomic. Every rank calls, rank 0 writes.

    ``partial`` (mid-epoch, on a stop signal): the steps done in epoch ``epoch`` and that
    epoch's running sums, so a resume skips those batches and logs the same epoch metrics.
    """
    generators = D.all_gather_object(run.generator.get_state())  # each rank's augmentation RNG
    if not D.is_main():
        return
    extra = resumable(step, run.optimizer, generators, partial, run.scaler)
    extra["data"] = run.data_id
    if run.monitors.probe is not None:
        extra["online_linear"] = run.monitors.probe.run_state()
    save_checkpoint(run.out, run.method, run.spec, config=run.cfg.to_dict(), epoch=epoch, **extra)


def pretrain(cfg: Config, *, resume: bool = False, expect: dict | None = None, changes: dict | None = None,
             data_changed_ok: bool = False) -> dict:
    """Pre-train ``cfg.method`` and return the last epoch's metrics (with kNN before/after).

    The run folder is locked for the run's duration (:class:`RunLock`). SIGTERM / SIGINT finish
    the current step, checkpoint and raise :class:`Interrupted`; a streamed image that cannot be
    read checkpoints the steps done, then raises its :class:`DataError`. ``expect`` (resume):
    settings such as ``{"method": "moco"}`` that the saved run must have; ``changes``: settings to
    change on resume, as dotted keys (:data:`selfsup.resume.RESUMABLE`; others are refused by
    name); ``data_changed_ok``: resume even though the data changed since the checkpoint.
    """
    check_config(cfg)  # the method's own rules too (resolve checks each field only)
    with guarded() as (stop, held):
        return fit(build_run(cfg, resume=resume, expect=expect, stop=stop, held=held, changes=changes,
                             data_changed_ok=data_changed_ok))


def _tensorboard(out: Path):
    """A SummaryWriter under ``<out>/tensorboard`` (train.tensorboard=true), beside metrics.jsonl."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("train.tensorboard=true needs the tensorboard package: pip install tensorboard "
                          "(or pip install 'selfsup[tensorboard]')") from None
    return SummaryWriter(str(out / TENSORBOARD))


def _progress(cfg: Config, total: int, initial: int):
    if not (cfg.train.progress and D.is_main() and sys.stderr.isatty()):
        return None
    from tqdm import tqdm
    # counts steps, displayed as images (unit_scale) so the rate reads img/s
    return tqdm(total=total, initial=initial, unit="img", unit_scale=cfg.train.batch_size,
                dynamic_ncols=True)
