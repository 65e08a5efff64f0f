"""Input-pipeline speed: how many images per second a loader delivers, without any model."""

from __future__ import annotations

import itertools
import time
from typing import Iterable


def measure(batches: Iterable[dict], num_batches: int, warmup: int = 1) -> dict:
    """Draws `warmup` + `num_batches` batch dicts (with 'image_id' [B]) and times the last `num_batches`
    (fewer if the iterable runs out): dict(images_per_s, batches_per_s, seconds, images (real slots, image_id >= 0),
    batches, first_batch_s (worker start-up included))."""
    if num_batches <= 0 or warmup < 0:
        raise ValueError(f"need num_batches > 0 and warmup >= 0, got {num_batches}, {warmup}")
    it = iter(batches)
    start = time.perf_counter()
    first_batch_s = None
    for _ in itertools.islice(it, warmup):
        if first_batch_s is None:
            first_batch_s = time.perf_counter() - start
    images = count = 0
    timed_start = time.perf_counter()
    for batch in itertools.islice(it, num_batches):
        if first_batch_s is None:
            first_batch_s = time.perf_counter() - start
        images += int((batch["image_id"] >= 0).sum())
        count += 1
    seconds = time.perf_counter() - timed_start
    return dict(images_per_s=images / seconds if seconds > 0 else float("nan"),
                batches_per_s=count / seconds if seconds > 0 else float("nan"), seconds=seconds,
                images=images, batches=count, first_batch_s=first_batch_s)
