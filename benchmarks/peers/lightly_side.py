"""The peer's side of benchmarks/peers/run.py: one method trained with lightly's own parts.

Runs in the peer environment (benchmarks/peers/setup.sh), never in the project's:

    $PEERS_VENV/bin/python benchmarks/peers/lightly_side.py SPEC.json

SPEC (written by run.py) holds selfsup's resolved config of the matching selfsup run, the
decoded training images (.npy), the initial backbone state_dict both sides start from, and the
selfsup checkout whose backbone is built here. Everything method-specific comes from lightly:
its transforms (torchvision, through a DataLoader with workers), projection/prediction heads,
losses, momentum helpers (update_momentum, cosine_schedule, batch_shuffle), memory banks
(NNCLR's nearest-neighbour support set), LARS, the cosine-warm-up scheduler and weight-decay
grouping, used as lightly's CIFAR-10 benchmark and examples use them. The backbone is ours
(same architecture, a ResNet or a ViT, and the same initial weights), so the run folder it
writes (backbone.pt + backbone.json) is evaluated by ``selfsup eval knn``.
"""
from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from lightly import loss as L
from lightly.models import utils as U
from lightly.models.modules import NNMemoryBankModule
from lightly.models.modules import heads as H
from lightly import transforms as T
from lightly.utils.lars import LARS
from lightly.utils.scheduler import CosineWarmupScheduler, cosine_schedule


def hp(cfg: dict, *keys: str):
    """The first of ``keys`` ('section.name' or 'name') present in selfsup's config: a method's
    own section first, so a setting that moves from the top level into it is still found."""
    for key in keys:
        node = cfg
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            return node
    raise KeyError(f"none of {keys} in selfsup's config")


def fixed_layers(cfg: dict, head: str, layers: int = 3) -> None:
    """Refuse a model.proj_layers that lightly's ``head`` (a fixed depth) cannot build."""
    if cfg["model"]["proj_layers"] != layers:
        raise SystemExit(f"lightly_side: lightly's {head} has {layers} layers, selfsup's config "
                         f"model.proj_layers {cfg['model']['proj_layers']}")


class Images(torch.utils.data.Dataset):
    """uint8 (N, H, W, 3) images -> the lightly transform's list of views (as torchvision's CIFAR10)."""

    def __init__(self, images: np.ndarray, transform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i]))


