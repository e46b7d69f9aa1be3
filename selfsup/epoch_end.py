"""What pre-training watches at the end of an epoch: the weighted kNN monitor
(:func:`evaluate.knn_eval`) with the online linear probe's top-1 where there are labels (the run's
own, or ``eval.data``'s), and on every run, labelled or not, cached or streamed, the label-free
monitors of :mod:`selfsup.monitor` (collapse: feature std and effective rank; alignment and
uniformity) on a fixed sample of the run's own training images; the epoch line's text for them
and the warnings they raise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import distributed as D
from .config import Config
from .augment import Augment
from .data import DataSplits, ImageDataset, load_data
from .evaluate import OnlineLinear, extract_features, knn_eval
from .loop import log
from .methods import Method
from .monitor import CHANCE_TOLERANCE, alignment, collapse_warning, effective_rank, feature_std, uniformity

MONITOR_IMAGES = 2048  # the label-free monitors' fixed sample of the training images
#: The seed of the alignment monitor's two views: the same augmentations at every epoch end.
ALIGNMENT_SEED = 20200101
#: Alignment is a mean over pairs: the first 512 images of the sample estimate it to about ±2 %.
ALIGNMENT_IMAGES = 512


def monitor_indices(n: int, seed: int) -> np.ndarray:
    """The label-free monitors' images: a fixed random subset of ``MONITOR_IMAGES`` of the n
    training images, the same every epoch (and on resume), sorted."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, min(n, MONITOR_IMAGES), replace=False))


def collapse_monitor(features: torch.Tensor) -> dict[str, float]:
    """The backbone monitors every method shares (selfsup.monitor), of pooled features (N, D)."""
    return {"feature_std": feature_std(features), "effective_rank": effective_rank(features)}


def monitor_text(metrics: dict, dim: int) -> str:
    """The monitors' part of the epoch log line: feature std in units of 1/√D, effective rank of
    D, alignment and uniformity."""
    text = ""
    if "feature_std" in metrics:
        text += (f" feature std {metrics['feature_std'] * math.sqrt(dim):.3f}/√D"
                 f" eff. rank {metrics['effective_rank']:.1f}/{dim}")
    if "alignment" in metrics:
        text += f" align {metrics['alignment']:.3f} uniform {metrics['uniformity']:.3f}"
    return text


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


