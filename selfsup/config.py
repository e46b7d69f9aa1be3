"""Typed run configuration, presets, YAML files and ``--set key=value`` overrides.

A run is described by one :class:`Config`. It is resolved in this order: defaults, then a
preset, then a YAML file, then ``--set`` overrides, then the explicit CLI flags; the result is
written to ``<out>/config.yaml`` so every run can be repeated exactly.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value, key, preset or file is wrong; the message says which."""


@dataclass
class DataConfig:
    source: str = "digits"          # 'digits', 'cifar10', 'cifar100', 'stl10', a folder or an archive
    image_size: int | None = None   # resize every image to this (None: the source's own size; digits: 32)
    cache_dir: str | None = None    # decoded-array cache (default $SELFSUP_CACHE or ~/.cache/selfsup)
    unlabeled: bool = False         # STL-10: pre-train on train + the 100k unlabelled images
    skip_corrupt: bool = False      # skip (and count) undecodable images instead of failing
    device_budget_gb: float = 8.0   # keep the uint8 dataset on the GPU when it is smaller than this


@dataclass
class ModelConfig:
    backbone: str = "resnet18"
    width: float = 1.0              # multiplies every channel width (0.25 -> a 16-channel ResNet)
    cifar_stem: bool = True         # 3x3 stride-1 first conv and no max-pool (SimCLR B.9)
    proj_layers: int = 2            # SimCLR: 2, SimCLRv2: 3
    proj_hidden: int | None = None  # None: the backbone's feature width
    proj_dim: int = 128
    sync_bn: bool | None = None     # global BN when distributed (None: the method's default)


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


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 512           # global batch (split over ranks when distributed)
    seed: int = 0
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    precision: str = "auto"         # auto (bf16 on CUDA when supported, else fp32) | bf16 | fp32
    channels_last: bool = True
    compile: bool = False           # torch.compile the model (pays off on GPUs for long runs)
    checkpoint_every: int = 10      # epochs between checkpoints (and always at the end)
    log_every: int = 20             # steps between progress-bar updates (each one syncs the host)
    max_minutes: float | None = None  # stop at the first epoch end after this much training time
    progress: bool = True


@dataclass
class EvalConfig:
    knn_every: int = 1              # epochs between kNN monitor runs (0: only at the end)
    knn_k: int = 200
    knn_t: float = 0.1
    batch_size: int = 512           # feature extraction batch
    linear_epochs: int = 100
    linear_lr: float = 0.1
    linear_batch_size: int = 256


@dataclass
class Config:
    method: str = "simclr"
    loss: str = "nt_xent"
    temperature: float = 0.5
    out: str | None = None
    preset: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Presets: each states the recipe it follows.

PRESETS: dict[str, dict[str, Any]] = {
    "digits-simclr": {
        "_about": "The default main job: SimCLR on the bundled 8x8 digits resized to 16x16, a "
                  "narrow CIFAR-stem ResNet-18, a few CPU minutes. Not a paper recipe.",
        "method": "simclr", "temperature": 0.5,
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
        "method": "simclr", "temperature": 0.5,
        "data": {"source": "cifar10"},
        "model": {"backbone": "resnet18", "width": 1.0, "cifar_stem": True, "proj_layers": 2},
        "aug": {"strength": 0.5, "blur": False},
        "optim": {"name": "lars", "lr": 1.0, "lr_scaling": "linear", "weight_decay": 1e-4,
                  "warmup_epochs": 10},
        "train": {"epochs": 1000, "batch_size": 512, "checkpoint_every": 10},
        "eval": {"knn_every": 10},
    },
    "cifar10-simclr-small": {
        "_about": "cifar10-simclr shrunk for a CPU: a width-0.25 (16-channel) ResNet-18 at 32x32, "
                  "batch 256, 15 epochs (about 10 minutes on 2 cores); otherwise the same recipe.",
        "method": "simclr", "temperature": 0.5,
        "data": {"source": "cifar10"},
        "model": {"backbone": "resnet18", "width": 0.25, "cifar_stem": True, "proj_layers": 2},
        "aug": {"strength": 0.5, "blur": False},
        "optim": {"name": "lars", "lr": 1.0, "lr_scaling": "linear", "weight_decay": 1e-4,
                  "warmup_epochs": 1},
        "train": {"epochs": 15, "batch_size": 256, "checkpoint_every": 1},
        "eval": {"knn_every": 5},
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
            raise ConfigError(f"unknown config key '{full}'; valid keys here: "
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


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys, got {type(data).__name__}")
    return data


def preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}'; available: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def resolve(*, preset_name: str | None = None, file: str | Path | None = None,
            sets: list[str] | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults <- preset <- YAML file <- ``--set`` items <- explicit overrides (nested dict)."""
    cfg = Config()
    if file is not None:
        data = load_yaml(file)
        preset_name = preset_name or data.get("preset")
    if preset_name:
        _apply(cfg, preset(preset_name))
        cfg.preset = preset_name
    if file is not None:
        _apply(cfg, data)
    for item in sets or []:
        _apply(cfg, parse_set(item))
    if overrides:
        _apply(cfg, overrides)
    validate(cfg)
    return cfg


def from_dict(data: dict[str, Any]) -> Config:
    cfg = Config()
    _apply(cfg, data)
    return cfg


def validate(cfg: Config) -> None:
    """Reject values no run can use, with the key named."""
    from .methods import METHODS  # late import: methods import this module

    if cfg.method not in METHODS:
        raise ConfigError(f"unknown method '{cfg.method}'; available: {', '.join(sorted(METHODS))}")
    checks = [
        (cfg.train.batch_size >= 2, "train.batch_size must be at least 2 (contrastive losses need negatives)"),
        (cfg.train.epochs >= 1, "train.epochs must be at least 1"),
        (cfg.temperature > 0, "temperature must be positive"),
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
        (cfg.eval.knn_every >= 0, "eval.knn_every must be >= 0"),
        (cfg.eval.knn_k >= 1, "eval.knn_k must be at least 1"),
        (cfg.eval.knn_t > 0, "eval.knn_t must be positive"),
        (cfg.eval.batch_size >= 1, "eval.batch_size must be at least 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def dump(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