class Peer(nn.Module):
    """One method assembled from lightly's parts around our backbone."""

    def __init__(self, method: str, cfg: dict, backbone: nn.Module, total_steps: int, steps_per_epoch: int):
        super().__init__()
        self.method, self.cfg, self.total, self.spe = method, cfg, total_steps, steps_per_epoch
        self.backbone = backbone
        feat = backbone.num_features
        m = cfg["model"]
        hidden = m["proj_hidden"] or feat
        self.momentum_pairs: list[tuple[nn.Module, nn.Module]] = []
        if method in ("simclr", "dcl", "dclw"):
            self.head = H.SimCLRProjectionHead(feat, hidden, m["proj_dim"], num_layers=m["proj_layers"])
            t = hp(cfg, "simclr.temperature", "temperature")
            self.criterion = {"simclr": lambda: L.NTXentLoss(temperature=t),
                              "dcl": lambda: L.DCLLoss(temperature=t),
                              "dclw": lambda: L.DCLWLoss(temperature=t, sigma=hp(cfg, "simclr.dclw_sigma", "dclw_sigma"))}[method]()
        elif method == "moco":
            mo = cfg["moco"]
            if mo["mlp"]:
                self.head = H.MoCoProjectionHead(feat, hidden, m["proj_dim"])
            else:  # v1 / the CIFAR demo: one linear layer
                self.head = H.ProjectionHead([(feat, m["proj_dim"], None, None)])
            self.criterion = L.NTXentLoss(temperature=hp(cfg, "moco.temperature", "temperature"),
                                          memory_bank_size=(mo["queue_size"], m["proj_dim"]))
            self._momentum_copies("backbone", "head")
        elif method == "byol":
            self.head = H.BYOLProjectionHead(feat, hidden, m["proj_dim"])
            self.predictor = H.BYOLPredictionHead(m["proj_dim"], cfg["byol"]["pred_hidden"] or hidden, m["proj_dim"])
            self.criterion = L.NegativeCosineSimilarity()
            self._momentum_copies("backbone", "head")
        elif method == "simsiam":
            # lightly's CIFAR-10 benchmark: a 2-layer projector with BN on both layers
            self.head = H.ProjectionHead([(feat, hidden, nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)),
                                          (hidden, m["proj_dim"], nn.BatchNorm1d(m["proj_dim"]), None)])
            self.predictor = H.SimSiamPredictionHead(m["proj_dim"], cfg["simsiam"]["pred_hidden"] or m["proj_dim"] // 4,
                                                     m["proj_dim"])
            self.criterion = L.NegativeCosineSimilarity()
        elif method == "swav":
            s = cfg["swav"]
            from selfsup.optim import freeze_steps  # selfsup's own rule; main() put the checkout on the path
            frozen_steps = freeze_steps(s["freeze_prototypes_epochs"], steps_per_epoch, s["freeze_prototypes_steps"])
            self.head = H.SwaVProjectionHead(feat, hidden, m["proj_dim"])
            self.prototypes = H.SwaVPrototypes(m["proj_dim"], s["prototypes"],
                                               n_steps_frozen_prototypes=frozen_steps)
            self.criterion = L.SwaVLoss(temperature=hp(cfg, "swav.temperature", "temperature"),
                                        sinkhorn_iterations=s["sinkhorn_iterations"], sinkhorn_epsilon=s["epsilon"])
        elif method == "barlow_twins":
            fixed_layers(cfg, "BarlowTwinsProjectionHead")
            self.head = H.BarlowTwinsProjectionHead(feat, hidden, m["proj_dim"])
            self.criterion = L.BarlowTwinsLoss(lambda_param=cfg["barlow_twins"]["lambd"], gather_distributed=False)
        elif method == "vicreg":
            v = cfg["vicreg"]
            self.head = H.VICRegProjectionHead(feat, hidden, m["proj_dim"], num_layers=m["proj_layers"])
            self.criterion = L.VICRegLoss(lambda_param=v["sim_coeff"], mu_param=v["std_coeff"], nu_param=v["cov_coeff"])
        elif method == "nnclr":
            c = cfg["nnclr"]
            fixed_layers(cfg, "NNCLRProjectionHead")
            self.head = H.NNCLRProjectionHead(feat, hidden, m["proj_dim"])
            self.predictor = H.NNCLRPredictionHead(m["proj_dim"], c["pred_hidden"], m["proj_dim"])
            self.memory_bank = NNMemoryBankModule(size=(c["support_size"], m["proj_dim"]))
            self.criterion = L.NTXentLoss(temperature=hp(cfg, "nnclr.temperature", "temperature"))
        elif method == "dino":
            d = cfg["dino"]
            fixed_layers(cfg, "DINOProjectionHead")
            head = lambda: H.DINOProjectionHead(feat, hidden, d["bottleneck_dim"], d["out_dim"],  # noqa: E731
                                                batch_norm=d["head_bn"], norm_last_layer=d["norm_last_layer"],
                                                freeze_last_layer=int(round(d["freeze_last_layer_epochs"])))
            self.head = head()
            self.criterion = L.DINOLoss(output_dim=d["out_dim"], warmup_teacher_temp=d["warmup_teacher_temp"],
                                        teacher_temp=d["teacher_temp"],
                                        warmup_teacher_temp_epochs=int(round(d["warmup_teacher_temp_epochs"])),
                                        student_temp=d["student_temp"], center_momentum=d["center_momentum"])
            self._momentum_copies("backbone")
            # weight_norm's head cannot be deep-copied: a second instance, given the student's weights (as DINO)
            self.head_momentum = head()
            self.head_momentum.load_state_dict(self.head.state_dict())
            U.deactivate_requires_grad(self.head_momentum)
            self.momentum_pairs.append((self.head, self.head_momentum))
        else:
            raise SystemExit(f"lightly_side: no lightly recipe for method {method!r}")

    def _momentum_copies(self, *names: str) -> None:
        from selfsup.vit import without_drop_path  # ours, as the backbone: a momentum copy runs without
        for name in names:                         # stochastic depth (a no-op for a ResNet)
            online = getattr(self, name)
            target = without_drop_path(copy.deepcopy(online))
            U.deactivate_requires_grad(target)
            setattr(self, name + "_momentum", target)
            self.momentum_pairs.append((online, target))

    def ema(self, step: int) -> None:
        """lightly's momentum update before the step; BYOL and DINO raise m to 1 on a cosine."""
        if self.method == "moco":
            m = self.cfg["moco"]["momentum"]
            if self.cfg["moco"]["momentum_cosine"]:
                m = cosine_schedule(step, self.total, m, 1.0)
        elif self.method in ("byol", "dino"):
            m = cosine_schedule(step, self.total, self.cfg[self.method]["momentum"], 1.0)
        else:
            return
        for online, target in self.momentum_pairs:
            U.update_momentum(online, target, m)

    def forward(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        f = lambda x: self.backbone(x).flatten(start_dim=1)  # noqa: E731
        if self.method in ("simclr", "dcl", "dclw"):
            return self.criterion(self.head(f(views[0])), self.head(f(views[1])))
        if self.method == "moco":
            def one(q_view, k_view):
                q = self.head(f(q_view))
                with torch.no_grad():
                    k_view, shuffle = U.batch_shuffle(k_view)
                    k = self.head_momentum(self.backbone_momentum(k_view).flatten(start_dim=1))
                    k = U.batch_unshuffle(k, shuffle)
                return self.criterion(q, k)
            loss = one(views[0], views[1])
            return loss + one(views[1], views[0]) if self.cfg["moco"]["symmetric"] else loss
        if self.method == "byol":
            p0, p1 = (self.predictor(self.head(f(v))) for v in views[:2])
            with torch.no_grad():
                z0, z1 = (self.head_momentum(self.backbone_momentum(v).flatten(start_dim=1)) for v in views[:2])
            return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))
        if self.method == "simsiam":
            z0, z1 = (self.head(f(v)) for v in views[:2])
            p0, p1 = self.predictor(z0), self.predictor(z1)
            return 0.5 * (self.criterion(p0, z1.detach()) + self.criterion(p1, z0.detach()))
        if self.method in ("barlow_twins", "vicreg"):
            z0, z1 = (self.head(f(v)) for v in views[:2])  # each view alone: BN per view, as selfsup
            return self.criterion(z0, z1)
        if self.method == "nnclr":  # lightly's NNCLR example: the second view's projections enter the bank
            z0, z1 = (self.head(f(v)) for v in views[:2])
            p0, p1 = self.predictor(z0), self.predictor(z1)
            nn0 = self.memory_bank(z0.detach(), update=False)
            nn1 = self.memory_bank(z1.detach(), update=True)
            return 0.5 * (self.criterion(nn0, p1) + self.criterion(nn1, p0))
        if self.method == "swav":
            self.prototypes.normalize()
            z = [nn.functional.normalize(self.head(f(v)), dim=1, p=2) for v in views]
            p = [self.prototypes(x, step) for x in z]
            n = self.cfg["multicrop"]["global_crops"]
            return self.criterion(p[:n], p[n:])
        if self.method == "dino":
            n = self.cfg["multicrop"]["global_crops"]
            with torch.no_grad():
                teacher = [self.head_momentum(self.backbone_momentum(v).flatten(start_dim=1)) for v in views[:n]]
            student = [self.head(f(v)) for v in views]
            return self.criterion(teacher, student, epoch=step // self.spe)
        raise AssertionError(self.method)

    def after_backward(self, step: int) -> None:
        if self.method == "dino":
            self.head.cancel_last_layer_gradients(current_epoch=step // self.spe)


#: methods whose two views are BYOL's asymmetric pair in selfsup (``Method.asymmetric_views``); lightly
#: has its own transforms for some (VICRegTransform, ...), but both sides must run the same recipe
BYOL_VIEWS = ("byol", "barlow_twins", "vicreg", "nnclr")


def byol_views(cfg: dict, size: int, normalize: dict):
    """lightly's BYOLTransform: view 1 blur 1.0, view 2 blur 0.1 and solarisation 0.2 (blur only if aug.blur)."""
    a = cfg["aug"]
    kw = dict(input_size=size, min_scale=a["scale_min"], normalize=normalize)
    return T.BYOLTransform(view_1_transform=T.BYOLView1Transform(gaussian_blur=1.0 if a["blur"] else 0.0, **kw),
                           view_2_transform=T.BYOLView2Transform(gaussian_blur=0.1 if a["blur"] else 0.0, **kw))


def transform(method: str, cfg: dict, size: int, normalize: dict):
    a, mc = cfg["aug"], cfg["multicrop"]
    blur = 0.5 if a["blur"] else 0.0
    if method in ("simclr", "dcl", "dclw"):
        return T.SimCLRTransform(input_size=size, cj_strength=a["strength"], min_scale=a["scale_min"],
                                 gaussian_blur=blur, normalize=normalize)
    if method == "moco":  # v2: jitter (0.4, 0.4, 0.4, 0.1) p=0.8, grayscale 0.2
        return T.MoCoV2Transform(input_size=size, min_scale=a["scale_min"], gaussian_blur=blur, normalize=normalize)
    if method in BYOL_VIEWS:
        return byol_views(cfg, size, normalize)
    if method == "simsiam":
        return T.SimSiamTransform(input_size=size, min_scale=a["scale_min"], gaussian_blur=blur, normalize=normalize)
    local = mc["local_size"] or round(size * 96 / 224)
    if method == "swav":
        return T.SwaVTransform(crop_sizes=(size, local), crop_counts=(mc["global_crops"], mc["local_crops"]),
                               crop_min_scales=(a["scale_min"], mc["local_scale_min"]),
                               crop_max_scales=(1.0, mc["local_scale_max"]), cj_strength=a["strength"],
                               gaussian_blur=blur, normalize=normalize)
    if method == "dino":
        return T.DINOTransform(global_crop_size=size, global_crop_scale=(a["scale_min"], 1.0), local_crop_size=local,
                               local_crop_scale=(mc["local_scale_min"], mc["local_scale_max"]),
                               n_local_views=mc["local_crops"],
                               gaussian_blur=(1.0, 0.1, 0.5) if a["blur"] else (0.0, 0.0, 0.0), normalize=normalize)
    raise SystemExit(f"lightly_side: no lightly transform for method {method!r}")


def optimizer(method: str, cfg: dict, model: Peer, peak_lr: float):
    o = cfg["optim"]
    trainable = nn.ModuleList([mod for name, mod in model.named_children()
                               if not name.endswith("_momentum") and name != "criterion"])
    if o["exclude_bias_and_norm"]:
        decay, no_decay = U.get_weight_decay_parameters([trainable])
        groups = [{"params": decay, "weight_decay": o["weight_decay"]},
                  {"params": no_decay, "weight_decay": 0.0}]
        if method == "barlow_twins":  # biases and BN at bias_lr_ratio of the lr (LARS skips their trust ratio:
            # weight decay 0); the scheduler scales each group's own lr
            groups[1]["lr"] = peak_lr * cfg["barlow_twins"]["bias_lr_ratio"]
    else:
        groups = [{"params": [p for p in trainable.parameters()], "weight_decay": o["weight_decay"]}]
    if method == "simsiam" and cfg["simsiam"]["fix_pred_lr"]:
        pred = {id(p) for p in model.predictor.parameters()}
        for g in groups:
            g["params"] = [p for p in g["params"] if id(p) not in pred]
        groups.append({"params": list(model.predictor.parameters()), "weight_decay": o["weight_decay"],
                       "fixed_lr": True})
    if o["name"] == "lars":
        return LARS(groups, lr=peak_lr, momentum=o["momentum"])  # wd 0 groups skip the trust ratio
    if o["name"] == "sgd":
        return torch.optim.SGD(groups, lr=peak_lr, momentum=o["momentum"])
    return torch.optim.AdamW(groups, lr=peak_lr)  # each group's own weight decay (none on biases and norms)


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    cfg, method, out = spec["config"], spec["method"], Path(spec["out"])
    sys.path.insert(0, spec["checkout"])
    from selfsup.backbones import build_backbone, is_vit  # ours: only torch is needed

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    device = torch.device(spec.get("device", "cpu"))
    if spec["flush_denormal"] and device.type == "cpu":
        torch.set_flush_denormal(True)
    m = cfg["model"]
    # as selfsup.train.build_method: every family's arguments (a ViT's position embeddings for the views' side)
    backbone = build_backbone(m["backbone"], width=m["width"], cifar_stem=m["cifar_stem"],
                              binary_weights=m["binary_weights"], zero_init_residual=m["zero_init_residual"],
                              patch_size=m["patch_size"], image_size=spec["size"] if is_vit(m["backbone"]) else None,
                              drop_path=m["drop_path"], freeze_patch_embed=m["freeze_patch_embed"])
    backbone.load_state_dict(torch.load(spec["init"], map_location="cpu"))
    images = np.load(spec["images"], mmap_mode="r")
    b, epochs = cfg["train"]["batch_size"], cfg["train"]["epochs"]
    spe = len(images) // b
    total = spe * epochs
    model = Peer(method, cfg, backbone, total, spe).to(device)
    norm = {"mean": spec["mean"], "std": spec["std"]}
    data = Images(images, transform(method, cfg, spec["size"], norm))
    g = torch.Generator().manual_seed(spec["seed"])
    loader = torch.utils.data.DataLoader(data, batch_size=b, shuffle=True, drop_last=True, generator=g,
                                         num_workers=spec["workers"], persistent_workers=spec["workers"] > 0,
                                         pin_memory=device.type == "cuda")
    peak_lr = spec["peak_lr"]
    opt = optimizer(method, cfg, model, peak_lr)
    warmup = min(round(cfg["optim"]["warmup_epochs"] * spe), total)
    sched = CosineWarmupScheduler(opt, warmup_epochs=warmup, max_epochs=total,
                                  end_value=cfg["optim"]["final_lr"])
    o = cfg["optim"]
    decayed = [grp for grp in opt.param_groups if grp["weight_decay"] > 0]  # DINO's regularised group only
    clip = o["clip_grad"]
    if clip:
        from selfsup.methods import METHODS  # the method's own default mode, as selfsup's loop resolves it
        clip_mode = o["clip_grad_mode"] or METHODS[cfg["method"]].clip_grad_mode_default
    dtype = torch.bfloat16 if spec["precision"] == "bf16" else None
    losses, step = [], 0
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        total_loss = torch.zeros((), device=device)
        for views in loader:
            views = [v.to(device, non_blocking=True) for v in views]
            model.ema(step)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = model(views, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            model.after_backward(step)
            if clip:
                params = [p for grp in opt.param_groups for p in grp["params"] if p.grad is not None]
                if clip_mode == "per_param":  # each parameter's own norm: DINO's utils.clip_gradients
                    for p in params:
                        nn.utils.clip_grad_norm_(p, clip)
                else:
                    nn.utils.clip_grad_norm_(params, clip)
            if o.get("final_weight_decay") is not None:  # the step's weight decay beside its lr (DINO's ViT)
                wd = cosine_schedule(step, total, o["weight_decay"], o["final_weight_decay"])
                for grp in decayed:
                    grp["weight_decay"] = wd
            opt.step()
            sched.step()
            for grp in opt.param_groups:
                if grp.get("fixed_lr"):
                    grp["lr"] = peak_lr
            total_loss += loss.detach().float().sum()  # SwaVLoss returns shape (1,)
            step += 1
        losses.append(total_loss.item() / spe)
        print(f"lightly {method} epoch {epoch + 1}/{epochs} loss {losses[-1]:.4f}", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.cpu() for k, v in backbone.state_dict().items()}, out / "backbone.pt")
    (out / "backbone.json").write_text(json.dumps(spec["meta"], indent=1))
    result = {"steps": step, "seconds": seconds, "images_per_s": step * b / seconds, "losses": losses,
              "torch": torch.__version__, "lightly": __import__("lightly").__version__,
              "threads": torch.get_num_threads(), "workers": spec["workers"], "device": str(device)}
    (out / "lightly_result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(sys.argv[1])