@dataclass
class Monitors:
    """The end-of-epoch monitors of one run. kNN where ``splits`` (the run's own labels, or
    ``eval.data``'s) has a test split with two classes or more, every ``eval.knn_every`` epochs and
    after the last; the label-free monitors every epoch, on ``sample``: the collapse monitor and
    uniformity of its evaluation-view features, and the alignment of the features of two training
    views of it (``pair``, drawn with the same seed every epoch, so epochs compare)."""
    cfg: Config
    method: Method
    view: tuple                    # (size, mean, std) of the evaluation view
    device: torch.device
    dtype: torch.dtype | None
    splits: DataSplits | None      # labelled images for kNN, or None
    knn: bool
    probe: OnlineLinear | None
    sample: np.ndarray             # uint8 (n, H, W, 3): the fixed sample of the run's own images
    pair: tuple[Augment, Augment]  # the two training views whose features alignment compares
    head: nn.Module | None         # the projection head (eval.knn_features=head), else None

    @property
    def dim(self) -> int:
        return self.method.backbone.num_features

    def _knn(self, probe: OnlineLinear | None = None) -> dict:
        size, mean, std = self.view
        result, _ = knn_eval(self.method.backbone, self.splits.train, self.splits.test, size=size, mean=mean,
                             std=std, device=self.device, batch_size=self.cfg.eval.batch_size,
                             dtype=self.dtype, k=self.cfg.eval.knn_k, temperature=self.cfg.eval.knn_t,
                             head=self.head, probe=probe)
        result["knn_features"] = "head" if self.head is not None else "backbone"
        return result

    def _label_free(self) -> dict[str, float]:
        """Collapse, uniformity and alignment of the backbone on the sample."""
        features = self._features(self.sample, None)  # (n, D), the evaluation view
        generator = torch.Generator(device=self.device).manual_seed(ALIGNMENT_SEED)
        few = self.sample[:ALIGNMENT_IMAGES]
        z1, z2 = (self._features(few, lambda x, aug=aug: aug(x, generator)) for aug in self.pair)  # (m, D) each
        return {**collapse_monitor(features), "alignment": alignment(z1, z2), "uniformity": uniformity(features)}

    def _features(self, images: np.ndarray, view) -> torch.Tensor:
        size, mean, std = self.view
        with torch.no_grad():
            return extract_features(self.method.backbone, images, size=size, mean=mean, std=std,
                                    device=self.device, batch_size=self.cfg.eval.batch_size, dtype=self.dtype,
                                    view=view)

    def initial(self) -> dict:
        """kNN top-1 (where there are labels) and the label-free monitors at random
        initialisation, logged (rank 0, a fresh start)."""
        if not D.is_main():
            return {}
        text = monitor_text(self._label_free(), self.dim)
        if not self.knn:
            log(f"at random initialisation:{text}")
            return {}
        knn = self._knn()
        _log_initial(self.cfg, knn["knn_top1"], text)
        return {"knn_top1_init": knn["knn_top1"]}

    def __call__(self, epoch: int, last: bool) -> dict:
        """The epoch's monitor metrics (rank 0; nothing on the other ranks)."""
        if not D.is_main():
            return {}
        every = self.cfg.eval.knn_every
        metrics = self._knn(self.probe) if self.knn and (last or (every and (epoch + 1) % every == 0)) else {}
        metrics.update(self._label_free())
        return metrics

    def describe(self, metrics: dict) -> str:
        """The epoch line's kNN, online-probe and label-free monitors' text."""
        text = f" kNN {metrics['knn_top1']:.2f}%" if "knn_top1" in metrics else ""
        text += f" online linear {metrics['linear_top1']:.2f}%" if "linear_top1" in metrics else ""
        return text + monitor_text(metrics, self.dim)

    def warnings(self, metrics: dict) -> list[str]:
        return monitor_warnings(self.method, metrics, self.dim)


def _log_initial(cfg: Config, top1: float, text: str) -> None:
    log(f"kNN top-1 at random initialisation ({cfg.eval.knn_features} features): {top1:.2f}%{text}")


def build_monitors(cfg: Config, method: Method, splits: DataSplits | None, num_images: int, view: tuple,
                   sample: np.ndarray, device: torch.device, dtype: torch.dtype | None,
                   state: dict | None) -> Monitors:
    """The run's monitors; ``sample``: the label-free monitors' images (:func:`monitor_sample`);
    ``state``: a resumed run's checkpoint, whose online probe continues. ``eval.data`` names a
    labelled source for kNN instead of the run's own splits (a run on unlabelled images); the
    online probe trains on the run's own labels only, so it runs only with those."""
    own = splits is not None and splits.test is not None and len(splits.test) > 0 and len(splits.train.classes) > 1
    probe = head = None
    if cfg.eval.data:  # at its own size (mixed sizes: the views' side); the evaluation view resizes it
        splits = load_data(cfg.eval.data, default_size=view[0], cache_dir=cfg.data.cache_dir,
                           skip_corrupt=cfg.data.skip_corrupt, holdout=cfg.data.holdout)
    knn = (splits is not None and splits.test is not None and len(splits.test) > 0
           and len(splits.train.classes) > 1)
    if knn:
        head = method.projector if cfg.eval.knn_features == "head" else None
    if own and not cfg.eval.data:
        probe = online_linear(cfg, method, splits.train, num_images, device)
        if probe is not None and state is not None and "online_linear" in state:
            probe.load_run_state(state["online_linear"])
    size, mean, std = view
    views = [a for a in method.augmentations(size, mean, std) if a.cfg.size == size]  # the global views
    pair = (views[0], views[1] if len(views) > 1 else views[0])
    return Monitors(cfg, method, view, device, dtype, splits if knn else None, knn, probe, sample, pair, head)


def monitor_sample(images, seed: int) -> np.ndarray:
    """The label-free monitors' images from the run's uint8 training images (N, H, W, 3) (an
    array or a memmap): :data:`MONITOR_IMAGES` of them, fixed by ``seed`` (:func:`monitor_indices`)."""
    return np.asarray(images[monitor_indices(len(images), seed)])
