"""A run's training images and the loader that batches them: the whole uint8 array on the
device (:class:`loader.DeviceLoader`), or a stream decoded by worker processes every epoch
(:class:`stream.StreamLoader`) for a dataset too big for memory."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from . import distributed as D
from .backbones import is_vit
from .config import Config
from .data import DataSplits, load_data
from .loader import DeviceLoader
from .stream import IMAGENET_MEAN_STD, ImageStream, StreamLoader, device_augmentations


@dataclass
class Images:
    """A run's training images and the view they are fed as: side ``size``, ``mean``, ``std``."""
    splits: DataSplits | None  # None when streamed
    images: object             # uint8 (N, H, W, 3) (labelled + unlabelled) or an ImageStream
    size: int
    mean: tuple
    std: tuple


def load_images(cfg: Config) -> Images:
    """The training images (with STL-10's unlabelled ones when asked), or a stream of them."""
    if cfg.data.stream:  # too big for memory: decoded every epoch by worker processes, no kNN monitor
        mean, std = IMAGENET_MEAN_STD
        return Images(None, ImageStream(cfg.data.source, skip_corrupt=cfg.data.skip_corrupt,
                                        holdout=cfg.data.holdout),
                      cfg.aug.size or cfg.data.image_size, mean, std)
    splits = load_data(cfg.data.source, image_size=cfg.data.image_size, cache_dir=cfg.data.cache_dir,
                       unlabeled=cfg.data.unlabeled, skip_corrupt=cfg.data.skip_corrupt,
                       default_size=default_image_size(cfg), holdout=cfg.data.holdout)
    if splits.chosen_size is not None:
        # Written to the run's config.yaml and backbone.json, so eval and report decode it alike.
        cfg.data.image_size = splits.chosen_size
    images = splits.train.images
    if cfg.data.unlabeled and splits.unlabeled is not None:
        images = np.concatenate([np.asarray(images), np.asarray(splits.unlabeled.images)])
    mean, std = splits.train.mean_std()
    return Images(splits, images, cfg.aug.size or splits.train.image_size[0], mean, std)


def default_image_size(cfg: Config) -> int:
    """The cache's side for a folder of images of different sizes when data.image_size is unset:
    aug.size x 8/7 rounded up when set (224 -> 256, ImageNet's resize-then-crop ratio), else 64
    for a CIFAR-stem ResNet (room for its 32-64 crops) and 256 for an ImageNet-stem ResNet or a ViT."""
    if cfg.aug.size:
        return math.ceil(cfg.aug.size * 8 / 7)
    return 64 if cfg.model.cifar_stem and not is_vit(cfg.model.backbone) else 256


def build_loader(cfg: Config, images, augmentations: list,
                 device: torch.device) -> tuple[DeviceLoader | StreamLoader, list]:
    """The batches' loader, and the augmentations still to run on the device (streamed: the
    crops are taken at decode time)."""
    world, rank = D.world_size(), D.rank()
    if cfg.data.stream:
        loader = StreamLoader(images, [a.cfg for a in augmentations], cfg.train.batch_size, device,
                              seed=cfg.train.seed, rank=rank, world_size=world, workers=cfg.data.workers)
        return loader, device_augmentations(augmentations)
    return DeviceLoader(images, cfg.train.batch_size, device, seed=cfg.train.seed, rank=rank,
                        world_size=world, budget_gb=cfg.data.device_budget_gb), augmentations
