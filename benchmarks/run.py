"""Performance of selfsup on the current device, in one run (issue 8).

    python benchmarks/run.py                                   # every section, defaults below
    python benchmarks/run.py --only steps --batch 256 --size 32 --width 0.25
    python benchmarks/run.py --only augment,stream
    python benchmarks/run.py --only losses --loss-batches 256,1024,4096,16384
    python benchmarks/run.py --device cuda --batch 512 --width 1          # the GPU table

Sections (``--only``):
  steps    per method (every entry of selfsup.methods.METHODS, on its CIFAR-10 preset): images/s
           of the full training step (train.train_step with the method's augmentations,
           optimiser and hooks) against the bare backbone forward + backward on pre-made
           tensors of the same shapes (all views, by resolution), interleaved, median of rounds;
           also against the backbone work the method itself does (its online calls plus the
           no-grad forwards of momentum encoders), peak memory, and the time shares of a
           separate, synchronised pass.
  augment  our SimCLR view against kornia.augmentation on the same recipe, and against
           torchvision transforms + DataLoader workers where torchvision imports.
  stream   decoded + cropped images/s per CPU core of the streaming loader (selfsup.stream)
           on the CIFAR-10 JPEGs (--cifar) and on generated 500x375 JPEGs.
  settings (not in the default list) the full step of each method in fp32 and bf16, channels_last
           on and off, at 1 thread and at all of them, interleaved: what precision=auto and
           train.channels_last should choose on this CPU (issue 14 §3).
  losses   time and peak memory of nt_xent, dcl and info_nce (forward + backward), dense and
           chunked, from batch 256 upwards.
Headline timings never synchronise inside a round; peak memory is CUDA's max_memory_allocated,
or on a CPU the growth of the resident-set high-water mark (printed with each table).
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selfsup import losses  # noqa: E402
from selfsup.augment import Augment, blur_kernel_size, simclr_view  # noqa: E402
from selfsup.config import resolve  # noqa: E402
from selfsup.device import autocast_dtype  # noqa: E402
from selfsup.methods import METHODS  # noqa: E402
from selfsup.perf import (PeakMemory, backbone_calls, bare_backbone, build_rig, interleaved,  # noqa: E402
                          phases, synchronize, view_shapes)
from selfsup.stream import Crops, ImageStream  # noqa: E402

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
PRESETS = {"simclr": "cifar10-simclr", "moco": "cifar10-moco-v2", "byol": "cifar10-byol",
           "simsiam": "cifar10-simsiam", "swav": "cifar10-swav", "dino": "cifar10-dino"}


def mib(n: float) -> str:
    return f"{n / 2**20:.0f}"


# --------------------------------------------------------------------------------------- steps

def bench_steps(a, device) -> None:
    print(f"## steps: batch {a.batch} at {a.size}x{a.size}, {a.backbone} width {a.width}, precision "
          f"{a.precision}{', torch.compile' if a.compile else ''}; {a.rounds} rounds x {a.iters} steps, median")
    header = (f"{'method':<8}{'step img/s':>11}{'bare img/s':>11}{'ratio':>7}{'vs own':>8}{'peak MiB':>10}"
              + "".join(f"{k:>{len(k) + 2}}" for k in ("augment", "backbone", "momentum", "loss+heads", "optimizer"))
              + f"{'head FLOPs':>12}")
    print(header)
    for name in a.methods:
        if name not in METHODS:
            print(f"{name:<8} not in selfsup.methods.METHODS; skipped")
            continue
        preset = PRESETS.get(name)
        overrides = {"model": {"backbone": a.backbone, "width": a.width},
                     "train": {"batch_size": a.batch, "precision": a.precision}}
        if name == "moco":  # the queue must hold whole batches
            overrides["moco"] = {"queue_size": max(4096 // a.batch, 1) * a.batch}
        if name == "swav":
            overrides["swav"] = {"queue_length": 0}
        try:
            cfg = resolve(preset_name=preset, overrides=overrides) if preset else resolve(
                overrides={"method": name, **overrides})
            with PeakMemory(device) as peak:
                rig = build_rig(cfg, device, a.size)
                online, momentum = backbone_calls(rig)  # one real step, hooks recording shapes
                p = phases(rig, steps=3)  # eager: the hooks it times with do not fire in compiled code
                flops = head_flops(rig, online, momentum)
                if a.compile:
                    rig.method = torch.compile(rig.method)
                bare = bare_backbone(rig, view_shapes(rig))
                fns = {"step": rig, "bare": bare}
                if sorted(online) != sorted(view_shapes(rig)) or momentum:  # else "own" is "bare"
                    fns["own"] = bare_backbone(rig, online, momentum)
                t = interleaved(fns, device, iters=a.iters, rounds=a.rounds)
                t.setdefault("own", t["bare"])
        except Exception as e:  # a registered method this harness cannot build: say so, go on
            print(f"{name:<8} skipped: {type(e).__name__}: {e}")
            continue
        total = sum(p.values())
        b = a.batch
        print(f"{name:<8}{b / t['step']:>11.1f}{b / t['bare']:>11.1f}{t['step'] / t['bare']:>7.3f}"
              f"{t['step'] / t['own']:>8.3f}{mib(peak.peak):>10}"
              + "".join(f"{100 * s / total:>{len(k) + 1}.0f}%" for k, s in p.items())
              + f"{100 * flops:>11.0f}%", flush=True)
        print(f"{'':<8}views {view_shapes(rig)}; online backbone {online}; momentum encoders {momentum}")
    print(f"ratio = step time / bare backbone f+b on all views; vs own = step / (the online backbone's "
          f"f+b + the momentum encoders' forwards, as the step calls them); peak = {PeakMemory(device).what}, "
          f"building + running; shares of the step's time from a separate pass that synchronises around "
          f"each part (median of 3 steps): the online backbone's forwards and backward (hooks), the momentum "
          f"encoders' forwards, the rest of forward + backward (heads, loss), optimiser + post-step hook. "
          f"head FLOPs: the forward's FLOPs outside the backbones (heads, loss) over the backbones' "
          f"(torch.utils.flop_counter; matmuls and convolutions).\n")


def head_flops(rig, online, momentum) -> float:
    """FLOPs of one forward outside the backbones (heads, loss) over the backbones' FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad():
        views = [aug(rig.batch, rig.generator) for aug in rig.augmentations]
        with FlopCounterMode(display=False) as whole:
            rig.method(views)
        backbone = 0
        for shape in online + momentum:
            with FlopCounterMode(display=False) as one:
                rig.method.backbone(torch.zeros(shape, device=rig.device).contiguous(memory_format=torch.channels_last))
            backbone += one.get_total_flops()
    return (whole.get_total_flops() - backbone) / backbone


