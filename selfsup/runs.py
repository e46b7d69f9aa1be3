"""The run folder: its file names, the :class:`BackboneSpec` its ``backbone.json`` holds, and the
one reader and writer of run checkpoints and backbones.

A run folder (``selfsup pretrain --out DIR``; ``finetune`` and ``distill`` write the same) holds:

- ``checkpoint.pt`` — the whole training state: ``format``, ``config``, ``epoch``, ``step``,
  ``model``, ``optimizer``, the RNG states and ``meta`` (the backbone's spec as a dict);
- ``backbone.pt`` + ``backbone.json`` — the backbone's ``state_dict`` alone (torchvision names;
  timm's for ViTs) and its spec, which is all an evaluation needs (:func:`load_backbone`);
- ``config.yaml`` (the resolved settings), ``metrics.jsonl`` (one JSON line per epoch),
  ``run.lock`` (held while a run writes the folder), ``tensorboard/`` (train.tensorboard=true)
  and the results of ``selfsup eval`` (:func:`eval_file`).

Each file is written atomically (``checkpoint.py``), so a kill leaves the previous one whole.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import checkpoint as ckpt
from .backbones import NAMES as BACKBONE_NAMES, build_backbone, is_vit
from .errors import CheckpointError, ConfigError, TrainingError

CHECKPOINT = "checkpoint.pt"
BACKBONE = "backbone.pt"
BACKBONE_SPEC = "backbone.json"  # BACKBONE's description: BACKBONE with the suffix .json
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
LOCK = "run.lock"
TENSORBOARD = "tensorboard"
EVAL_GLOB = "eval_*.json"  # every evaluation result beside a run (:func:`eval_file`)
EXPORTS = {"torchvision": "backbone-torchvision.pt", "timm": "backbone-timm.pt",  # selfsup export
           "safetensors": "backbone.safetensors"}
META_KEY = "selfsup"  # the safetensors metadata entry holding an export's spec


def eval_file(name: str) -> str:
    """The file ``selfsup eval`` writes its result to, e.g. ``eval_knn.json``."""
    return f"eval_{name}.json"


def is_count(v: object, least: int) -> bool:
    """A JSON whole number (not a bool) of at least ``least``."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


def is_channels(v: object) -> bool:
    """A JSON list of three finite numbers, one per colour channel."""
    return isinstance(v, (list, tuple)) and len(v) == 3 and all(is_number(x) and math.isfinite(x) for x in v)


#: What each field of a spec on disk must be (None is allowed where the field's default is None):
#: the test, and its words in the error.
SPEC_RULES: dict[str, tuple[Any, str]] = {
    "backbone": (lambda v: v in BACKBONE_NAMES, f"one of {', '.join(BACKBONE_NAMES)}"),
    "width": (lambda v: is_number(v) and math.isfinite(v) and v > 0, "a positive number"),
    "cifar_stem": (lambda v: isinstance(v, bool), "true or false"),
    "binary_weights": (lambda v: isinstance(v, bool), "true or false"),
    "patch_size": (lambda v: is_count(v, 1), "a whole number >= 1"),
    "image_size": (lambda v: is_count(v, 1), "a whole number >= 1"),
    "data_image_size": (lambda v: is_count(v, 1), "a whole number >= 1"),
    "mean": (is_channels, "a list of 3 finite numbers (one per colour channel)"),
    "std": (lambda v: is_channels(v) and min(v) > 0, "a list of 3 positive finite numbers (one per colour channel)"),
    "num_classes": (lambda v: is_count(v, 1), "a whole number >= 1"),
    "head_layers": (lambda v: is_count(v, 0), "a whole number >= 0"),
    "pretrain_config": (lambda v: isinstance(v, dict), "a JSON object"),
    "random_init": (lambda v: isinstance(v, bool), "true or false"),
    **{name: (lambda v: isinstance(v, str), "text")
       for name in ("method", "data", "pretrain_method", "teacher", "format", "layout", "stem")},
}


