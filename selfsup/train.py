"""One training loop for every method.

Per step: slice a uint8 batch on the device -> augment every view on the device -> forward
under autocast -> loss -> backward -> optimiser step -> the method's post-step hook. Metrics
are accumulated on the device and read back only every ``train.log_every`` steps and at the
end of each epoch (each read is a host-device synchronisation).
"""
from __future__ import annotations

import itertools
import json
import math
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import checkpoint as ckpt
from . import distributed as D
from .backbones import build_backbone
from .config import Config, dump, from_dict
from .data import ImageDataset, load_data
from .device import autocast, autocast_dtype, resolve_device
from .errors import CheckpointError, ConfigError, Interrupted, TrainingError
from .evaluate import OnlineLinear, apply_head, extract_features, knn_accuracy
from .loader import DeviceLoader
from .methods import METHODS, Method, StepInfo, check_config
from .monitor import CHANCE_TOLERANCE, collapse_warning, effective_rank, feature_std
from .optim import build_optimizer, clip_gradients, scale_lr, set_lr, warmup_cosine
from .runguard import EXIT_CODES, RunLock, StopSignals
from .runs import CHECKPOINT, CONFIG, METRICS, TENSORBOARD, BackboneSpec, load_backbone, load_run, save_run
from .stream import IMAGENET_MEAN_STD, ImageStream, StreamLoader, device_augmentations

MONITOR_IMAGES = 2048  # the collapse monitor's fixed subset of the training images


def build_method(cfg: Config) -> Method:
    m = cfg.model
    backbone = build_backbone(m.backbone, width=m.width, cifar_stem=m.cifar_stem, binary_weights=m.binary_weights,
                              zero_init_residual=m.zero_init_residual)
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
    cfg = from_dict(state["config"])
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
                        data_image_size=cfg.data.image_size, mean=tuple(mean), std=tuple(std),
                        method=cfg.method, data=cfg.data.source)


@dataclass
class Knn:
    """The kNN monitor: the training set is the bank, the labelled test split the queries."""
    train: ImageDataset
    test: ImageDataset
    k: int
    temperature: float
    batch_size: int
    bank: torch.Tensor | None = None  # the last call's training-set features, reused by the collapse monitor
    head: nn.Module | None = None  # the method's projection head (eval.knn_features=head), else None

    def __call__(self, backbone: nn.Module, size, mean, std, device, dtype,
                 probe: OnlineLinear | None = None) -> dict[str, float | str]:
        """``knn_top1`` and ``knn_features``, with the online probe's ``linear_top1`` on the same
        (backbone) test features when ``probe`` is given."""
        kw = dict(size=size, mean=mean, std=std, device=device, batch_size=self.batch_size, dtype=dtype)
        bank = self.bank = extract_features(backbone, self.train.images, **kw)  # (N, F)
        queries = extract_features(backbone, self.test.images, **kw)              # (M, F)
        as_long = lambda y: torch.tensor(np.asarray(y), dtype=torch.long, device=device)  # noqa: E731
        test_labels = as_long(self.test.labels)
        result: dict[str, float | str] = {}
        if probe is not None:
            result["linear_top1"] = probe.accuracy(queries, test_labels)
        if self.head is not None:
            bank, queries = apply_head(self.head, bank), apply_head(self.head, queries)  # (N, D), (M, D)
        result["knn_top1"] = knn_accuracy(bank, as_long(self.train.labels), queries, test_labels,
                                          num_classes=len(self.train.classes), k=self.k,
                                          temperature=self.temperature)
        result["knn_features"] = "head" if self.head is not None else "backbone"
        return result


def online_linear(cfg: Config, method: Method, train: ImageDataset, num_images: int,
                  device: torch.device) -> OnlineLinear | None:
    """The online linear probe of a labelled in-memory run (eval.online_linear), watching the
    backbone; images past the labelled training split (STL-10's unlabelled) carry label -1."""
    if not cfg.eval.online_linear:
        return None
    labels = torch.full((num_images,), -1, dtype=torch.long)
    labels[:len(train)] = torch.tensor(np.asarray(train.labels), dtype=torch.long)
    probe = OnlineLinear(method.backbone.num_features, labels, len(train.classes),
                         lr=cfg.eval.online_linear_lr).to(device)
    probe.watch(method.backbone)
    return probe


