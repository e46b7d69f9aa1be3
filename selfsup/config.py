"""Typed run configuration: the settings, their field checks, YAML files and ``--set key=value``.

A run is described by one :class:`Config`. It is resolved in this order: defaults, then the
method's own recipe (:data:`METHOD_DEFAULTS`, so ``--method moco`` alone trains like MoCo), then
a preset (``selfsup/presets/NAME.yaml``), then a YAML file, then ``--set`` overrides, then the
explicit CLI flags; the result is written to ``<out>/config.yaml`` so every run can be repeated
exactly. :func:`resolve` checks each field; what a method needs beyond that (MoCo's queue holding
whole batches, say) is the method's own rule, checked with these by
:func:`selfsup.methods.check_config` before a run trains.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .backbones import is_vit
from .errors import ConfigError  # noqa: F401 (defined there; imported from here too)
from .files import write_text_atomic
from .presets import LEGACY_TEMPERATURE, load_yaml, method_recipes, preset, upgrade  # noqa: F401 (re-exported)


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
    holdout: float = 0.1            # class folders / a labelled list: each class's fraction held out as the test
                                    # split (seeded by the file paths, not train.seed, so eval holds out the same)


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
    patch_size: int = 16            # ViTs: the side of a patch (16 for 224-pixel images; 4 or 8 for 32x32)
    drop_path: float = 0.0          # ViTs: stochastic depth, rising linearly to this over the blocks (DINO: 0.1);
                                    # momentum teachers run without it
    drop_path_subset: bool = False  # ViTs: each block's branch runs on exactly round(B(1 - p)) kept samples only
                                    # (cheaper; the paper's drop path keeps a Bernoulli count and runs on all)
    freeze_patch_embed: bool = False  # ViTs: keep the random patch projection fixed (MoCo v3 §4.2's stability fix)
    grad_checkpointing: bool = False  # ViTs: recompute each block's activations in backward (less memory, ~1.3x time)


@dataclass
class ViewOverrides:
    """Settings that replace the method's recipe in its views; None (the default) keeps the
    recipe's value. Probabilities are per image; the paper's value is in brackets."""
    ratio: tuple[float, float] | None = None  # crop aspect ratios [lo, hi], log-uniform [3/4, 4/3]
    hflip_p: float | None = None    # horizontal flip [0.5]
    vflip_p: float | None = None    # vertical flip [0]: for images with no "up" (microscopy, satellite, medical)
    rot90_p: float | None = None    # turn by 1, 2 or 3 quarter turns, uniformly [0]; 0.75: 0-3 turns equally likely
    jitter_p: float | None = None   # colour jitter [0.8]
    brightness: float | None = None  # jitter factors in [1 - b, 1 + b] [SimCLR: 0.8 s, BYOL: 0.4]
    contrast: float | None = None   # [SimCLR: 0.8 s, BYOL: 0.4]
    saturation: float | None = None  # [SimCLR: 0.8 s, BYOL: 0.2]
    hue: float | None = None        # hue shift in turns, in [0, 0.5] [SimCLR: 0.2 s, BYOL: 0.1]
    grayscale_p: float | None = None  # [0.2]
    blur_p: float | None = None     # Gaussian blur [SimCLR: 0.5 with aug.blur; BYOL: 1.0 / 0.1]
    blur_sigma: tuple[float, float] | None = None  # blur sigma [lo, hi] in pixels [0.1, 2.0]
    solarize_p: float | None = None  # [BYOL: 0 / 0.2]


@dataclass
class OneViewOverrides(ViewOverrides):
    """:class:`ViewOverrides` of some of the views (``aug.view1``, ``aug.view2``, ``aug.local``),
    applied after ``aug``'s own, and their crop scale."""
    scale: tuple[float, float] | None = None  # crop area fraction [lo, hi] [global (aug.scale_min, 1); local
                                    # (multicrop.local_scale_min, local_scale_max)]


@dataclass
class AugConfig(ViewOverrides):
    """The views: the recipe's knobs (``strength``, ``blur``, ``scale_min``, ``size``), then
    :class:`ViewOverrides` of every view (``aug.vflip_p=0.5``) and of some (``aug.view2.blur_p``):
    ``view1`` the first, third, ... global view (BYOL's and DINO's view 1), ``view2`` the second,
    fourth, ..., ``local`` the multi-crop local crops."""
    strength: float = 1.0           # colour-distortion strength s (SimCLR appendix A)
    blur: bool = False              # Gaussian blur, p=0.5 (ImageNet recipe; off at 32x32)
    scale_min: float = 0.08         # smallest crop area fraction
    size: int | None = None         # output size (None: the data's image size)
    view1: OneViewOverrides = field(default_factory=OneViewOverrides)
    view2: OneViewOverrides = field(default_factory=OneViewOverrides)
    local: OneViewOverrides = field(default_factory=OneViewOverrides)


