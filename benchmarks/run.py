"""Performance of selfsup on the current device, in one run (issues 8 and 24).

    python benchmarks/run.py                                   # every section, defaults below
    python benchmarks/run.py --only steps --batch 256 --size 32 --width 0.25
    python benchmarks/run.py --only augment,stream
    python benchmarks/run.py --only losses --loss-batches 256,1024,4096,16384
    python benchmarks/run.py --device cuda --batch 512 --width 1          # the GPU table
    python benchmarks/run.py --only steps --compile --compile-mode max-autotune-no-cudagraphs \
        --ceiling-tflops 700 --profile profile.txt --json steps.json
    python benchmarks/run.py --only e2e --runs RUN_DIR --measure-bare     # the real loop against the rig

Sections (``--only``):
  steps    per method (every entry of selfsup.methods.METHODS, on its CIFAR-10 preset): images/s
           of the full training step (train.train_step with the method's augmentations,
           optimiser and hooks) against the bare backbone forward + backward on pre-made
           tensors of the same shapes (all views, by resolution), interleaved, median of rounds;
           also against the backbone work the method itself does (its online calls plus the
           no-grad forwards of momentum encoders), peak memory, and the time shares of a
           separate, synchronised pass. With --compile the step and the bare backbone are
           compiled alike (--compile-mode). The host's issue time per step beside the GPU's
           (CUDA events), the step's TFLOP/s (FLOPs by torch's FlopCounterMode) and its share of
           a matmul ceiling (--ceiling-tflops, else measured); --profile: torch.profiler tables.
  augment  our SimCLR view against kornia.augmentation on the same recipe, and against
           torchvision transforms + DataLoader workers where torchvision imports.
  stream   decoded + cropped images/s per CPU core of the streaming loader (selfsup.stream)
           on the CIFAR-10 JPEGs (--cifar) and on generated 500x375 JPEGs.
  settings (not in the default list) the full step of each method in fp32 and bf16, channels_last
           on and off, at 1 thread and at all of them, interleaved: what precision=auto and
           train.channels_last should choose on this CPU (issue 14 §3).
  losses   time and peak memory of nt_xent, dcl and info_nce (forward + backward), dense and
           chunked, from batch 256 upwards.
Not in the default list, for benchmarks/gpu_check.sh (issue 24):
  machine  the ceilings: a bf16 matmul's TFLOP/s, a device-to-device copy's GB/s (read + write).
  decode   --data decoded into the cache: the first load and a cached one.
  e2e      per run folder (--runs): train seconds per epoch (metrics.jsonl) against steps x the bare
           backbone step of the run's config, compiled as the run was (--measure-bare).
  vit      DINO ViT-S/16's step (--vit-preset: 2 x 224 + 8 x 96 views) at --vit-batches: img/s, peak memory.
  lightly  lightly's side of benchmarks/peers/run.py on this device against the --runs folder's
           steady state (skipped when lightly does not import).
Headline timings never synchronise inside a round; peak memory is CUDA's max_memory_allocated,
or on a CPU the growth of the resident-set high-water mark (printed with each table). --json
FILE: every section's numbers as JSON, rewritten after each row.
"""
from __future__ import annotations

import argparse
import io
import json
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from selfsup import losses  # noqa: E402
from selfsup.augment import Augment, blur_kernel_size, simclr_view  # noqa: E402
from selfsup.config import resolve  # noqa: E402
from selfsup.device import autocast_dtype  # noqa: E402
from selfsup.methods import METHODS  # noqa: E402
from selfsup.config import COMPILE_MODES  # noqa: E402
from selfsup.perf import (PeakMemory, backbone_calls, bare_backbone, build_rig, compile_rig,  # noqa: E402
                          copy_gbps, count_flops, epoch_times, interleaved, issue_and_device, matmul_tflops,
                          phases, profile_table, synchronize, view_shapes, write_json)
