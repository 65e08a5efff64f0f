import time

import pytest
import torch

from retina_fn.data.throughput import measure


def _batches(n, delay=0.0):
    for i in range(n):
        time.sleep(delay)
        yield {"image_id": torch.tensor([i, -1 if i % 2 else i + 100])}


def test_counts_real_images_after_warmup():
    out = measure(_batches(10), num_batches=6, warmup=2)
    assert out["batches"] == 6
    assert out["images"] == 6 + 3  # batches 2..7: every even one has no padding slot
    assert out["images_per_s"] == pytest.approx(out["images"] / out["seconds"])
    assert out["first_batch_s"] is not None


def test_rate_reflects_producer_speed():
    out = measure(_batches(6, delay=0.02), num_batches=5, warmup=1)
    assert out["seconds"] >= 5 * 0.02
    assert out["batches_per_s"] <= 1 / 0.02


def test_short_iterable_and_bad_arguments():
    assert measure(_batches(3), num_batches=10, warmup=1)["batches"] == 2
    with pytest.raises(ValueError):
        measure(_batches(3), num_batches=0)
