import os
from pathlib import Path

import pytest
import torch

# Tests are sized for a 2-core CI machine; one thread each keeps parallel work predictable.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets the same throw-away decoded-data cache, never the user's."""
    monkeypatch.setenv("SELFSUP_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