from selfsup.stream import Crops, ImageStream  # noqa: E402

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
PRESETS = {"simclr": "cifar10-simclr", "moco": "cifar10-moco-v2", "byol": "cifar10-byol",
           "simsiam": "cifar10-simsiam", "swav": "cifar10-swav", "dino": "cifar10-dino"}


def mib(n: float) -> str:
    return f"{n / 2**20:.0f}"


# --------------------------------------------------------------------------------------- steps

def bench_steps(a, device) -> None:
    cuda, mode = device.type == "cuda", a.compile_mode if a.compile else None
    ceiling = a.ceiling_tflops or matmul_tflops(device, a.matmul_n)
    print(f"## steps: batch {a.batch} at {a.size}x{a.size}, {a.backbone} width {a.width}, precision "
          f"{a.precision}{f', torch.compile mode {mode} (step and bare alike)' if mode else ''}; {a.rounds} rounds "
          f"x {a.iters} steps, median; ceiling {ceiling:.1f} TFLOP/s "
          f"({'given' if a.ceiling_tflops else f'bf16 {a.matmul_n}^3 matmul, measured'})")
    header = (f"{'method':<8}{'step img/s':>11}{'bare img/s':>11}{'ratio':>7}{'vs own':>8}{'issue ms':>9}"
              f"{'gpu ms':>8}{'TFLOP/s':>9}{'% ceil':>7}{'peak MiB':>10}"
              + "".join(f"{k:>{len(k) + 2}}" for k in ("augment", "backbone", "momentum", "loss+heads", "optimizer"))
              + f"{'head FLOPs':>12}")
    print(header)
    rows = {}
    for name in a.methods:
        if name not in METHODS:
            print(f"{name:<8} not in selfsup.methods.METHODS; skipped")
            continue
        try:
            cfg = method_config(name, a)
            with PeakMemory(device) as peak:
                rig = build_rig(cfg, device, a.size)
                online, momentum = backbone_calls(rig)  # one real step, hooks recording shapes
                p = phases(rig, steps=3)  # eager: the hooks it times with do not fire in compiled code
                flops = head_flops(rig, online, momentum)
                step_flops = count_flops(rig)  # eager too: the counter sees no compiled kernels
                bare_flops = count_flops(bare_backbone(rig, view_shapes(rig)))
                if mode:
                    compile_rig(rig, mode)
                bare = bare_backbone(rig, view_shapes(rig), compile_mode=mode)
                fns = {"step": rig, "bare": bare}
                if sorted(online) != sorted(view_shapes(rig)) or momentum:  # else "own" is "bare"
                    fns["own"] = bare_backbone(rig, online, momentum, compile_mode=mode)
                t = interleaved(fns, device, iters=a.iters, rounds=a.rounds)
                t.setdefault("own", t["bare"])
            issue, gpu = issue_and_device(rig, device, a.iters)
            bare_issue, bare_gpu = issue_and_device(bare, device, a.iters)
            if a.profile:
                with open(a.profile, "a") as f:
                    f.write(f"## {name}: {a.profile_steps} training steps, batch {a.batch}, {a.size}x{a.size}, "
                            f"{a.backbone} width {a.width}, {a.precision}{f', compiled ({mode})' if mode else ''}, "
                            f"on {device_name(device)}, torch {torch.__version__}\n"
                            f"{profile_table(rig, device, steps=a.profile_steps)}\n\n")
        except Exception as e:  # a registered method this harness cannot build: say so, go on
            print(f"{name:<8} skipped: {type(e).__name__}: {e}")
            rows[name] = {"skipped": f"{type(e).__name__}: {e}"}
            a.results.put(a.key or "steps", rows)
            continue
        total = sum(p.values())
        b = a.batch
        step_s, bare_s = gpu or t["step"], bare_gpu or t["bare"]  # device time on CUDA, the wall's median else
        tflops = step_flops / step_s / 1e12
        print(f"{name:<8}{b / t['step']:>11.1f}{b / t['bare']:>11.1f}{t['step'] / t['bare']:>7.3f}"
              f"{t['step'] / t['own']:>8.3f}{1e3 * issue:>9.1f}{f'{1e3 * gpu:.1f}' if gpu else '-':>8}"
              f"{tflops:>9.3g}{100 * tflops / ceiling:>6.1f}%{mib(peak.peak):>10}"
              + "".join(f"{100 * s / total:>{len(k) + 1}.0f}%" for k, s in p.items())
              + f"{100 * flops:>11.0f}%", flush=True)
        print(f"{'':<8}views {view_shapes(rig)}; online backbone {online}; momentum encoders {momentum}")
        rows[name] = {"batch": b, "size": a.size, "width": a.width, "precision": a.precision, "compile_mode": mode,
                      "step_s": t["step"], "bare_s": t["bare"], "own_s": t["own"], "step_img_s": b / t["step"],
                      "bare_img_s": b / t["bare"], "ratio": t["step"] / t["bare"], "vs_own": t["step"] / t["own"],
                      "issue_s": issue, "gpu_s": gpu, "bare_issue_s": bare_issue, "bare_gpu_s": bare_gpu,
                      "step_flops": step_flops, "bare_flops": bare_flops, "tflops": tflops,
                      "bare_tflops": bare_flops / bare_s / 1e12, "ceiling_tflops": ceiling,
                      "ceiling_share": tflops / ceiling, "peak_bytes": peak.peak,
                      "shares": {k: s / total for k, s in p.items()}, "head_flops_share": flops,
                      "views": view_shapes(rig)}
        a.results.put(a.key or "steps", rows)
    print(f"ratio = step time / bare backbone f+b on all views{' (both compiled alike)' if mode else ''}; vs own = "
          f"step / (the online backbone's f+b + the momentum encoders' forwards, as the step calls them); issue ms: "
          f"the host's time to queue one step, gpu ms: the device's (CUDA events) over {a.iters} steps queued "
          f"without a sync (issue ≈ gpu: launch-bound); TFLOP/s: the step's FLOPs (FlopCounterMode, one eager "
          f"step) over its {'GPU' if cuda else 'wall'} time, % ceil of the ceiling above; peak = "
          f"{PeakMemory(device).what}, building + running; shares of the step's time from a separate pass that "
          f"synchronises around each part (median of 3 steps): the online backbone's forwards and backward "
          f"(hooks), the momentum encoders' forwards, the rest of forward + backward (heads, loss), optimiser + "
          f"post-step hook. head FLOPs: the forward's FLOPs outside the backbones (heads, loss) over the "
          f"backbones' (torch.utils.flop_counter; matmuls and convolutions)."
          + (f" Profile: {a.profile}." if a.profile else "") + "\n")


