"""Where a run computes and at what precision: the one place for device resolution, the CUDA
backend settings (cuDNN autotuning, the TF32 policy) and the autocast policy (bf16 where the
hardware computes it natively, fp16 with a gradient scaler on GPUs that do not, fp32 otherwise)."""
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
    """The autocast dtype of ``precision`` (auto | bf16 | fp16 | fp32; None: fp32). ``auto``: on
    CUDA, bf16 where the GPU computes it natively (compute capability >= 8: Ampere, Hopper and
    later) and fp16 (with :func:`grad_scaler`) on older GPUs, where torch would only emulate bf16;
    on a CPU, bf16 with AMX or AVX512-BF16, else fp32."""
    if precision in ("bf16", "fp16"):
        return torch.bfloat16 if precision == "bf16" else torch.float16
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
        return torch.bfloat16 if _cpu_has_bf16_matmul() else None
    return None


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler | None:
    """fp16's dynamic loss scaling (its small gradients would underflow unscaled); None for the
    other precisions, whose range is fp32's."""
    return torch.amp.GradScaler(device.type) if dtype == torch.float16 else None


def configure_cuda(benchmark: bool) -> str:
    """The CUDA backend settings of every run, set before anything is timed; returns them in words.

    - cuDNN autotuning (``train.cudnn_benchmark``): each convolution shape is timed once against
      cuDNN's algorithms and the fastest kept (a step's shapes never change, so it pays at once).
    - The TF32 policy: fp32 matmuls and convolutions may use TF32 tensor cores (10-bit mantissa,
      fp32 range), as autocast regions are bf16 anyway; what stays fp32 (losses, BN statistics,
      the optimiser) is elementwise work that TF32 never touches."""
    torch.backends.cudnn.benchmark = benchmark
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return f"cudnn.benchmark {'on' if benchmark else 'off'}, TF32 matmuls and convolutions on"


def autocast(device: torch.device, dtype: torch.dtype | None):
    """bf16 autocast where asked for, a no-op context otherwise."""
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)
