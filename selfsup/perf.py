"""Measuring the training step against its backbone (issues 8 and 24); the tools behind
benchmarks/run.py and benchmarks/gpu_check.sh.

A *rig* is what :func:`selfsup.train.pretrain` builds for one step (the method, its real
augmentations, the optimiser, the hooks) on a synthetic uint8 batch. Headline timings are
sync-free: a timed round queues ``iters`` steps and synchronises once at its end; rounds of the
functions compared alternate, and the median round is reported. The phase shares come from a
separate pass that synchronises around each phase. A compiled rig is divided by a bare backbone
compiled the same way (:func:`compile_rig`, ``bare_backbone(compile_mode=...)``), so the ratio
compares like with like. On CUDA, :func:`issue_and_device` sets the host's issue time beside the
device's (CUDA events), :func:`count_flops` counts a call's FLOPs with torch's FlopCounterMode, and
:func:`matmul_tflops` measures the ceiling they are a share of.
"""
from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import Config
from .device import autocast, autocast_dtype, grad_scaler
from .optim import set_lr
from .methods import StepInfo
from .train import build_parts, train_step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict[str, Callable[[], object]], device: torch.device, *, iters: int = 5,
                rounds: int = 5, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each fn; rounds alternate between the fns so that machine
    noise hits all alike. Each round synchronises once, at its end."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            synchronize(device)
            times[name].append((time.perf_counter() - t0) / iters)
    return {name: statistics.median(ts) for name, ts in times.items()}