def method_config(name: str, a):
    """``name``'s CIFAR-10 preset (or its recipe) at the benchmark's size, batch and precision."""
    overrides = {"model": {"backbone": a.backbone, "width": a.width},
                 "train": {"batch_size": a.batch, "precision": a.precision}}
    if name == "moco":  # the queue must hold whole batches
        overrides["moco"] = {"queue_size": max(4096 // a.batch, 1) * a.batch}
    if name == "swav":
        overrides["swav"] = {"queue_length": 0}
    preset = PRESETS.get(name)
    if preset is None:
        return resolve(overrides={"method": name, **overrides})
    return resolve(preset_name=preset, overrides=overrides)


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
        rigs = {}
        for prec, cl in combos:
            cfg = method_config(name, a)
            cfg.train.precision, cfg.train.channels_last = prec, cl
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


# ------------------------------------------------------------------------------------- machine

def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())


def bench_machine(a, device) -> None:
    """The ceilings the other sections are shares of: a bf16 matmul's TFLOP/s and a copy's GB/s."""
    n, nbytes = a.matmul_n, a.copy_mib * 2**20
    tflops = statistics.median(matmul_tflops(device, n) for _ in range(3))
    gbps = statistics.median(copy_gbps(device, nbytes) for _ in range(3))
    res = {"device": device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
           "threads": torch.get_num_threads(),
           "matmul": f"bf16 {n}x{n} @ {n}x{n}, 10 reps after 3 warm-up, median of 3",
           "matmul_tflops": tflops, "copy": f"device-to-device copy of {a.copy_mib} MiB, 10 reps, median of 3; "
           "GB/s counts the bytes read plus the bytes written", "copy_gbps": gbps}
    a.results.put("machine", res)
    print(f"## machine: {res['device']}, torch {res['torch']} (CUDA {res['cuda']}, cuDNN {res['cudnn']})\n"
          f"matmul ceiling: {tflops:.1f} TFLOP/s ({res['matmul']}; "
          f"{'CUDA events' if device.type == 'cuda' else 'host clock'})\n"
          f"copy: {gbps:.1f} GB/s ({res['copy']})\n")


# -------------------------------------------------------------------------------------- decode

def bench_decode(a, device) -> None:
    """--data decoded into the cache ($SELFSUP_CACHE): the first load (a decode, unless cached
    before) and a second (the cache), as the trainer then loads it."""
    from selfsup.data import load_data
    t0 = time.perf_counter()
    splits = load_data(a.data)
    t1 = time.perf_counter()
    load_data(a.data)
    t2 = time.perf_counter()
    res = {"data": a.data, "train_images": len(splits.train), "test_images": len(splits.test) if splits.test else 0,
           "first_load_s": t1 - t0, "cached_load_s": t2 - t1, "cache": os.environ.get("SELFSUP_CACHE", "default")}
    a.results.put(a.key or "decode", res)
    print(f"## decode: {a.data}: {res['train_images']} + {res['test_images']} images; first load {t1 - t0:.1f} s "
          f"(decoding, unless cached before), cached load {t2 - t1:.1f} s; cache {res['cache']}\n")


# ------------------------------------------------------------------------------------------ e2e

def bench_e2e(a, device) -> None:
    """The real loop beside the rig: each run folder's (--runs) train seconds per epoch against
    steps x the bare backbone step of its config (compiled as the run was), and against steps x
    the rig's full step (--with-step)."""
    print(f"## e2e: the trainer's epochs (metrics.jsonl 'seconds')"
          + (f" against the rig; {a.rounds} rounds x {a.iters} steps, median" if a.measure_bare else ""))
    walls = [float(w) for w in a.walls.split(",")] if a.walls else []
    for i, folder in enumerate(Path(r) for r in a.runs.split(",") if r):
        e = epoch_times(folder / "metrics.jsonl")
        res = {"run": str(folder), **e}
        if i < len(walls):  # start-up, decoding, the monitors (kNN at start and end), checkpoints
            res.update(wall_s=walls[i], outside_training_s=walls[i] - e["train_seconds"])
        line = (f"{folder.name}: {e['epochs']} epochs of {e['steps_per_epoch']} steps; epochs {e['steady_epochs']}: "
                f"{e['steady_s_per_epoch']:.2f} ± {e['steady_sd']:.2f} s/epoch; epoch 1 {e['seconds'][0]:.1f} s "
                f"({e['first_epoch_excess_s']:+.1f} s: compilation, autotuning)")
        if "wall_s" in res:
            line += f"; wall {res['wall_s']:.0f} s, of which {res['outside_training_s']:.0f} s outside training"
        if a.measure_bare:
            cfg = resolve(file=folder / "config.yaml")
            size = json.loads((folder / "backbone.json").read_text())["data_image_size"]
            mode = cfg.train.compile_mode if cfg.train.compile else None
            rig = build_rig(cfg, device, size)
            fns = {"bare": bare_backbone(rig, view_shapes(rig), compile_mode=mode)}
            if a.with_step:
                if mode:
                    compile_rig(rig, mode)
                fns["step"] = rig
            t = interleaved(fns, device, iters=a.iters, rounds=a.rounds)
            steps = e["steps_per_epoch"]
            res.update(bare_compile_mode=mode, bare_step_s=t["bare"],
                       e2e_ratio=e["steady_s_per_epoch"] / (steps * t["bare"]))
            line += (f"\n  bare backbone step{f' (compiled, {mode})' if mode else ''} {1e3 * t['bare']:.1f} ms: "
                     f"e2e ratio {res['e2e_ratio']:.2f} = epoch / ({steps} x bare)")
            if "step" in t:
                res.update(rig_step_s=t["step"], rig_ratio=t["step"] / t["bare"],
                           loop_over_rig=e["steady_s_per_epoch"] / (steps * t["step"]))
                line += (f"; rig step {1e3 * t['step']:.1f} ms: rig ratio {res['rig_ratio']:.2f}, "
                         f"loop / rig {res['loop_over_rig']:.2f}")
        a.results.put(a.key or f"e2e-{folder.name}", res)
        print(line, flush=True)
    print()


# ------------------------------------------------------------------------------------------ vit

def bench_vit(a, device) -> None:
    """--vit-preset's step (DINO ViT-S/16: 2 x 224 + 8 x 96 views through the real augmentations)
    on random uint8 images at each --vit-batches: images/s and peak memory."""
    print(f"## vit: {a.vit_preset} {' '.join(a.vit_set)}, precision {a.precision}; {a.rounds} rounds x {a.iters} steps")
    rows = {}
    for b in a.vit_batches:
        cfg = resolve(preset_name=a.vit_preset,
                      sets=[*a.vit_set, f"train.batch_size={b}", f"train.precision={a.precision}"])
        size = a.vit_size or cfg.data.image_size or cfg.aug.size
        try:
            with PeakMemory(device) as peak:
                rig = build_rig(cfg, device, size)
                t = interleaved({"step": rig}, device, iters=a.iters, rounds=a.rounds)
            issue, gpu = issue_and_device(rig, device, a.iters)
            flops = count_flops(rig)
        except torch.OutOfMemoryError as e:
            rows[b] = {"batch": b, "error": f"out of memory: {str(e).splitlines()[0]}"}
            print(f"batch {b}: out of memory")
            continue
        finally:
            rig = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows[b] = {"batch": b, "images": f"{size}x{size} uint8", "views": view_shapes_of(cfg, b),
                   "step_s": t["step"], "img_s": b / t["step"], "issue_s": issue, "gpu_s": gpu,
                   "tflops": flops / (gpu or t["step"]) / 1e12, "peak_bytes": peak.peak, "peak_what": peak.what}
        a.results.put("vit", rows)
        print(f"batch {b}: {b / t['step']:.0f} img/s ({1e3 * t['step']:.0f} ms/step; issue {1e3 * issue:.0f} ms"
              f"{f', gpu {1e3 * gpu:.0f} ms' if gpu else ''}), {rows[b]['tflops']:.1f} TFLOP/s, "
              f"peak {peak.peak / 2**30:.2f} GiB ({peak.what}); views {rows[b]['views']}", flush=True)
    print()


def view_shapes_of(cfg, batch: int) -> list[str]:
    m = cfg.multicrop
    return [f"{m.global_crops}x{batch}x{cfg.aug.size}px", f"{m.local_crops}x{batch}x{m.local_size}px"]


# -------------------------------------------------------------------------------------- lightly

def bench_lightly(a, device) -> None:
    """lightly's SimCLR (benchmarks/peers/lightly_side.py, its transforms in a DataLoader with
    --workers) on this device for --lightly-epochs, with the settings of the selfsup run --runs
    (its first folder); its last epoch's seconds against that run's steady state."""
    try:
        import lightly
    except ImportError as e:  # absent, or a dependency of it missing (wheels go in with --no-deps)
        why = ("no lightly (carry its wheel in .whl/)" if getattr(e, "name", None) == "lightly"
               else f"lightly does not import ({e}); carry the wheels it needs in .whl/")
        print(f"## lightly: skipped: {why}\n")
        a.results.put("lightly", {"skipped": why})
        return
    import subprocess
    import yaml
    from selfsup.feed import load_images
    from selfsup.optim import scale_lr
    from selfsup.train import backbone_spec, build_method
    run = Path(a.runs.split(",")[0])
    ours = epoch_times(run / "metrics.jsonl")
    cfg = resolve(file=run / "config.yaml")
    cfg_dict = yaml.safe_load((run / "config.yaml").read_text())
    cfg_dict["train"]["epochs"] = a.lightly_epochs
    work = Path(tempfile.mkdtemp(prefix="lightly-", dir=a.work))
    data = load_images(cfg)  # as the run loaded them, from the cache it filled
    np.save(work / "train.npy", np.asarray(data.images))
    mean, std, size = data.mean, data.std, data.size
    torch.manual_seed(cfg.train.seed)  # the same initial backbone as the selfsup run's
    torch.save(build_method(cfg).backbone.state_dict(), work / "init.pt")
    dtype = autocast_dtype(cfg.train.precision, device)
    workers = a.workers if a.workers is not None else os.cpu_count() or 1
    spec = {"method": cfg.method, "config": cfg_dict, "out": str(work / "out"), "checkout": str(REPO),
            "init": str(work / "init.pt"), "meta": backbone_spec(cfg, size, mean, std).to_json(),
            "images": str(work / "train.npy"), "mean": list(mean), "std": list(std), "size": size,
            "seed": cfg.train.seed, "device": str(device), "threads": torch.get_num_threads(), "workers": workers,
            "flush_denormal": True, "precision": "bf16" if dtype == torch.bfloat16 else "fp32",
            "peak_lr": scale_lr(cfg.optim.lr, cfg.train.batch_size, cfg.optim.lr_scaling)}
    (work / "spec.json").write_text(json.dumps(spec))
    print(f"## lightly {lightly.__version__}: {cfg.method}, {a.lightly_epochs} epochs, {workers} DataLoader workers, "
          f"{spec['precision']}, on {device_name(device)}; against {run}")
    t0 = time.perf_counter()
    ends = []  # when each epoch's line arrives: its end (the side syncs on its loss each epoch)
    side = REPO / "benchmarks" / "peers" / "lightly_side.py"
    proc = subprocess.Popen([sys.executable, str(side), str(work / "spec.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        print("  " + line.rstrip(), flush=True)
        if line.startswith(f"lightly {spec['method']} epoch "):
            ends.append(time.perf_counter() - t0)
    rc = proc.wait()
    epochs = [end - start for start, end in zip([0.0, *ends], ends)]
    res = {"rc": rc, "lightly": lightly.__version__, "workers": workers, "epoch_s": epochs,
           "wall_s": time.perf_counter() - t0, "selfsup_steady_s_per_epoch": ours["steady_s_per_epoch"],
           "selfsup_run": str(run)}
    if len(epochs) > 1:  # the first holds the workers' start-up
        res["lightly_last_epoch_s"] = epochs[-1]
        res["speed_ratio"] = epochs[-1] / ours["steady_s_per_epoch"]
        print(f"lightly's epoch {len(epochs)}: {epochs[-1]:.1f} s; selfsup's steady state "
              f"{ours['steady_s_per_epoch']:.1f} s/epoch: selfsup {res['speed_ratio']:.2f}x faster")
    a.results.put("lightly", res)
    print()
    if rc:
        sys.exit(f"lightly side failed (rc {rc}); its output is above")


class Results(dict):
    """Every section's numbers, rewritten to ``path`` (--json) after each addition: a timeout
    still leaves a valid file. A key "a/b" nests: {"a": {"b": value}}."""

    def __init__(self, path: str | None):
        super().__init__()
        self.path = path

    def put(self, key: str, value) -> None:
        *parents, last = key.split("/")
        node = self
        for name in parents:
            node = node.setdefault(name, {})
        node[last] = value
        if self.path:
            write_json(self.path, self)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="steps,augment,stream,losses")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--precisions", default="fp32,bf16", help="the settings section's precisions (bf16 without "
                   "AMX or avx512_bf16 can be 5x slower than fp32: leave it out there to save time)")
    p.add_argument("--iters", type=int, default=2, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    p.add_argument("--compile", action="store_true", help="torch.compile the step (method and augmentations) in "
                   "the steps section, and the bare backbone it is divided by, in --compile-mode")
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES)
    p.add_argument("--ceiling-tflops", type=float, help="the matmul ceiling the steps' TFLOP/s are a share of "
                   "(the machine section's matmul_tflops); default: measured at --matmul-n")
    p.add_argument("--matmul-n", type=int, default=None, help="side of the ceiling's bf16 matmul (default 8192 on "
                   "CUDA, 1024 on a CPU)")
    p.add_argument("--copy-mib", type=int, default=None,
                   help="the machine section's copy (default 1024 on CUDA, 64 on a CPU)")
    p.add_argument("--profile", help="append a torch.profiler table of each method's steps to this file")
    p.add_argument("--profile-steps", type=int, default=10)
    p.add_argument("--json", help="write every section's numbers to this JSON file (rewritten after each row)")
    p.add_argument("--key", help="the JSON key of the steps / e2e / decode results (default: the section's; "
                   "'a/b' nests)")
    p.add_argument("--data", default="cifar10", help="the decode section's source")
    p.add_argument("--runs", default="", help="e2e, lightly: selfsup run folders, comma-separated")
    p.add_argument("--walls", default="", help="e2e: the runs' wall-clock seconds, in the same order")
    p.add_argument("--measure-bare", action="store_true", help="e2e: time the bare backbone step of each run's config")
    p.add_argument("--with-step", action="store_true", help="e2e: also time the rig's full step")
    p.add_argument("--vit-preset", default="imagenet-dino-vits16")
    p.add_argument("--vit-batches", default="128,256")
    p.add_argument("--vit-size", type=int, default=None, help="side of the random uint8 images (default: the "
                   "preset's data.image_size)")
    p.add_argument("--vit-set", nargs="*", default=[], help="--set items for the vit section (a tiny dry run)")
    p.add_argument("--lightly-epochs", type=int, default=2)
    p.add_argument("--work", default=tempfile.gettempdir(), help="lightly: scratch folder for its spec and images")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers of the torchvision pipeline "
                   "and of the lightly side (default: cores - 1; lightly: cores)")
    p.add_argument("--cifar", default=str(REPO / "../shared/data/cifar10-jpeg.tar.gz"))
    p.add_argument("--stream-images", type=int, default=2000)
    p.add_argument("--loss-batches", default="256,512,1024,2048,4096,8192,16384")
    p.add_argument("--queue", type=int, default=65536, help="info_nce's queue length K")
    p.add_argument("--loss-repeats", type=int, default=3)
    p.add_argument("--loss-minutes", type=float, default=6.0, help="stop the losses section after this")
    p.add_argument("--dense-max", type=int, default=2**28, help="largest dense logits (entries) to try")
    a = p.parse_args(argv)
    a.methods = [m for m in a.methods.split(",") if m]
    a.loss_batches = [int(b) for b in a.loss_batches.split(",")]
    a.vit_batches = [int(b) for b in a.vit_batches.split(",") if b]
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    a.matmul_n = a.matmul_n or (8192 if cuda else 1024)
    a.copy_mib = a.copy_mib or (1024 if cuda else 64)
    a.results = Results(a.json)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # as train.pretrain does on a CPU
    print(f"# selfsup benchmarks | torch {torch.__version__} | Python {platform.python_version()} | {device} "
          f"({device_name(device)}) | {torch.get_num_threads()} threads | "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    sections = {"steps": bench_steps, "augment": bench_augment, "stream": bench_stream, "losses": bench_losses,
                "settings": bench_settings, "machine": bench_machine, "decode": bench_decode, "e2e": bench_e2e,
                "vit": bench_vit, "lightly": bench_lightly}
    for s in a.only.split(","):
        if s not in sections:
            sys.exit(f"--only: unknown section '{s}'; choose from {', '.join(sections)}")
        sections[s](a, device)


if __name__ == "__main__":
    main()
