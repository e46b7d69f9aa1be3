"""How much memory is left, and the check that refuses a decode that cannot fit."""
from __future__ import annotations

import os
from pathlib import Path

from .datasets import DataError


def available_memory() -> int | None:
    """Bytes this process can still allocate: /proc/meminfo's MemAvailable (or the free pages
    sysconf reports), lowered by a cgroup memory limit and an address-space ulimit. None: unknown."""
    limits = []
    try:
        with open("/proc/meminfo") as f:
            limits += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    if not limits:
        try:
            limits.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit, usage = (Path(limit_file).read_text().strip(), int(Path(usage_file).read_text()))
            if limit != "max" and int(limit) < 1 << 60:
                limits.append(max(0, int(limit) - usage))
        except (OSError, ValueError):
            continue
        break
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            with open("/proc/self/statm") as f:
                vm = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            limits.append(max(0, soft - vm))
    except (ImportError, OSError, ValueError, IndexError):
        pass
    return min(limits) if limits else None


def check_memory(n: int, size: int | tuple[int, int], copies: float, what: str) -> None:
    """Refuse, before allocating, ``n`` uint8 RGB images of ``size``^2 (or (H, W)) held ``copies``
    times at the peak of their decoding (measured per path: the result plus its temporaries)."""
    h, w = (size, size) if isinstance(size, int) else size
    images = n * h * w * 3
    need, free = int(images * copies), available_memory()
    if free is not None and need > free:
        gb = lambda b: f"{b / 2**30:.1f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"  # noqa: E731
        raise DataError(f"{what}: {n} images of {w}x{h} need about {gb(need)} of memory to decode ({gb(images)} "
                        f"of uint8 pixels, {copies:.3g}x that at the peak), but only {gb(free)} is available; lower "
                        "data.image_size, or stream the source from disk (data.stream=true)")
