"""Typed run configuration, presets, YAML files and ``--set key=value`` overrides.

A run is described by one :class:`Config`. It is resolved in this order: defaults, then the
method's own recipe (:data:`METHOD_DEFAULTS`, so ``--method moco`` alone trains like MoCo), then
a preset, then a YAML file, then ``--set`` overrides, then the explicit CLI flags; the result is
written to ``<out>/config.yaml`` so every run can be repeated exactly.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError  # noqa: F401 (defined there; imported from here too)
from .losses import memory_collapse_size


@dataclass
class DataConfig:
    source: str = "digits"          # 'digits', 'cifar10', 'cifar100', 'stl10', a folder or an archive
    image_size: int | None = None   # resize every image to this (None: the source's own size; digits: 32)
    cache_dir: str | None = None    # decoded-array cache (default $SELFSUP_CACHE or ~/.cache/selfsup)
    unlabeled: bool = False         # STL-10: pre-train on train + the 100k unlabelled images
    skip_corrupt: bool = False      # skip (and count) undecodable images instead of failing
    device_budget_gb: float = 8.0   # keep the uint8 dataset on the GPU when it is smaller than this
    stream: bool = False            # decode from an image folder / .tar shards every epoch (selfsup.stream)
    workers: int | None = None      # stream: decoding processes per rank (None: cores / ranks, at most 8)


@dataclass
class ModelConfig:
    backbone: str = "resnet18"
    width: float = 1.0              # multiplies every channel width (0.25 -> a 16-channel ResNet)
    cifar_stem: bool = True         # 3x3 stride-1 first conv and no max-pool (SimCLR B.9)
    zero_init_residual: bool = False  # last BN γ of each residual branch starts at 0 (SimSiam's code)
    proj_layers: int = 2            # SimCLR: 2, SimCLRv2: 3
    proj_hidden: int | None = None  # None: the backbone's feature width
    proj_dim: int = 128
    sync_bn: bool | None = None     # global BN when distributed (None: the method's default)
    binary_weights: bool = True     # binary backbones: 1-bit weights; False = real weights (S2-BNN step one)
    init_from: str | None = None    # start the backbone from this run folder / checkpoint (S2-BNN step two)


@dataclass
class AugConfig:
    strength: float = 1.0           # colour-distortion strength s (SimCLR appendix A)
    blur: bool = False              # Gaussian blur, p=0.5 (ImageNet recipe; off at 32x32)
    scale_min: float = 0.08         # smallest crop area fraction
    size: int | None = None         # output size (None: the data's image size)


@dataclass
class OptimConfig:
    name: str = "lars"              # lars | sgd | adamw
    lr: float = 1.0                 # base learning rate, scaled by lr_scaling
    lr_scaling: str = "linear"      # linear: lr*B/256, sqrt: lr*sqrt(B), none
    momentum: float = 0.9
    weight_decay: float = 1e-6
    warmup_epochs: float = 10.0
    final_lr: float = 0.0           # end of the cosine decay, as a fraction of the peak lr
    exclude_bias_and_norm: bool = True  # no weight decay / LARS adaptation on biases and norms
    clip_grad: float = 0.0          # clip the gradient norm to this before each step (DINO: 3.0); 0 = off
    clip_grad_mode: str | None = None  # global (one norm) | per_param (each parameter's, DINO's clip_gradients);
                                    # None: the method's (per_param for DINO, global otherwise)


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 512           # global batch (split over ranks when distributed)
    seed: int = 0
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    precision: str = "auto"         # auto (bf16 on CUDA, and on CPUs with AMX; else fp32) | bf16 | fp32
    channels_last: bool = True
    compile: bool = False           # torch.compile the model (pays off on GPUs for long runs)
    checkpoint_every: int = 10      # epochs between checkpoints (and always at the end)
    log_every: int = 20             # steps between progress-bar updates (each one syncs the host)
    max_minutes: float | None = None  # stop at the first epoch end after this much training time
    progress: bool = True
    tensorboard: bool = False       # also log the epoch metrics to <out>/tensorboard (pip install tensorboard)


@dataclass
class EvalConfig:
    knn_every: int = 1              # epochs between kNN monitor runs (0: only at the end)
    knn_k: int = 200
    knn_t: float = 0.1
    batch_size: int = 512           # feature extraction batch
    knn_features: str = "backbone"  # backbone: pooled features; head: the method's projection output (MoCo demo)
    online_linear: bool = True      # solo-learn's online linear probe (labelled in-memory sources; logged as linear_top1)
    online_linear_lr: float = 0.1   # its SGD lr (solo-learn classifier_lr), times the run's lr schedule
    # offline linear evaluation (selfsup eval linear): its protocols live in evaluate.LINEAR_PROTOCOLS


@dataclass
class SimCLRConfig:
    temperature: float = 0.5        # τ of the contrastive loss: SimCLR's CIFAR-10 command and App. B.9 (its
                                    # ImageNet flag: 0.1); also distill's contrastive term (S2-BNN ablation)


@dataclass
class MoCoConfig:
    temperature: float = 0.2        # τ of InfoNCE: v2 0.2 (v1: 0.07, CIFAR demo: 0.1)
    queue_size: int = 65536         # K negatives; a multiple of the keys added per step (global batch, x2 if symmetric)
    momentum: float = 0.999         # key encoder EMA m (CIFAR demo: 0.99)
    momentum_cosine: bool = False   # m rises from `momentum` to 1 over training on a cosine (BYOL's schedule)
    symmetric: bool = False         # both views are queries; the loss is the sum of both directions (CIFAR demo)
    shuffle_bn_groups: int = 8      # one process: BN over this many groups of the shuffled batch (split BN), as on
                                    # that many devices; 1 = plain BN. Distributed runs shuffle over ranks instead
    mlp: bool = True                # v2 head Linear-ReLU-Linear, no BN; False: v1's single linear layer
    aug_plus: bool = True           # v2 augmentation (jitter p=0.8, blur per aug.blur); False: v1 (jitter always, hue 0.4)


@dataclass
class MemoryConfig:
    size: int = 0                   # SimCLRv2's memory of momentum-encoder negatives (paper: 65536); 0 = off
    momentum: float = 0.999         # EMA of the memory encoder; use a low simclr.temperature (paper: 0.1) with a
                                    # memory: a large memory at a high one collapses (validate refuses it)


@dataclass
class MultiCropConfig:
    global_crops: int = 2           # views at full resolution (aug.size), crop scale (aug.scale_min, 1)
    local_crops: int = 0            # extra low-resolution views (SwAV: 6); SimCLR, BYOL, SimSiam and SwAV take them
    local_size: int | None = None   # None: 96/224 of the global size, as SwAV's 96-pixel crops of 224
    local_scale_min: float = 0.05   # SwAV's local crops cover 5-14% of the image
    local_scale_max: float = 0.14


@dataclass
class BYOLConfig:
    momentum: float = 0.99          # target EMA τ_base, raised to 1 on a cosine over all steps (BYOL: 0.99
                                    # for 100-300 epochs, 0.996 for 1000); the projector is model.proj_hidden/proj_dim
    pred_hidden: int | None = None  # predictor hidden width (None: model.proj_hidden, BYOL's 4096)
    per_view_bn: bool = False       # true: the networks run once per view, BN normalising each view alone
                                    # (BYOL's code); false: one pass over all views of a size, which did
                                    # better in the measured CIFAR-10 run (docs/results.md, issue 13)


@dataclass
class SimSiamConfig:
    pred_hidden: int | None = None  # predictor bottleneck (None: model.proj_dim // 4, SimSiam's 2048 -> 512)
    fix_pred_lr: bool = True        # the predictor keeps the peak lr while the rest decays (--fix-pred-lr)


@dataclass
class SwAVConfig:
    temperature: float = 0.1        # τ of the swapped prediction (SwAV's code)
    prototypes: int = 3000          # K; the embedding is model.proj_dim (128), the head hidden model.proj_hidden
    epsilon: float = 0.05           # Sinkhorn's entropy ε; lower it (0.03) if the loss sticks at ln K
    sinkhorn_iterations: int = 3
    freeze_prototypes_epochs: float = 1.0  # prototype gradients dropped this long (SwAV: 313 steps at batch 4096)
    freeze_prototypes_steps: int | None = None  # exact step count instead (freeze_prototypes_niters); wins if set
    queue_length: int = 0           # past global-crop embeddings joined to Sinkhorn's input; 0 = off;
                                    # a multiple of the global batch (SwAV: 3840 at batch 256)
    queue_start_epoch: int = 15     # the queue starts filling at this epoch; used once full


@dataclass
class DINOConfig:
    out_dim: int = 65536            # K, outputs of the weight-normalised last layer (CIFAR: 4096)
    bottleneck_dim: int = 256       # the L2-normalised bottleneck; the MLP's hidden width is model.proj_hidden
    momentum: float = 0.996         # teacher EMA, raised to 1 on a cosine (use 0.9995 with batch 256)
    student_temp: float = 0.1
    teacher_temp: float = 0.04      # after the warm-up; raise to 0.07 if the loss stalls
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 0.0  # linear warm-up of the teacher temperature (paper: 30)
    center_momentum: float = 0.9
    freeze_last_layer_epochs: float = 1.0  # the last layer gets no gradient this long
    norm_last_layer: bool = True    # weight_g fixed at 1 (the last layer's rows are unit vectors)
    head_bn: bool = False           # BN after the head's hidden Linear layers (DINO's --use_bn_in_head)


@dataclass
class DistillConfig:
    teacher: str | None = None      # run folder or checkpoint.pt of any selfsup pre-training (--teacher)
    mode: str = "s2bnn"             # s2bnn: softmax over embedding dims; seed: over [own embedding, queue]
    temperature: float = 0.2        # student (and, s2bnn, teacher) temperature
    teacher_temp: float = 1e-4      # seed: teacher temperature (SEED's --distill-t)
    queue_size: int = 65536         # seed: teacher embeddings kept; a multiple of the global batch
    contrastive_weight: float = 0.0  # > 0 adds the student's own nt_xent on two views (S2-BNN ablation)


@dataclass
class Config:
    method: str = "simclr"
    loss: str = "nt_xent"           # nt_xent | dcl | dclw (MoCo: info_nce = nt_xent, its InfoNCE); the temperature
                                    # is the method's own: simclr.temperature, moco.temperature, swav.temperature
    dclw_sigma: float = 0.5         # DCLW's weighting temperature σ (loss=dclw)
    out: str | None = None
    preset: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    simclr: SimCLRConfig = field(default_factory=SimCLRConfig)
    moco: MoCoConfig = field(default_factory=MoCoConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    multicrop: MultiCropConfig = field(default_factory=MultiCropConfig)
    byol: BYOLConfig = field(default_factory=BYOLConfig)
    simsiam: SimSiamConfig = field(default_factory=SimSiamConfig)
    swav: SwAVConfig = field(default_factory=SwAVConfig)
    dino: DINOConfig = field(default_factory=DINOConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Each method's own recipe, applied between the defaults and a preset: ``--method M`` alone trains
# with M's official settings. The defaults themselves are SimCLR's (LARS lr 1.0 x B/256, the CIFAR
# command's; wd 1e-6, the TF2 flags') at CIFAR scale (CIFAR stem, no blur, as SimCLR B.9, SimSiam
# App. D and MoCo's CIFAR demo), which every recipe keeps; a recipe sets only what its method's code
# does differently. Method-only keys (moco.*, swav.*, ...) default to the official values in their
# own sections; a preset or a file overrides any of it.

METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "simclr": {  # tf2/resnet.py: init_zero=True on the last BN of every block
        "model": {"zero_init_residual": True},
    },
    "moco": {  # main_moco.py v2 (--mlp --aug-plus --cos): SGD lr 0.03 x B/256, wd 1e-4 on everything
        "aug": {"strength": 0.5, "scale_min": 0.2},
        "optim": {"name": "sgd", "lr": 0.03, "lr_scaling": "linear", "momentum": 0.9, "weight_decay": 1e-4,
                  "warmup_epochs": 0, "exclude_bias_and_norm": False},
    },
    "byol": {  # configs/byol.py at 100 epochs (the default train.epochs): lr 0.45 x B/256, wd 1e-6, τ 0.99
        "model": {"proj_hidden": 4096, "proj_dim": 256},
        "optim": {"name": "lars", "lr": 0.45, "lr_scaling": "linear", "weight_decay": 1e-6,
                  "warmup_epochs": 10, "exclude_bias_and_norm": True},
    },
    "simsiam": {  # main_simsiam.py: SGD lr 0.05 x B/256 at 512, wd 1e-4 on everything, 3-layer 2048-d head
        "model": {"proj_layers": 3, "proj_dim": 2048, "zero_init_residual": True},
        "aug": {"strength": 0.5, "scale_min": 0.2},
        "optim": {"name": "sgd", "lr": 0.05, "lr_scaling": "linear", "momentum": 0.9, "weight_decay": 1e-4,
                  "warmup_epochs": 0, "exclude_bias_and_norm": False},
    },
    "swav": {  # the batch-256 scripts: LARC lr 0.6 without exclusions, wd 1e-6, cosine to 0.0006, 2 + 6 crops
        "model": {"proj_hidden": 2048, "proj_dim": 128},
        "aug": {"strength": 1.0, "scale_min": 0.14},
        "optim": {"name": "lars", "lr": 0.6, "lr_scaling": "linear", "weight_decay": 1e-6, "warmup_epochs": 0,
                  "final_lr": 0.001, "exclude_bias_and_norm": False},
        "multicrop": {"global_crops": 2, "local_crops": 6, "local_scale_min": 0.05, "local_scale_max": 0.14},
    },
    "dino": {  # the ResNet-50 command: SGD lr 0.03 x B/256, wd 1e-4, 10 warm-up epochs, clip 3, 2 + 8 crops
        "model": {"proj_layers": 3, "proj_hidden": 2048},
        "aug": {"scale_min": 0.14},
        "optim": {"name": "sgd", "lr": 0.03, "lr_scaling": "linear", "momentum": 0.9, "weight_decay": 1e-4,
                  "warmup_epochs": 10, "exclude_bias_and_norm": True, "clip_grad": 3.0},
        "multicrop": {"global_crops": 2, "local_crops": 8, "local_scale_min": 0.05, "local_scale_max": 0.14},
    },
}

#: Where a config written before the per-method temperatures keeps its top-level ``temperature``:
#: the key of the method that read it (distill's contrastive term is SimCLR's NT-Xent).
LEGACY_TEMPERATURE = {"simclr": "simclr", "distill": "simclr", "moco": "moco", "swav": "swav"}


def upgrade(data: dict[str, Any], method: str) -> dict[str, Any]:
    """A config mapping written before the per-method settings, in today's keys, unchanged otherwise.

    The rule, for a mapping with a top-level ``temperature`` (every config.yaml before then had
    one; ``--set temperature=T`` too): the value becomes the temperature of ``method``, the method
    that read it (see :data:`LEGACY_TEMPERATURE`; BYOL, SimSiam and DINO never read it and it is
    dropped). A whole saved config (it also has a ``byol`` section) without ``byol.per_view_bn``
    gets false, the joint pass those runs trained with. Every other key kept its name and meaning.
    """
    if "temperature" not in data:
        return data
    data = dict(data)
    temperature = data.pop("temperature")
    section = LEGACY_TEMPERATURE.get(method)
    if section and isinstance(data.get(section) or {}, dict):  # else _apply names the bad section
        data[section] = {"temperature": temperature, **(data.get(section) or {})}
    if isinstance(data.get("byol"), dict):
        data["byol"] = {"per_view_bn": False, **data["byol"]}
    return data


# ---------------------------------------------------------------------------------------------
# Presets: each states the recipe it follows.

#: model.init_from of the second step of a two-step preset until ``--set model.init_from=RUN``.
INIT_PLACEHOLDER = "<step one: pass --set model.init_from=RUN_DIR>"

#: data.source of the ImageNet presets until ``--data PATH`` replaces it (validate names it).
IMAGENET_PLACEHOLDER = "<imagenet: pass --data PATH>"

# Shared by the ImageNet presets: ResNet-50 with the standard stem, 224-pixel crops.
_IMAGENET_DATA = {"source": IMAGENET_PLACEHOLDER, "image_size": 256}
_IMAGENET_MODEL = {"backbone": "resnet50", "width": 1.0, "cifar_stem": False}
_IMAGENET_EVAL = {"knn_every": 10, "knn_k": 200, "knn_t": 0.1}

PRESETS: dict[str, dict[str, Any]] = {
    "digits-simclr": {
        "_about": "The default main job: SimCLR on the bundled 8x8 digits resized to 16x16, a "
                  "narrow CIFAR-stem ResNet-18 (zero-initialised residual branches, as SimCLR's code), "
                  "a few CPU minutes. Not a paper recipe: temperature 0.1, chosen from a sweep "
                  "(docs/results.md, issue 13 section 4) where SimCLR's CIFAR 0.5 gained least.",
        "method": "simclr", "simclr": {"temperature": 0.1},
        "data": {"source": "digits", "image_size": 16},
        "model": {"backbone": "resnet18", "width": 0.25, "cifar_stem": True},
        "aug": {"strength": 0.5, "blur": False, "scale_min": 0.2},
        "optim": {"name": "lars", "lr": 1.0, "weight_decay": 1e-6, "warmup_epochs": 5},
        "train": {"epochs": 60, "batch_size": 128, "checkpoint_every": 10},
        "eval": {"knn_every": 10, "knn_k": 20},
    },
    "cifar10-simclr": {
        "_about": "SimCLR's official CIFAR-10 README command: ResNet-18 CIFAR stem, batch 512, "
                  "LARS lr 1.0 x B/256, wd 1e-4, temperature 0.5, colour strength 0.5, no blur, "
                  "10 warm-up epochs then cosine, 1000 epochs (REFERENCE.md section 1).",
        "method": "simclr", "simclr": {"temperature": 0.5},
        "data": {"source": "cifar10"},
        "model": {"backbone": "resnet18", "width": 1.0, "cifar_stem": True, "proj_layers": 2},
        "aug": {"strength": 0.5, "blur": False},
        "optim": {"name": "lars", "lr": 1.0, "lr_scaling": "linear", "weight_decay": 1e-4,
                  "warmup_epochs": 10},
        "train": {"epochs": 1000, "batch_size": 512, "checkpoint_every": 10},
        "eval": {"knn_every": 10},
    },
    "cifar10-simclr-small": {
        "_base": "cifar10-simclr",
        "_about": "cifar10-simclr shrunk to about 10 minutes on a 2-core CPU: a width-0.25 "
                  "(16-channel) ResNet-18 at 32x32, batch 256, 6 epochs with 1 warm-up epoch; "
                  "otherwise the same recipe.",
        "model": {"width": 0.25},
        "optim": {"warmup_epochs": 1},
        "train": {"epochs": 6, "batch_size": 256, "checkpoint_every": 1},
        "eval": {"knn_every": 3},
    },
    "cifar10-simclr-dcl": {
        "_base": "cifar10-simclr",
        "_about": "cifar10-simclr with the DCL loss (positive removed from the denominator) at the "
                  "reference implementations' temperature 0.1, 200 epochs as in lightly's CIFAR-10 "
                  "benchmark, where DCL reaches about SimCLR's kNN (REFERENCE.md section 7).",
        "loss": "dcl", "simclr": {"temperature": 0.1},
        "train": {"epochs": 200},
    },
    "cifar10-simclr-dclw": {
        "_base": "cifar10-simclr-dcl",
        "_about": "cifar10-simclr-dcl with DCLW: each positive weighted by 2 - N softmax(<z1,z2>/sigma), "
                  "sigma 0.5 (REFERENCE.md section 7).",
        "loss": "dclw", "dclw_sigma": 0.5,
    },
    "cifar10-simclr-v2": {
        "_base": "cifar10-simclr",
        "_about": "SimCLRv2 pre-training on CIFAR-10: cifar10-simclr with the 3-layer projection head "
                  "and a memory of momentum-encoder negatives with the paper's EMA 0.999 and T 0.1 "
                  "(REFERENCE.md section 2); the paper's 64K memory is sized for ImageNet, here 4096 "
                  "keys (MoCo's CIFAR-10 K). With the memory, SimCLR's CIFAR T 0.5 collapsed the "
                  "embedding in short CPU runs. The public SimCLR code has no memory.",
        "simclr": {"temperature": 0.1},
        "model": {"proj_layers": 3},
        "memory": {"size": 4096, "momentum": 0.999},
    },
    "cifar10-simclr-v2-small": {
        "_base": "cifar10-simclr-small",
        "_about": "cifar10-simclr-v2 shrunk for a CPU like cifar10-simclr-small: width 0.25, batch 256, "
                  "15 epochs; memory 4096, EMA 0.999, T 0.1.",
        "simclr": {"temperature": 0.1},
        "model": {"proj_layers": 3},
        "train": {"epochs": 15},
        "eval": {"knn_every": 5},
        "memory": {"size": 4096, "momentum": 0.999},
    },
    "cifar10-moco-v2": {
        "_about": "MoCo's official CIFAR-10 demo (REFERENCE.md section 3): ResNet-18 CIFAR stem, "
                  "linear fc -> 128 head as the demo (moco.mlp=true gives v2's MLP), K 4096, m 0.99, "
                  "T 0.1, SGD lr 0.06 at batch 512 (0.03 x B/256), momentum 0.9, wd 5e-4 on every "
                  "parameter, cosine without warm-up, split BN in 8 groups, asymmetric loss "
                  "(moco.symmetric=true for the demo's symmetric variant), jitter (0.4, 0.4, 0.4, 0.1) "
                  "p=0.8, grayscale 0.2, no blur, 200 epochs, kNN k=200 T=0.1. The demo reports kNN "
                  "82.6% at 200 epochs (symmetric 85.3%).",
        "method": "moco", "loss": "info_nce",
        "data": {"source": "cifar10"},
        "model": {"backbone": "resnet18", "width": 1.0, "cifar_stem": True, "proj_dim": 128},
        "aug": {"strength": 0.5, "blur": False, "scale_min": 0.08},
        "optim": {"name": "sgd", "lr": 0.03, "lr_scaling": "linear", "momentum": 0.9,
                  "weight_decay": 5e-4, "warmup_epochs": 0, "exclude_bias_and_norm": False},
        "train": {"epochs": 200, "batch_size": 512, "checkpoint_every": 10},
        "eval": {"knn_every": 10, "knn_k": 200, "knn_t": 0.1},
        "moco": {"temperature": 0.1, "queue_size": 4096, "momentum": 0.99, "momentum_cosine": False, "symmetric": False,
                 "shuffle_bn_groups": 8, "mlp": False, "aug_plus": True},
    },
    "cifar10-moco-v2-small": {
        "_about": "cifar10-moco-v2 shrunk for a CPU: a width-0.25 (16-channel) ResNet-18, batch 256 "
                  "(lr 0.03 x B/256), 15 epochs; otherwise the demo's recipe (K 4096, m 0.99, T 0.1, "
                  "split BN in 8 groups).",
        "method": "moco", "loss": "info_nce",
        "data": {"source": "cifar10"},
        "model": {"backbone": "resnet18", "width": 0.25, "cifar_stem": True, "proj_dim": 128},
        "aug": {"strength": 0.5, "blur": False, "scale_min": 0.08},
        "optim": {"name": "sgd", "lr": 0.03, "lr_scaling": "linear", "momentum": 0.9,
                  "weight_decay": 5e-4, "warmup_epochs": 0, "exclude_bias_and_norm": False},
        "train": {"epochs": 15, "batch_size": 256, "checkpoint_every": 1},
        "eval": {"knn_every": 5, "knn_k": 200, "knn_t": 0.1},
        "moco": {"temperature": 0.1, "queue_size": 4096, "momentum": 0.99, "symmetric": False, "shuffle_bn_groups": 8,
                 "mlp": False, "aug_plus": True},
    },
    "imagenet-simclr": {
        "_about": "SimCLR's ImageNet recipe (paper section 2.3, REFERENCE.md section 1): ResNet-50, "
                  "batch 4096, LARS lr 0.3 x B/256 = 4.8, wd 1e-6, 10 warm-up epochs then cosine, "
                  "100 epochs, T 0.1, 2-layer head -> 128, colour strength 1.0 with blur, global BN. "
                  "Needs --data PATH (an ImageNet image folder or archive).",
        "method": "simclr", "loss": "nt_xent", "simclr": {"temperature": 0.1},
        "data": _IMAGENET_DATA, "model": {**_IMAGENET_MODEL, "proj_layers": 2},
        "aug": {"strength": 1.0, "blur": True, "scale_min": 0.08, "size": 224},
        "optim": {"name": "lars", "lr": 0.3, "lr_scaling": "linear", "weight_decay": 1e-6,
                  "warmup_epochs": 10},
        "train": {"epochs": 100, "batch_size": 4096, "checkpoint_every": 5},
        "eval": _IMAGENET_EVAL,
    },
    "imagenet-simclr-v2": {
        "_about": "SimCLRv2 pre-training (REFERENCE.md section 2): ResNet-50 (1x, no SK), 3-layer head, "
                  "batch 4096, LARS lr 0.1 x sqrt(B) = 6.4, wd 1e-4, 5 warm-up epochs, T 0.1, 800 "
                  "epochs, global BN, memory of 65536 momentum-encoder keys with EMA 0.999, SimCLR's "
                  "augmentation. lr, warm-up, wd and T are marked unverified in REFERENCE.md. Needs "
                  "--data PATH.",
        "method": "simclr", "loss": "nt_xent", "simclr": {"temperature": 0.1},
        "data": _IMAGENET_DATA, "model": {**_IMAGENET_MODEL, "proj_layers": 3},
        "aug": {"strength": 1.0, "blur": True, "scale_min": 0.08, "size": 224},
        "optim": {"name": "lars", "lr": 0.1, "lr_scaling": "sqrt", "weight_decay": 1e-4,
                  "warmup_epochs": 5},
        "train": {"epochs": 800, "batch_size": 4096, "checkpoint_every": 5},
        "eval": _IMAGENET_EVAL,
        "memory": {"size": 65536, "momentum": 0.999},
    },
    "imagenet-simclr-dcl": {
        "_about": "SimCLR with DCL at the DCL paper's headline setting, batch 256 and 200 epochs "
                  "(68.2% linear, REFERENCE.md section 7); T 0.1 as the reference implementations; "
                  "optimiser from SimCLR's README for small batches: LARS lr 0.075 x sqrt(B) = 1.2, "
                  "wd 1e-6, 10 warm-up epochs (the DCL paper's own optimiser settings are not in "
                  "REFERENCE.md). ResNet-50, SimCLR's augmentation with blur. Needs --data PATH.",
        "method": "simclr", "loss": "dcl", "simclr": {"temperature": 0.1},
        "data": _IMAGENET_DATA, "model": {**_IMAGENET_MODEL, "proj_layers": 2},
        "aug": {"strength": 1.0, "blur": True, "scale_min": 0.08, "size": 224},
        "optim": {"name": "lars", "lr": 0.075, "lr_scaling": "sqrt", "weight_decay": 1e-6,
                  "warmup_epochs": 10},
        "train": {"epochs": 200, "batch_size": 256, "checkpoint_every": 5},
        "eval": _IMAGENET_EVAL,
    },
    "imagenet-moco-v1": {
        "_about": "MoCo v1 (REFERENCE.md section 3): ResNet-50, linear head -> 128, K 65536, m 0.999, "
                  "T 0.07, SGD lr 0.03 x B/256 at batch 256, momentum 0.9, wd 1e-4 on every parameter, "
                  "200 epochs, v1 augmentation (crop scale 0.2-1, grayscale 0.2, jitter 0.4 on every "
                  "image, no blur), Shuffle BN (8 groups on one process, across ranks otherwise). The "
                  "original decays the lr x0.1 at epochs 120 and 160; the trainer's schedule is cosine. "
                  "Needs --data PATH.",
        "method": "moco", "loss": "info_nce",
        "data": _IMAGENET_DATA, "model": {**_IMAGENET_MODEL, "proj_dim": 128},
        "aug": {"strength": 0.5, "blur": False, "scale_min": 0.2, "size": 224},
        "optim": {"name": "sgd", "lr": 0.03, "lr_scaling": "linear", "momentum": 0.9,
                  "weight_decay": 1e-4, "warmup_epochs": 0, "exclude_bias_and_norm": False},
        "train": {"epochs": 200, "batch_size": 256, "checkpoint_every": 5},
        "eval": _IMAGENET_EVAL,
        "moco": {"temperature": 0.07, "queue_size": 65536, "momentum": 0.999, "symmetric": False, "shuffle_bn_groups": 8,
                 "mlp": False, "aug_plus": False},
    },
    "imagenet-moco-v2": {
        "_base": "imagenet-moco-v1",
        "_about": "MoCo v2 (REFERENCE.md section 3): imagenet-moco-v1 with the MLP head (2048-2048-128, "
                  "no BN), T 0.2, aug+ (jitter (0.4, 0.4, 0.4, 0.1) p=0.8, grayscale 0.2, blur p=0.5) "
                  "and the cosine lr, 200 epochs (67.5% linear). Needs --data PATH.",
        "aug": {"blur": True},
        "moco": {"temperature": 0.2, "mlp": True, "aug_plus": True},
    },
    "cifar10-byol": {
        "_about": "BYOL on CIFAR-10. The paper has no CIFAR recipe; this follows solo-learn's "
                  "cifar/byol.yaml as quoted in REFERENCE.md section 5 (92.6% after 1000 epochs): "
                  "ResNet-18 CIFAR stem, projector and predictor 4096 -> 256, target EMA 0.99 -> 1 "
                  "on a cosine, LARS lr 1.0 x B/256 at batch 256 with bias and BN excluded, wd 1e-5, "
                  "10 warm-up epochs, BYOL's asymmetric views (jitter (0.4, 0.4, 0.2, 0.1), "
                  "solarise p=0.2 on view 2) without blur at 32x32, 1000 epochs.",
        "method": "byol",
        "data": {"source": "cifar10"},
        "model": {"backbone": "resnet18", "width": 1.0, "cifar_stem": True, "proj_hidden": 4096,
                  "proj_dim": 256},
        "aug": {"blur": False, "scale_min": 0.08},
        "optim": {"name": "lars", "lr": 1.0, "lr_scaling": "linear", "weight_decay": 1e-5,
                  "warmup_epochs": 10, "exclude_bias_and_norm": True},
        "train": {"epochs": 1000, "batch_size": 256, "checkpoint_every": 10},
        "eval": {"knn_every": 10},
        "byol": {"momentum": 0.99, "pred_hidden": 4096},
    },
    "cifar10-simsiam": {
        "_about": "SimSiam's CIFAR-10 recipe (paper appendix D, REFERENCE.md section 6): ResNet-18 "
                  "CIFAR stem, 2-layer projector with 2048-d output (non-affine BN), predictor "
                  "2048 -> 512 -> 2048 with its lr fixed, SGD lr 0.03 x B/256 at batch 512, "
                  "momentum 0.9, wd 5e-4 on every parameter, cosine without warm-up, MoCo v2's "
                  "augmentation (crop 0.2-1, jitter (0.4, 0.4, 0.4, 0.1)) without blur, 800 epochs.",
        "method": "simsiam",
        "data": {"source": "cifar10"},
        "model": {"backbone": "resnet18", "width": 1.0, "cifar_stem": True, "proj_layers": 2,
                  "proj_dim": 2048, "zero_init_residual": True},
        "aug": {"strength": 0.5, "blur": False, "scale_min": 0.2},
        "optim": {"name": "sgd", "lr": 0.03, "lr_scaling": "linear", "momentum": 0.9,
                  "weight_decay": 5e-4, "warmup_epochs": 0, "exclude_bias_and_norm": False},
        "train": {"epochs": 800, "batch_size": 512, "checkpoint_every": 10},
        "eval": {"knn_every": 10},
        "simsiam": {"pred_hidden": 512, "fix_pred_lr": True},
    },
    "cifar10-swav": {
        "_about": "SwAV on CIFAR-10 with multi-crop: 2 x 32 crops (scale 0.14-1) + 6 x 16 crops "
                  "(scale 0.05-0.14), SwAV's ratio of 96 to 224 pixels. SwAV has no official CIFAR "
                  "recipe; the rest follows solo-learn's cifar/swav.yaml as quoted in REFERENCE.md "
                  "section 4 (89.2% after 1000 epochs): ResNet-18, head 2048 -> 128, 3000 prototypes "
                  "frozen for 2 epochs (390 steps at batch 256), T 0.1, eps 0.05, 3 Sinkhorn "
                  "iterations, queue 3840 from epoch 50, LARS lr 0.6 x B/256 without exclusions, "
                  "wd 1e-6, cosine to 0.1% of the peak, colour strength 1.0 without blur.",
        "method": "swav",
        "data": {"source": "cifar10"},
        "model": {"backbone": "resnet18", "width": 1.0, "cifar_stem": True, "proj_hidden": 2048,
                  "proj_dim": 128},
        "aug": {"strength": 1.0, "blur": False, "scale_min": 0.14},
        "optim": {"name": "lars", "lr": 0.6, "lr_scaling": "linear", "weight_decay": 1e-6,
                  "warmup_epochs": 0, "final_lr": 0.001, "exclude_bias_and_norm": False},
        "train": {"epochs": 1000, "batch_size": 256, "checkpoint_every": 10},
        "eval": {"knn_every": 10},
        "multicrop": {"global_crops": 2, "local_crops": 6, "local_size": 16,
                      "local_scale_min": 0.05, "local_scale_max": 0.14},
        "swav": {"temperature": 0.1, "prototypes": 3000, "epsilon": 0.05, "sinkhorn_iterations": 3,
                 "freeze_prototypes_epochs": 2, "queue_length": 3840, "queue_start_epoch": 50},
    },
    "imagenet-byol": {
        "_about": "BYOL's ImageNet recipe (REFERENCE.md section 5, configs/byol.py at 1000 epochs; "
                  "74.3% linear): ResNet-50, batch 4096, LARS lr 0.2 x B/256 = 3.2 with bias and "
                  "norm excluded, wd 1.5e-6, 10 warm-up epochs then cosine, projector and predictor "
                  "4096 -> 256, target EMA 0.996 -> 1 on a cosine, asymmetric views with blur "
                  "(p 1.0 / 0.1) and solarisation (0 / 0.2), global BN. Needs --data PATH.",
        "method": "byol",
        "data": _IMAGENET_DATA, "model": {**_IMAGENET_MODEL, "proj_hidden": 4096, "proj_dim": 256},
        "aug": {"blur": True, "scale_min": 0.08, "size": 224},
        "optim": {"name": "lars", "lr": 0.2, "lr_scaling": "linear", "weight_decay": 1.5e-6,
                  "warmup_epochs": 10, "exclude_bias_and_norm": True},
        "train": {"epochs": 1000, "batch_size": 4096, "checkpoint_every": 5},
        "eval": _IMAGENET_EVAL,
        "byol": {"momentum": 0.996, "pred_hidden": 4096},
    },
    "imagenet-simsiam": {
        "_about": "SimSiam's ImageNet recipe (REFERENCE.md section 6; 68.1% linear at 100 epochs): "
                  "ResNet-50, 3-layer projector 2048-d with a non-affine output BN, predictor "
                  "2048 -> 512 -> 2048 with a fixed lr, SGD lr 0.05 x B/256 at batch 512, momentum "
                  "0.9, wd 1e-4 on every parameter including BN, cosine without warm-up, MoCo v2's "
                  "augmentation with blur, global BN, 100 epochs. Needs --data PATH.",
        "method": "simsiam",
        "data": _IMAGENET_DATA, "model": {**_IMAGENET_MODEL, "proj_layers": 3, "proj_hidden": 2048,
                                          "proj_dim": 2048, "zero_init_residual": True},
        "aug": {"strength": 0.5, "blur": True, "scale_min": 0.2, "size": 224},
        "optim": {"name": "sgd", "lr": 0.05, "lr_scaling": "linear", "momentum": 0.9,
                  "weight_decay": 1e-4, "warmup_epochs": 0, "exclude_bias_and_norm": False},
        "train": {"epochs": 100, "batch_size": 512, "checkpoint_every": 5},
        "eval": _IMAGENET_EVAL,
        "simsiam": {"pred_hidden": 512, "fix_pred_lr": True},
    },
    "imagenet-swav": {
        "_about": "SwAV's batch-256 ImageNet script (REFERENCE.md section 4; 72.7% linear at 200 "
                  "epochs): ResNet-50, head 2048 -> 2048 -> 128, 3000 prototypes frozen for 5005 "
                  "steps (1 epoch), T 0.1, eps 0.05, 3 Sinkhorn iterations, queue 3840 from epoch 15, "
                  "multi-crop 2 x 224 (scale 0.14-1) + 6 x 96 (0.05-0.14), colour strength 1.0 with "
                  "blur, LARS lr 0.6 without exclusions (the original is LARC, trust 0.001, no "
                  "clipping), wd 1e-6, no warm-up, cosine to 0.0006, global BN. Needs --data PATH.",
        "method": "swav",
        "data": _IMAGENET_DATA, "model": {**_IMAGENET_MODEL, "proj_hidden": 2048, "proj_dim": 128},
        "aug": {"strength": 1.0, "blur": True, "scale_min": 0.14, "size": 224},
        "optim": {"name": "lars", "lr": 0.6, "lr_scaling": "linear", "weight_decay": 1e-6,
                  "warmup_epochs": 0, "final_lr": 0.001, "exclude_bias_and_norm": False},
        "train": {"epochs": 200, "batch_size": 256, "checkpoint_every": 5},
        "eval": _IMAGENET_EVAL,
        "multicrop": {"global_crops": 2, "local_crops": 6, "local_size": 96,
                      "local_scale_min": 0.05, "local_scale_max": 0.14},
        "swav": {"temperature": 0.1, "prototypes": 3000, "epsilon": 0.05, "sinkhorn_iterations": 3,
                 "freeze_prototypes_steps": 5005, "queue_length": 3840, "queue_start_epoch": 15},
    },
    "cifar10-dino": {
        "_about": "DINO on CIFAR-10 with a ResNet-18 (REFERENCE.md section 10; DINO has no CIFAR recipe): "
                  "head 512 -> 2048 -> 2048 -> 256 (GELU, no BN), L2-normalised, then a weight-normalised "
                  "last layer of 4096 outputs (solo-learn's cifar/dino.yaml size) frozen for epoch 1, "
                  "student T 0.1, teacher T 0.04 -> 0.07 over 30 epochs (the paper's), centre momentum 0.9, "
                  "teacher EMA 0.9995 -> 1 on a cosine (solo-learn's for batch 256), the optimiser of "
                  "DINO's ResNet-50 command (SGD lr 0.03 x B/256, momentum 0.9, wd 1e-4; solo-learn's "
                  "LARS uses a trust coefficient of 0.02, not this LARS's 0.001), 10 warm-up epochs, gradient "
                  "norm of each parameter clipped at 3.0 (DINO's clip_gradients), multi-crop 2 x 32 (scale 0.14-1) + 8 x 16 (0.05-0.14) as the ResNet-50 "
                  "command's scales, BYOL/DINO's jitter (0.4, 0.4, 0.2, 0.1) without blur at 32x32, "
                  "1000 epochs. The weight-decay schedule (0.04 -> 0.4 for ViTs) is constant here.",
        "method": "dino",
        "data": {"source": "cifar10"},
        "model": {"backbone": "resnet18", "width": 1.0, "cifar_stem": True, "proj_layers": 3,
                  "proj_hidden": 2048},
        "aug": {"blur": False, "scale_min": 0.14},
        "optim": {"name": "sgd", "lr": 0.03, "lr_scaling": "linear", "momentum": 0.9, "weight_decay": 1e-4,
                  "warmup_epochs": 10, "exclude_bias_and_norm": True, "clip_grad": 3.0,
                  "clip_grad_mode": "per_param"},
        "train": {"epochs": 1000, "batch_size": 256, "checkpoint_every": 10},
        "eval": {"knn_every": 10},
        "multicrop": {"global_crops": 2, "local_crops": 8, "local_size": 16,
                      "local_scale_min": 0.05, "local_scale_max": 0.14},
        "dino": {"out_dim": 4096, "bottleneck_dim": 256, "momentum": 0.9995, "student_temp": 0.1,
                 "teacher_temp": 0.07, "warmup_teacher_temp": 0.04, "warmup_teacher_temp_epochs": 30,
                 "center_momentum": 0.9, "freeze_last_layer_epochs": 1, "norm_last_layer": True},
    },
    "cifar10-distill-s2bnn": {
        "_about": "S2-BNN step one on CIFAR-10 (REFERENCE.md section 8; the repo has no CIFAR settings): "
                  "a binary ResNet-18 student (binary activations, real weights) learns only from a frozen "
                  "teacher (--teacher RUN), the softmax over the 128 embedding dims of both L2-normalised "
                  "outputs at T 0.2, same view for both, Adam lr 3e-4, wd 0, batch 256, 200 epochs, "
                  "aug+ (jitter (0.4, 0.4, 0.4, 0.1) p 0.6, grayscale 0.2, crop 0.2-1; its blur p 0.2 "
                  "dropped at 32x32). The original decays the lr linearly; here cosine. Step two: "
                  "cifar10-distill-s2bnn-step2.",
        "method": "distill",
        "data": {"source": "cifar10"},
        "model": {"backbone": "binary-resnet18", "width": 1.0, "cifar_stem": True, "binary_weights": False},
        "aug": {"strength": 0.5, "blur": False, "scale_min": 0.2},
        "optim": {"name": "adamw", "lr": 3e-4, "lr_scaling": "none", "weight_decay": 0.0,
                  "warmup_epochs": 0},
        "train": {"epochs": 200, "batch_size": 256, "checkpoint_every": 10},
        "eval": {"knn_every": 10},
        "distill": {"mode": "s2bnn", "temperature": 0.2, "contrastive_weight": 0.0},
    },
    "cifar10-distill-s2bnn-step2": {
        "_base": "cifar10-distill-s2bnn",
        "_about": "S2-BNN step two: cifar10-distill-s2bnn with binary weights too (sign(W) x mean|W| per "
                  "output channel), initialised from step one's run: pass --set model.init_from=RUN_DIR "
                  "and the same --teacher.",
        "model": {"binary_weights": True, "init_from": INIT_PLACEHOLDER},
    },
    "cifar10-distill-seed": {
        "_about": "SEED on CIFAR-10 (REFERENCE.md section 9): a small ResNet-18 student (width 0.25) matches "
                  "a frozen ResNet-18 teacher's (--teacher RUN) similarity distribution over [its own "
                  "embedding, a queue of 4096 teacher embeddings] (SEED: 65536, sized for ImageNet), student "
                  "T 0.2, teacher T 1e-4 (the code's defaults), MoCo v2-style student head, SGD lr 0.03 x "
                  "B/256, momentum 0.9, wd 1e-4 on every parameter, 5 warm-up epochs then cosine, 200 "
                  "epochs, MoCo v2's augmentation (crop 0.2-1, jitter (0.4, 0.4, 0.4, 0.1)) without blur.",
        "method": "distill",
        "data": {"source": "cifar10"},
        "model": {"backbone": "resnet18", "width": 0.25, "cifar_stem": True},
        "aug": {"strength": 0.5, "blur": False, "scale_min": 0.2},
        "optim": {"name": "sgd", "lr": 0.03, "lr_scaling": "linear", "momentum": 0.9,
                  "weight_decay": 1e-4, "warmup_epochs": 5, "exclude_bias_and_norm": False},
        "train": {"epochs": 200, "batch_size": 256, "checkpoint_every": 10},
        "eval": {"knn_every": 10},
        "distill": {"mode": "seed", "temperature": 0.2, "teacher_temp": 1e-4, "queue_size": 4096},
    },
}


# ---------------------------------------------------------------------------------------------
# Resolution: presets, files and overrides, each checked against the dataclass types.

def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the field type ``tp``; ints are accepted for floats."""
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: must not be empty (expected {tp.__name__})")
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads '1e-4' as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp in (int, str, bool) and isinstance(value, tp):
        return value
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{key}: expected {tp.__name__}{' or null' if optional else ''}, "
                      f"got {value!r} ({type(value).__name__})")