@dataclass(frozen=True, kw_only=True)
class BackboneSpec:
    """What an evaluation needs to rebuild a backbone and feed it as in training.

    On disk it is the JSON object of ``backbone.json``, of a run checkpoint's ``meta`` and of an
    export's description, with these field names as keys (:meth:`to_json`, :meth:`from_json`).
    """
    backbone: str                             # a name of backbones.build_backbone
    width: float
    cifar_stem: bool
    binary_weights: bool = True               # binary backbones: 1-bit weights too (absent in old files)
    patch_size: int | None = None             # ViTs: the side of a patch (None for ResNets and in old files)
    image_size: int                           # side of the views the backbone was trained on (a ViT's pos grid)
    data_image_size: int | None = None        # the run's data.image_size: load its data at this size
    mean: tuple[float, ...]                   # per-channel normalisation of the views
    std: tuple[float, ...]
    method: str | None = None                 # the run's method ("finetune" / "distill" for SimCLRv2's steps)
    data: str | None = None                   # the run's data.source
    # a SimCLRv2 fine-tuned or distilled classifier (semisup.py); None for pre-training runs
    num_classes: int | None = None
    head_layers: int | None = None            # projection-head layers kept under the classifier
    pretrain_method: str | None = None
    pretrain_config: dict | None = None       # the pre-training run's config, to rebuild its head
    random_init: bool | None = None           # the supervised-only baseline
    teacher: str | None = None                # a distilled student's teacher run
    # an export's (selfsup export)
    format: str | None = None                 # "torchvision" or "safetensors"
    layout: str | None = None                 # "torchvision", "selfsup" or "timm" (ViTs): names and shapes
    stem: str | None = None                   # ResNets: "cifar" or "standard"
    extra: dict = field(default_factory=dict)  # keys this version does not know, written back as read

    REQUIRED = ("backbone", "width", "cifar_stem", "image_size", "mean", "std")
    # written even when None, as every version has written them; the other fields only when set
    ALWAYS = ("backbone", "width", "cifar_stem", "binary_weights", "image_size", "data_image_size",
              "mean", "std", "method", "data")

    def to_json(self) -> dict[str, Any]:
        """The JSON object on disk: the fields by name (mean and std as lists), then ``extra``."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name != "extra" and (value is not None or f.name in self.ALWAYS):
                out[f.name] = list(value) if f.name in ("mean", "std") else value
        return {**out, **self.extra}

    def vit_args(self) -> dict[str, int]:
        """``build_backbone``'s ViT arguments for this backbone: its patch size (if recorded) and
        the side of its training views, which its position embeddings are learned for; none for
        other backbones (a ResNet student's spec may carry its ViT teacher's patch size)."""
        if not is_vit(self.backbone):
            return {}
        patch = {} if self.patch_size is None else {"patch_size": self.patch_size}
        return {"image_size": self.image_size, **patch}

    @classmethod
    def from_json(cls, obj: Any, source: str | Path) -> BackboneSpec:
        """The spec a JSON object describes (any version's), each field checked against
        :data:`SPEC_RULES`; ``source`` (the file) names it in errors."""
        if not isinstance(obj, dict):
            raise CheckpointError(f"the description of '{source}' is a JSON {type(obj).__name__}, not an "
                                  f"object; was it written by selfsup?")
        missing = [k for k in cls.REQUIRED if k not in obj]
        if missing:
            raise CheckpointError(f"the description of '{source}' lacks {', '.join(missing)}; was it "
                                  f"written by selfsup?")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {k: v for k, v in obj.items() if k in known}
        if values.get("binary_weights") is None:
            values["binary_weights"] = True
        for name, (ok, what) in SPEC_RULES.items():
            value = values.get(name)
            if (value is not None or name in cls.REQUIRED) and not ok(value):
                raise CheckpointError(f"{source}: {name} must be {what}, got {value!r}")
        values["mean"], values["std"] = tuple(obj["mean"]), tuple(obj["std"])
        return cls(**values, extra={k: v for k, v in obj.items() if k not in known})


# ---------------------------------------------------------------------------------------------
# Paths


def run_dir(path: str | Path) -> Path:
    """The run folder of ``path``: the folder itself, or the folder a file of it lies in."""
    path = Path(path)
    return path if path.is_dir() else path.parent


def checkpoint_path(path: str | Path, *, beside_backbone: bool = False) -> Path:
    """A run folder -> its ``checkpoint.pt``; with ``beside_backbone``, its ``backbone.pt`` ->
    the ``checkpoint.pt`` beside it; any other path as it is."""
    path = Path(path)
    if path.is_dir():
        return path / CHECKPOINT
    return path.with_name(CHECKPOINT) if beside_backbone and path.name == BACKBONE else path


# ---------------------------------------------------------------------------------------------
# Reading


def load_run(path: str | Path, *, who: str, kind: str = "run", hint: str = "",
             beside_backbone: bool = False) -> tuple[Path, dict]:
    """The checkpoint file of a run (``path``: its folder or the file, see
    :func:`checkpoint_path`) and its loaded state. Errors name ``who`` asked (``"distill.teacher"``),
    the file, the ``kind`` of run expected and end with ``hint``."""
    file = checkpoint_path(path, beside_backbone=beside_backbone)
    if not file.exists():
        raise CheckpointError(f"{who} '{file}' does not exist (expected a selfsup run folder or its "
                              f"{CHECKPOINT}){hint}")
    state = ckpt.load(file)
    if not ckpt.is_run_state(state):
        raise CheckpointError(f"{who} '{file}' is not a selfsup {kind} checkpoint{hint}")
    return file, state


def saved_config(state: dict, file: str | Path, who: str, purpose: str) -> dict:
    """A loaded run checkpoint's settings (its ``config`` mapping), or an error naming ``who``
    asked, the ``file`` and what the settings were needed for (``purpose``)."""
    config = state.get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{who} '{file}' holds no settings ('config') {purpose}")
    return config


def is_number(v: object) -> bool:
    """A JSON number (an int or a float, not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


#: metrics.jsonl fields the trainer writes as text (the others are numbers).
TEXT_FIELDS = ("knn_features",)


def read_metrics(run: Path, notes: list[str] | None = None) -> list[dict]:
    """The usable rows of ``run/metrics.jsonl`` (numbers, and the text of :data:`TEXT_FIELDS`);
    what was left out is described in ``notes``."""
    notes = [] if notes is None else notes
    path = run / METRICS
    if not path.is_file():
        raise CheckpointError(f"'{run}' has no {METRICS}; pass a run folder written by selfsup pretrain")
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise CheckpointError(f"cannot read '{path}': {e.strerror or e}") from None
    rows = []
    for n, raw in enumerate(lines, 1):
        where = f"{path} line {n}"
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except ValueError as e:  # e.g. a last line cut short by a kill: the run's resume drops it too
            notes.append(f"{where} is not valid JSON ({str(e)[:80]}); left out")
            continue
        if not isinstance(row, dict):
            notes.append(f"{where} is a JSON {type(row).__name__}, not an object; left out")
            continue
        epoch, loss = row.get("epoch"), row.get("loss")
        if not (is_number(epoch) and math.isfinite(epoch) and epoch == int(epoch) and epoch >= 0):
            notes.append(f"{where}: 'epoch' must be a whole number >= 0, got {epoch!r}; left out")
            continue
        if not is_number(loss):
            notes.append(f"{where}: 'loss' must be a number, got {loss!r}; left out")
            continue
        odd = [k for k, v in row.items() if not is_number(v) and not (k in TEXT_FIELDS and isinstance(v, str))]
        if odd:
            notes.append(f"{where}: {', '.join(f'{k}={row[k]!r}' for k in odd)} not a number; that value left out")
        bad = [k for k, v in row.items() if is_number(v) and not math.isfinite(v)]
        if bad:
            notes.append(f"{where}: {', '.join(f'{k}={row[k]}' for k in bad)} (not finite)")
        rows.append({k: v for k, v in row.items() if k not in odd} | {"epoch": int(epoch)})
    if not rows:
        raise CheckpointError(f"'{path}' has no complete epoch yet; report after the first epoch"
                              + (f" ({notes[-1]})" if notes else ""))
    return rows


def run_spec(state: dict, file: str | Path) -> BackboneSpec:
    """The spec a loaded run checkpoint (``file``) carries as its ``meta``."""
    return BackboneSpec.from_json(state.get("meta"), file)


def require_safetensors():
    """The ``safetensors.torch`` module, or a one-line error saying how to install it."""
    try:
        import safetensors.torch
    except ImportError:
        raise ConfigError("--format safetensors needs the safetensors package: pip install safetensors "
                          "(or pip install 'selfsup[export]')") from None
    return safetensors.torch


def load_safetensors(path: str | Path) -> tuple[dict[str, Tensor], BackboneSpec]:
    """Weights and spec of a safetensors export (never executes code: plain tensors)."""
    st = require_safetensors()
    from safetensors import safe_open  # the optional package, present once require_safetensors passed

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(META_KEY, "null"))
        weights = st.load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"'{path}' is not a readable safetensors file: {str(e)[:200]}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"'{path}' has no '{META_KEY}' metadata describing the backbone; "
                              f"export it with selfsup export --format safetensors")
    return weights, BackboneSpec.from_json(meta, path)