class PeakMemory:
    """Peak memory of a block: CUDA's max_memory_allocated, or on a CPU the growth of the
    process's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs) over the
    resident set at the start (after malloc_trim). ``what`` says which was measured."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0
        self.what = "CUDA max_memory_allocated" if device.type == "cuda" else "RSS high-water above start"

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            _reset_hwm()
            self.start = _status_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            self.peak = _status_kb("VmHWM") * 1024 - self.start


def _status_kb(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource  # not Linux: the lifetime peak is all there is
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_hwm() -> None:
    try:  # glibc keeps freed heap memory resident: hand it back, so the start is what is live
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: reset the peak RSS to the current RSS
    except OSError:
        pass


def rss_bytes() -> int:
    return _status_kb("VmRSS") * 1024


@dataclass
class Rig:
    """One method's training step as train.pretrain builds it, on a fixed uint8 batch."""
    cfg: Config
    method: nn.Module
    optimizer: torch.optim.Optimizer
    augmentations: list
    generator: torch.Generator
    dtype: torch.dtype | None
    batch: Tensor
    device: torch.device
    step: int = 0
    total_steps: int = 10_000
    model: nn.Module | None = None  # what the step calls: the method, or it compiled (compile_rig)
    scaler: torch.amp.GradScaler | None = None  # fp16's loss scaling, as the trainer's

    def info(self) -> StepInfo:
        """The hooks' view of this step: epochs of ``total_steps // train.epochs`` steps, one process."""
        t = self.cfg.train
        return StepInfo(self.step, self.total_steps, max(1, self.total_steps // t.epochs), t.batch_size, t.seed)

    def __call__(self) -> dict[str, Tensor]:
        """One full training step as the trainer's: schedules, hooks, augmentation, forward,
        backward, frozen gradients dropped, clipping (optim.clip_grad), update."""
        set_lr(self.optimizer, self.cfg.optim.lr)
        info, o = self.info(), self.cfg.optim
        self.method.on_step_start(info)
        model = self.method if self.model is None else self.model
        out = train_step(model, self.optimizer, self.augmentations, self.batch, self.generator,
                         self.dtype, o.clip_grad, o.clip_grad_mode or self.method.clip_grad_mode_default,
                         self.method.frozen_now(), scaler=self.scaler)
        self.method.on_step_end(info)
        self.step += 1
        return out


def compile_rig(rig: Rig, mode: str = "default") -> None:
    """Compile the rig's step as train.compile does: the method (torch.compile ``mode``) and its
    augmentations' batched apply."""
    rig.model = torch.compile(rig.method, mode=mode)
    for aug in rig.augmentations:
        aug.compile_apply(mode)


def build_rig(cfg: Config, device: torch.device, size: int) -> Rig:
    """``cfg``'s method, optimiser and augmentations on ``device``, built by the trainer's own
    :func:`train.build_parts`, with a random uint8 (B, size, size, 3) batch."""
    torch.manual_seed(cfg.train.seed)
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    method, optimizer, augmentations = build_parts(cfg, device, size, mean, std)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (cfg.train.batch_size, size, size, 3), dtype=torch.uint8, generator=g)
    dtype = autocast_dtype(cfg.train.precision, device)
    return Rig(cfg, method.train(), optimizer, augmentations, torch.Generator(device=device).manual_seed(1), dtype,
               batch.to(device), device, scaler=grad_scaler(device, dtype))


def view_shapes(rig: Rig) -> list[tuple[int, ...]]:
    """(n, 3, S, S) per resolution: the views of one step, concatenated by size."""
    by_size: dict[int, int] = {}
    for aug in rig.augmentations:
        by_size[aug.cfg.size] = by_size.get(aug.cfg.size, 0) + len(rig.batch)
    return [(n, 3, s, s) for s, n in by_size.items()]


def backbone_calls(rig: Rig) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """Input shapes of the backbone calls of one real step: (online, momentum copies'), read
    with forward hooks on the method's backbone and on every copy of its class."""
    online, momentum, handles = [], [], []
    kind = type(rig.method.backbone)
    for module in rig.method.modules():
        if isinstance(module, kind):
            seen = online if module is rig.method.backbone else momentum
            handles.append(module.register_forward_hook(lambda m, args, out, seen=seen: seen.append(tuple(args[0].shape))))
    try:
        rig()
    finally:
        for h in handles:
            h.remove()
    return online, momentum


def bare_backbone(rig: Rig, shapes: list[tuple[int, ...]], no_grad_shapes: list[tuple[int, ...]] = (),
                  compile_mode: str | None = None) -> Callable[[], None]:
    """The backbone's own forward + backward on pre-made float tensors of ``shapes`` (and its
    forward without gradient on ``no_grad_shapes``), in the rig's precision and layout;
    ``compile_mode``: through torch.compile in that mode, as a compiled step's backbone runs."""
    backbone, device, dtype = rig.method.backbone, rig.device, rig.dtype
    if compile_mode is not None:
        backbone = torch.compile(backbone, mode=compile_mode)
    fmt = torch.channels_last if rig.cfg.train.channels_last else torch.contiguous_format
    xs = [torch.randn(s, device=device).contiguous(memory_format=fmt) for s in shapes]
    xs_ng = [torch.randn(s, device=device).contiguous(memory_format=fmt) for s in no_grad_shapes]

    def run() -> None:
        with autocast(device, dtype):
            total = sum(backbone(x).float().sum() for x in xs)
            with torch.no_grad():
                for x in xs_ng:
                    backbone(x)
        total.backward()
        rig.method.backbone.zero_grad(set_to_none=True)
    return run


def phases(rig: Rig, steps: int = 3) -> dict[str, float]:
    """Median seconds of each part of the real step, synchronising around each: augmentation,
    the online backbone (its forwards, read with hooks, and its backward: from the gradient of
    its output to the gradient of its first parameter), the momentum encoders' backbones
    (forwards), the rest of forward + backward (heads, loss), the optimiser step + hook."""
    device, method = rig.device, rig.method
    backbone, kind = method.backbone, type(method.backbone)
    copies = [m for m in method.modules() if isinstance(m, kind) and m is not backbone]
    first = next(p for p in backbone.parameters() if p.requires_grad)
    clock: dict[str, list[float]] = {"fwd": [], "mom": [], "bwd_start": [], "bwd_end": []}

    def now() -> float:
        synchronize(device)
        return time.perf_counter()

    def timed_forward(key):
        def pre(module, args):
            module._t0 = now()

        def post(module, args, out):
            clock[key].append(now() - module._t0)
            if key == "fwd" and out.requires_grad:
                out.register_hook(lambda g: clock["bwd_start"].append(now()))
        return pre, post

    handles = []
    for module, key in [(backbone, "fwd")] + [(c, "mom") for c in copies]:
        pre, post = timed_forward(key)
        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    handles.append(first.register_post_accumulate_grad_hook(lambda p: clock["bwd_end"].append(now())))
    parts = {k: [] for k in ("augment", "backbone", "momentum", "loss+heads", "optimizer")}
    try:
        for _ in range(steps):
            for v in clock.values():
                v.clear()
            set_lr(rig.optimizer, rig.cfg.optim.lr)
            info = rig.info()
            method.on_step_start(info)
            t0 = now()
            with torch.no_grad():
                views = [aug(rig.batch, rig.generator) for aug in rig.augmentations]
            t1 = now()
            with autocast(device, rig.dtype):
                out = method(views)
            rig.optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            t2 = now()
            rig.optimizer.step()
            method.on_step_end(info)
            t3 = now()
            rig.step += 1
            online = sum(clock["fwd"]) + (max(clock["bwd_end"]) - min(clock["bwd_start"]))
            momentum = sum(clock["mom"])
            for k, t in zip(parts, (t1 - t0, online, momentum, t2 - t1 - online - momentum, t3 - t2)):
                parts[k].append(t)
    finally:
        for h in handles:
            h.remove()
    return {k: statistics.median(v) for k, v in parts.items()}


# ---------------------------------------------------------------------------------------------
# Device time, FLOPs and the machine's ceilings (issue 24)

def device_seconds(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Seconds per call of ``fn`` over ``reps`` calls: CUDA events around them on a GPU (the
    device's time, queued work included), else the host's clock."""
    synchronize(device)
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def issue_and_device(fn: Callable[[], object], device: torch.device,
                     iters: int = 10) -> tuple[float, float | None]:
    """(host issue, device) seconds per call over ``iters`` calls queued without a sync. Issue:
    until the calls return; device: CUDA events around them (None on a CPU). A launch-bound step
    shows issue ≈ device: the GPU waits for the host. (A full launch queue blocks the host too, so
    issue ≈ device is necessary for launch-bound, not proof; issue << device is GPU-bound.)"""
    synchronize(device)
    cuda = device.type == "cuda"
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    issue = (time.perf_counter() - t0) / iters
    if not cuda:
        return issue, None
    end.record()
    end.synchronize()
    return issue, start.elapsed_time(end) / 1e3 / iters


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` (forward and backward), counted by torch.utils.flop_counter
    (matmuls, convolutions, attention): run it eager, the counter sees no compiled kernels."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_tflops(device: torch.device, n: int = 8192, dtype: torch.dtype = torch.bfloat16, reps: int = 10) -> float:
    """Measured ceiling: TFLOP/s of an (n, n) @ (n, n) matmul in ``dtype`` (2 n³ FLOPs each),
    after 3 warm-up calls."""
    g = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=g) for _ in range(2))
    out = torch.empty_like(a)
    for _ in range(3):
        torch.mm(a, b, out=out)
    return 2 * n ** 3 / device_seconds(lambda: torch.mm(a, b, out=out), device, reps) / 1e12


def copy_gbps(device: torch.device, nbytes: int = 2 ** 30, reps: int = 10) -> float:
    """Measured memory bandwidth: GB/s of a device-to-device copy of ``nbytes``, counting the
    bytes read and the bytes written (2 x nbytes per copy)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * nbytes / device_seconds(lambda: dst.copy_(src), device, reps) / 1e9


def profile_table(fn: Callable[[], object], device: torch.device, steps: int = 10, row_limit: int = 15) -> str:
    """torch.profiler's table of ``steps`` calls of ``fn`` (after one unprofiled): the top
    ``row_limit`` rows by their own device time on a GPU (the kernels), by their own CPU time else."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    synchronize(device)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        synchronize(device)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=row_limit)


# ---------------------------------------------------------------------------------------------
# The real loop's epochs, beside the rig

def epoch_times(metrics: str | Path, skip: int = 1) -> dict:
    """Training seconds per epoch of a run's metrics.jsonl (its ``seconds``, monitors excluded):
    the steady state (mean ± sd over the epochs after the first ``skip``), the first epoch's
    excess over it (torch.compile's compile time, cuDNN's autotuning), steps per epoch, total."""
    rows = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "seconds" in r]
    if not rows:
        raise ValueError(f"{metrics}: no epoch with a 'seconds' field (did the run train an epoch?)")
    seconds = [r["seconds"] for r in rows]
    steady = seconds[skip:] or seconds
    mean = statistics.mean(steady)
    return {"epochs": len(rows), "steps_per_epoch": rows[0]["step"] // rows[0]["epoch"],
            "seconds": seconds, "train_seconds": sum(seconds), "steady_epochs": f"{skip + 1}-{len(rows)}",
            "steady_s_per_epoch": mean, "steady_sd": statistics.stdev(steady) if len(steady) > 1 else 0.0,
            "first_epoch_excess_s": seconds[0] - mean, "images_per_s": rows[-1].get("images_per_s")}


def write_json(path: str | Path, data: dict) -> None:
    """``data`` as indented JSON, atomically: a reader (or a kill) never sees half a file."""
    from .files import write_text_atomic
    write_text_atomic(json.dumps(data, indent=1, default=str) + "\n", path)
