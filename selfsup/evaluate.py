"""One feature extractor for every evaluation: weighted kNN, linear probe (and, later, fine-tuning).

kNN follows the InstDisc / MoCo-demo monitor: cosine similarity to the training bank, the top k
neighbours vote with weight exp(sim / T) (k=200, T=0.1). Similarities are computed in chunks of
test queries, so 50 000 x 512 features never form a full similarity matrix.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .augment import eval_view


def autocast(device: torch.device, dtype: torch.dtype | None):
    """bf16 autocast where asked for, a no-op context otherwise."""
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)


@torch.no_grad()
def extract_features(backbone: nn.Module, images: np.ndarray | Tensor, *, size: int, mean, std,
                     device: torch.device, batch_size: int = 512,
                     dtype: torch.dtype | None = None, channels_last: bool = True) -> Tensor:
    """Pooled backbone features of uint8 (N, H, W, 3) images, in eval mode. Returns (N, D) float32."""
    was_training = backbone.training
    backbone.eval()
    feats = []
    for lo in range(0, len(images), batch_size):
        chunk = torch.as_tensor(np.array(images[lo:lo + batch_size])).to(device, non_blocking=True)  # copy: memmaps are read-only
        x = eval_view(chunk, size, mean, std)  # (B, 3, S, S)
        if not channels_last:
            x = x.contiguous()
        with autocast(device, dtype):
            feats.append(backbone(x).float())
    backbone.train(was_training)
    return torch.cat(feats) if feats else torch.empty(0, device=device)


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


def linear_probe(train_features: Tensor, train_labels: Tensor, test_features: Tensor,
                 test_labels: Tensor, *, num_classes: int, epochs: int = 100, lr: float = 0.1,
                 batch_size: int = 256, weight_decay: float = 0.0, seed: int = 0) -> dict:
    """A linear classifier trained on frozen features: SGD (Nesterov, momentum 0.9), cosine
    schedule, features standardised with the training statistics (the role BN plays in front
    of the classifier in frozen-feature protocols). Returns test top-1 (%) and the final loss."""
    device = train_features.device
    mu = train_features.mean(0, keepdim=True)
    sigma = train_features.std(0, keepdim=True).clamp_min(1e-6)
    x_train, x_test = (train_features - mu) / sigma, (test_features - mu) / sigma
    g = torch.Generator().manual_seed(seed)
    clf = nn.Linear(x_train.shape[1], num_classes).to(device)
    nn.init.zeros_(clf.weight)
    nn.init.zeros_(clf.bias)
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9, nesterov=True,
                          weight_decay=weight_decay)
    n = len(x_train)
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total = epochs * steps_per_epoch
    step, loss = 0, torch.zeros(())
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g).to(device)
        for lo in range(0, n, batch_size):
            idx = perm[lo:lo + batch_size]
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(clf(x_train[idx]), train_labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    with torch.no_grad():
        top1 = 100.0 * (clf(x_test).argmax(1) == test_labels).float().mean().item()
    return {"top1": top1, "train_loss": float(loss.detach())}


def load_backbone(path: str | Path, *, random_init: bool = False) -> tuple[nn.Module, dict]:
    """A pre-trained backbone and its metadata (architecture, input size, normalisation).

    ``path`` is a run folder, its ``checkpoint.pt`` or its ``backbone.pt`` (whose sibling
    ``backbone.json`` describes it), or an export (``selfsup export``: a ``.pt`` with its
    ``.json``, or a ``.safetensors``). ``random_init`` builds the same architecture untrained.
    """
    from . import checkpoint as ckpt
    from .backbones import build_backbone

    path = Path(path)
    if path.is_dir():
        path = path / "backbone.pt"
    if not path.exists():
        raise ckpt.CheckpointError(f"checkpoint '{path}' does not exist (expected a run folder, "
                                   f"its checkpoint.pt or its backbone.pt)")
    if path.suffix == ".safetensors":
        from .export import load_safetensors
        weights, meta = load_safetensors(path)
    else:
        weights, meta = _weights_and_meta(path)
    missing = [k for k in ("backbone", "width", "cifar_stem", "image_size", "mean", "std") if k not in meta]
    if missing:
        raise ckpt.CheckpointError(f"the description of '{path}' lacks {', '.join(missing)}; was it "
                                   f"written by selfsup?")
    backbone = build_backbone(meta["backbone"], width=meta["width"], cifar_stem=meta["cifar_stem"],
                              binary_weights=meta.get("binary_weights", True))
    if not random_init:
        stem = "CIFAR" if meta["cifar_stem"] else "standard"
        ckpt.load_weights(backbone, weights, path, f"a {meta['backbone']} (width {meta['width']:g}, "
                                                   f"{stem} stem) as its metadata says")
    return backbone, meta


def _weights_and_meta(path: Path) -> tuple[dict, dict]:
    """A training checkpoint carries its description; a bare state_dict has a JSON beside it."""
    from . import checkpoint as ckpt

    state = ckpt.load(path)
    if ckpt.is_run_state(state):
        weights = {k[len("backbone."):]: v for k, v in state["model"].items() if k.startswith("backbone.")}
        return weights, state["meta"]
    meta_path = path.with_suffix(".json")  # an export's own description, else the run's
    if not meta_path.exists():
        meta_path = path.with_name("backbone.json")
    if not meta_path.exists():
        raise ckpt.CheckpointError(f"'{path}' has no {meta_path.name} beside it describing the "
                                   f"architecture; point --checkpoint at the run folder")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as e:
        raise ckpt.CheckpointError(f"'{meta_path}' is not valid JSON ({e}); it describes {path.name}") from None
    if not isinstance(meta, dict) or not isinstance(state, dict):
        raise ckpt.CheckpointError(f"'{path}' with '{meta_path.name}' is not a selfsup backbone")
    return state, meta