def backbone_weights(state: dict) -> dict[str, Tensor]:
    """The backbone's own weights in a run checkpoint's ``model`` (its ``backbone.`` entries)."""
    return {k[len("backbone."):]: v for k, v in state["model"].items() if k.startswith("backbone.")}


def read_backbone(path: Path) -> tuple[dict[str, Tensor], BackboneSpec]:
    """Backbone weights and spec from a run checkpoint (which carries both), a safetensors
    export, or a bare state_dict with its JSON beside it (an export's own, else ``backbone.json``)."""
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    state = ckpt.load(path)
    if ckpt.is_run_state(state):
        return backbone_weights(state), run_spec(state, path)
    spec_path = path.with_suffix(".json")
    if not spec_path.exists():
        spec_path = path.with_name(BACKBONE_SPEC)
    if not spec_path.exists():
        raise CheckpointError(f"'{path}' has no {spec_path.name} beside it describing the "
                              f"architecture; point --checkpoint at the run folder")
    try:
        meta = json.loads(spec_path.read_text())
    except ValueError as e:
        raise CheckpointError(f"'{spec_path}' is not valid JSON ({e}); it describes {path.name}") from None
    if not isinstance(meta, dict) or not isinstance(state, dict):
        raise CheckpointError(f"'{path}' with '{spec_path.name}' is not a selfsup backbone")
    return state, BackboneSpec.from_json(meta, spec_path)


