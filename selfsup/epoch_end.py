"""What pre-training watches at the end of an epoch: the weighted kNN monitor
(:func:`evaluate.knn_eval`) with the online linear probe's top-1, and the collapse monitors of
:mod:`selfsup.monitor` on a fixed subset of the training images; the epoch line's text for them
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
from .data import DataSplits, ImageDataset
from .evaluate import OnlineLinear, extract_features, knn_eval
from .loop import log
from .methods import Method
from .monitor import CHANCE_TOLERANCE, collapse_warning, effective_rank, feature_std

MONITOR_IMAGES = 2048  # the collapse monitor's fixed subset of the training images


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
    """The end-of-epoch monitors of one run. kNN (``knn``: a labelled test split with two classes
    or more) every ``eval.knn_every`` epochs and after the last; the collapse monitor every epoch
    on the training images ``indices`` (None when streamed: no monitor)."""
    cfg: Config
    method: Method
    view: tuple                    # (size, mean, std) of the evaluation view
    device: torch.device
    dtype: torch.dtype | None
    splits: DataSplits | None
    knn: bool
    probe: OnlineLinear | None
    indices: np.ndarray | None
    head: nn.Module | None         # the projection head (eval.knn_features=head), else None

    @property
    def dim(self) -> int:
        return self.method.backbone.num_features

    def _knn(self, probe: OnlineLinear | None = None) -> tuple[dict, torch.Tensor]:
        """kNN metrics and the collapse monitor's backbone features, from one extraction."""
        size, mean, std = self.view
        result, bank = knn_eval(self.method.backbone, self.splits.train, self.splits.test, size=size, mean=mean,
                                std=std, device=self.device, batch_size=self.cfg.eval.batch_size,
                                dtype=self.dtype, k=self.cfg.eval.knn_k, temperature=self.cfg.eval.knn_t,
                                head=self.head, probe=probe)
        result["knn_features"] = "head" if self.head is not None else "backbone"
        return result, bank[torch.as_tensor(self.indices, device=self.device)]  # (n, D): the same images

    def initial(self) -> dict:
        """kNN top-1 at random initialisation, logged with the collapse monitor (rank 0, a fresh start)."""
        if not self.knn or not D.is_main():
            return {}
        knn, features = self._knn()
        _log_initial(self.cfg, knn["knn_top1"], monitor_text(collapse_monitor(features), self.dim))
        return {"knn_top1_init": knn["knn_top1"]}

    def __call__(self, epoch: int, last: bool) -> dict:
        """The epoch's monitor metrics (rank 0; nothing on the other ranks)."""
        if self.indices is None or not D.is_main():
            return {}
        every = self.cfg.eval.knn_every
        metrics: dict = {}
        if self.knn and (last or (every and (epoch + 1) % every == 0)):
            metrics, features = self._knn(self.probe)
        else:
            size, mean, std = self.view
            features = extract_features(self.method.backbone, self.splits.train.images[self.indices], size=size,
                                        mean=mean, std=std, device=self.device,
                                        batch_size=self.cfg.eval.batch_size, dtype=self.dtype)
        metrics.update(collapse_monitor(features))
        return metrics

    def describe(self, metrics: dict) -> str:
        """The epoch line's kNN, online-probe and collapse-monitor text."""
        text = f" kNN {metrics['knn_top1']:.2f}%" if "knn_top1" in metrics else ""
        text += f" online linear {metrics['linear_top1']:.2f}%" if "linear_top1" in metrics else ""
        return text + monitor_text(metrics, self.dim)

    def warnings(self, metrics: dict) -> list[str]:
        return monitor_warnings(self.method, metrics, self.dim)


def _log_initial(cfg: Config, top1: float, text: str) -> None:
    log(f"kNN top-1 at random initialisation ({cfg.eval.knn_features} features): {top1:.2f}%{text}")


def build_monitors(cfg: Config, method: Method, splits: DataSplits | None, num_images: int, view: tuple,
                   device: torch.device, dtype: torch.dtype | None, state: dict | None) -> Monitors:
    """The run's monitors; ``state``: a resumed run's checkpoint, whose online probe continues."""
    knn = (splits is not None and splits.test is not None and len(splits.test) > 0
           and len(splits.train.classes) > 1)
    probe = head = None
    if knn:
        head = method.projector if cfg.eval.knn_features == "head" else None
        probe = online_linear(cfg, method, splits.train, num_images, device)
        if probe is not None and state is not None and "online_linear" in state:
            probe.load_run_state(state["online_linear"])
    indices = None if splits is None else monitor_indices(len(splits.train), cfg.train.seed)  # streamed: none
    return Monitors(cfg, method, view, device, dtype, splits, knn, probe, indices, head)
