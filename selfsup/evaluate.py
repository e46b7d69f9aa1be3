"""One feature extractor for every evaluation: weighted kNN, the linear protocols and the online
linear probe.

kNN follows the InstDisc / MoCo-demo monitor: cosine similarity to the training bank, the top k
neighbours vote with weight exp(sim / T) (k=200, T=0.1). Similarities are computed in chunks of
test queries, so 50 000 x 512 features never form a full similarity matrix. Its features are the
pooled backbone's, or the method's projection head on top of them (``head``: the MoCo CIFAR
demo's kNN runs on encoder_q's 128-d output).

Linear evaluation (:data:`LINEAR_PROTOCOLS`): ``simclr`` and ``moco`` train a classifier on the
frozen backbone (eval mode) with random-resized-crop + flip drawn on the fly, as the papers do;
``fast`` trains it on pre-extracted, standardised features of the un-augmented images (quick,
not comparable with published tables). :class:`OnlineLinear` is solo-learn's online probe.

:func:`evaluate_run` is ``selfsup eval``: one protocol on a run folder, its result written beside it.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .augment import Augment, crop_flip_view, eval_view
from .data import DataSplits, ImageDataset, load_data
from .device import autocast, resolve_device
from .errors import DataError, TrainingError
from .files import write_text_atomic
from .runs import eval_file, load_backbone, run_dir


@torch.no_grad()
def extract_features(backbone: nn.Module, images: np.ndarray | Tensor, *, size: int, mean, std,
                     device: torch.device, batch_size: int = 512,
                     dtype: torch.dtype | None = None, channels_last: bool = True,
                     view: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Pooled backbone features of uint8 (N, H, W, 3) images, in eval mode. Returns (N, D) float32.
    ``view``: what turns a uint8 batch into the network's input (default: the evaluation view,
    :func:`augment.eval_view`; e.g. a training augmentation, for the alignment monitor)."""
    was_training = backbone.training
    backbone.eval()
    feats = []
    for lo in range(0, len(images), batch_size):
        chunk = torch.as_tensor(np.array(images[lo:lo + batch_size])).to(device, non_blocking=True)  # copy: memmaps are read-only
        x = eval_view(chunk, size, mean, std) if view is None else view(chunk)  # (B, 3, S, S)
        if not channels_last:
            x = x.contiguous()
        with autocast(device, dtype):
            feats.append(backbone(x).float())
    backbone.train(was_training)
    return torch.cat(feats) if feats else torch.empty(0, device=device)


@torch.no_grad()
def apply_head(head: nn.Module, features: Tensor, *, batch_size: int = 4096) -> Tensor:
    """The projection head (eval mode, fp32) on backbone features: (N, F) -> (N, D)."""
    was_training = head.training
    head.eval()
    out = [head(features[lo:lo + batch_size].float()).float() for lo in range(0, len(features), batch_size)]
    head.train(was_training)
    return torch.cat(out) if out else features