# ------------------------------------------------------------------------------------- augment

def kornia_pipeline(size: int, blur: bool, device):
    import kornia.augmentation as K
    ops = [K.RandomResizedCrop((size, size), scale=(0.08, 1.0)), K.RandomHorizontalFlip(),
           K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8), K.RandomGrayscale(p=0.2)]
    if blur:
        k = blur_kernel_size(size)
        ops.append(K.RandomGaussianBlur((k, k), (0.1, 2.0), p=0.5))
    ops.append(K.Normalize(mean=torch.tensor(MEAN), std=torch.tensor(STD)))
    seq = torch.nn.Sequential(*ops).to(device)
    return lambda images: seq(images.permute(0, 3, 1, 2).float().div_(255.0))  # its input: float NCHW


def torchvision_loader(images: np.ndarray, size: int, blur: bool, batch: int, workers: int):
    """The peers' pipeline: per-image PIL transforms in DataLoader workers, two views per image."""
    import torchvision.transforms as T
    from PIL import Image
    ops = [T.RandomResizedCrop(size, scale=(0.08, 1.0)), T.RandomHorizontalFlip(),
           T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=0.2)]
    if blur:
        ops.append(T.RandomApply([T.GaussianBlur(blur_kernel_size(size), (0.1, 2.0))], p=0.5))
    view = T.Compose([*ops, T.ToTensor(), T.Normalize(MEAN, STD)])

    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            im = Image.fromarray(images[i])
            return view(im), view(im)

    return torch.utils.data.DataLoader(Pairs(), batch_size=batch, shuffle=True, num_workers=workers,
                                       drop_last=True, persistent_workers=workers > 0)