def _unwrap(model: nn.Module) -> Method:
    model = getattr(model, "module", model)            # DDP
    return getattr(model, "_orig_mod", model)           # torch.compile


def _log(msg: str) -> None:
    if D.is_main():
        print(msg, flush=True)


def _save(out: Path, method: Method, optimizer, generator: torch.Generator, *, epoch: int,
          step: int, cfg: Config, spec: BackboneSpec, partial: dict | None = None,
          probe: OnlineLinear | None = None) -> None:
    """Checkpoint first, then the backbone alone; both atomic. Every rank calls, rank 0 writes.

    ``partial`` (mid-epoch, on a stop signal): the steps done in epoch ``epoch`` and that
    epoch's running sums, so a resume skips those batches and logs the same epoch metrics.
    """
    generators = D.all_gather_object(generator.get_state())  # each rank's augmentation RNG
    if not D.is_main():
        return
    state = {"format": ckpt.FORMAT, "version": 1, "config": cfg.to_dict(), "epoch": epoch,
             "step": step, "model": method.state_dict(), "optimizer": optimizer.state_dict(),
             "generator": generators[0], "generators": generators}
    if partial is not None:
        state["partial_epoch"] = partial
    if probe is not None:
        state["online_linear"] = probe.run_state()
    save_run(out, state, method.backbone, spec)


def _tensorboard(out: Path):
    """A SummaryWriter under ``<out>/tensorboard`` (train.tensorboard=true), beside metrics.jsonl."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("train.tensorboard=true needs the tensorboard package: pip install tensorboard "
                          "(or pip install 'selfsup[tensorboard]')") from None
    return SummaryWriter(str(out / TENSORBOARD))


def _truncate_metrics(path: Path, epochs_done: int) -> None:
    """Drop metric lines of epochs that the checkpoint does not contain (all of them on a fresh
    start), and a last line cut short by a kill."""
    if not path.exists():
        return

    def epoch_of(line: str) -> float:
        try:
            return json.loads(line).get("epoch", 0)
        except ValueError:  # a partial line written as the process was killed
            return math.inf

    keep = [line for line in path.read_text().splitlines() if line.strip() and epoch_of(line) <= epochs_done]
    ckpt.write_text_atomic("".join(line + "\n" for line in keep), path)


def monitor_indices(n: int, seed: int) -> np.ndarray:
    """The collapse monitor's images: a fixed random subset of ``MONITOR_IMAGES`` of the n
    training images, the same every epoch (and on resume), sorted."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, min(n, MONITOR_IMAGES), replace=False))


def collapse_monitor(features: torch.Tensor) -> dict[str, float]:
    """The backbone monitors every method shares (selfsup.monitor), of pooled features (N, D)."""
    return {"feature_std": feature_std(features), "effective_rank": effective_rank(features)}


def monitor_text(metrics: dict, dim: int) -> str:
    """The monitors' part of the epoch log line: feature std in units of 1/√D, effective rank of D."""
    if "feature_std" not in metrics:
        return ""
    return (f" feature std {metrics['feature_std'] * math.sqrt(dim):.3f}/√D"
            f" eff. rank {metrics['effective_rank']:.1f}/{dim}")


def monitor_warnings(method: Method, metrics: dict, dim: int) -> list[str]:
    """Warnings for the epoch: the backbone looks collapsed, the loss sits at the method's
    chance value (:meth:`Method.chance_loss`), or the method's own (:meth:`Method.warnings`)."""
    warnings = []
    if "feature_std" in metrics:
        reason = collapse_warning(metrics["feature_std"], metrics["effective_rank"], dim)
        if reason:
            warnings.append(f"warning: the backbone features look collapsed ({reason}); every image maps to "
                            f"(almost) one direction")
    chance = method.chance_loss()
    if chance is not None and abs(metrics["loss"] - chance) <= CHANCE_TOLERANCE * chance:
        warnings.append(f"warning: the loss {metrics['loss']:.4f} sits at its chance value {chance:.4f}: "
                        f"{method.chance_advice}")
    return warnings + [f"warning: {w}" for w in method.warnings(metrics)]


