"""SimCLRv2's semi-supervised recipe (Chen et al. 2020b, §2): pre-train, fine-tune, distil.

2. **Fine-tune** on a labelled subset from the middle of the projection head: the encoder f
   plus the first ``head_layers`` layers of g (SimCLRv2's ``ft_proj_selector``; 1 = the first
   Linear + BN + ReLU) and a new zero-initialised linear classifier, trained end to end with
   crop + flip only, LARS and no weight decay. As in SimCLRv2's code the classifier is trained
   by plain momentum SGD at the LARS lr (no trust ratio; L2 decay on its weight only).
3. **Distil** the fine-tuned network (the teacher, frozen) into a student on every training
   image, labelled or not: L = α·L_distill + (1 − α)·CE(labelled), where L_distill is
   :func:`losses.distill` at temperature τ (§2 eq. 2; α = 1 in the paper's main results).

:func:`semisup` runs the steps in one folder and adds the supervised-only baseline: the same
fine-tuning from a randomly initialised network. A fine-tuned or distilled run folder holds
``backbone.pt`` / ``backbone.json`` like a pre-training run, so ``selfsup eval knn|linear``
evaluates its encoder f.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from . import labels as L
from .augment import Augment, crop_flip_view, eval_view
from .backbones import NAMES as BACKBONE_NAMES, build_backbone, is_vit
from . import checkpoint as ckpt
from .config import MIN_TEMPERATURE, Config, from_dict, parse_set, seed_check
from .config import apply_updates as apply_settings  # the typed --set machinery of run configs
from .data import ImageDataset, load_data
from .device import autocast, grad_scaler, resolve_device
from .errors import CheckpointError, ConfigError, Interrupted, TrainingError
from .evaluate import extract_features
from .heads import ProjectionHead
from .loader import epoch_permutation
from .loop import (Loop, Position, Schedule, backward_step, fresh_out, guarded, lock_folder, log, prepare_device,
                   resumable, run_epochs, save_checkpoint, start_folder)
from .losses import distill as distill_loss
from .norm import plain_batchnorm
from .optim import build_optimizer, param_groups, scale_lr
from .resume import apply_changes, check_same_data, data_identity, open_run, restore
from .runguard import StopSignals
from .runs import CHECKPOINT, BackboneSpec, load_run, read_metrics, run_dir, run_spec, saved_config
from .train import build_method, pretrain

RESULTS = "results"  # semisup writes results.json and results.md
PLAN = "semisup.yaml"  # semisup's settings of every step, read back by its --resume

#: What ``--resume`` of a fine-tuning or distillation may change: its length (the lr schedule then
#: follows it), the lr schedule's settings and how often it evaluates and checkpoints.
RESUMABLE = ("epochs", "lr", "lr_scaling", "warmup_epochs", "eval_every", "eval_batch_size", "checkpoint_every")


@dataclass
class StepConfig:
    """What fine-tuning and distillation share: data, schedule, optimiser, where they run."""
    data: str | None = None          # None: the source the pre-training (teacher) run used
    out: str | None = None
    epochs: int = 60
    batch_size: int = 256
    optimizer: str = "lars"
    lr: float = 0.005                # base lr, scaled by lr_scaling
    lr_scaling: str = "sqrt"         # sqrt: lr*sqrt(B) (SimCLRv2 fine-tuning), linear: lr*B/256, none
    momentum: float = 0.9
    weight_decay: float = 0.0
    warmup_epochs: float = 0.0
    crop_scale_min: float = 0.08     # crop + flip augmentation: smallest crop area fraction
    eval_every: int = 1              # epochs between test-split evaluations (always after the last)
    checkpoint_every: int = 10       # epochs between checkpoints (and always at the end, or on a stop signal);
                                     # as pretrain's: a save of a ResNet-50 classifier takes ~1-2 s here
    eval_batch_size: int = 512
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"          # as train.precision: auto | bf16 | fp16 | fp32


@dataclass
class FinetuneConfig(StepConfig):
    """SimCLRv2 fine-tuning (README 1 % command: LARS 0.005 x sqrt(B), wd 0, no warm-up, 60
    epochs for 1 % and 30 for 10 %, from head layer 1; REFERENCE.md section 2)."""
    checkpoint: str = ""             # the pre-training run (folder or its checkpoint.pt)
    labels: str = "10%"              # 1%, 10%, a count per class (50) or a file of image indices
    label_seed: int = 0              # draws the labelled subset of a fraction or count
    head_layers: int = 1             # projection-head layers kept (SimCLRv2 ft_proj_selector; 0: f only)
    random_init: bool = False        # the same network untrained: the supervised-only baseline


@dataclass
class StudentConfig(StepConfig):
    """SimCLRv2 distillation: the student trains on every training image with the pre-training
    run's schedule (here SimCLR's CIFAR LARS 1.0 x B/256, wd 1e-4), crop + flip only."""
    teacher: str = ""                # a fine-tuned (or distilled) run folder
    student: str = "resnet18"
    width: float | None = None       # a ResNet student's width (None: the teacher's)
    patch_size: int | None = None    # a ViT student's patch side (None: :func:`student_patch`)
    temperature: float = 1.0         # tau: 1.0 big-to-small, 0.1 self-distillation (SimCLRv2 section 2)
    alpha: float = 1.0               # weight of the distillation term; 1 - alpha weighs the labelled CE
    augment: bool = True             # crop + flip per step; off: the teacher's logits are computed once
    unlabeled: bool = False          # STL-10: distil on the 100k unlabelled images too
    epochs: int = 10
    lr: float = 1.0
    lr_scaling: str = "linear"
    weight_decay: float = 1e-4


def validate_step(cfg: StepConfig) -> None:
    """Each field's range (every number finite), or a ConfigError naming the field."""
    checks = [
        (cfg.epochs >= 1, "epochs must be at least 1"),
        (cfg.batch_size >= 2, "batch_size must be at least 2 (batch norm needs two samples)"),
        (cfg.lr > 0, "lr must be positive"),
        (cfg.weight_decay >= 0, "weight_decay must be >= 0"),
        (cfg.warmup_epochs >= 0, "warmup_epochs must be >= 0"),
        (cfg.lr_scaling in ("linear", "sqrt", "none"), "lr_scaling must be linear, sqrt or none"),
        (cfg.optimizer in ("lars", "sgd", "adamw"), f"optimizer '{cfg.optimizer}' unknown; choose lars, sgd or adamw"),
        (0 < cfg.crop_scale_min <= 1, "crop_scale_min must be in (0, 1]"),
        (cfg.eval_every >= 1, "eval_every must be at least 1"),
        (cfg.checkpoint_every >= 1, "checkpoint_every must be at least 1"),
        (cfg.precision in ("auto", "bf16", "fp16", "fp32"), "precision must be auto, bf16, fp16 or fp32"),
        seed_check("seed", cfg.seed),
    ]
    if isinstance(cfg, FinetuneConfig):
        checks += [(cfg.head_layers >= 0, "head_layers (--from-head-layer) must be >= 0"),
                   seed_check("label_seed", cfg.label_seed)]
    if isinstance(cfg, StudentConfig):
        checks += [(cfg.temperature >= MIN_TEMPERATURE, f"temperature must be at least {MIN_TEMPERATURE:g} (the "
                                                        f"distillation loss divides logits by it)"),
                   (0 <= cfg.alpha <= 1, "alpha must be in [0, 1]"),
                   (cfg.width is None or cfg.width > 0, "width must be positive"),
                   (cfg.width is None or not is_vit(cfg.student), f"width {cfg.width} applies to ResNet "
                    f"students; a {cfg.student} has a fixed width (patch_size sets its patches)"),
                   (cfg.patch_size is None or (is_vit(cfg.student) and cfg.patch_size >= 1),
                    f"patch_size {cfg.patch_size} must be at least 1, for a ViT student (not {cfg.student})")]
    numbers = [(f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg)]
    checks += [(math.isfinite(v), f"{name} must be a finite number, got {v}") for name, v in numbers
               if isinstance(v, float)]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{'distill' if isinstance(cfg, StudentConfig) else 'finetune'}: {message}")


