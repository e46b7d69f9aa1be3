"""Where a run computes and at what precision: the one place for device resolution and the
autocast policy (bf16 where the hardware runs it fast or when asked for, fp32 otherwise)."""
from __future__ import annotations

import torch

from . import distributed as D
from .errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``; under
    torchrun a bare ``cuda`` is this process's local GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device '{name}' asked for, but CUDA is not available here; use --device cpu")
        if D.launched_by_torchrun() and name == "cuda":
            name = f"cuda:{D.local_rank()}"
    elif name != "cpu":
        raise ConfigError(f"train.device '{name}' unknown; use auto, cpu, cuda or cuda:N")
    return torch.device(name)


def _cpu_has_bf16_matmul() -> bool:
    """AMX tiles or AVX512-BF16 make bf16 convolutions faster than fp32 on a CPU (measured: 2.5x
    on an AMD EPYC with avx512_bf16 and no AMX, docs/results.md); without either bf16 is about 5x
    slower (AVX2 only)."""
    try:  # private API: fall back to fp32 if it moves
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:
        return False


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 where the hardware runs it fast (auto) or when asked for; fp32 otherwise."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto":
        fast = (torch.cuda.is_bf16_supported() if device.type == "cuda" else _cpu_has_bf16_matmul())
        return torch.bfloat16 if fast else None
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """bf16 autocast where asked for, a no-op context otherwise."""
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)