def accumulate_scalars(sums: dict[str, torch.Tensor], output: dict[str, torch.Tensor]) -> None:
    """Add every 0-dim output of a step besides the loss (e.g. SwAV's ``code_entropy``) to
    ``sums``; the epoch logs their means. On the device: nothing is read back."""
    for key, value in output.items():
        if key != "loss" and value.dim() == 0:
            sums[key] = sums[key] + value.float() if key in sums else value.float()


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, augmentations: list,
               batch: torch.Tensor, generator: torch.Generator,
               dtype: torch.dtype | None, clip_grad: float = 0.0,
               clip_mode: str = "global") -> dict[str, torch.Tensor]:
    """Augment the uint8 batch into views, forward, backward, (clip the gradient norm to
    ``clip_grad`` if > 0, globally or per parameter: :func:`optim.clip_gradients`,) step.
    Returns detached outputs.

    ``batch``: uint8 (B, H, W, 3), or one per view (B, S_v, S_v, 3) already cropped (streamed).
    Nothing here reads a tensor back to the host: the step is queued, never waited for."""
    batches = batch if isinstance(batch, list) else [batch] * len(augmentations)  # streamed: one per view
    with torch.no_grad():
        views = [aug(b, generator) for aug, b in zip(augmentations, batches)]  # each (B, 3, S, S)
    with autocast(views[0].device, dtype):
        output = model(views)
    optimizer.zero_grad(set_to_none=True)
    output["loss"].backward()
    if clip_grad > 0:
        clip_gradients([p for g in optimizer.param_groups for p in g["params"]], clip_grad, clip_mode)
    optimizer.step()
    return {k: v.detach() for k, v in output.items()}


def pretrain(cfg: Config, *, resume: bool = False, expect: dict | None = None) -> dict:
    """Pre-train ``cfg.method`` and return the last epoch's metrics (with kNN before/after).

    The run folder is locked for the run's duration (:class:`RunLock`). SIGTERM / SIGINT finish
    the current step, checkpoint and raise :class:`Interrupted`. ``expect`` (resume): settings
    such as ``{"method": "moco"}`` that the saved run must have.
    """
    check_config(cfg)  # the method's own rules too (resolve checks each field only)
    # Not under torchrun: it also sends SIGTERM to tear down a group after a rank died, when the
    # survivors sit in a collective that never returns, so only the default action ends them.
    with StopSignals(enabled=not D.launched_by_torchrun()) as stop, ExitStack() as held:
        return _pretrain(cfg, resume=resume, expect=expect or {}, stop=stop, held=held)