@torch.no_grad()
def nearest_neighbours(train_features: Tensor, features: Tensor, *, k: int,
                       chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """Cosine similarities and bank indices (M, k) of each query's k nearest bank entries."""
    bank = F.normalize(train_features.float(), dim=1)           # (N, D)
    k = min(k, len(bank))
    sims, idxs = [], []
    for lo in range(0, len(features), chunk):
        q = F.normalize(features[lo:lo + chunk].float(), dim=1)  # (m, D)
        sim, idx = (q @ bank.T).topk(k, dim=1)                    # (m, k)
        sims.append(sim)
        idxs.append(idx)
    empty = torch.empty(0, k, device=features.device)
    return (torch.cat(sims), torch.cat(idxs)) if sims else (empty, empty.long())


@torch.no_grad()
def knn_predict(train_features: Tensor, train_labels: Tensor, features: Tensor, *, num_classes: int,
                k: int = 200, temperature: float = 0.1, chunk: int = 1024) -> Tensor:
    """Weighted kNN class scores (M, C) for query ``features`` (M, D) against the bank (N, D)."""
    sim, idx = nearest_neighbours(train_features, features, k=k, chunk=chunk)  # (M, k)
    weight = (sim / temperature).exp()                                          # (M, k)
    votes = torch.zeros(len(features), num_classes, device=features.device)
    return votes.scatter_add_(1, train_labels[idx], weight)                     # (M, C)


def knn_accuracy(train_features: Tensor, train_labels: Tensor, test_features: Tensor,
                 test_labels: Tensor, *, num_classes: int, k: int = 200,
                 temperature: float = 0.1) -> float:
    """Top-1 (%) of the weighted kNN classifier."""
    scores = knn_predict(train_features, train_labels, test_features, num_classes=num_classes,
                         k=k, temperature=temperature)
    return 100.0 * (scores.argmax(1) == test_labels).float().mean().item()


def label_tensor(data: ImageDataset, device: torch.device) -> Tensor:
    """The labels of ``data`` as a (N,) long tensor on ``device``."""
    return torch.tensor(np.asarray(data.labels), dtype=torch.long, device=device)


def knn_eval(backbone: nn.Module, train: ImageDataset, test: ImageDataset, *, size: int, mean, std,
             device: torch.device, batch_size: int = 512, dtype: torch.dtype | None = None,
             k: int = 200, temperature: float = 0.1, head: nn.Module | None = None,
             probe: OnlineLinear | None = None) -> tuple[dict[str, float], Tensor]:
    """Weighted kNN top-1 (%) of ``test`` against the bank of ``train``'s features (``knn_top1``),
    on the backbone's features or, given ``head``, on the projection head's; with ``probe`` also
    the online probe's top-1 on the same backbone test features (``linear_top1``). Returns the
    metrics and the bank of backbone features (N, F), which the collapse monitor reuses."""
    kw = dict(size=size, mean=mean, std=std, device=device, batch_size=batch_size, dtype=dtype)
    bank = extract_features(backbone, train.images, **kw)    # (N, F)
    queries = extract_features(backbone, test.images, **kw)  # (M, F)
    test_labels = label_tensor(test, device)
    result: dict[str, float] = {}
    if probe is not None:
        result["linear_top1"] = probe.accuracy(queries, test_labels)
    keys = bank
    if head is not None:
        keys, queries = apply_head(head, bank), apply_head(head, queries)  # (N, D), (M, D)
    result["knn_top1"] = knn_accuracy(keys, label_tensor(train, device), queries, test_labels,
                                      num_classes=len(train.classes), k=k, temperature=temperature)
    return result, bank


@dataclass(frozen=True)
class LinearProtocol:
    """How a linear classifier is trained on a frozen backbone; the one place stating each default."""
    name: str
    lr: float                  # at batch 256; scaled by batch / 256 where ``scale_lr``
    scale_lr: bool
    weight_decay: float
    nesterov: bool
    schedule: str              # "cosine" (per step, to 0) or "steps" (x0.1 at ``milestones`` of the epochs)
    milestones: tuple[float, ...]
    init: str                  # classifier weights: "zeros" or "normal" (std 0.01); bias zero
    augment: bool              # random-resized-crop + flip on the fly through the frozen backbone
    standardize: bool          # features standardised with the training statistics (fast only)
    epochs: int = 100
    batch_size: int = 256
    momentum: float = 0.9

    def base_lr(self, batch_size: int) -> float:
        return self.lr * batch_size / 256 if self.scale_lr else self.lr


LINEAR_PROTOCOLS = {
    # SimCLR: Nesterov momentum, lr 0.1 x B/256, no wd, crop + flip, cosine; zero-initialised
    # classifier (zero_init_logits_layer). 100 epochs as its CIFAR README recipe (ImageNet: 90).
    "simclr": LinearProtocol("simclr", lr=0.1, scale_lr=True, weight_decay=0.0, nesterov=True,
                             schedule="cosine", milestones=(), init="zeros", augment=True, standardize=False),
    # MoCo main_lincls.py: SGD momentum 0.9, lr 30, wd 0, batch 256, 100 epochs, lr x0.1 at epochs
    # 60 and 80, fc ~ N(0, 0.01) with zero bias, crop + flip.
    "moco": LinearProtocol("moco", lr=30.0, scale_lr=False, weight_decay=0.0, nesterov=False,
                           schedule="steps", milestones=(0.6, 0.8), init="normal", augment=True, standardize=False),
    # Pre-extracted un-augmented features, standardised: quick, not the papers' protocol.
    "fast": LinearProtocol("fast", lr=0.1, scale_lr=False, weight_decay=0.0, nesterov=True,
                           schedule="cosine", milestones=(), init="zeros", augment=False, standardize=True),
}


def protocol_for(method: str | None) -> str:
    """The linear protocol of a run's method by default: MoCo's for moco, SimCLR's otherwise."""
    return "moco" if method == "moco" else "simclr"


def _lr_at(protocol: LinearProtocol, base_lr: float, step: int, total: int, steps_per_epoch: int) -> float:
    if protocol.schedule == "cosine":
        return base_lr * 0.5 * (1 + math.cos(math.pi * step / total))
    epochs = total // steps_per_epoch
    epoch = step // steps_per_epoch
    return base_lr * 0.1 ** sum(epoch >= round(m * epochs) for m in protocol.milestones)


def _classifier(dim: int, num_classes: int, init: str, seed: int, device) -> nn.Linear:
    clf = nn.Linear(dim, num_classes)
    if init == "normal":
        with torch.no_grad():
            clf.weight.copy_(torch.randn(clf.weight.shape, generator=torch.Generator().manual_seed(seed)) * 0.01)
    else:
        nn.init.zeros_(clf.weight)
    nn.init.zeros_(clf.bias)
    return clf.to(device)


def fit_linear(batches, dim: int, *, num_classes: int, protocol: LinearProtocol, steps_per_epoch: int,
               epochs: int, batch_size: int, seed: int = 0, device=None) -> tuple[nn.Linear, float]:
    """Train a linear classifier under ``protocol`` on ``batches(epoch)``, an iterator of
    ((B, dim) features, (B,) labels) per epoch. Returns the classifier and the last batch loss."""
    clf = _classifier(dim, num_classes, protocol.init, seed, device)
    opt = torch.optim.SGD(clf.parameters(), lr=protocol.lr, momentum=protocol.momentum,
                          nesterov=protocol.nesterov, weight_decay=protocol.weight_decay)
    base_lr = protocol.base_lr(batch_size)
    total = max(1, epochs * steps_per_epoch)
    step, loss = 0, torch.zeros(())
    for epoch in range(epochs):
        for x, y in batches(epoch):
            for group in opt.param_groups:
                group["lr"] = _lr_at(protocol, base_lr, step, total, steps_per_epoch)
            loss = F.cross_entropy(clf(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return clf, float(loss.detach())


def linear_probe(train_features: Tensor, train_labels: Tensor, test_features: Tensor,
                 test_labels: Tensor, *, num_classes: int, epochs: int | None = None,
                 lr: float | None = None, seed: int = 0) -> dict:
    """The ``fast`` protocol: a linear classifier on pre-extracted frozen features, standardised
    with the training statistics (the role BN plays in front of the classifier in frozen-feature
    protocols). Returns test top-1 (%), the final loss and the settings used."""
    protocol = LINEAR_PROTOCOLS["fast"]
    if lr is not None:
        protocol = dataclasses.replace(protocol, lr=lr)
    epochs = protocol.epochs if epochs is None else epochs
    mu = train_features.mean(0, keepdim=True)
    sigma = train_features.std(0, keepdim=True).clamp_min(1e-6)
    x_train, x_test = (train_features - mu) / sigma, (test_features - mu) / sigma
    g = torch.Generator().manual_seed(seed)
    n, b = len(x_train), protocol.batch_size

    def batches(epoch):
        perm = torch.randperm(n, generator=g).to(x_train.device)
        for lo in range(0, n, b):
            idx = perm[lo:lo + b]
            yield x_train[idx], train_labels[idx]

    clf, loss = fit_linear(batches, x_train.shape[1], num_classes=num_classes, protocol=protocol,
                           steps_per_epoch=max(1, math.ceil(n / b)), epochs=epochs, batch_size=b,
                           seed=seed, device=x_train.device)
    with torch.no_grad():
        top1 = 100.0 * (clf(x_test).argmax(1) == test_labels).float().mean().item()
    return {"top1": top1, "train_loss": loss, "settings": {**dataclasses.asdict(protocol), "epochs": epochs}}


def linear_eval(backbone: nn.Module, train_images: np.ndarray | Tensor, train_labels: Tensor,
                test_features: Tensor, test_labels: Tensor, *, num_classes: int, protocol: LinearProtocol,
                size: int, mean, std, device: torch.device, epochs: int | None = None,
                lr: float | None = None, dtype: torch.dtype | None = None, seed: int = 0) -> dict:
    """Linear evaluation as the papers run it: the backbone frozen in eval mode, each step's
    batch of ``protocol.batch_size`` training images cropped and flipped afresh
    (random-resized-crop, scale (0.08, 1), flip p=0.5) and encoded without gradient; tested on the
    un-augmented ``test_features`` (from :func:`extract_features`). Returns top-1 (%), the final
    loss and the settings used."""
    if lr is not None:
        protocol = dataclasses.replace(protocol, lr=lr)
    epochs = protocol.epochs if epochs is None else epochs
    images = torch.as_tensor(np.array(train_images)).to(device)  # (N, H, W, 3) uint8, once
    labels = train_labels.to(device)
    augment = Augment(crop_flip_view(size, mean=tuple(mean), std=tuple(std)))
    g_order = torch.Generator().manual_seed(seed)
    g_aug = torch.Generator(device=device).manual_seed(seed + 1)
    n, b = len(images), protocol.batch_size
    was_training = backbone.training
    backbone.eval()

    def batches(epoch):
        perm = torch.randperm(n, generator=g_order).to(device)
        for lo in range(0, n, b):
            idx = perm[lo:lo + b]
            with torch.no_grad(), autocast(device, dtype):
                x = backbone(augment(images.index_select(0, idx), g_aug)).float()  # (B, F)
            yield x, labels[idx]

    clf, loss = fit_linear(batches, test_features.shape[1], num_classes=num_classes, protocol=protocol,
                           steps_per_epoch=max(1, math.ceil(n / b)), epochs=epochs, batch_size=b,
                           seed=seed, device=device)
    backbone.train(was_training)
    with torch.no_grad():
        top1 = 100.0 * (clf(test_features).argmax(1) == test_labels).float().mean().item()
    return {"top1": top1, "train_loss": loss, "settings": {**dataclasses.asdict(protocol), "epochs": epochs}}


class OnlineLinear(nn.Module):
    """solo-learn's online linear probe: a linear classifier trained in the same steps as
    pre-training on the detached backbone features of the training views, with its own optimiser
    and its own backward, so the backbone's gradients never see it.

    The features are those of the backbone's first call in each training step (a forward hook):
    both views for SimCLR (one pass), the query view for MoCo, the global crops under multi-crop;
    solo-learn likewise averages the classifier loss over the large crops. BN is in train mode there
    (augmented views), and the probe is tested on the un-augmented test split in eval mode.
    ``labels`` (N,) are the training images' labels by index; -1 (unlabelled images) is ignored.

    Optimiser: SGD momentum 0.9, no weight decay, lr ``lr`` (0.1) times the run's schedule (the
    run's lr / its peak): solo-learn's CIFAR configs put the classifier in the method's optimiser
    with classifier_lr 0.1, weight_decay 0 and the same warm-up + cosine schedule. Plain SGD rather
    than the run's LARS: a trust ratio on a zero-initialised layer freezes it (issue 13 §1.1).
    """

    def __init__(self, num_features: int, labels: Tensor, num_classes: int, lr: float = 0.1):
        super().__init__()
        self.classifier = nn.Linear(num_features, num_classes)
        nn.init.zeros_(self.classifier.weight)  # deterministic: no draw from the global RNG
        nn.init.zeros_(self.classifier.bias)
        self.register_buffer("labels", labels.long(), persistent=False)  # (N,)
        self.lr = lr
        self.optimizer = torch.optim.SGD(self.classifier.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
        self.features: Tensor | None = None
        self.hook = None

    def watch(self, backbone: nn.Module) -> None:
        """Capture the detached output of ``backbone``'s first training call in each step."""
        def capture(module, args, output):
            if self.features is None and module.training and torch.is_grad_enabled():
                self.features = output.detach()
        self.hook = backbone.register_forward_hook(capture)

    def step(self, indices: Tensor, lr_factor: float = 1.0) -> Tensor:
        """One optimiser step on the captured features of the batch of images ``indices`` (B,);
        returns the (detached) loss. Nothing is read back to the host."""
        features, self.features = self.features, None
        if features is None:
            raise RuntimeError("OnlineLinear.step: the backbone was not called in this step")
        y = self.labels[indices].repeat(len(features) // len(indices))  # (V*B,): views in order
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * lr_factor
        with torch.autocast(device_type=features.device.type, enabled=False):
            loss = F.cross_entropy(self.classifier(features.float()), y, ignore_index=-1)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    @torch.no_grad()
    def accuracy(self, features: Tensor, labels: Tensor) -> float:
        """Top-1 (%) on (M, F) eval-mode features."""
        return 100.0 * (self.classifier(features.float()).argmax(1) == labels).float().mean().item()

    def run_state(self) -> dict:
        return {"classifier": self.classifier.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_run_state(self, state: dict) -> None:
        self.classifier.load_state_dict(state["classifier"])
        self.optimizer.load_state_dict(state["optimizer"])



# ---------------------------------------------------------------------------------------------
# selfsup eval


def evaluate_run(run: str | Path, kind: str, *, data: str, device: str = "auto", random_init: bool = False,
                 k: int = 200, temperature: float = 0.1, head: Callable[[], nn.Module] | None = None,
                 protocol: str | None = None, epochs: int | None = None, lr: float | None = None,
                 batch_size: int = 512, seed: int = 0, skip_corrupt: bool = False) -> tuple[dict, Path]:
    """``selfsup eval``: ``kind`` ("knn" or "linear") on the backbone of ``run`` (a run folder, its
    checkpoint or its backbone), tested on ``data``'s test split. ``head`` (kNN): builds the run's
    projection head, for kNN on head features. ``protocol`` (linear): a name of
    :data:`LINEAR_PROTOCOLS` (default: the run's method's). Returns the result and the file beside
    the run it was written to (:func:`runs.eval_file`)."""
    torch.manual_seed(seed)
    backbone, spec = load_backbone(run, random_init=random_init)
    where = resolve_device(device)
    splits = load_data(data, image_size=spec.data_image_size, skip_corrupt=skip_corrupt)
    if splits.test is None:
        raise DataError(f"'{data}' has no labelled test split to evaluate on (expected test/ or val/ "
                        f"beside train/)")
    backbone.to(where)
    view = dict(size=spec.image_size, mean=spec.mean, std=spec.std, device=where)
    if kind == "knn":
        projector = None if head is None else head().to(where)
        top1, _ = knn_eval(backbone, splits.train, splits.test, **view, batch_size=batch_size, k=k,
                           temperature=temperature, head=projector)
        name = "knn_head" if head is not None else "knn"
        result = {"protocol": "knn", "features": "backbone" if head is None else "head",
                  "top1": top1["knn_top1"], "k": k, "t": temperature}
    else:
        chosen = LINEAR_PROTOCOLS[protocol or protocol_for(spec.method)]
        out = _linear_run(backbone, splits, chosen, view, batch_size=batch_size, epochs=epochs, lr=lr, seed=seed)
        name = f"linear_{chosen.name}"
        result = {"protocol": "linear", "linear_protocol": chosen.name, "features": "backbone",
                  "epochs": out["settings"]["epochs"], "lr": out["settings"]["lr"], **out}
    result.update(data=data, checkpoint=str(run), random_init=random_init)
    path = run_dir(run) / eval_file(f"{name}{'_random_init' if random_init else ''}")
    try:
        write_text_atomic(json.dumps(result, indent=1) + "\n", path)
    except OSError as e:  # the result is not lost with its file: it is in the message
        raise TrainingError(f"{name} top-1 {result['top1']:.2f}% computed, but could not write '{path}': "
                            f"{e.strerror or e}") from None
    return result, path


def _linear_run(backbone: nn.Module, splits: DataSplits, protocol: LinearProtocol, view: dict, *, batch_size: int,
                epochs: int | None, lr: float | None, seed: int) -> dict:
    """The linear protocol on frozen features: on the fly through the backbone, or pre-extracted."""
    device = view["device"]
    test_f = extract_features(backbone, splits.test.images, **view, batch_size=batch_size)
    train_y, test_y = label_tensor(splits.train, device), label_tensor(splits.test, device)
    n_cls = len(splits.train.classes)
    if protocol.augment:
        return linear_eval(backbone, splits.train.images, train_y, test_f, test_y, num_classes=n_cls,
                           protocol=protocol, **view, epochs=epochs, lr=lr, seed=seed)
    train_f = extract_features(backbone, splits.train.images, **view, batch_size=batch_size)
    return linear_probe(train_f, train_y, test_f, test_y, num_classes=n_cls, epochs=epochs, lr=lr, seed=seed)