def _apply(obj: Any, updates: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in updates.items():
        if key.startswith("_"):
            continue
        full = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), sorted(names), n=1)
            hint = f"did you mean '{prefix}{close[0]}'? " if close else ""
            raise ConfigError(f"unknown config key '{full}'; {hint}valid keys here: "
                              f"{', '.join(sorted(names))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: expected a mapping of {', '.join(sorted(f.name for f in dataclasses.fields(current)))}, got {value!r}")
            _apply(current, value, full + ".")
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


def _nest(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def parse_set(item: str) -> dict[str, Any]:
    """``'optim.lr=0.3'`` -> ``{'optim': {'lr': 0.3}}`` (values parsed as YAML scalars)."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got '{item}'")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects key=value, got '{item}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads '1e-3' as a string; a number is meant
        try:
            value = float(value)
        except ValueError:
            pass
    return _nest(key, value)


class _DuplicateKey(Exception):
    def __init__(self, key: object, first: int, again: int):
        super().__init__(key, first, again)
        self.key, self.first, self.again = key, first, again


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        lines: dict[object, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *base' overrides by design
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = lines.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: the base class says so
                continue
            if first != key_node.start_mark.line + 1:
                raise _DuplicateKey(key, first, key_node.start_mark.line + 1)
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file '{path}' is a directory; pass a YAML file")
    if not path.exists():
        raise ConfigError(f"config file '{path}' does not exist")
    if not path.is_file():
        raise ConfigError(f"config file '{path}' is not a regular file; pass a YAML file")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file '{path}' is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                          f"{e.start}); save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file '{path}': {e.strerror or e}") from None
    except _DuplicateKey as e:
        raise ConfigError(f"config file '{path}' sets {e.key!r} twice in one mapping (lines {e.first} and "
                          f"{e.again}); keep one") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file '{path}' is not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys, got {type(data).__name__}")
    return data


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def preset(name: str) -> dict[str, Any]:
    """A preset's settings; one with ``_base`` states only what it changes in that preset."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, sorted(PRESETS), n=1)
        raise ConfigError(f"unknown preset '{name}'; {f'did you mean {close[0]!r}? ' if close else ''}"
                          f"available: {', '.join(sorted(PRESETS))}")
    recipe = PRESETS[name]
    return _merge(preset(recipe["_base"]), recipe) if "_base" in recipe else recipe


def _with_method_defaults(layers: list[dict[str, Any]]) -> Config:
    """Defaults, then the recipe of the method the last layer naming one chooses, then the layers,
    each in today's keys (:func:`upgrade`)."""
    method = next((layer["method"] for layer in reversed(layers) if isinstance(layer.get("method"), str)),
                  Config.method)
    cfg = Config()
    _apply(cfg, METHOD_DEFAULTS.get(method, {}))
    for layer in layers:
        _apply(cfg, upgrade(layer, method))
    return cfg


def resolve(*, preset_name: str | None = None, file: str | Path | None = None,
            sets: list[str] | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults <- the method's recipe <- preset <- YAML file <- ``--set`` items <- explicit
    overrides (nested dict)."""
    layers: list[dict[str, Any]] = []
    if file is not None:
        data = load_yaml(file)
        preset_name = preset_name or data.get("preset")
    if preset_name is not None and not isinstance(preset_name, str):
        raise ConfigError(f"preset: expected a preset name, got {preset_name!r}")
    if preset_name:
        layers.append({**preset(preset_name), "preset": preset_name})
    if file is not None:
        layers.append(data)
    layers += [parse_set(item) for item in sets or []]
    if overrides:
        layers.append(overrides)
    cfg = _with_method_defaults(layers)
    validate(cfg)
    return cfg


# Keys that saved runs may hold but that no longer exist (never read when they did).
RETIRED_KEYS = {"eval": ("linear_epochs", "linear_lr", "linear_batch_size")}


def from_dict(data: dict[str, Any]) -> Config:
    """A saved run's config (its config.yaml or checkpoint), old keys mapped by :func:`upgrade`
    and :data:`RETIRED_KEYS` ignored."""
    data = {k: ({n: x for n, x in v.items() if n not in RETIRED_KEYS.get(k, ())} if isinstance(v, dict) else v)
            for k, v in data.items()}
    return _with_method_defaults([data])


def validate(cfg: Config) -> None:
    """Reject values no run can use, with the key named."""
    from .backbones import BACKBONES, BINARY_BACKBONES
    from .methods import METHODS  # late import: methods import this module

    if cfg.method not in METHODS:
        close = difflib.get_close_matches(cfg.method, sorted(METHODS), n=1)
        raise ConfigError(f"unknown method '{cfg.method}'; {f'did you mean {close[0]!r}? ' if close else ''}"
                          f"available: {', '.join(sorted(METHODS))}")
    if cfg.model.backbone not in {**BACKBONES, **BINARY_BACKBONES}:
        raise ConfigError(f"model.backbone '{cfg.model.backbone}' unknown; choose "
                          f"{', '.join([*BACKBONES, *BINARY_BACKBONES])}")
    checks = [
        (cfg.train.batch_size >= 2, "train.batch_size must be at least 2 (contrastive losses need negatives)"),
        (cfg.train.epochs >= 1, "train.epochs must be at least 1"),
        (min(cfg.simclr.temperature, cfg.moco.temperature, cfg.swav.temperature) > 0,
         "simclr.temperature, moco.temperature and swav.temperature must be positive"),
        (cfg.optim.lr > 0, "optim.lr must be positive"),
        (cfg.optim.weight_decay >= 0, "optim.weight_decay must be >= 0"),
        (cfg.optim.warmup_epochs >= 0, "optim.warmup_epochs must be >= 0"),
        (cfg.optim.lr_scaling in ("linear", "sqrt", "none"), "optim.lr_scaling must be linear, sqrt or none"),
        (cfg.optim.name in ("lars", "sgd", "adamw"), f"optim.name '{cfg.optim.name}' unknown; choose lars, sgd or adamw"),
        (cfg.model.width > 0, "model.width must be positive"),
        (cfg.model.proj_layers >= 1, "model.proj_layers must be at least 1"),
        (cfg.model.proj_dim >= 1, "model.proj_dim must be at least 1"),
        (cfg.data.image_size is None or cfg.data.image_size >= 8, "data.image_size must be at least 8"),
        (cfg.aug.size is None or cfg.aug.size >= 8, "aug.size must be at least 8"),
        (0 < cfg.aug.scale_min <= 1, "aug.scale_min must be in (0, 1]"),
        (cfg.aug.strength >= 0, "aug.strength must be >= 0"),
        (cfg.train.precision in ("auto", "bf16", "fp32"), "train.precision must be auto, bf16 or fp32"),
        (cfg.train.checkpoint_every >= 1, "train.checkpoint_every must be at least 1"),
        (cfg.train.log_every >= 1, "train.log_every must be at least 1"),
        (cfg.train.max_minutes is None or cfg.train.max_minutes >= 0, "train.max_minutes must be >= 0"),
        (cfg.data.device_budget_gb >= 0, "data.device_budget_gb must be >= 0"),
        (cfg.eval.knn_every >= 0, "eval.knn_every must be >= 0"),
        (cfg.eval.knn_k >= 1, "eval.knn_k must be at least 1"),
        (cfg.eval.knn_t > 0, "eval.knn_t must be positive"),
        (cfg.eval.batch_size >= 1, "eval.batch_size must be at least 1"),
        (cfg.eval.knn_features in ("backbone", "head"),
         f"eval.knn_features '{cfg.eval.knn_features}' unknown; use backbone or head"),
        (cfg.eval.online_linear_lr > 0, "eval.online_linear_lr must be positive"),
        (cfg.dclw_sigma > 0, "dclw_sigma must be positive"),
        (cfg.moco.queue_size >= 1, "moco.queue_size must be at least 1"),
        (0 <= cfg.moco.momentum <= 1, "moco.momentum must be in [0, 1]"),
        (cfg.moco.shuffle_bn_groups >= 1, "moco.shuffle_bn_groups must be at least 1 (1: plain BN)"),
        (cfg.memory.size >= 0, "memory.size must be >= 0 (0: no memory)"),
        (0 <= cfg.memory.momentum <= 1, "memory.momentum must be in [0, 1]"),
        (cfg.multicrop.global_crops >= 1, "multicrop.global_crops must be at least 1"),
        (cfg.multicrop.local_crops >= 0, "multicrop.local_crops must be >= 0 (0: no local crops)"),
        (cfg.multicrop.local_size is None or cfg.multicrop.local_size >= 4, "multicrop.local_size must be at least 4"),
        (0 < cfg.multicrop.local_scale_min <= cfg.multicrop.local_scale_max <= 1,
         "multicrop needs 0 < local_scale_min <= local_scale_max <= 1"),
        (0 <= cfg.byol.momentum <= 1, "byol.momentum must be in [0, 1]"),
        (cfg.byol.pred_hidden is None or cfg.byol.pred_hidden >= 1, "byol.pred_hidden must be at least 1"),
        (cfg.simsiam.pred_hidden is None or cfg.simsiam.pred_hidden >= 1, "simsiam.pred_hidden must be at least 1"),
        (cfg.swav.prototypes >= 1, "swav.prototypes must be at least 1"),
        (cfg.swav.epsilon > 0, "swav.epsilon must be positive"),
        (cfg.swav.sinkhorn_iterations >= 1, "swav.sinkhorn_iterations must be at least 1"),
        (cfg.swav.freeze_prototypes_epochs >= 0, "swav.freeze_prototypes_epochs must be >= 0"),
        (cfg.swav.freeze_prototypes_steps is None or cfg.swav.freeze_prototypes_steps >= 0,
         "swav.freeze_prototypes_steps must be >= 0 (null: swav.freeze_prototypes_epochs)"),
        (cfg.swav.queue_length >= 0, "swav.queue_length must be >= 0 (0: no queue)"),
        (cfg.swav.queue_start_epoch >= 0, "swav.queue_start_epoch must be >= 0"),
        (cfg.model.binary_weights or cfg.model.backbone.startswith("binary-"),
         f"model.binary_weights=false applies to binary backbones (binary-resnet18), not {cfg.model.backbone}"),
        (cfg.optim.clip_grad >= 0, "optim.clip_grad must be >= 0 (0: no clipping)"),
        (cfg.optim.clip_grad_mode in (None, "global", "per_param"),  # optim.CLIP_MODES
         f"optim.clip_grad_mode '{cfg.optim.clip_grad_mode}' unknown; choose global or per_param"),
        (cfg.dino.out_dim >= 1 and cfg.dino.bottleneck_dim >= 1,
         "dino.out_dim and dino.bottleneck_dim must be at least 1"),
        (0 <= cfg.dino.momentum <= 1, "dino.momentum must be in [0, 1]"),
        (0 <= cfg.dino.center_momentum <= 1, "dino.center_momentum must be in [0, 1]"),
        (min(cfg.dino.student_temp, cfg.dino.teacher_temp, cfg.dino.warmup_teacher_temp) > 0,
         "dino.student_temp, dino.teacher_temp and dino.warmup_teacher_temp must be positive"),
        (cfg.dino.warmup_teacher_temp_epochs >= 0, "dino.warmup_teacher_temp_epochs must be >= 0"),
        (cfg.dino.freeze_last_layer_epochs >= 0, "dino.freeze_last_layer_epochs must be >= 0"),
        (cfg.distill.mode in ("s2bnn", "seed"), f"distill.mode '{cfg.distill.mode}' unknown; choose s2bnn or seed"),
        (cfg.distill.temperature > 0 and cfg.distill.teacher_temp > 0,
         "distill.temperature and distill.teacher_temp must be positive"),
        (cfg.distill.queue_size >= 1, "distill.queue_size must be at least 1"),
        (cfg.distill.contrastive_weight >= 0, "distill.contrastive_weight must be >= 0 (0: distillation only)"),
        (cfg.data.workers is None or cfg.data.workers >= 0, "data.workers must be >= 0 (0: decode in the training process)"),
        (not cfg.data.stream or bool(cfg.aug.size or cfg.data.image_size),
         "data.stream needs aug.size, the side of the crops (e.g. aug.size=224): streamed images keep their own sizes"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if cfg.method == "distill" and not cfg.distill.teacher:
        raise ConfigError("--method distill needs a frozen teacher: pass --teacher RUN_DIR_OR_CHECKPOINT "
                          "(distill.teacher), a selfsup pre-training run")
    if cfg.method == "distill" and cfg.distill.mode == "seed" and cfg.distill.queue_size % cfg.train.batch_size:
        raise ConfigError(f"distill.queue_size {cfg.distill.queue_size} must be a multiple of the global batch "
                          f"{cfg.train.batch_size}; e.g. distill.queue_size="
                          f"{max(1, cfg.distill.queue_size // cfg.train.batch_size) * cfg.train.batch_size}")
    if cfg.model.init_from == INIT_PLACEHOLDER:
        raise ConfigError(f"preset '{cfg.preset}' starts from S2-BNN's step one: pass --set "
                          f"model.init_from=RUN_DIR (a run of cifar10-distill-s2bnn)")
    if cfg.data.source == IMAGENET_PLACEHOLDER:
        where = f"preset '{cfg.preset}'" if cfg.preset else "this configuration"
        raise ConfigError(f"{where} trains on ImageNet: pass --data PATH, an image folder "
                          f"(<root>/train/<class>/*.JPEG and <root>/val/...) or an archive of one")
    # MoCo asserts K % batch == 0 so the queue always holds whole batches of keys
    batch = cfg.train.batch_size
    if cfg.method == "moco" and cfg.moco.queue_size % (batch * (2 if cfg.moco.symmetric else 1)):
        per_step = batch * (2 if cfg.moco.symmetric else 1)
        raise ConfigError(f"moco.queue_size {cfg.moco.queue_size} must be a multiple of the keys queued per "
                          f"step, {per_step} (the global batch{' x 2 views, moco.symmetric' if cfg.moco.symmetric else ''}); "
                          f"e.g. moco.queue_size={max(1, cfg.moco.queue_size // per_step) * per_step}")
    crops = cfg.multicrop.global_crops + cfg.multicrop.local_crops
    if cfg.method == "moco" and (cfg.multicrop.global_crops != 2 or cfg.multicrop.local_crops):
        raise ConfigError("moco takes exactly two views; multicrop.global_crops=2 and "
                          "multicrop.local_crops=0 (multi-crop is for simclr, byol, simsiam and swav)")
    if cfg.method == "simclr" and (cfg.multicrop.global_crops < 2 or
                                   (cfg.memory.size and (cfg.multicrop.global_crops, cfg.multicrop.local_crops) != (2, 0))):
        raise ConfigError("simclr needs multicrop.global_crops >= 2, and exactly two views "
                          "(global_crops=2, local_crops=0) with SimCLRv2's memory (memory.size > 0)")
    if crops < 2:
        raise ConfigError(f"multicrop gives {crops} view(s); every method needs at least two "
                          f"(global_crops + local_crops >= 2)")
    if cfg.method == "swav" and cfg.swav.queue_length % batch:
        raise ConfigError(f"swav.queue_length {cfg.swav.queue_length} must be a multiple of the global batch "
                          f"{batch}; e.g. swav.queue_length={max(1, cfg.swav.queue_length // batch) * batch}")
    if cfg.method == "simclr" and cfg.memory.size and cfg.memory.size % (2 * batch):
        raise ConfigError(f"memory.size {cfg.memory.size} must be a multiple of the keys queued per step, "
                          f"{2 * batch} (2 views x the global batch); e.g. memory.size="
                          f"{max(1, cfg.memory.size // (2 * batch)) * 2 * batch}")
    collapse = memory_collapse_size(batch, cfg.simclr.temperature)
    if cfg.method == "simclr" and cfg.memory.size and cfg.memory.size >= collapse:
        raise ConfigError(f"memory.size {cfg.memory.size} with simclr.temperature {cfg.simclr.temperature:g} at "
                          f"train.batch_size {batch} collapses: above {collapse:.0f} keys a collapsed embedding "
                          f"has the lower loss (stale memory negatives; see selfsup.methods.simclr). Lower "
                          f"simclr.temperature (SimCLRv2: 0.1) or memory.size")


def dump(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