@dataclass
class OptimConfig:
    name: str = "lars"              # lars | sgd | adamw
    lr: float = 1.0                 # base learning rate, scaled by lr_scaling
    lr_scaling: str = "linear"      # linear: lr*B/256, sqrt: lr*sqrt(B), none
    momentum: float = 0.9
    weight_decay: float = 1e-6
    final_weight_decay: float | None = None  # the decayed groups' weight decay rises (or falls) to this on a
                                    # cosine over the run, per step (DINO's ViT: 0.04 -> 0.4); None: constant
    warmup_epochs: float = 10.0
    final_lr: float = 0.0           # end of the cosine decay, as a fraction of the peak lr
    exclude_bias_and_norm: bool = True  # no weight decay / LARS adaptation on biases and norms
    clip_grad: float = 0.0          # clip the gradient norm to this before each step (DINO: 3.0); 0 = off
    clip_grad_mode: str | None = None  # global (one norm) | per_param (each parameter's, DINO's clip_gradients);
                                    # None: the method's (per_param for DINO, global otherwise)


#: torch.compile's modes that train.compile_mode may name.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead")


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 512           # global batch (split over ranks when distributed)
    seed: int = 0
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    precision: str = "auto"         # auto: bf16 on GPUs that compute it natively (compute capability >= 8), fp16 with a
                                    # gradient scaler on older GPUs, bf16 on CPUs with AMX or AVX512-BF16, else fp32
                                    # | bf16 | fp16 | fp32
    channels_last: bool = True
    compile: bool = False           # torch.compile the augmentations and the model (pays off on GPUs for long runs)
    compile_mode: str = "default"   # torch.compile mode: default | max-autotune-no-cudagraphs | reduce-overhead
    cudnn_benchmark: bool = True    # CUDA: let cuDNN time its convolution algorithms once per shape and keep the fastest
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
    data: str | None = None        # a labelled source (as --data) for the kNN monitor of a run whose own data has
                                    # no labels (--eval-data); the online probe needs the run's own labels
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
                                    # memory: a large memory at a high one collapses (SimCLR.check refuses it)


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
class BarlowTwinsConfig:
    lambd: float = 0.0051           # λ, the weight of the off-diagonal (redundancy-reduction) terms
    bias_lr_ratio: float = 0.024    # lr of biases and BN over that of the weights: the official 0.0048 / 0.2


@dataclass
class VICRegConfig:
    sim_coeff: float = 25.0         # λ, the invariance (MSE) term
    std_coeff: float = 25.0         # μ, the variance hinge
    cov_coeff: float = 1.0          # ν, the covariance term


@dataclass
class MoCoV3Config:
    temperature: float = 1.0        # τ: the ResNet-50 config's 1.0 (ViT: 0.2)
    momentum: float = 0.99          # the momentum encoder's EMA, raised to 1 on a cosine (--moco-m-cos)
    pred_hidden: int | None = None  # the predictor's hidden width (None: model.proj_hidden, MoCo v3's 4096)


@dataclass
class NNCLRConfig:
    temperature: float = 0.1        # τ of the NT-Xent between nearest neighbours and predictions
    support_size: int = 98304       # the support set Q of past embeddings (a multiple of the global batch)
    pred_hidden: int = 4096         # the prediction head's hidden width


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
    barlow_twins: BarlowTwinsConfig = field(default_factory=BarlowTwinsConfig)
    vicreg: VICRegConfig = field(default_factory=VICRegConfig)
    mocov3: MoCoV3Config = field(default_factory=MoCoV3Config)
    nnclr: NNCLRConfig = field(default_factory=NNCLRConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: Each method's own recipe, applied between the defaults and a preset (``--method moco`` alone
#: trains like MoCo's code): selfsup/presets/_methods.yaml, which names each one's source.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = method_recipes()

# ---------------------------------------------------------------------------------------------
# Placeholders a preset leaves for what only the user knows (check_placeholders names them).

#: model.init_from of the second step of a two-step preset until ``--set model.init_from=RUN``.
INIT_PLACEHOLDER = "<step one: pass --set model.init_from=RUN_DIR>"

#: data.source of the ImageNet presets (their base, presets/_imagenet.yaml) until ``--data PATH``.
IMAGENET_PLACEHOLDER = "<imagenet: pass --data PATH>"



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
    if typing.get_origin(tp) is tuple:  # a range such as aug.ratio: YAML and --set give a list
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} numbers, e.g. {key}=[0.5,1.0], got {value!r}")
        return tuple(_coerce(v, t, key) for v, t in zip(value, args))
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


