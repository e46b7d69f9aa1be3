"""One training loop for every method.

Per step: slice a uint8 batch on the device -> augment every view on the device -> forward
under autocast -> loss -> backward -> optimiser step -> the method's post-step hook. Metrics
are accumulated on the device and read back only every ``train.log_every`` steps and at the
end of each epoch (each read is a host-device synchronisation).
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import checkpoint as ckpt
from . import distributed as D
from .backbones import build_backbone
from .config import Config, ConfigError, dump, from_dict
from .data import ImageDataset, load_data
from .evaluate import autocast, extract_features, knn_accuracy
from .loader import DeviceLoader
from .methods import METHODS, Method
from .optim import build_optimizer, scale_lr, set_lr, warmup_cosine

CHECKPOINT = "checkpoint.pt"
BACKBONE = "backbone.pt"
BACKBONE_META = "backbone.json"
METRICS = "metrics.jsonl"


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, a clash with an existing run folder, ...)."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device '{name}' asked for, but CUDA is not available here; use --device cpu")
        if D.launched_by_torchrun() and name == "cuda":
            name = f"cuda:{D.local_rank()}"
    elif name != "cpu":
        raise ConfigError(f"train.device '{name}' unknown; use auto, cpu, cuda or cuda:N")
    return torch.device(name)


def _cpu_has_bf16_matmul() -> bool:
    """AMX tiles make bf16 convolutions faster than fp32 on a CPU; without them bf16 is slower."""
    try:
        return bool(torch.cpu._is_amx_tile_supported())  # private API: fall back to fp32 if it moves
    except AttributeError:
        return False


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 where the hardware runs it fast (auto) or when asked for; fp32 otherwise."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto":
        fast = (torch.cuda.is_bf16_supported() if device.type == "cuda" else _cpu_has_bf16_matmul())
        return torch.bfloat16 if fast else None
    return None


def build_method(cfg: Config) -> Method:
    m = cfg.model
    backbone = build_backbone(m.backbone, width=m.width, cifar_stem=m.cifar_stem)
    return METHODS[cfg.method](cfg, backbone)


def backbone_meta(cfg: Config, size: int, mean, std) -> dict:
    """What an evaluation needs to rebuild the backbone and feed it as in training."""
    return {"backbone": cfg.model.backbone, "width": cfg.model.width, "cifar_stem": cfg.model.cifar_stem,
            "image_size": size, "data_image_size": cfg.data.image_size, "mean": list(mean),
            "std": list(std), "method": cfg.method, "data": cfg.data.source}


@dataclass
class Knn:
    """The kNN monitor: the training set is the bank, the labelled test split the queries."""
    train: ImageDataset
    test: ImageDataset
    k: int
    temperature: float
    batch_size: int

    def __call__(self, backbone: nn.Module, size, mean, std, device, dtype) -> float:
        kw = dict(size=size, mean=mean, std=std, device=device, batch_size=self.batch_size, dtype=dtype)
        bank = extract_features(backbone, self.train.images, **kw)
        queries = extract_features(backbone, self.test.images, **kw)
        as_long = lambda y: torch.tensor(np.asarray(y), dtype=torch.long, device=device)  # noqa: E731
        return knn_accuracy(bank, as_long(self.train.labels), queries, as_long(self.test.labels),
                            num_classes=len(self.train.classes), k=self.k, temperature=self.temperature)


def _unwrap(model: nn.Module) -> Method:
    model = getattr(model, "module", model)            # DDP
    return getattr(model, "_orig_mod", model)           # torch.compile


def _log(msg: str) -> None:
    if D.is_main():
        print(msg, flush=True)


def _save(out: Path, method: Method, optimizer, generator: torch.Generator, *, epoch: int,
          step: int, cfg: Config, meta: dict) -> None:
    """Checkpoint first, then the backbone alone; both atomic. Every rank calls, rank 0 writes."""
    generators = D.all_gather_object(generator.get_state())  # each rank's augmentation RNG
    if not D.is_main():
        return
    state = {"format": "selfsup-checkpoint", "version": 1, "config": cfg.to_dict(), "epoch": epoch,
             "step": step, "model": method.state_dict(), "optimizer": optimizer.state_dict(),
             "generator": generators[0], "generators": generators, "meta": meta}
    save_run(out, state, method.backbone, meta)


def save_run(out: Path, state: dict, backbone: nn.Module, meta: dict) -> None:
    """A run's checkpoint, then its backbone alone with the metadata evaluations read; atomic."""
    ckpt.save_atomic(state, out / CHECKPOINT)
    ckpt.save_atomic(backbone.state_dict(), out / BACKBONE)
    (out / BACKBONE_META).write_text(json.dumps(meta, indent=1))