def step_config(cls: type[StepConfig], sets: list[str] | None = None, **overrides) -> StepConfig:
    """A step's settings: defaults <- ``--set key=value`` items <- explicit (non-None) overrides."""
    cfg = cls()
    for item in sets or []:
        apply_settings(cfg, parse_set(item))
    apply_settings(cfg, {k: v for k, v in overrides.items() if v is not None})
    validate_step(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------
# The network


class Classifier(nn.Module):
    """f(·), the first layers of g(·) (possibly none) and a linear layer to the classes.

    The encoder is called ``backbone``, as in every method, so ``runs.load_backbone``
    reads the encoder of a fine-tuned or distilled checkpoint like a pre-trained one.
    """

    def __init__(self, backbone: nn.Module, head: nn.Sequential, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = head
        linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
        width = linears[-1].out_features if linears else backbone.num_features
        self.fc = nn.Linear(width, num_classes)
        # SimCLRv2's zero_init_logits_layer: every class starts equally likely
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.head(self.backbone(x)))  # (B, 3, S, S) -> (B, C)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimiser groups: f and g as in pre-training; the new classifier without LARS
        adaptation, as SimCLRv2's ``head_supervised`` (L2 decay on its weight, none on its bias)."""
        return param_groups(self, weight_decay, plain=self.fc.parameters())


def build_classifier(spec: BackboneSpec, method: nn.Module | None = None) -> Classifier:
    """The classifier ``spec`` describes; ``method``: the pre-training network to take f and g
    from (its weights are shared, not copied); otherwise both are built untrained."""
    n = spec.head_layers
    if method is None and (n or spec.pretrain_config):
        method = build_method(from_dict(spec.pretrain_config))
    if method is None:
        backbone = build_backbone(spec.backbone, width=spec.width, cifar_stem=spec.cifar_stem, **spec.vit_args())
        return Classifier(backbone, nn.Sequential(), spec.num_classes)
    head = nn.Sequential()
    if n:
        projector = getattr(method, "projector", None)
        if not isinstance(projector, ProjectionHead):
            raise ConfigError(f"a {spec.pretrain_method or 'this'} run has no SimCLR-style projection "
                              f"head to fine-tune from; use --from-head-layer 0 (the encoder only)")
        if n > projector.num_layers:
            raise ConfigError(f"--from-head-layer {n}: the run's projection head has only "
                              f"{projector.num_layers} layers")
        head = projector.layers_up_to(n)
    # MoCo's split BN emulates devices during pre-training only: the classifier uses plain BN
    return Classifier(plain_batchnorm(method.backbone), head, spec.num_classes)


def _run_state(path: str | Path, who: str) -> tuple[Path, dict, BackboneSpec]:
    """The folder, loaded checkpoint and spec of the run ``path`` (its folder or checkpoint)."""
    file, state = load_run(path, who=who)
    return run_dir(file), state, run_spec(state, file)


def load_classifier(run: str | Path) -> tuple[Classifier, BackboneSpec, Path]:
    """A fine-tuned or distilled run's classifier, its spec and its folder."""
    folder, state, spec = _run_state(run, "run")
    if spec.num_classes is None:
        raise CheckpointError(f"'{run}' is a pre-training run, not a fine-tuned one; run "
                              f"`selfsup finetune --checkpoint {run}` first")
    model = build_classifier(spec)
    ckpt.load_weights(model, state["model"], folder / CHECKPOINT,
                      f"the {spec.method} classifier its metadata describes")
    return model, spec, folder


# ---------------------------------------------------------------------------------------------
# One supervised loop for both steps


@dataclass
class StepRun:
    """A fine-tuning's or distillation's folder as it (re)starts, and where it runs."""
    cfg: StepConfig             # the settings it trains with (on resume: the saved ones, changed as allowed)
    out: Path
    state: dict | None          # the checkpoint to continue from (resume), or None
    stop: StopSignals
    device: torch.device
    dtype: torch.dtype | None   # autocast


@contextmanager
def _step_run(cfg: StepConfig, kind: str, resume: bool, changes: dict | None) -> Iterator[StepRun]:
    """The step's folder, locked while in use (:func:`resume.open_run`), under the stop signals of
    :func:`loop.guarded`; on resume its checkpoint and saved settings, where it runs (device)
    taken from ``cfg`` and the :data:`RESUMABLE` ``changes`` applied (any other is refused by name)."""
    validate_step(cfg)
    if resume and not cfg.out:
        raise ConfigError("--resume needs --out DIR, the run to continue")
    with guarded() as (stop, held):
        out = Path(cfg.out) if cfg.out else fresh_out(kind)
        state = open_run(out, resume, held, kind)
        if state is not None:
            saved = type(cfg)()
            apply_settings(saved, state["config"])
            saved.device = cfg.device
            cfg = apply_changes(saved, changes or {}, out, state["epoch"], resumable=RESUMABLE, epochs_key="epochs",
                                check=validate_step)
        cfg.out = str(out)
        device = resolve_device(cfg.device)
        yield StepRun(cfg, out, state, stop, device, prepare_device(device, cfg.precision, cfg.seed))


@torch.no_grad()
def top1(model: nn.Module, data: ImageDataset, spec: BackboneSpec, device: torch.device, cfg: StepConfig,
         dtype: torch.dtype | None) -> float:
    """Test top-1 (%) of a classifier on the deterministic evaluation view."""
    logits = extract_features(model, data.images, size=spec.image_size, mean=spec.mean,
                              std=spec.std, device=device, batch_size=cfg.eval_batch_size, dtype=dtype)
    labels = torch.from_numpy(np.array(data.labels)).to(device)  # a copy: cached arrays are read-only
    return 100.0 * (logits.argmax(1) == labels).float().mean().item()


def _fit(model: Classifier, batch_loss: Callable[[Tensor, torch.Generator], Tensor], n: int, cfg: StepConfig,
         out: Path, kind: str, spec: BackboneSpec, test: ImageDataset, device: torch.device,
         dtype: torch.dtype | None, state: dict | None, stop: StopSignals, data_id: dict,
         data_changed_ok: bool = False) -> dict:
    """Minimise ``batch_loss(indices, generator)`` over seeded permutations of ``n`` items with a
    warm-up + cosine schedule, in the loop of :mod:`selfsup.loop` (from ``state``'s position on
    resume, refused on data other than ``data_id`` unless ``data_changed_ok``); test top-1 every
    ``eval_every`` epochs; a checkpoint every ``checkpoint_every`` epochs, at the end and on a
    stop signal. Returns the last metrics."""
    if state is not None:
        check_same_data(state, data_id, data_changed_ok)
    batch = min(cfg.batch_size, n)
    # a 1 % subset is a few batches: keep the last partial one unless BN cannot take it (1 item)
    steps_per_epoch = n // batch + (n % batch >= 2)
    schedule = Schedule.create(cfg.epochs, steps_per_epoch, cfg.warmup_epochs, scale_lr(cfg.lr, batch, cfg.lr_scaling))
    optimizer = build_optimizer(cfg.optimizer, model.param_groups(cfg.weight_decay), lr=schedule.peak_lr,
                                momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    generator = torch.Generator(device=device).manual_seed(cfg.seed * 7919 + 1)
    scaler = grad_scaler(device, dtype)
    start = Position() if state is None else restore(
        state, out, model, optimizer, generator, steps_per_epoch, cfg.epochs,
        f"the {kind} classifier its {CHECKPOINT} describes", scaler)
    start_folder(out, yaml.safe_dump({kind: dataclasses.asdict(cfg)}, sort_keys=False), start.epoch)
    log(f"{n} training images, {steps_per_epoch} steps/epoch of {batch}, {cfg.epochs} epochs, "
        f"peak lr {schedule.peak_lr:.4g}")

    def batches(epoch: int, first: int):
        perm = epoch_permutation(n, cfg.seed, epoch).to(device)
        return (perm[i * batch:(i + 1) * batch] for i in range(first, steps_per_epoch))

    def step(step: int, idx: Tensor, lr: float) -> dict[str, Tensor]:
        loss = batch_loss(idx, generator)
        backward_step(optimizer, loss, scaler=scaler)
        return {"loss": loss.detach()}

    def evaluate(epoch: int, last: bool) -> dict:
        due = (epoch + 1) % cfg.eval_every == 0 or last
        return {"test_top1": top1(model, test, spec, device, cfg, dtype)} if due else {}

    def save(epochs: int, step: int, partial: dict | None) -> None:
        save_checkpoint(out, model, spec, config=dataclasses.asdict(cfg), epoch=epochs, kind=kind, data=data_id,
                        **resumable(step, optimizer, [generator.get_state()], partial, scaler))

    if start.epoch >= cfg.epochs:  # a finished run: its result again (the weights are the saved ones)
        log(f"'{out}' has trained all {cfg.epochs} epochs; nothing to resume")
        return {"epoch": cfg.epochs, **evaluate(cfg.epochs - 1, True)}
    resume_command = f"selfsup {kind} --out {out} --resume"
    loop = Loop(out=out, model=model, optimizer=optimizer, schedule=schedule, device=device, batches=batches,
                step=step, save=save, images_per_epoch=min(steps_per_epoch * batch, n),  # what the batches hold
                nonfinite_advice=(f"Resume from that checkpoint with a lower lr ({resume_command} --lr ...), "
                                  f"or start again in a new --out with a lower --lr (now {cfg.lr:g})",
                                  f"Start again in a new --out with a lower --lr (now {cfg.lr:g})"),
                evaluate=evaluate, describe=lambda m: f" test top-1 {m['test_top1']:.2f}%" if "test_top1" in m else "",
                checkpoint_every=cfg.checkpoint_every, stop=stop, resume_command=resume_command)
    return run_epochs(loop, start)


# ---------------------------------------------------------------------------------------------
# Step 2: fine-tuning


def finetune(cfg: FinetuneConfig, *, resume: bool = False, changes: dict | None = None,
             data_changed_ok: bool = False) -> dict:
    """Fine-tune a pre-training run on a labelled subset (SimCLRv2 §2); returns the last metrics.
    ``resume``: continue the run in ``cfg.out`` (``changes``: settings to change, :data:`RESUMABLE`;
    ``data_changed_ok``: on data that changed since its checkpoint)."""
    with _step_run(cfg, "finetune", resume, changes) as run:
        cfg, out, state, device, dtype = run.cfg, run.out, run.state, run.device, run.dtype
        method, spec, source = (_pretrained(cfg) if state is None else
                                (None, run_spec(state, out / CHECKPOINT), "its checkpoint"))
        splits = load_data(cfg.data, image_size=spec.data_image_size)
        if splits.test is None:
            raise ConfigError(f"'{cfg.data}' has no labelled test split to evaluate the fine-tuning on")
        train = splits.train
        spec = dataclasses.replace(spec, num_classes=len(train.classes))
        model = build_classifier(spec, method).to(device, memory_format=torch.channels_last)
        if state is None:
            indices = L.select(cfg.labels, train.labels, len(train.classes), seed=cfg.label_seed)  # (M,)
            L.write_indices(out / L.LABELS_FILE, indices, about=f"--labels {cfg.labels} --label-seed "
                            f"{cfg.label_seed}: {len(indices)} indices into the training split of {cfg.data}")
        else:  # the subset this run drew, as it wrote it
            indices = L.read_indices(out / L.LABELS_FILE, len(train))
        images = torch.from_numpy(np.array(train.images[indices])).to(device)  # (M, H, W, 3) uint8
        targets = torch.from_numpy(train.labels[indices]).to(device)             # (M,)
        augment = Augment(crop_flip_view(spec.image_size, scale=(cfg.crop_scale_min, 1.0),
                                         mean=spec.mean, std=spec.std))
        log(f"fine-tuning {spec.backbone} (width {spec.width:g}) + {cfg.head_layers} head "
            f"layer(s) from {source} on {len(indices)} labelled images ({cfg.labels})")

        def batch_loss(idx: Tensor, generator: torch.Generator) -> Tensor:
            with torch.no_grad():
                x = augment(images[idx], generator)  # (B, 3, S, S)
            with autocast(device, dtype):
                logits = model(x)                     # (B, C)
            return F.cross_entropy(logits.float(), targets[idx])

        metrics = _fit(model, batch_loss, len(indices), cfg, out, "finetune", spec, splits.test, device, dtype,
                       state, run.stop, data_identity(cfg.data, splits.train.images, splits), data_changed_ok)
    return dict(metrics, out=str(out), labelled=len(indices))


def _pretrained(cfg: FinetuneConfig) -> tuple[nn.Module, BackboneSpec, str]:
    """The pre-training run ``cfg.checkpoint``'s network (untrained with ``random_init``), the
    fine-tuned run's spec but its class count, and where the weights came from; sets ``cfg.data``
    to the run's source if unset."""
    folder, state, pre_spec = _run_state(cfg.checkpoint, "--checkpoint")
    if pre_spec.num_classes is not None:
        raise ConfigError(f"'{cfg.checkpoint}' is already a fine-tuned run; pass the pre-training run")
    pre_cfg: Config = from_dict(saved_config(state, cfg.checkpoint, "--checkpoint", "to rebuild its network from"))
    method = build_method(pre_cfg)
    if not cfg.random_init:
        ckpt.load_weights(method, state["model"], folder / CHECKPOINT,
                          f"a {pre_cfg.method} model with a {pre_cfg.model.backbone} (width {pre_cfg.model.width:g}) "
                          f"as its config says")
    cfg.data = cfg.data or pre_spec.data
    spec = dataclasses.replace(pre_spec, method="finetune", pretrain_method=pre_cfg.method,
                               pretrain_config=pre_cfg.to_dict(), head_layers=cfg.head_layers,
                               random_init=cfg.random_init)
    return method, spec, "random initialisation" if cfg.random_init else str(folder)


# ---------------------------------------------------------------------------------------------
# Step 3: distillation


def distill(cfg: StudentConfig, *, resume: bool = False, changes: dict | None = None,
            data_changed_ok: bool = False) -> dict:
    """Distil a fine-tuned teacher into a student on all training images (SimCLRv2 §2 eq. 2).
    ``resume``: continue the run in ``cfg.out`` (``changes``: settings to change, :data:`RESUMABLE`;
    ``data_changed_ok``: on data that changed since its checkpoint)."""
    with _step_run(cfg, "distill", resume, changes) as run:
        cfg, out, state, device, dtype = run.cfg, run.out, run.state, run.device, run.dtype
        teacher, tspec, tfolder = load_classifier(cfg.teacher)
        teacher.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)  # fixed
        cfg.data = cfg.data or tspec.data
        splits = load_data(cfg.data, image_size=tspec.data_image_size, unlabeled=cfg.unlabeled)
        if splits.test is None:
            raise ConfigError(f"'{cfg.data}' has no labelled test split to evaluate the student on")
        if len(splits.train.classes) != tspec.num_classes:
            raise ConfigError(f"the teacher '{cfg.teacher}' predicts {tspec.num_classes} classes, "
                              f"'{cfg.data}' has {len(splits.train.classes)}; distil on the teacher's data")
        all_images, labels = _distill_images(cfg, splits, tfolder)
        vit = is_vit(cfg.student)  # a ViT has no width, and a patch size of its own
        spec = dataclasses.replace(tspec, method="distill", backbone=cfg.student,
                                   width=1.0 if vit else cfg.width or tspec.width,
                                   patch_size=student_patch(cfg, tspec) if vit else tspec.patch_size, head_layers=0, pretrain_config=None, teacher=str(tfolder), random_init=False)
        student = build_classifier(spec).to(device, memory_format=torch.channels_last)
        teacher_top1 = top1(teacher, splits.test, tspec, device, cfg, dtype)
        log(f"distilling the teacher {tfolder} (test top-1 {teacher_top1:.2f}%) into {cfg.student} "
            f"(width {spec.width:g}) on {len(all_images)} images, tau {cfg.temperature:g}, alpha {cfg.alpha:g}")
        batch_loss = _distill_loss(cfg, teacher, student, spec, all_images, labels, device, dtype)
        metrics = _fit(student, batch_loss, len(all_images), cfg, out, "distill", spec, splits.test, device, dtype,
                       state, run.stop, data_identity(cfg.data, all_images, splits), data_changed_ok)
    return dict(metrics, out=str(out), teacher_top1=teacher_top1)


def student_patch(cfg: StudentConfig, tspec: BackboneSpec) -> int:
    """A ViT student's patch side: ``cfg.patch_size``, else its ViT teacher's, else the largest of
    16, 8, 4 and 2 that cuts the teacher's views into at least 8 x 8 whole patches (4 at 32 pixels,
    as the CIFAR ViT recipes), else 1."""
    if cfg.patch_size is not None:
        return cfg.patch_size
    if is_vit(tspec.backbone) and tspec.patch_size is not None:
        return tspec.patch_size
    size = tspec.image_size
    return next((p for p in (16, 8, 4, 2) if size % p == 0 and size // p >= 8), 1)


def _distill_images(cfg: StudentConfig, splits, tfolder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every image the student learns from (STL-10's unlabelled too when asked) and its label:
    the teacher's labelled subset keeps its labels (for the (1 - alpha) CE term), the rest -1."""
    train = splits.train
    labels = np.full(len(train), -1, dtype=np.int64)
    labels_file = tfolder / L.LABELS_FILE
    if labels_file.exists():
        idx = L.read_indices(labels_file, len(train))
        labels[idx] = train.labels[idx]
    elif cfg.alpha < 1:
        raise ConfigError(f"alpha {cfg.alpha:g} < 1 needs the teacher's {L.LABELS_FILE}, missing in '{tfolder}'")
    all_images = np.asarray(train.images)
    if cfg.unlabeled and splits.unlabeled is not None:
        all_images = np.concatenate([all_images, np.asarray(splits.unlabeled.images)])
        labels = np.concatenate([labels, np.full(len(splits.unlabeled), -1, dtype=np.int64)])
    return all_images, labels


def _distill_loss(cfg: StudentConfig, teacher: Classifier, student: Classifier, spec: BackboneSpec,
                  all_images: np.ndarray, labels: np.ndarray, device: torch.device,
                  dtype: torch.dtype | None) -> Callable[[Tensor, torch.Generator], Tensor]:
    """L = alpha * L_distill(student, teacher; tau) + (1 - alpha) * CE on the labelled images."""
    size, mean, std = spec.image_size, spec.mean, spec.std
    images = torch.from_numpy(np.array(all_images)).to(device)  # (N, H, W, 3) uint8
    targets = torch.from_numpy(labels).to(device)                 # (N,), -1 = unlabelled
    augment = Augment(crop_flip_view(size, scale=(cfg.crop_scale_min, 1.0), mean=mean, std=std))
    cached = None
    if not cfg.augment:  # one fixed view per image: the teacher's logits never change
        cached = extract_features(teacher, all_images, size=size, mean=mean, std=std, device=device,
                                  batch_size=cfg.eval_batch_size, dtype=dtype)  # (N, C)

    def batch_loss(idx: Tensor, generator: torch.Generator) -> Tensor:
        with torch.no_grad():
            x = augment(images[idx], generator) if cached is None else eval_view(images[idx], size, mean, std)
            if cached is None:
                with autocast(device, dtype):
                    t = teacher(x).float()        # (B, C)
            else:
                t = cached[idx]                   # (B, C)
        with autocast(device, dtype):
            s = student(x).float()                # (B, C)
        loss = distill_loss(s, t, cfg.temperature) if cfg.alpha > 0 else s.new_zeros(())
        if cfg.alpha < 1:
            y = targets[idx]                      # (B,)
            mask = (y >= 0).float()
            ce = (F.cross_entropy(s, y.clamp_min(0), reduction="none") * mask).sum() / mask.sum().clamp_min(1)
            loss = cfg.alpha * loss + (1 - cfg.alpha) * ce
        return loss
    return batch_loss


# ---------------------------------------------------------------------------------------------
# The whole recipe


def semisup(out: str | Path, *, pretrain_cfg: Config | None, pretrained: str | None,
            finetune_cfg: FinetuneConfig, distill_cfg: StudentConfig, resume: bool = False,
            data_changed_ok: bool = False) -> dict:
    """Pre-train (unless ``pretrained`` names a run) -> fine-tune -> distil, plus the fine-tuning
    of a randomly initialised network on the same labels; writes ``results.json`` / ``.md``.

    The folder is locked while the recipe runs and its settings are in ``semisup.yaml``.
    ``resume``: continue the recipe in ``out`` with those settings (where it runs: the
    ``device`` of ``finetune_cfg``), each step resumed from its checkpoint or started afresh
    (``data_changed_ok``: on data that changed since)."""
    out = Path(out)
    with guarded() as (stop, held):
        stop.phase = "between the recipe's steps: each step's checkpoint so far is kept"
        lock_folder(out, held)
        if resume:
            pretrain_cfg, pretrained, finetune_cfg, distill_cfg = _read_plan(out, finetune_cfg.device)
        elif (out / PLAN).exists() or (out / f"{RESULTS}.json").exists():
            raise TrainingError(f"'{out}' already holds a semisup run ({PLAN}); pass --resume to continue it "
                                f"or choose another --out")
        else:
            if pretrained is None and pretrain_cfg is None:
                raise ConfigError("semisup needs a pre-training config or --pretrained RUN")
            check_recipe(pretrained, finetune_cfg, distill_cfg)  # before the plan: a refusal leaves none
            plan = {"pretrained": pretrained, "pretrain": None if pretrain_cfg is None else pretrain_cfg.to_dict(),
                    "finetune": dataclasses.asdict(finetune_cfg), "distill": dataclasses.asdict(distill_cfg)}
            ckpt.write_text_atomic(yaml.safe_dump(plan, sort_keys=False), out / PLAN)
        try:
            table = _recipe(out, pretrain_cfg, pretrained, finetune_cfg, distill_cfg, resume, data_changed_ok)
        except Interrupted as e:  # a step's stop: the recipe continues where that step does
            raise e.continued_by(f"selfsup semisup --out {out} --resume") from None
    return table


def check_recipe(pretrained: str | None, finetune_cfg: FinetuneConfig, distill_cfg: StudentConfig) -> None:
    """What can be checked of a new recipe before its plan is written and any data is read: the
    labels request, the student's backbone and the pre-trained run, if one is given."""
    if not Path(finetune_cfg.labels).is_file():
        L.parse_request(finetune_cfg.labels)
    if distill_cfg.student not in BACKBONE_NAMES:
        raise ConfigError(f"--student '{distill_cfg.student}' unknown; choose {', '.join(BACKBONE_NAMES)}")
    if pretrained is not None:
        file, state = load_run(pretrained, who="--pretrained", kind="pre-training")
        spec = run_spec(state, file)
        if spec.num_classes is not None:
            raise ConfigError(f"--pretrained '{file}' is a {spec.method} run; pass a "
                              f"pre-training run (selfsup pretrain)")


def _read_plan(out: Path, device: str) -> tuple[Config | None, str | None, FinetuneConfig, StudentConfig]:
    """The settings a semisup run in ``out`` started with (its ``semisup.yaml``), on ``device``."""
    path = out / PLAN
    if not path.is_file():
        raise CheckpointError(f"--resume: no {PLAN} in '{out}' to resume from; start the recipe without --resume")
    try:
        plan = yaml.safe_load(path.read_text())
        ft, ds = FinetuneConfig(), StudentConfig()
        apply_settings(ft, plan["finetune"])
        apply_settings(ds, plan["distill"])
        pre = None if plan["pretrain"] is None else from_dict(plan["pretrain"])
        pretrained = plan["pretrained"]
    except (OSError, ValueError, yaml.YAMLError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"--resume: '{path}' is not the plan a semisup run wrote ({str(e)[:120]})") from None
    ft.device = ds.device = device
    if pre is not None:
        pre.train.device = device
    return pre, pretrained, ft, ds


def _recipe(out: Path, pretrain_cfg: Config | None, pretrained: str | None, finetune_cfg: FinetuneConfig,
            distill_cfg: StudentConfig, resume: bool, data_changed_ok: bool = False) -> dict:
    """The steps of :func:`semisup` (each resumed when ``resume`` and it has a checkpoint; on
    changed data if ``data_changed_ok``) and the table."""
    def again(folder: Path) -> bool:
        return resume and (folder / CHECKPOINT).exists()

    rows: list[dict] = []
    if pretrained is None:
        pretrain_cfg.out = str(out / "pretrain")
        result = pretrain(pretrain_cfg, resume=again(out / "pretrain"), data_changed_ok=data_changed_ok)
        pretrained = pretrain_cfg.out
        knn = result.get("knn_top1")
        if knn is None and again(out / "pretrain"):  # finished before: its last epoch's figure
            knn = read_metrics(out / "pretrain")[-1].get("knn_top1")
        rows.append({"step": "1. pre-train (kNN monitor, all labels)", "run": pretrained, "top1": knn})
    # one labelled subset for every step: drawn once, then passed on as the file it was written to
    labels = finetune_cfg.labels
    steps = [("2. fine-tune", "finetune", False), ("supervised only (random init)", "supervised", True)]
    for name, folder, random_init in steps:
        cfg = dataclasses.replace(finetune_cfg, checkpoint=str(pretrained), out=str(out / folder),
                                  random_init=random_init, labels=labels)
        result = finetune(cfg, resume=again(out / folder), data_changed_ok=data_changed_ok)
        labels = str(Path(result["out"]) / L.LABELS_FILE)
        rows.append({"step": name, "run": result["out"], "top1": result["test_top1"],
                     "labelled": result["labelled"]})
    dcfg = dataclasses.replace(distill_cfg, teacher=str(out / "finetune"), out=str(out / "distill"))
    result = distill(dcfg, resume=again(out / "distill"), data_changed_ok=data_changed_ok)
    rows.append({"step": "3. distil (student)", "run": result["out"], "top1": result["test_top1"]})

    table = {"labels": finetune_cfg.labels, "pretrained": str(pretrained), "head_layers": finetune_cfg.head_layers,
             "distill_temperature": distill_cfg.temperature, "distill_alpha": distill_cfg.alpha,
             "rows": rows}
    lines = [f"Labels: {finetune_cfg.labels}; pre-trained run: {pretrained}", "",
             "| step | test top-1 | run |", "|---|---|---|"]
    lines += [f"| {r['step']} | {_percent(r['top1'])} | {r['run']} |" for r in rows]
    ckpt.write_text_atomic(json.dumps(table, indent=1) + "\n", out / f"{RESULTS}.json")
    ckpt.write_text_atomic("\n".join(lines) + "\n", out / f"{RESULTS}.md")
    print("\n".join(lines), flush=True)
    return table


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} %"