def apply_updates(obj: Any, updates: dict[str, Any], prefix: str = "") -> None:
    """Set ``updates`` (a nested mapping) on the settings dataclass ``obj``, each value checked
    against its field's type; a wrong key or value raises a ConfigError naming it."""
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
            apply_updates(current, value, full + ".")
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


def flatten(updates: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping of settings as dotted keys: ``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in updates.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        elif not isinstance(value, dict):
            flat[f"{prefix}{key}"] = value
    return flat


def nest(key: str, value: Any) -> dict[str, Any]:
    """``nest("optim.lr", 1)`` -> ``{"optim": {"lr": 1}}``."""
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
    return nest(key, value)


def _with_method_defaults(layers: list[dict[str, Any]]) -> Config:
    """Defaults, then the recipe of the method the last layer naming one chooses, then the layers,
    each in today's keys (:func:`upgrade`)."""
    method = next((layer["method"] for layer in reversed(layers) if isinstance(layer.get("method"), str)),
                  Config.method)
    cfg = Config()
    apply_updates(cfg, METHOD_DEFAULTS.get(method, {}))
    for layer in layers:
        apply_updates(cfg, upgrade(layer, method))
    return cfg


def resolve(*, preset_name: str | None = None, file: str | Path | None = None,
            sets: list[str] | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults <- the method's recipe <- preset <- YAML file <- ``--set`` items <- explicit
    overrides (nested dict)."""
    layers: list[dict[str, Any]] = []
    set_layers = [parse_set(item) for item in sets or []]
    if file is not None:
        data = load_yaml(file)
        step = [k for k in ("finetune", "distill") if k in data and len(data) == 1]
        if step:  # the config.yaml of a fine-tuned or distilled run
            raise ConfigError(f"--config '{file}' holds the settings of a selfsup {step[0]} run, not of a "
                              f"pre-training; continue that run with selfsup {step[0]} --out DIR --resume")
        preset_name = preset_name or data.get("preset")
    named = [layer["preset"] for layer in set_layers if "preset" in layer]
    if named:  # --set preset=NAME chooses the preset, as --preset does (the last one wins)
        if preset_name and preset_name != named[-1]:
            raise ConfigError(f"--set preset={named[-1]} contradicts the preset '{preset_name}' given by "
                              f"--preset or the config file; name one")
        preset_name = named[-1]
    if preset_name is not None and not isinstance(preset_name, str):
        raise ConfigError(f"preset: expected a preset name, got {preset_name!r}")
    if preset_name:
        layers.append({**preset(preset_name), "preset": preset_name})
    if file is not None:  # an old run's config.yaml repeats: its retired keys are ignored
        layers.append(without_retired(data))
    layers += set_layers
    if overrides:
        layers.append(overrides)
    cfg = _with_method_defaults(layers)
    validate(cfg)
    return cfg


# Keys that saved runs may hold but that no longer exist (never read when they did).
RETIRED_KEYS = {"eval": ("linear_epochs", "linear_lr", "linear_batch_size")}


def without_retired(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (a saved run's settings) without the :data:`RETIRED_KEYS`."""
    return {k: ({n: x for n, x in v.items() if n not in RETIRED_KEYS.get(k, ())} if isinstance(v, dict) else v)
            for k, v in data.items()}


def from_dict(data: dict[str, Any]) -> Config:
    """A saved run's config (its config.yaml or checkpoint), old keys mapped by :func:`upgrade`
    and :data:`RETIRED_KEYS` ignored."""
    return _with_method_defaults([without_retired(data)])


#: The names of selfsup.methods.METHODS and of the backbones in selfsup.backbones (tests/test_config.py
#: keeps them equal): config is below both, so it names them instead of importing them.
METHOD_NAMES = ("simclr", "moco", "byol", "simsiam", "swav", "dino", "barlow_twins", "vicreg", "mocov3", "nnclr",
                "distill")
BACKBONE_NAMES = ("resnet18", "resnet34", "resnet50", "binary-resnet18", "vit_tiny", "vit_small", "vit_base")


#: the smallest temperature a loss with gradients may use: 40x below the smallest in any recipe
#: here (DINO's student 0.1, SimCLR's 0.1, MoCo's 0.07, SwAV's 0.1); teachers' sharpening
#: temperatures (no gradient through them, e.g. SEED's 1e-4) need only be positive
MIN_TEMPERATURE = 1e-3


def student_temperatures(cfg: Config) -> list[tuple[str, float]]:
    """The temperatures that divide logits a gradient flows through, with their keys."""
    return [("simclr.temperature", cfg.simclr.temperature), ("moco.temperature", cfg.moco.temperature),
            ("swav.temperature", cfg.swav.temperature), ("dino.student_temp", cfg.dino.student_temp),
            ("mocov3.temperature", cfg.mocov3.temperature), ("nnclr.temperature", cfg.nnclr.temperature),
            ("distill.temperature", cfg.distill.temperature)]


#: seeds are below 2^40: the seeds derived from them (seed * 1_000_003 + step, seed * 7919 + 1 + rank)
#: then fit the 64-bit seed of torch's generators, even after 2^40 steps
MAX_SEED = 2**40

#: the widest embedding or hidden layer of a head: 8x the widest any recipe here uses (Barlow
#: Twins' and VICReg's 8192); a head's last layer holds hidden x dim float32 weights
MAX_HEAD_DIM = 2**16

#: the fewest channels a ResNet's first stage (64 x model.width) may have
MIN_CHANNELS = 4


def seed_check(key: str, seed: int) -> tuple[bool, str]:
    """The range check of a seed setting ``key``, a row of :func:`validate`'s table."""
    return (0 <= seed < MAX_SEED, f"{key} must be in [0, 2^40) = [0, {MAX_SEED}), got {seed}: seeds derived "
                                  f"from it (seed x 1000003 + step) must fit torch's 64-bit generator seed")


def head_checks(cfg: Config) -> list[tuple[bool, str]]:
    """model.proj_dim and model.proj_hidden within :data:`MAX_HEAD_DIM`, with the memory they would take."""
    hidden = cfg.model.proj_hidden or 512  # None: the backbone's features, 512 for a ResNet-18
    rows = []
    for key, dim, other in (("model.proj_dim", cfg.model.proj_dim, hidden),
                            ("model.proj_hidden", cfg.model.proj_hidden or 0, cfg.model.proj_dim)):
        gb = dim * other * 4 / 1e9
        rows.append((dim <= MAX_HEAD_DIM, f"{key}={dim} is above {MAX_HEAD_DIM} (2^16, 8x Barlow Twins' 8192): "
                                          f"one head layer alone would hold {dim} x {other} float32 weights = "
                                          f"{gb:,.1f} GB"))
    return rows


def check_finite(section: object, prefix: str = "") -> None:
    """Every number in a config is finite: inf and NaN are refused with the key named (they would
    end in a traceback or train into NaN)."""
    for f in dataclasses.fields(section):
        value, key = getattr(section, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            check_finite(value, key + ".")
        elif any(isinstance(v, float) and not math.isfinite(v)
                 for v in (value if isinstance(value, tuple) else (value,))):  # a number or a range
            raise ConfigError(f"{key} must be a finite number, got {value}")


#: The probabilities among :class:`ViewOverrides`.
VIEW_PROBABILITIES = ("hflip_p", "vflip_p", "rot90_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p")


def view_override_checks(o: ViewOverrides, prefix: str) -> list[tuple[bool, str]]:
    """The field checks of the overrides ``o`` that are set, their keys starting with ``prefix``."""
    def got(name: str) -> str:
        value = getattr(o, name)
        return f"got {list(value) if isinstance(value, tuple) else value}"

    set_ = {f.name for f in dataclasses.fields(o) if getattr(o, f.name) is not None}
    rows = [(0 <= getattr(o, n) <= 1, f"{prefix}{n} must be in [0, 1], {got(n)}")
            for n in VIEW_PROBABILITIES if n in set_]
    rows += [(getattr(o, n) >= 0, f"{prefix}{n} must be >= 0, {got(n)}")
             for n in ("brightness", "contrast", "saturation") if n in set_]
    if "hue" in set_:
        rows.append((0 <= o.hue <= 0.5, f"{prefix}hue must be in [0, 0.5] (turns), {got('hue')}"))
    for n, top in (("scale", 1.0), ("ratio", math.inf), ("blur_sigma", math.inf)):
        if n in set_:
            lo, hi = getattr(o, n)
            rows.append((0 < lo <= hi <= top, f"{prefix}{n} must be [lo, hi] with 0 < lo <= hi"
                                              f"{' <= 1' if top == 1 else ''}, {got(n)}"))
    return rows


def validate(cfg: Config) -> None:
    """Reject values no run can use, with the key named: each field's choices and range. The
    rules of one method are that method's (:func:`selfsup.methods.check_config` adds them)."""
    if cfg.method not in METHOD_NAMES:
        close = difflib.get_close_matches(cfg.method, sorted(METHOD_NAMES), n=1)
        raise ConfigError(f"unknown method '{cfg.method}'; {f'did you mean {close[0]!r}? ' if close else ''}"
                          f"available: {', '.join(sorted(METHOD_NAMES))}")
    if cfg.model.backbone not in BACKBONE_NAMES:
        raise ConfigError(f"model.backbone '{cfg.model.backbone}' unknown; choose {', '.join(BACKBONE_NAMES)}")
    check_finite(cfg)
    checks = [
        (cfg.train.batch_size >= 2, "train.batch_size must be at least 2 (contrastive losses need negatives)"),
        (cfg.train.epochs >= 1, "train.epochs must be at least 1"),
        *[(t >= MIN_TEMPERATURE, f"{key} must be at least {MIN_TEMPERATURE:g} (got {t:g}): 1/T scales every "
           f"gradient, and below that a step overflows") for key, t in student_temperatures(cfg)],
        (cfg.optim.lr > 0, "optim.lr must be positive"),
        (0 <= cfg.optim.final_lr <= 1, "optim.final_lr must be in [0, 1] (a fraction of the peak lr)"),
        (0 <= cfg.optim.momentum < 1, "optim.momentum must be in [0, 1)"),
        (cfg.optim.weight_decay >= 0, "optim.weight_decay must be >= 0"),
        (cfg.optim.final_weight_decay is None or cfg.optim.final_weight_decay >= 0,
         "optim.final_weight_decay must be >= 0 (null: a constant optim.weight_decay)"),
        (cfg.optim.final_weight_decay is None or cfg.optim.weight_decay > 0,
         "optim.final_weight_decay schedules the decayed groups' weight decay: it needs optim.weight_decay > 0"),
        (cfg.optim.warmup_epochs >= 0, "optim.warmup_epochs must be >= 0"),
        (cfg.optim.lr_scaling in ("linear", "sqrt", "none"), "optim.lr_scaling must be linear, sqrt or none"),
        (cfg.optim.name in ("lars", "sgd", "adamw"), f"optim.name '{cfg.optim.name}' unknown; choose lars, sgd or adamw"),
        (cfg.model.width > 0, "model.width must be positive"),
        (is_vit(cfg.model.backbone) or int(64 * cfg.model.width) >= MIN_CHANNELS,
         f"model.width={cfg.model.width:g} gives the ResNet's first stage {max(1, int(64 * cfg.model.width))} "
         f"channel(s) (64 x width); use at least {MIN_CHANNELS / 64:g} ({MIN_CHANNELS} channels)"),
        (cfg.model.proj_layers >= 1, "model.proj_layers must be at least 1"),
        (cfg.model.proj_dim >= 1, "model.proj_dim must be at least 1"),
        *head_checks(cfg),
        seed_check("train.seed", cfg.train.seed),
        (cfg.data.image_size is None or cfg.data.image_size >= 8, "data.image_size must be at least 8"),
        (cfg.aug.size is None or cfg.aug.size >= 8, "aug.size must be at least 8"),
        (0 < cfg.aug.scale_min <= 1, "aug.scale_min must be in (0, 1]"),
        (cfg.aug.strength >= 0, "aug.strength must be >= 0"),
        *view_override_checks(cfg.aug, "aug."),
        *[row for name in ("view1", "view2", "local") for row in view_override_checks(getattr(cfg.aug, name), f"aug.{name}.")],
        (cfg.train.precision in ("auto", "bf16", "fp16", "fp32"), "train.precision must be auto, bf16, fp16 or fp32"),
        (cfg.train.compile_mode in COMPILE_MODES,
         f"train.compile_mode '{cfg.train.compile_mode}' unknown; choose {', '.join(COMPILE_MODES)}"),
        (cfg.train.checkpoint_every >= 1, "train.checkpoint_every must be at least 1"),
        (cfg.train.log_every >= 1, "train.log_every must be at least 1"),
        (cfg.train.max_minutes is None or cfg.train.max_minutes >= 0, "train.max_minutes must be >= 0"),
        (cfg.data.device_budget_gb >= 0, "data.device_budget_gb must be >= 0"),
        (0 <= cfg.data.holdout < 1, "data.holdout must be in [0, 1) (the fraction of each class held out)"),
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
        (min(cfg.dino.teacher_temp, cfg.dino.warmup_teacher_temp) > 0,
         "dino.teacher_temp and dino.warmup_teacher_temp must be positive"),
        (cfg.dino.warmup_teacher_temp_epochs >= 0, "dino.warmup_teacher_temp_epochs must be >= 0"),
        (cfg.dino.freeze_last_layer_epochs >= 0, "dino.freeze_last_layer_epochs must be >= 0"),
        (cfg.model.patch_size >= 1, "model.patch_size must be at least 1"),
        (0 <= cfg.model.drop_path < 1, "model.drop_path must be in [0, 1)"),
        (cfg.barlow_twins.lambd >= 0, "barlow_twins.lambd must be >= 0"),
        (cfg.barlow_twins.bias_lr_ratio > 0, "barlow_twins.bias_lr_ratio must be positive"),
        (min(cfg.vicreg.sim_coeff, cfg.vicreg.std_coeff, cfg.vicreg.cov_coeff) >= 0,
         "vicreg.sim_coeff, vicreg.std_coeff and vicreg.cov_coeff must be >= 0"),
        (0 <= cfg.mocov3.momentum <= 1, "mocov3.momentum must be in [0, 1]"),
        (cfg.mocov3.pred_hidden is None or cfg.mocov3.pred_hidden >= 1, "mocov3.pred_hidden must be at least 1"),
        (cfg.nnclr.support_size >= 1, "nnclr.support_size must be at least 1"),
        (cfg.nnclr.pred_hidden >= 1, "nnclr.pred_hidden must be at least 1"),
        (cfg.distill.mode in ("s2bnn", "seed"), f"distill.mode '{cfg.distill.mode}' unknown; choose s2bnn or seed"),
        (cfg.distill.teacher_temp > 0, "distill.teacher_temp must be positive"),
        (cfg.distill.queue_size >= 1, "distill.queue_size must be at least 1"),
        (cfg.distill.contrastive_weight >= 0, "distill.contrastive_weight must be >= 0 (0: distillation only)"),
        (cfg.data.workers is None or cfg.data.workers >= 0, "data.workers must be >= 0 (0: decode in the training process)"),
        (not cfg.data.stream or bool(cfg.aug.size or cfg.data.image_size),
         "data.stream needs aug.size, the side of the crops (e.g. aug.size=224): streamed images keep their own sizes"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    crops = cfg.multicrop.global_crops + cfg.multicrop.local_crops
    if crops < 2:
        raise ConfigError(f"multicrop gives {crops} view(s); every method needs at least two "
                          f"(global_crops + local_crops >= 2)")


def check_placeholders(cfg: Config) -> None:
    """Refuse a preset's placeholder that nothing replaced (checked after the method's rules, so
    a distillation preset asks for its teacher first)."""
    if cfg.model.init_from == INIT_PLACEHOLDER:
        raise ConfigError(f"preset '{cfg.preset}' starts from S2-BNN's step one: pass --set "
                          f"model.init_from=RUN_DIR (a run of cifar10-distill-s2bnn)")
    if cfg.data.source == IMAGENET_PLACEHOLDER:
        where = f"preset '{cfg.preset}'" if cfg.preset else "this configuration"
        raise ConfigError(f"{where} trains on ImageNet: pass --data PATH, an image folder "
                          f"(<root>/train/<class>/*.JPEG and <root>/val/...) or an archive of one")


def dumps(cfg: Config) -> str:
    """``cfg`` as the YAML of a run's ``config.yaml``."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def dump(cfg: Config, path: str | Path) -> None:
    """``cfg`` written to ``path`` (atomically: a failed write leaves the previous file)."""
    write_text_atomic(dumps(cfg), path)