def _pretrain(cfg: Config, *, resume: bool, expect: dict, stop: StopSignals, held: ExitStack) -> dict:
    device = resolve_device(cfg.train.device)
    D.setup(str(device))
    if not cfg.out:  # a fresh folder per run, so repeating a command never clobbers a run
        if resume:
            raise ConfigError("--resume needs --out DIR, the run to continue")
        stamp = D.broadcast_object(time.strftime("%Y%m%d-%H%M%S"))
        cfg.out = str(Path("runs") / f"{cfg.preset or cfg.method}-{stamp}")
    out = Path(cfg.out)
    if D.is_main():  # before looking at the folder, so two runs cannot both decide to start
        held.enter_context(RunLock(out))
        ckpt.remove_temporaries(out)  # left by a run killed while saving
    if resume:
        if not (out / CHECKPOINT).exists():
            raise CheckpointError(f"--resume: no {CHECKPOINT} in '{out}' to resume from; start the run "
                                  f"without --resume")
        _, state = load_run(out, who="--resume:", kind="training")
        saved = from_dict(state["config"])  # the run's own settings; where it runs may change
        ckpt.check_expected(saved.to_dict(), expect, out / CHECKPOINT)
        saved.out = cfg.out
        saved.train.device, saved.train.progress = cfg.train.device, cfg.train.progress
        saved.train.max_minutes = cfg.train.max_minutes
        cfg = saved
    elif (out / CHECKPOINT).exists():
        raise TrainingError(f"'{out}' already holds a run ({CHECKPOINT}); pass --resume to continue "
                            f"it or choose another --out")

    world, rank = D.world_size(), D.rank()
    dtype = autocast_dtype(cfg.train.precision, device)
    if device.type == "cpu":  # denormals in near-zero activations slow CPU math several-fold (seen: SimSiam 6x)
        torch.set_flush_denormal(True)
    torch.manual_seed(cfg.train.seed)

    if cfg.data.stream:  # too big for memory: decoded every epoch by worker processes, no kNN monitor
        splits, images = None, ImageStream(cfg.data.source, skip_corrupt=cfg.data.skip_corrupt)
        size, (mean, std) = cfg.aug.size or cfg.data.image_size, IMAGENET_MEAN_STD
    else:
        splits = load_data(cfg.data.source, image_size=cfg.data.image_size, cache_dir=cfg.data.cache_dir,
                           unlabeled=cfg.data.unlabeled, skip_corrupt=cfg.data.skip_corrupt)
        images = splits.train.images
        if cfg.data.unlabeled and splits.unlabeled is not None:
            images = np.concatenate([np.asarray(images), np.asarray(splits.unlabeled.images)])
        size = cfg.aug.size or splits.train.image_size[0]
        mean, std = splits.train.mean_std()
    spec = backbone_spec(cfg, size, mean, std)

    method = build_method(cfg)
    sync_bn = cfg.model.sync_bn if cfg.model.sync_bn is not None else method.sync_bn_default
    if sync_bn and world > 1:
        method = D.convert_sync_batchnorm(method, device)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    method = method.to(device, memory_format=memory_format)
    augmentations = method.augmentations(size, mean, std)
    peak_lr = scale_lr(cfg.optim.lr, cfg.train.batch_size, cfg.optim.lr_scaling)  # global batch
    optimizer = build_optimizer(cfg.optim.name, method.param_groups(peak_lr), lr=cfg.optim.lr,
                                momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)

    if cfg.data.stream:
        loader = StreamLoader(images, [a.cfg for a in augmentations], cfg.train.batch_size, device,
                              seed=cfg.train.seed, rank=rank, world_size=world, workers=cfg.data.workers)
        augmentations = device_augmentations(augmentations)  # the crops are taken at decode time
    else:
        loader = DeviceLoader(images, cfg.train.batch_size, device, seed=cfg.train.seed, rank=rank,
                              world_size=world, budget_gb=cfg.data.device_budget_gb)
    steps_per_epoch = len(loader)
    total_steps = cfg.train.epochs * steps_per_epoch
    warmup_steps = round(cfg.optim.warmup_epochs * steps_per_epoch)
    if warmup_steps > total_steps:  # a short run of a long recipe: warm up over the whole run
        _log(f"note: optim.warmup_epochs={cfg.optim.warmup_epochs:g} exceeds the run; warming up "
             f"over all {cfg.train.epochs} epochs")
        warmup_steps = total_steps
    final_lr = cfg.optim.final_lr * peak_lr
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed * 7919 + 1 + rank)

    start_epoch = start_step = 0
    partial: dict = {}
    if resume:
        ckpt.load_weights(method, state["model"], out / CHECKPOINT,
                          f"a {cfg.method} model with a {cfg.model.backbone} (width {cfg.model.width:g})")
        optimizer.load_state_dict(state["optimizer"])
        generators = state.get("generators", [state["generator"]])
        if len(generators) == world:  # else the fresh per-rank seeds: augmentations cannot repeat
            generator.set_state(generators[rank])
        else:
            _log(f"the run was saved on {len(generators)} ranks and continues on {world}: the "
                 f"augmentations will differ from an uninterrupted run's")
        start_epoch = int(state["epoch"])
        partial = state.get("partial_epoch") or {}
        start_step = int(partial.get("steps", 0))
        where = f", step {start_step}/{steps_per_epoch} of epoch {start_epoch + 1}" if start_step else ""
        _log(f"resuming '{out}' at epoch {start_epoch}/{cfg.train.epochs}{where}")
    if D.is_main():
        out.mkdir(parents=True, exist_ok=True)
        dump(cfg, out / CONFIG)
        _truncate_metrics(out / METRICS, start_epoch)

    model: nn.Module = method
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            method, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=method.find_unused_parameters)
    if cfg.train.compile:
        model = torch.compile(model)

    knn = probe = None
    if splits is not None and splits.test is not None and len(splits.test) and (len(splits.train.classes) > 1):
        head = method.projector if cfg.eval.knn_features == "head" else None
        knn = Knn(splits.train, splits.test, cfg.eval.knn_k, cfg.eval.knn_t, cfg.eval.batch_size, head=head)
        probe = online_linear(cfg, method, splits.train, len(images), device)
        if probe is not None and resume and "online_linear" in state:
            probe.load_run_state(state["online_linear"])
    monitor_idx = None if splits is None else monitor_indices(len(splits.train), cfg.train.seed)  # streamed: none
    feature_dim = method.backbone.num_features
    result: dict = {}
    if knn is not None and start_epoch == 0 and not start_step and D.is_main():
        result["knn_top1_init"] = knn(method.backbone, size, mean, std, device, dtype)["knn_top1"]
        init = collapse_monitor(knn.bank[torch.as_tensor(monitor_idx, device=device)])
        knn.bank = None
        _log(f"kNN top-1 at random initialisation ({cfg.eval.knn_features} features): "
             f"{result['knn_top1_init']:.2f}%{monitor_text(init, feature_dim)}")

    _log(f"{cfg.method}: {len(images)} images, {steps_per_epoch} steps/epoch of {cfg.train.batch_size}"
         f" on {world} x {device}, {cfg.train.epochs} epochs, peak lr {peak_lr:.4g}")
    writer = _tensorboard(out) if cfg.train.tensorboard and D.is_main() else None
    if writer is not None:
        held.callback(writer.close)
    progress = _progress(cfg, total_steps, start_epoch * steps_per_epoch + start_step)
    train_seconds = float(partial.get("train_seconds", 0.0))
    for epoch in range(start_epoch, cfg.train.epochs):
        model.train()
        first = start_step if epoch == start_epoch else 0  # > 0 only when resuming mid-epoch
        loss_sum = torch.zeros((), device=device)
        sums: dict[str, torch.Tensor] = {}  # the method's other scalar outputs (old checkpoints: spread_sum, dropped)
        if first:
            loss_sum += partial["loss_sum"].to(device)
            sums = {k: v.to(device) for k, v in partial.get("sums", {}).items()}
        t0 = time.perf_counter() - (float(partial.get("seconds", 0.0)) if first else 0.0)
        indices = loader.indices(epoch, first) if probe is not None else itertools.repeat(None)
        for i, (batch, idx) in enumerate(zip(loader.batches(epoch, first), indices), start=first):
            step = epoch * steps_per_epoch + i
            lr = warmup_cosine(step, total_steps, warmup_steps, peak_lr, final_lr)
            set_lr(optimizer, lr)
            info = StepInfo(step, total_steps, steps_per_epoch, cfg.train.batch_size // world, cfg.train.seed)
            method.on_step_start(info)
            output = train_step(model, optimizer, augmentations, batch, generator, dtype, cfg.optim.clip_grad,
                                cfg.optim.clip_grad_mode or method.clip_grad_mode_default)
            method.on_step_end(info)
            if probe is not None:  # its own backward on detached features, after the method's step
                probe.step(idx, lr / peak_lr)
            loss = output["loss"]
            loss_sum += loss
            accumulate_scalars(sums, output)
            if progress is not None and (i + 1) % cfg.train.log_every == 0:
                progress.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.3g}", refresh=False)  # syncs
                progress.update(cfg.train.log_every)
            if i + 1 < steps_per_epoch and stop.requested:
                seconds = time.perf_counter() - t0
                _save(out, method, optimizer, generator, epoch=epoch, step=step + 1, cfg=cfg, spec=spec,
                      probe=probe, partial={"steps": i + 1, "loss_sum": loss_sum.cpu(),
                                            "sums": {k: v.cpu() for k, v in sums.items()},
                               "seconds": seconds, "train_seconds": train_seconds + seconds})
                raise _interrupted(stop, out, f"step {i + 1}/{steps_per_epoch} of epoch {epoch + 1}")
        seconds = time.perf_counter() - t0
        train_seconds += seconds
        mean_loss = D.all_reduce_mean(loss_sum / steps_per_epoch).item()
        if not math.isfinite(mean_loss):
            raise TrainingError(f"loss became {mean_loss} in epoch {epoch + 1}; stopping. The last good "
                                f"checkpoint in '{out}' is kept: lower optim.lr, raise temperature or "
                                f"use train.precision=fp32, then resume or restart")
        metrics = {"epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch, "loss": mean_loss,
                   "lr": lr, "images_per_s": steps_per_epoch * cfg.train.batch_size / seconds,
                   "seconds": seconds}
        metrics.update({k: D.all_reduce_mean(sums[k] / steps_per_epoch).item() for k in sorted(sums)})
        last = epoch + 1 == cfg.train.epochs or (
            cfg.train.max_minutes is not None and train_seconds >= 60 * cfg.train.max_minutes)
        every = cfg.eval.knn_every
        if knn is not None and D.is_main() and (last or (every and (epoch + 1) % every == 0)):
            metrics.update(knn(method.backbone, size, mean, std, device, dtype, probe))
            features = knn.bank[torch.as_tensor(monitor_idx, device=device)]  # (n, D): the same images
            knn.bank = None  # the whole training set's features: not kept until the next kNN
        elif monitor_idx is not None and D.is_main():
            features = extract_features(method.backbone, splits.train.images[monitor_idx], size=size, mean=mean,
                                        std=std, device=device, batch_size=cfg.eval.batch_size, dtype=dtype)
        if monitor_idx is not None and D.is_main():
            metrics.update(collapse_monitor(features))
        if D.is_main():
            with open(out / METRICS, "a") as f:
                f.write(json.dumps(metrics) + "\n")
            if writer is not None:
                for key, value in metrics.items():
                    if key not in ("epoch", "step", "knn_features"):
                        writer.add_scalar(f"train/{key}", value, metrics["step"])
                writer.flush()
            knn_text = f" kNN {metrics['knn_top1']:.2f}%" if "knn_top1" in metrics else ""
            knn_text += f" online linear {metrics['linear_top1']:.2f}%" if "linear_top1" in metrics else ""
            extra = "".join(f" {k} {metrics[k]:.4g}" for k in sorted(sums))
            _log(f"epoch {epoch + 1}/{cfg.train.epochs} loss {mean_loss:.4f} lr {lr:.4g} "
                 f"{metrics['images_per_s']:.0f} img/s{knn_text}{monitor_text(metrics, feature_dim)}{extra}")
            for warning in monitor_warnings(method, metrics, feature_dim):
                _log(warning)
        stopping = not last and stop.requested
        if last or stopping or (epoch + 1) % cfg.train.checkpoint_every == 0:
            _save(out, method, optimizer, generator, epoch=epoch + 1, step=(epoch + 1) * steps_per_epoch,
                  cfg=cfg, spec=spec, probe=probe)
        if stopping:
            raise _interrupted(stop, out, f"the end of epoch {epoch + 1}")
        result.update(metrics)
        if last:
            if epoch + 1 < cfg.train.epochs:
                _log(f"stopping after {train_seconds / 60:.1f} minutes (train.max_minutes)")
            break
    if progress is not None:
        progress.close()
    if "knn_top1" in result:
        _log(f"kNN top-1 after training: {result['knn_top1']:.2f}%")
    D.barrier()
    return result


def _interrupted(stop: StopSignals, out: Path, where: str) -> Interrupted:
    return Interrupted(f"stopped by {stop.received.name} after {where}; the checkpoint in '{out}' is saved. "
                       f"Continue with: selfsup pretrain --out {out} --resume", EXIT_CODES[stop.received])


def _progress(cfg: Config, total: int, initial: int):
    if not (cfg.train.progress and D.is_main() and sys.stderr.isatty()):
        return None
    from tqdm import tqdm
    # counts steps, displayed as images (unit_scale) so the rate reads img/s
    return tqdm(total=total, initial=initial, unit="img", unit_scale=cfg.train.batch_size,
                dynamic_ncols=True)