def bench_augment(a, device) -> None:
    try:
        import kornia
    except ImportError:
        kornia = None
    print(f"## augment: uint8 (B, H, W, 3) batch of {a.batch} in, normalised float views out; "
          f"{a.rounds} rounds x 20 batches, interleaved, median" + ("" if kornia else " (kornia not installed)"))
    print(f"{'recipe':<32}{'ours img/s':>12}{'kornia img/s':>14}{'ours/kornia':>13}")
    g = torch.Generator().manual_seed(0)
    for label, size, blur in ((f"SimCLR s=0.5 {a.size}x{a.size}", a.size, False),
                              ("SimCLR s=0.5 + blur 64x64", 64, True)):
        images = torch.randint(0, 256, (a.batch, size, size, 3), dtype=torch.uint8, generator=g).to(device)
        ours = Augment(simclr_view(size, strength=0.5, blur=blur, mean=MEAN, std=STD))
        gen = torch.Generator(device=device).manual_seed(0)
        fns = {"ours": lambda: ours(images, gen)}
        if kornia:
            korn = kornia_pipeline(size, blur, device)
            fns["kornia"] = lambda: korn(images)
        with torch.no_grad():
            t = interleaved(fns, device, iters=20, rounds=a.rounds)
        k = f"{a.batch / t['kornia']:>14.0f}{t['kornia'] / t['ours']:>12.2f}x" if kornia else ""
        print(f"{label:<32}{a.batch / t['ours']:>12.0f}{k}")
    try:
        import torchvision  # noqa: F401
    except Exception as e:  # noqa: BLE001 -- a broken install raises more than ImportError
        print(f"torchvision + DataLoader: skipped, torchvision does not import here ({type(e).__name__}: {e})\n")
        return
    workers = a.workers if a.workers is not None else max(1, (os.cpu_count() or 2) - 1)
    images = torch.randint(0, 256, (a.batch * 21, a.size, a.size, 3), dtype=torch.uint8, generator=g).numpy()
    loader = torchvision_loader(images, a.size, False, a.batch, workers)
    ours = Augment(simclr_view(a.size, strength=0.5, blur=False, mean=MEAN, std=STD))
    gen = torch.Generator(device=device).manual_seed(0)
    data = torch.from_numpy(images).to(device)
    it = iter(loader)
    next(it)  # workers started
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(20):
        v1, v2 = next(it)
        v1.to(device, non_blocking=True), v2.to(device, non_blocking=True)
    synchronize(device)
    tv = (time.perf_counter() - t0) / 20
    synchronize(device)
    t0 = time.perf_counter()
    for i in range(20):
        batch = data[i * a.batch:(i + 1) * a.batch]
        ours(batch, gen), ours(batch, gen)
    synchronize(device)
    ot = (time.perf_counter() - t0) / 20
    print(f"two views per image, {a.size}x{a.size}: ours {a.batch / ot:.0f} images/s on {device}; torchvision "
          f"+ DataLoader ({workers} workers) {a.batch / tv:.0f} images/s; ours/torchvision {tv / ot:.2f}x\n")


# -------------------------------------------------------------------------------------- stream

def _jpegs(root: Path, a) -> dict[str, Path]:
    """Folders of test JPEGs: the first --stream-images CIFAR-10 JPEGs, and generated 500x375 ones."""
    out = {}
    if a.cifar and Path(a.cifar).exists():
        d = root / "cifar"
        d.mkdir()
        with tarfile.open(a.cifar, "r:*") as tf:
            n = 0
            for m in tf:
                if m.isfile() and m.name.lower().endswith((".jpg", ".jpeg")) and "/train/" in f"/{m.name}":
                    (d / f"{n:06d}.jpg").write_bytes(tf.extractfile(m).read())
                    n += 1
                    if n == a.stream_images:
                        break
        out["CIFAR-10 JPEG 32x32"] = d
    else:
        print(f"(CIFAR-10 JPEGs not found at {a.cifar}: that row is skipped)")
    from PIL import Image
    d = root / "large"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(min(a.stream_images, 400)):
        base = rng.integers(0, 256, (47, 63, 3), dtype=np.uint8)  # smooth content, as photos are
        im = Image.fromarray(base).resize((500, 375), Image.Resampling.BICUBIC)
        im.save(d / f"{i:06d}.jpg", quality=90)
    out["generated JPEG 500x375"] = d
    return out


