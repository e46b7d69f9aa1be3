"""Throughput of selfsup.augment's SimCLR view against the same recipe built from kornia.

Both pipelines start from a uint8 (B, H, W, 3) batch on the chosen device and end with a
normalised float batch. Timings of the two are interleaved round by round in one process,
so the printed ratio is meaningful even on a shared, noisy machine; the absolute images/s
are not.

    python benchmarks/bench_augment.py --device cpu --batch 256 --size 32 --iters 20

Rows:
  * SimCLR CIFAR recipe (strength 0.5, no blur) at --size (Appendix B.9 of SimCLR);
  * the same with Gaussian blur (p=0.5, kernel 10% of the side) at 64x64.
Notes: kornia's ColorJitter draws one op order per batch, ours one per sample; kornia's
output is left in its natural NCHW layout while ours is channels_last.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selfsup.augment import Augment, blur_kernel_size, simclr_view  # noqa: E402

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def _import_kornia():
    try:
        import kornia  # noqa: F401
        import kornia.augmentation as K
    except ImportError:
        sys.exit("kornia is needed for the comparison: pip install 'kornia>=0.7' (or pip install -e '.[bench]')")
    return kornia, K


def kornia_pipeline(size: int, blur: bool, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """SimCLR strength 0.5 from kornia.augmentation, with ColorJitter (torchvision formulas)."""
    _, K = _import_kornia()
    ops = [
        K.RandomResizedCrop((size, size), scale=(0.08, 1.0)),
        K.RandomHorizontalFlip(),
        K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
        K.RandomGrayscale(p=0.2),
    ]
    if blur:
        k = blur_kernel_size(size)
        ops.append(K.RandomGaussianBlur((k, k), (0.1, 2.0), p=0.5))
    ops.append(K.Normalize(mean=torch.tensor(MEAN), std=torch.tensor(STD)))
    seq = torch.nn.Sequential(*ops).to(device)

    def run(images: torch.Tensor) -> torch.Tensor:
        # kornia wants float NCHW in [0, 1]; the conversion is part of its cost.
        return seq(images.permute(0, 3, 1, 2).float().div_(255.0))

    return run


def ours_pipeline(size: int, blur: bool, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    aug = Augment(simclr_view(size, strength=0.5, blur=blur, mean=MEAN, std=STD))
    gen = torch.Generator(device=device).manual_seed(0)
    return lambda images: aug(images, gen)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_pair(
    fns: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    images: torch.Tensor,
    iters: int,
    warmup: int,
    rounds: int,
) -> dict[str, float]:
    """Median seconds per batch of each fn, alternating fns round by round."""
    device = images.device
    with torch.no_grad():
        for fn in fns.values():
            for _ in range(warmup):
                fn(images)
        _sync(device)
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(iters):
                    fn(images)
                _sync(device)
                times[name].append((time.perf_counter() - t0) / iters)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--size", type=int, default=32, help="source and output side of the first row")
    ap.add_argument("--blur-size", type=int, default=64, help="source and output side of the blur row")
    ap.add_argument("--iters", type=int, default=20, help="batches per timed round")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds; the median is reported")
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args(argv)

    kornia, _ = _import_kornia()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda requested but CUDA is not available")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"torch {torch.__version__}  kornia {kornia.__version__}  device {name}")
    print(f"batch {args.batch}, {args.iters} iters x {args.rounds} rounds (median), uint8 NHWC in\n")
    print(f"{'recipe':<34}{'ours img/s':>12}{'kornia img/s':>14}{'ours/kornia':>13}")

    gen = torch.Generator().manual_seed(0)
    for label, size, blur in (
        (f"SimCLR s=0.5 no blur {args.size}x{args.size}", args.size, False),
        (f"SimCLR s=0.5 + blur {args.blur_size}x{args.blur_size}", args.blur_size, True),
    ):
        images = torch.randint(0, 256, (args.batch, size, size, 3), dtype=torch.uint8, generator=gen).to(device)
        fns = {"ours": ours_pipeline(size, blur, device), "kornia": kornia_pipeline(size, blur, device)}
        t = bench_pair(fns, images, args.iters, args.warmup, args.rounds)
        ours, korn = args.batch / t["ours"], args.batch / t["kornia"]
        print(f"{label:<34}{ours:>12.0f}{korn:>14.0f}{ours / korn:>12.2f}x")


if __name__ == "__main__":
    main()