def _truncate_metrics(path: Path, epochs_done: int) -> None:
    """On resume, drop metric lines of epochs that the checkpoint does not contain."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("epoch", 0) <= epochs_done]
    path.write_text("".join(line + "\n" for line in keep))


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, augmentations: list,
               batch: torch.Tensor, generator: torch.Generator,
               dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Augment the uint8 batch into views, forward, backward, step. Returns detached outputs."""
    with torch.no_grad():
        views = [aug(batch, generator) for aug in augmentations]  # each (B, 3, S, S)
    with autocast(batch.device, dtype):
        output = model(views)
    optimizer.zero_grad(set_to_none=True)
    output["loss"].backward()
    optimizer.step()
    return {k: v.detach() for k, v in output.items()}


def pretrain(cfg: Config, *, resume: bool = False) -> dict:
    """Pre-train ``cfg.method`` and return the last epoch's metrics (with kNN before/after)."""
    device = resolve_device(cfg.train.device)
    D.setup(str(device))
    if not cfg.out:  # a fresh folder per run, so repeating a command never clobbers a run
        if resume:
            raise ConfigError("--resume needs --out DIR, the run to continue")
        stamp = D.broadcast_object(time.strftime("%Y%m%d-%H%M%S"))
        cfg.out = str(Path("runs") / f"{cfg.preset or cfg.method}-{stamp}")
    out = Path(cfg.out)
    if resume:
        if not (out / CHECKPOINT).exists():
            raise TrainingError(f"--resume: no {CHECKPOINT} in '{out}' to resume from")
        state = ckpt.load(out / CHECKPOINT)
        saved = from_dict(state["config"])  # the run's own settings; where it runs may change
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

    splits = load_data(cfg.data.source, image_size=cfg.data.image_size, cache_dir=cfg.data.cache_dir,
                       unlabeled=cfg.data.unlabeled, skip_corrupt=cfg.data.skip_corrupt)
    images = splits.train.images
    if cfg.data.unlabeled and splits.unlabeled is not None:
        images = np.concatenate([np.asarray(images), np.asarray(splits.unlabeled.images)])
    size = cfg.aug.size or splits.train.image_size[0]
    mean, std = splits.train.mean_std()
    meta = backbone_meta(cfg, size, mean, std)

    method = build_method(cfg)
    sync_bn = cfg.model.sync_bn if cfg.model.sync_bn is not None else method.sync_bn_default
    if sync_bn and world > 1:
        method = D.convert_sync_batchnorm(method, device)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    method = method.to(device, memory_format=memory_format)
    augmentations = method.augmentations(size, mean, std)
    optimizer = build_optimizer(cfg.optim.name, method.param_groups(), lr=cfg.optim.lr,
                                momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)

    loader = DeviceLoader(images, cfg.train.batch_size, device, seed=cfg.train.seed, rank=rank,
                          world_size=world, budget_gb=cfg.data.device_budget_gb)
    steps_per_epoch = len(loader)
    total_steps = cfg.train.epochs * steps_per_epoch
    warmup_steps = round(cfg.optim.warmup_epochs * steps_per_epoch)
    if warmup_steps > total_steps:  # a short run of a long recipe: warm up over the whole run
        _log(f"note: optim.warmup_epochs={cfg.optim.warmup_epochs:g} exceeds the run; warming up "
             f"over all {cfg.train.epochs} epochs")
        warmup_steps = total_steps
    peak_lr = scale_lr(cfg.optim.lr, cfg.train.batch_size, cfg.optim.lr_scaling)  # global batch
    final_lr = cfg.optim.final_lr * peak_lr
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed * 7919 + 1 + rank)

    start_epoch = 0
    if resume:
        method.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generators = state.get("generators", [state["generator"]])
        if len(generators) == world:  # else the fresh per-rank seeds: augmentations cannot repeat
            generator.set_state(generators[rank])
        else:
            _log(f"the run was saved on {len(generators)} ranks and continues on {world}: the "
                 f"augmentations will differ from an uninterrupted run's")
        start_epoch = int(state["epoch"])
        _log(f"resuming '{out}' at epoch {start_epoch}/{cfg.train.epochs}")
        if D.is_main():
            _truncate_metrics(out / METRICS, start_epoch)
    if D.is_main():
        out.mkdir(parents=True, exist_ok=True)
        dump(cfg, out / "config.yaml")

    model: nn.Module = method
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            method, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=method.find_unused_parameters)
    if cfg.train.compile:
        model = torch.compile(model)

    knn = None
    if splits.test is not None and len(splits.test) and (len(splits.train.classes) > 1):
        knn = Knn(splits.train, splits.test, cfg.eval.knn_k, cfg.eval.knn_t, cfg.eval.batch_size)
    result: dict = {}
    if knn is not None and start_epoch == 0 and D.is_main():
        result["knn_top1_init"] = knn(method.backbone, size, mean, std, device, dtype)
        _log(f"kNN top-1 at random initialisation: {result['knn_top1_init']:.2f}%")

    _log(f"{cfg.method}: {len(images)} images, {steps_per_epoch} steps/epoch of {cfg.train.batch_size}"
         f" on {world} x {device}, {cfg.train.epochs} epochs, peak lr {peak_lr:.4g}")
    progress = _progress(cfg, total_steps, start_epoch * steps_per_epoch)
    train_seconds = 0.0
    for epoch in range(start_epoch, cfg.train.epochs):
        model.train()
        loss_sum = torch.zeros((), device=device)
        spread_sum = torch.zeros((), device=device)
        t0 = time.perf_counter()
        for i, batch in enumerate(loader.batches(epoch)):
            step = epoch * steps_per_epoch + i
            lr = warmup_cosine(step, total_steps, warmup_steps, peak_lr, final_lr)
            set_lr(optimizer, lr)
            method.on_step_start(step, total_steps)
            output = train_step(model, optimizer, augmentations, batch, generator, dtype)
            method.on_step_end(step, total_steps)
            loss = output["loss"]
            loss_sum += loss
            with torch.no_grad():  # collapse monitor: per-dimension std of the normalised embedding
                spread_sum += nn.functional.normalize(output["embedding"].float(), dim=1).std(0).mean()
            if progress is not None and (i + 1) % cfg.train.log_every == 0:
                progress.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.3g}", refresh=False)  # syncs
                progress.update(cfg.train.log_every)
        seconds = time.perf_counter() - t0
        train_seconds += seconds
        mean_loss = D.all_reduce_mean(loss_sum / steps_per_epoch).item()
        if not math.isfinite(mean_loss):
            raise TrainingError(f"loss became {mean_loss} in epoch {epoch + 1}; stopping. The last good "
                                f"checkpoint in '{out}' is kept: lower optim.lr, raise temperature or "
                                f"use train.precision=fp32, then resume or restart")
        metrics = {"epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch, "loss": mean_loss,
                   "lr": lr, "images_per_s": steps_per_epoch * cfg.train.batch_size / seconds,
                   "seconds": seconds,
                   "embedding_std": D.all_reduce_mean(spread_sum / steps_per_epoch).item()}
        last = epoch + 1 == cfg.train.epochs or (
            cfg.train.max_minutes is not None and train_seconds >= 60 * cfg.train.max_minutes)
        every = cfg.eval.knn_every
        if knn is not None and D.is_main() and (last or (every and (epoch + 1) % every == 0)):
            metrics["knn_top1"] = knn(method.backbone, size, mean, std, device, dtype)
        if D.is_main():
            with open(out / METRICS, "a") as f:
                f.write(json.dumps(metrics) + "\n")
            knn_text = f" kNN {metrics['knn_top1']:.2f}%" if "knn_top1" in metrics else ""
            _log(f"epoch {epoch + 1}/{cfg.train.epochs} loss {mean_loss:.4f} lr {lr:.4g} "
                 f"{metrics['images_per_s']:.0f} img/s{knn_text}")
        if last or (epoch + 1) % cfg.train.checkpoint_every == 0:
            _save(out, method, optimizer, generator, epoch=epoch + 1, step=(epoch + 1) * steps_per_epoch,
                  cfg=cfg, meta=meta)
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


def _progress(cfg: Config, total: int, initial: int):
    if not (cfg.train.progress and D.is_main() and sys.stderr.isatty()):
        return None
    from tqdm import tqdm
    # counts steps, displayed as images (unit_scale) so the rate reads img/s
    return tqdm(total=total, initial=initial, unit="img", unit_scale=cfg.train.batch_size,
                dynamic_ncols=True)
