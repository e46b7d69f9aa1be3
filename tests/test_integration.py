"""Integration with the real CIFAR-10 JPEG archive beside the repository (skipped without it)."""
import time
from pathlib import Path

import numpy as np
import pytest

from selfsup.data import load_data

SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"

pytestmark = pytest.mark.skipif(not SHARED_CIFAR.exists(),
                                reason=f"{SHARED_CIFAR} not found (the shared CIFAR-10 JPEG archive)")


def test_cifar10_jpeg_archive_decodes_once_then_loads_from_cache(tmp_path):
    first = load_data(str(SHARED_CIFAR), cache_dir=tmp_path)
    assert first.train.images.shape == (50_000, 32, 32, 3) and first.train.images.dtype == np.uint8
    assert first.test.images.shape == (10_000, 32, 32, 3)
    assert first.train.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                   "horse", "ship", "truck"]
    assert np.bincount(first.train.labels).tolist() == [5000] * 10
    assert np.bincount(first.test.labels).tolist() == [1000] * 10
    t0 = time.perf_counter()
    second = load_data(str(SHARED_CIFAR), cache_dir=tmp_path)
    assert time.perf_counter() - t0 < 2.0                      # memory-mapped cache, no decoding
    assert isinstance(second.train.images, np.memmap)
    assert np.array_equal(second.test.images[:500], first.test.images[:500])
    assert np.array_equal(second.train.labels, first.train.labels)