def bench_stream(a, device) -> None:
    print(f"## stream: decode + crop at decode time, one process (one core), uint8 crops out")
    with tempfile.TemporaryDirectory() as tmp:
        folders = _jpegs(Path(tmp), a)
        print(f"{'images':<26}{'output':<22}{'images/s/core':>14}{'MB/s read':>10}")
        for label, folder in folders.items():
            stream = ImageStream(folder)
            mb = sum(Path(f).stat().st_size for f in stream.files) / 2**20
            for out in ((a.size,) * 2 if "CIFAR" in label else (224, 224), (224, 224, 96, 96, 96, 96, 96, 96)):
                if "CIFAR" in label and len(out) > 2:
                    continue
                views = [simclr_view(s, scale=(0.08, 1.0) if s >= 128 or "CIFAR" in label else (0.05, 0.14))
                         for s in out]
                crops, n = Crops(stream, views, seed=0), len(stream)
                batches = [[(0, i) for i in range(lo, min(n, lo + 64))] for lo in range(0, n, 64)]
                times = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    for keys in batches:  # what one DataLoader worker does with a batch of 64
                        crops.__getitems__(keys)
                    times.append(time.perf_counter() - t0)
                t = statistics.median(times)
                desc = f"{len(out)} crops " + "+".join(sorted({f'{s}px' for s in out}, reverse=True))
                print(f"{label:<26}{desc:<22}{len(stream) / t:>14.0f}{mb / t:>10.1f}")
    print("images/s/core: median of 3 passes over the files (in the page cache), batches of 64 decoded in "
          "this process as one DataLoader worker decodes them (read, crop boxes, decode, resize).\n")


# -------------------------------------------------------------------------------------- losses

