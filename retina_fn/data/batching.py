"""Collate samples into the static batch of docs/conventions.md.

Ground truth is padded to `max_boxes` rows with `box_valid`, crowd regions to `max_ignore_boxes` with
`ignore_valid`. An image with more boxes than fit keeps the `max_boxes` largest by area (ties: the earlier
annotation), in their original order (the order matters to mmdetection's assigner, where later boxes win
low-quality ties); `boxes_dropped` counts the rest and the loader reports the totals. Surplus crowd regions
are cut the same way (largest kept) without a count: they only matter when the assigner's
ignore_iof_thr > 0.

Beyond the conventions table the batch carries `replaced` bool [B]: the slot holds a stand-in for an
unreadable image (data.skip_bad_images).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def keep_largest(boxes: np.ndarray, limit: int) -> np.ndarray:
    """Indices (ascending) of at most `limit` boxes [N, 4] with the largest areas; ties keep the earlier."""
    if boxes.shape[0] <= limit:
        return np.arange(boxes.shape[0])
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return np.sort(np.argsort(-area, kind="stable")[:limit])


def collate(samples: Sequence[dict], max_boxes: int, max_ignore_boxes: int) -> dict[str, torch.Tensor]:
    """B samples (see DetectionDataset), all on one canvas -> the batch dict of tensors:
    image [B, 3, H, W] float32; image_hw, orig_hw [B, 2] int64; boxes [B, G, 4] float32; labels [B, G]
    int64; box_valid [B, G] bool; ignore_boxes [B, Gi, 4] float32; ignore_valid [B, Gi] bool;
    scale_factor [B, 2] float32; flipped [B] bool; image_id, index, boxes_dropped [B] int64;
    replaced [B] bool. G = max_boxes, Gi = max_ignore_boxes."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    shapes = {s["image"].shape for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"samples of one batch must share a canvas, got image shapes {sorted(shapes)}")
    b = len(samples)
    boxes = np.zeros((b, max_boxes, 4), np.float32)
    labels = np.zeros((b, max_boxes), np.int64)
    box_valid = np.zeros((b, max_boxes), bool)
    ignore = np.zeros((b, max_ignore_boxes, 4), np.float32)
    ignore_valid = np.zeros((b, max_ignore_boxes), bool)
    dropped = np.zeros((b,), np.int64)
    for i, s in enumerate(samples):
        keep = keep_largest(s["boxes"], max_boxes)
        n = keep.size
        boxes[i, :n] = s["boxes"][keep]
        labels[i, :n] = s["labels"][keep]
        box_valid[i, :n] = True
        dropped[i] = s["boxes"].shape[0] - n
        keep_ign = keep_largest(s["ignore_boxes"], max_ignore_boxes)
        ignore[i, : keep_ign.size] = s["ignore_boxes"][keep_ign]
        ignore_valid[i, : keep_ign.size] = True

    def stacked(key, dtype):
        return torch.from_numpy(np.stack([np.asarray(s[key], dtype=dtype) for s in samples]))

    return dict(
        image=torch.from_numpy(np.stack([s["image"] for s in samples])),
        image_hw=stacked("image_hw", np.int64),
        boxes=torch.from_numpy(boxes),
        labels=torch.from_numpy(labels),
        box_valid=torch.from_numpy(box_valid),
        ignore_boxes=torch.from_numpy(ignore),
        ignore_valid=torch.from_numpy(ignore_valid),
        scale_factor=stacked("scale_factor", np.float32),
        orig_hw=stacked("orig_hw", np.int64),
        flipped=stacked("flipped", bool),
        image_id=stacked("image_id", np.int64),
        index=stacked("index", np.int64),
        boxes_dropped=torch.from_numpy(dropped),
        replaced=stacked("replaced", bool),
    )


class Collate:
    """A picklable collate_fn for DataLoader: `collate` with fixed box limits."""

    def __init__(self, max_boxes: int, max_ignore_boxes: int):
        if max_boxes <= 0 or max_ignore_boxes < 0:
            raise ValueError(f"need max_boxes > 0 and max_ignore_boxes >= 0, got {max_boxes}, {max_ignore_boxes}")
        self.max_boxes = max_boxes
        self.max_ignore_boxes = max_ignore_boxes

    def __call__(self, samples: Sequence[dict]) -> dict[str, torch.Tensor]:
        return collate(samples, self.max_boxes, self.max_ignore_boxes)
