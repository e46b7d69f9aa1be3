"""Run a function on several gloo ranks on this machine and collect what each returns."""
from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, work: Callable[[], dict], world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.save(work(), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(work: Callable[[], dict], world: int, out: Path) -> list[dict]:
    """``work()`` on ``world`` spawned ranks (a module-level function: it is pickled); its
    tensors and plain containers, one dict per rank in rank order."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("needs torch.distributed with the gloo backend")
    torch.multiprocessing.spawn(_worker, args=(work, world, free_port(), str(out)), nprocs=world, join=True)
    return [torch.load(Path(out) / f"rank{r}.pt", weights_only=True) for r in range(world)]