def load_backbone(path: str | Path, *, random_init: bool = False) -> tuple[nn.Module, BackboneSpec]:
    """A pre-trained backbone and its spec (architecture, input size, normalisation).

    ``path`` is a run folder, its ``checkpoint.pt`` or its ``backbone.pt`` (whose sibling
    ``backbone.json`` describes it), or an export (``selfsup export``: a ``.pt`` with its
    ``.json``, or a ``.safetensors``). ``random_init`` builds the same architecture untrained.
    """
    path = Path(path)
    if path.is_dir():
        path = path / BACKBONE
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist (expected a run folder, "
                              f"its {CHECKPOINT} or its {BACKBONE})")
    weights, spec = read_backbone(path)
    try:
        backbone = build_backbone(spec.backbone, width=spec.width, cifar_stem=spec.cifar_stem,
                                  binary_weights=spec.binary_weights, **spec.vit_args())
    except ValueError as e:  # fields each valid, but not together (a ViT given a width)
        raise CheckpointError(f"'{path}': its description builds no backbone: {e}") from None
    if not random_init:
        if is_vit(spec.backbone):
            about = f"patch {backbone.patch_size}, position embeddings for {spec.image_size}-pixel views"
        else:
            about = f"width {spec.width:g}, {'CIFAR' if spec.cifar_stem else 'standard'} stem"
        ckpt.load_weights(backbone, weights, path, f"a {spec.backbone} ({about}) as its metadata says")
    return backbone, spec