def bench_losses(a, device) -> None:
    dim, queue_k = 128, a.queue
    print(f"## losses: forward + backward, D={dim}, float32, info_nce against a queue of {queue_k}; median of "
          f"{a.loss_repeats} (1 from batch 8192); peak = {PeakMemory(device).what} (the inputs excluded)")
    print(f"{'loss':<9}{'batch':>7}{'logits':>16}{'dense ms':>10}{'dense MiB':>11}{'chunked ms':>12}{'chunked MiB':>13}")
    budget = time.perf_counter() + 60 * a.loss_minutes
    for b in a.loss_batches:
        for name in ("nt_xent", "dcl", "info_nce"):
            if time.perf_counter() > budget:
                print(f"(stopped at batch {b}: --loss-minutes {a.loss_minutes} spent)")
                return
            g = torch.Generator(device=device).manual_seed(b)
            z = [torch.randn(b, dim, device=device, generator=g).requires_grad_() for _ in range(2)]
            queue = F.normalize(torch.randn(queue_k, dim, device=device, generator=g), dim=1)
            rows, cols = (b, queue_k + 1) if name == "info_nce" else (2 * b, 2 * b)
            fn = getattr(losses, name)
            row = f"{name:<9}{b:>7}{f'{rows}x{cols}':>16}"
            for chunk in (0, None):
                if chunk == 0 and rows * cols > a.dense_max:
                    row += f"{'-':>10}{'-':>11}"
                    continue
                kw = {"chunk": chunk if chunk == 0 else max(1, losses.DENSE_LOGITS_MAX // cols)}

                def run():
                    args = (z[0], z[1], queue) if name == "info_nce" else (z[0], z[1])
                    loss = fn(*args, **kw)
                    loss.backward()
                    for x in z:
                        x.grad = None
                times = []
                for _ in range(a.loss_repeats if b < 8192 else 1):  # the largest: one run each
                    with PeakMemory(device) as peak:
                        synchronize(device)
                        t0 = time.perf_counter()
                        run()
                        synchronize(device)
                    times.append(time.perf_counter() - t0)
                row += f"{1e3 * statistics.median(times):>10.0f}{mib(peak.peak):>11}" if chunk == 0 else \
                    f"{1e3 * statistics.median(times):>12.0f}{mib(peak.peak):>13}"
            print(row, flush=True)
    print(f"dense: '-' above --dense-max {a.dense_max} logits entries; chunked: "
          f"{losses.DENSE_LOGITS_MAX} entries per chunk (the automatic path above that size).\n")


# ------------------------------------------------------------------------------------ settings

def bench_settings(a, device) -> None:
    """Issue 14 §3: the full training step of each method under every CPU setting that
    precision=auto and train.channels_last choose between, and at each thread count,
    interleaved in one process (the machine's noise hits every setting alike)."""
    threads = sorted({1, torch.get_num_threads()})
    combos = [(prec, cl) for prec in a.precisions.split(",") for cl in (True, False)]
    print(f"## settings: batch {a.batch} at {a.size}x{a.size}, {a.backbone} width {a.width}; img/s of the "
          f"full step, {a.rounds} interleaved rounds x {a.iters} steps, median; threads {threads}; "
          f"precision=auto picks {autocast_dtype('auto', device) or 'fp32'} here")
    print(f"{'method':<8}{'threads':>8}" + "".join(f"{p + (' cl' if cl else ' nchw'):>12}" for p, cl in combos)
          + f"{'best':>14}")
    for name in a.methods:
        preset = PRESETS.get(name)
        rigs = {}
        for prec, cl in combos:
            overrides = {"model": {"backbone": a.backbone, "width": a.width},
                         "train": {"batch_size": a.batch, "precision": prec, "channels_last": cl}}
            if name == "moco":
                overrides["moco"] = {"queue_size": max(4096 // a.batch, 1) * a.batch}
            if name == "swav":
                overrides["swav"] = {"queue_length": 0}
            cfg = resolve(preset_name=preset, overrides=overrides) if preset else resolve(
                overrides={"method": name, **overrides})
            rigs[prec, cl] = build_rig(cfg, device, a.size)
        for n in threads:
            torch.set_num_threads(n)
            t = interleaved({k: rig for k, rig in rigs.items()}, device, iters=a.iters, rounds=a.rounds)
            best = min(t, key=t.get)
            print(f"{name:<8}{n:>8}" + "".join(f"{a.batch / t[k]:>12.1f}" for k in combos)
                  + f"{best[0] + (' cl' if best[1] else ' nchw'):>14}", flush=True)
        torch.set_num_threads(threads[-1])
    print("cl: channels_last memory format (train.channels_last=true); nchw: contiguous. bf16 on a CPU "
          "runs under autocast; its strided convolutions on inputs of 2 px or less run in fp32 (selfsup.conv).\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="steps,augment,stream,losses")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--precisions", default="fp32,bf16", help="the settings section's precisions (bf16 without "
                   "AMX or avx512_bf16 can be 5x slower than fp32: leave it out there to save time)")
    p.add_argument("--iters", type=int, default=2, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    p.add_argument("--compile", action="store_true", help="torch.compile the method in the steps section")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers of the torchvision pipeline")
    p.add_argument("--cifar", default=str(Path(__file__).resolve().parents[1] / "../shared/data/cifar10-jpeg.tar.gz"))
    p.add_argument("--stream-images", type=int, default=2000)
    p.add_argument("--loss-batches", default="256,512,1024,2048,4096,8192,16384")
    p.add_argument("--queue", type=int, default=65536, help="info_nce's queue length K")
    p.add_argument("--loss-repeats", type=int, default=3)
    p.add_argument("--loss-minutes", type=float, default=6.0, help="stop the losses section after this")
    p.add_argument("--dense-max", type=int, default=2**28, help="largest dense logits (entries) to try")
    a = p.parse_args(argv)
    a.methods = [m for m in a.methods.split(",") if m]
    a.loss_batches = [int(b) for b in a.loss_batches.split(",")]
    device = torch.device(a.device)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # as train.pretrain does on a CPU
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"# selfsup benchmarks | torch {torch.__version__} | Python {platform.python_version()} | {device} "
          f"({name}) | {torch.get_num_threads()} threads | {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    sections = {"steps": bench_steps, "augment": bench_augment, "stream": bench_stream, "losses": bench_losses,
                "settings": bench_settings}
    for s in a.only.split(","):
        if s not in sections:
            sys.exit(f"--only: unknown section '{s}'; choose from {', '.join(sections)}")
        sections[s](a, device)


if __name__ == "__main__":
    main()
