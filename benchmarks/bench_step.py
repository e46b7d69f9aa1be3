"""Full SimCLR training step against the bare backbone, side by side on one device.

    python benchmarks/bench_step.py --device cpu --batch 256 --size 32 --width 0.25
    python benchmarks/bench_step.py --device cuda --batch 512 --size 32 --width 1

(a) images/s of a whole SimCLR step: on-device augmentation of a uint8 batch into two views,
    forward, NT-Xent, backward, LARS step;
(b) images/s of the bare backbone forward + backward on pre-made float tensors of the same
    shape (2 x batch views), with no augmentation, head, loss or optimiser.
The ratio (a time / b time) is what the data path, head, loss and optimiser add.
Timings alternate between (a) and (b) so machine noise hits both alike.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from selfsup.config import resolve
from selfsup.train import autocast_dtype, build_method, train_step
from selfsup.evaluate import autocast
from selfsup.optim import build_optimizer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--iters", type=int, default=5, help="timed iterations of each (after 2 warm-up)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    cfg = resolve(preset_name="cifar10-simclr", overrides={
        "model": {"backbone": a.backbone, "width": a.width},
        "train": {"batch_size": a.batch, "precision": a.precision}})
    dtype = autocast_dtype(cfg.train.precision, device)
    torch.manual_seed(0)
    method = build_method(cfg).to(device, memory_format=torch.channels_last)
    augmentations = method.augmentations(a.size, (0.5,) * 3, (0.25,) * 3)
    optimizer = build_optimizer("lars", method.param_groups(), lr=0.1, weight_decay=1e-6)
    generator = torch.Generator(device=device).manual_seed(0)
    batch = torch.randint(0, 256, (a.batch, a.size, a.size, 3), dtype=torch.uint8, device=device)

    backbone = method.backbone
    views = torch.randn(2 * a.batch, 3, a.size, a.size, device=device).to(memory_format=torch.channels_last)

    def full_step():
        train_step(method, optimizer, augmentations, batch, generator, dtype)

    def bare_step():
        with autocast(device, dtype):
            out = backbone(views)
        out.float().sum().backward()
        backbone.zero_grad(set_to_none=True)

    for _ in range(2):
        full_step()
        bare_step()
    t_full, t_bare = [], []
    for _ in range(a.iters):
        t_full.append(timed(full_step, device))
        t_bare.append(timed(bare_step, device))
    full, bare = statistics.median(t_full), statistics.median(t_bare)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"torch {torch.__version__} | {device} ({name}) | threads {torch.get_num_threads()} | "
          f"{a.backbone} width {a.width} | batch {a.batch} x 2 views at {a.size}px | "
          f"precision {dtype or torch.float32} | median of {a.iters}")
    print(f"full SimCLR step : {a.batch / full:10.1f} images/s ({full * 1e3:.1f} ms)")
    print(f"bare backbone f+b: {a.batch / bare:10.1f} images/s ({bare * 1e3:.1f} ms)")
    print(f"ratio step/backbone: {full / bare:.3f}")


if __name__ == "__main__":
    main()