# ---------------------------------------------------------------------------------------------
# Writing


def save_backbone(path: Path, weights: dict[str, Tensor], spec: BackboneSpec) -> None:
    """A backbone's weights at ``path`` and its spec beside them (``path`` with the suffix
    ``.json``); each atomic. OSError (e.g. ENOSPC) passes to the caller, who names the write."""
    ckpt.save_atomic(weights, path)
    ckpt.write_text_atomic(json.dumps(spec.to_json(), indent=1), path.with_suffix(".json"))


def _backbone_problem(out: Path, weights: dict[str, Tensor], spec: BackboneSpec) -> str | None:
    """What is wrong with ``out``'s backbone.pt and backbone.json against the checkpoint's
    ``weights`` and ``spec``, or None when they match."""
    if not (out / BACKBONE).exists() or not (out / BACKBONE_SPEC).exists():
        return f"{BACKBONE} or {BACKBONE_SPEC} was missing"
    try:
        have, have_spec = read_backbone(out / BACKBONE)
    except (CheckpointError, OSError, ValueError, RuntimeError) as e:
        return f"{BACKBONE} was unreadable ({str(e)[:120]})"
    if have_spec.to_json() != spec.to_json():
        return f"{BACKBONE_SPEC} described another backbone"
    if have.keys() != weights.keys() or not all(torch.equal(have[k], weights[k]) for k in weights):
        return f"{BACKBONE} held other weights than {CHECKPOINT} (a save cut short)"
    return None


def make_consistent(out: Path, state: dict) -> str | None:
    """Re-derive ``backbone.pt`` and ``backbone.json`` from ``checkpoint.pt`` (``state``) when they
    are missing, unreadable or from another save (a save cut short between the two files, by a
    SIGKILL or a full disk). Returns what was wrong, or None when they already match."""
    weights, spec = backbone_weights(state), run_spec(state, out / CHECKPOINT)
    problem = _backbone_problem(out, weights, spec)
    if problem is None:
        return None
    try:
        save_backbone(out / BACKBONE, weights, spec)
    except OSError as e:
        raise TrainingError(f"could not repair '{out / BACKBONE}' from {CHECKPOINT} ({problem}): "
                            f"{e.strerror or e}") from None
    return problem


def save_run(out: Path, state: dict, backbone: nn.Module, spec: BackboneSpec) -> None:
    """A run's checkpoint (``state`` with the spec as its ``meta``), then its backbone alone with
    the spec evaluations read; each atomic. A failed write (e.g. ENOSPC) leaves the previous
    files untouched and says so, or that there were none."""
    try:
        ckpt.save_atomic({**state, "meta": spec.to_json()}, out / CHECKPOINT)
        save_backbone(out / BACKBONE, backbone.state_dict(), spec)
    except OSError as e:
        then = ("the previous checkpoint there is intact. Free space, then resume with the command that made "
                "the run and --resume" if (out / CHECKPOINT).exists() else
                "no checkpoint had been written yet; start again with more free space")
        raise TrainingError(f"could not write the checkpoint in '{out}': {e.strerror or e}; {then}") from None
