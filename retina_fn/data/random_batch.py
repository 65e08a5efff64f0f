"""Random batches in docs/conventions.md's layout, for tests, benchmarks and compile checks (no files)."""

from __future__ import annotations

from typing import Sequence

import torch

from retina_fn.data import batching


def random_batch(num_boxes: Sequence[int] | None = None, *, batch_size: int | None = None,
                 canvas: tuple[int, int] = (64, 96), max_boxes: int = 5, max_ignore_boxes: int = 2,
                 num_classes: int = 3, seed: int = 0, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """A batch of noise images filling the canvas, with random ground truth, all drawn from `seed`.

    Args:
      num_boxes: real boxes per image (its length is B); None: `batch_size` images of 3..6 boxes (capped).
      canvas: (H, W); max_boxes: G, the padded count; max_ignore_boxes: Gi (no crowd regions).
      dtype: of image and boxes, computed in float64 first so float32 and float64 batches agree.
    Returns:
      The batch dict of `batching.collate` without its loader bookkeeping: image standard normal; boxes with
      top-left uniform in the upper-left 60% and sides 8 + uniform(0, 35%) of the canvas, clipped (padding
      rows 0); no crowd regions; scale_factor ones; image_hw = orig_hw = canvas; image_id 0..B-1."""
    g = torch.Generator().manual_seed(seed)
    if num_boxes is None:
        if batch_size is None:
            raise ValueError("random_batch needs num_boxes or batch_size")
        num_boxes = [min(max_boxes, int(n)) for n in torch.randint(3, 7, (batch_size,), generator=g)]
    b = len(num_boxes)
    h, w = canvas
    f64 = torch.float64
    xy = torch.rand(b, max_boxes, 2, generator=g, dtype=f64) * torch.tensor([w * 0.6, h * 0.6], dtype=f64)
    wh = torch.rand(b, max_boxes, 2, generator=g, dtype=f64) * torch.tensor([w * 0.35, h * 0.35], dtype=f64) + 8
    valid = torch.arange(max_boxes)[None, :] < torch.tensor(list(num_boxes))[:, None]
    limit = torch.tensor([w, h, w, h], dtype=torch.float64)
    boxes = torch.minimum(torch.cat([xy, xy + wh], -1), limit).to(dtype) * valid[..., None]
    batch = {
        "image": torch.randn(b, 3, h, w, generator=g, dtype=torch.float64).to(dtype),
        "image_hw": torch.tensor([[h, w]] * b),
        "boxes": boxes,
        "labels": torch.randint(0, num_classes, (b, max_boxes), generator=g) * valid,
        "box_valid": valid,
        "ignore_boxes": torch.zeros(b, max_ignore_boxes, 4, dtype=dtype),
        "ignore_valid": torch.zeros(b, max_ignore_boxes, dtype=torch.bool),
        "scale_factor": torch.ones(b, 2),
        "orig_hw": torch.tensor([[h, w]] * b),
        "image_id": torch.arange(b),
    }
    return {k: v.to(device) for k, v in batch.items()}


def config_batch(cfg, num_classes: int, device: torch.device | str = "cpu", seed: int = 0) -> dict:
    """The `random_batch` of a config's shape, padded as its loader pads: data.images_per_device images on
    data.landscape_canvas with 3 to 6 boxes each (counts drawn from the seed alone, the same for every
    config), G the max_boxes or bucket padding of `retina_fn.data.batching`."""
    batch_size = int(cfg.data.images_per_device)
    counts = [int(n) for n in torch.randint(3, 7, (batch_size,), generator=torch.Generator().manual_seed(seed))]
    sizes = batching.bucket_sizes(tuple(cfg.data.get("box_buckets", ())), int(cfg.data.max_boxes))
    rows = batching.padded_count(max(counts), sizes)
    return random_batch(counts, canvas=tuple(cfg.data.landscape_canvas), max_boxes=rows,
                        max_ignore_boxes=int(cfg.data.max_ignore_boxes), num_classes=num_classes, seed=seed,
                        device=device)
