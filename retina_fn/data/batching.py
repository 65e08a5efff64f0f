"""Collate samples into the static batch of docs/conventions.md (plus `replaced` bool [B]: a stand-in for an
unreadable image, data.skip_bad_images).

Ground truth is padded to `max_boxes` rows (`box_valid`), crowd regions to `max_ignore_boxes`
(`ignore_valid`). An image with more boxes keeps the `max_boxes` largest by area (ties: the earlier), in
their original order (mmdetection's assigner lets later boxes win low-quality ties); `boxes_dropped` counts
the rest. Surplus crowd regions are cut the same way, uncounted. With box buckets (data.box_buckets, e.g.
(8, 16, 32, 64, 128), clipped to max_boxes, always the last) a batch is padded to the smallest bucket
holding its largest kept count, so the assignment compares anchors with fewer rows (padding rows never
match); crowd regions keep one shape, so compiled steps need no more programs."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from retina_fn import errors


def keep_largest(boxes: np.ndarray, limit: int) -> np.ndarray:
    """Indices (ascending) of at most `limit` boxes [N, 4] with the largest areas; ties keep the earlier."""
    if boxes.shape[0] <= limit:
        return np.arange(boxes.shape[0])
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return np.sort(np.argsort(-area, kind="stable")[:limit])


def bucket_sizes(box_buckets: Sequence[int], max_boxes: int) -> tuple[int, ...]:
    """The ground-truth counts a batch may be padded to: ascending, each of data.box_buckets (positive ints,
    any order; () for none) clipped to max_boxes, and max_boxes itself last. ConfigError for a bad bucket."""
    if any(isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b <= 0 for b in box_buckets):
        raise errors.ConfigError(f"data.box_buckets must be positive ints, got {tuple(box_buckets)}")
    return tuple(sorted({min(int(b), max_boxes) for b in box_buckets} | {max_boxes}))


def padded_count(count: int, buckets: Sequence[int]) -> int:
    """The first of `buckets` (ascending, `bucket_sizes`) >= count (at most buckets[-1])."""
    return next(b for b in buckets if b >= count)


def collate(samples: Sequence[dict], max_boxes: int, max_ignore_boxes: int,
            box_buckets: Sequence[int] = ()) -> dict[str, torch.Tensor]:
    """B samples (DetectionDataset), all on one canvas of one dtype -> the batch dict of tensors:
    image [B, 3, H, W] float32 (or uint8); image_hw, orig_hw int64 [B, 2]; boxes float32 [B, G, 4]; labels
    int64 [B, G]; box_valid bool [B, G]; ignore_boxes float32 [B, Gi, 4]; ignore_valid bool [B, Gi];
    scale_factor float32 [B, 2]; flipped bool [B]; image_id, index, boxes_dropped int64 [B]; replaced bool
    [B]. G: max_boxes, or the bucket (module docstring); Gi: max_ignore_boxes."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    shapes = {(s["image"].shape, s["image"].dtype.name) for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"samples of one batch must share a canvas and its dtype, got images {sorted(shapes)}")
    b = len(samples)
    kept = [keep_largest(s["boxes"], max_boxes) for s in samples]
    g = padded_count(max(k.size for k in kept), bucket_sizes(box_buckets, max_boxes))
    boxes, labels, box_valid = np.zeros((b, g, 4), np.float32), np.zeros((b, g), np.int64), np.zeros((b, g), bool)
    ignore, ignore_valid = np.zeros((b, max_ignore_boxes, 4), np.float32), np.zeros((b, max_ignore_boxes), bool)
    dropped = np.zeros((b,), np.int64)
    for i, (s, keep) in enumerate(zip(samples, kept)):
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
        # default_collate stacks straight into shared memory in a loader worker: no copy when the batch is sent
        image=torch.utils.data.default_collate([torch.from_numpy(s["image"]) for s in samples]),
        image_hw=stacked("image_hw", np.int64), boxes=torch.from_numpy(boxes), labels=torch.from_numpy(labels),
        box_valid=torch.from_numpy(box_valid), ignore_boxes=torch.from_numpy(ignore),
        ignore_valid=torch.from_numpy(ignore_valid), scale_factor=stacked("scale_factor", np.float32),
        orig_hw=stacked("orig_hw", np.int64), flipped=stacked("flipped", bool), image_id=stacked("image_id", np.int64),
        index=stacked("index", np.int64), boxes_dropped=torch.from_numpy(dropped), replaced=stacked("replaced", bool))


def pad_ground_truth(batch: dict[str, torch.Tensor], num_boxes: int) -> dict[str, torch.Tensor]:
    """A batch with boxes [B, G', 4], labels and box_valid [B, G'] padded with zero / False rows to
    num_boxes = G' >= G (e.g. the largest G of an accumulated step); other tensors shared, `batch` itself
    when G' == G; ValueError when G' < G."""
    b, g = batch["box_valid"].shape
    if num_boxes < g:
        raise ValueError(f"cannot pad {g} ground-truth rows down to {num_boxes}")
    if num_boxes == g:
        return batch

    def widened(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x.new_zeros((b, num_boxes - g, *x.shape[2:]))], dim=1)

    return dict(batch, boxes=widened(batch["boxes"]), labels=widened(batch["labels"]),
                box_valid=widened(batch["box_valid"]))


class Collate:
    """A picklable collate_fn for DataLoader: `collate` with fixed box limits and buckets."""

    def __init__(self, max_boxes: int, max_ignore_boxes: int, box_buckets: Sequence[int] = ()):
        if max_boxes <= 0 or max_ignore_boxes < 0:
            raise ValueError(f"need max_boxes > 0 and max_ignore_boxes >= 0, got {max_boxes}, {max_ignore_boxes}")
        self.max_boxes, self.max_ignore_boxes = max_boxes, max_ignore_boxes
        self.box_buckets = bucket_sizes(box_buckets, max_boxes) if box_buckets else ()

    def __call__(self, samples: Sequence[dict]) -> dict[str, torch.Tensor]:
        return collate(samples, self.max_boxes, self.max_ignore_boxes, self.box_buckets)
