import os

# One thread per process: the test models are tiny (threads buy little), and the distributed
# tests run several processes at once, where OpenMP threads oversubscribing two cores make
# every parallel region wait on a descheduled thread. Set before torch is imported so that
# subprocesses (CLI runs, torchrun workers) inherit it too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test shares one throw-away decoded-data cache, never the user's."""
    monkeypatch.setenv("SELFSUP_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
