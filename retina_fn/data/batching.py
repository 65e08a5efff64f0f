"""Collate samples into the static batch of docs/conventions.md.

Ground truth is padded to `max_boxes` rows with `box_valid`, crowd regions to `max_ignore_boxes` with
`ignore_valid`. An image with more boxes than fit keeps the `max_boxes` largest by area (ties: the earlier
annotation), in their original order (the order matters to mmdetection's assigner, where later boxes win
low-quality ties); `boxes_dropped` counts the rest and the loader reports the totals. Surplus crowd regions
are cut the same way (largest kept) without a count: they only matter when the assigner's
ignore_iof_thr > 0.

With box buckets (data.box_buckets, e.g. (8, 16, 32, 64, 128)) a batch's ground truth is padded instead to
the smallest bucket that holds its largest kept count (buckets clipped to max_boxes, which is always the
last; the drop rule above is unchanged), so the MaxIoU assignment compares every anchor with, say, 16 rows
instead of 100 (COCO averages about 7 boxes per image). Each bucket is one static shape; the assignment and
the loss are the same whatever the padding (padding rows never match, retina_fn.assign). Crowd regions keep
their one shape (max_ignore_boxes): they are read only when ignore_iof_thr > 0, and a second varying shape
would multiply the programs a compiled or captured step needs.

Beyond the conventions table the batch carries `replaced` bool [B]: the slot holds a stand-in for an
unreadable image (data.skip_bad_images).
"""

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
    """The ground-truth counts a batch may be padded to.

    Args:
      box_buckets: data.box_buckets, positive ints in any order; () for padding to max_boxes always.
      max_boxes: data.max_boxes, the most boxes an image keeps.

    Returns:
      Ascending distinct counts: each bucket clipped to max_boxes, and max_boxes itself (the last).

    Raises:
      ValueError: naming data.box_buckets, for a bucket that is not a positive int.
    """
    if any(isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b <= 0 for b in box_buckets):
        raise errors.ConfigError(f"data.box_buckets must be positive ints, got {tuple(box_buckets)}")
    return tuple(sorted({min(int(b), max_boxes) for b in box_buckets} | {max_boxes}))


def padded_count(count: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds `count` rows.

    Args:
      count: the largest number of kept boxes of an image in the batch (at most buckets[-1]).
      buckets: ascending, from `bucket_sizes`.

    Returns:
      The first bucket >= count.
    """
    return next(b for b in buckets if b >= count)


def collate(samples: Sequence[dict], max_boxes: int, max_ignore_boxes: int,
            box_buckets: Sequence[int] = ()) -> dict[str, torch.Tensor]:
    """B samples (see DetectionDataset), all on one canvas of one dtype -> the batch dict of tensors:
    image [B, 3, H, W] float32 (uint8 for uint8 canvases); image_hw, orig_hw [B, 2] int64; boxes [B, G, 4]
    float32; labels [B, G] int64; box_valid [B, G] bool; ignore_boxes [B, Gi, 4] float32; ignore_valid
    [B, Gi] bool; scale_factor [B, 2] float32; flipped [B] bool; image_id, index, boxes_dropped [B] int64;
    replaced [B] bool. G = max_boxes, or with box_buckets the smallest of `bucket_sizes(box_buckets,
    max_boxes)` that holds the batch's largest kept count; Gi = max_ignore_boxes."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    shapes = {(s["image"].shape, s["image"].dtype.name) for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"samples of one batch must share a canvas and its dtype, got images {sorted(shapes)}")
    b = len(samples)
    kept = [keep_largest(s["boxes"], max_boxes) for s in samples]
    g = padded_count(max(k.size for k in kept), bucket_sizes(box_buckets, max_boxes))
    boxes = np.zeros((b, g, 4), np.float32)
    labels = np.zeros((b, g), np.int64)
    box_valid = np.zeros((b, g), bool)
    ignore = np.zeros((b, max_ignore_boxes, 4), np.float32)
    ignore_valid = np.zeros((b, max_ignore_boxes), bool)
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


def pad_ground_truth(batch: dict[str, torch.Tensor], num_boxes: int) -> dict[str, torch.Tensor]:
    """A batch whose ground truth is padded to more rows (e.g. the largest G of the loader batches that one
    optimiser step accumulates, so the step sees one shape).

    Args:
      batch: the batch dict; boxes float32 [B, G, 4], labels int64 [B, G], box_valid bool [B, G] are widened.
      num_boxes: the new row count G' >= G.

    Returns:
      A new dict sharing every other tensor: boxes [B, G', 4], labels [B, G'], box_valid [B, G'], the added
      rows zero / False; `batch` itself when G' == G.

    Raises:
      ValueError: G' < G.
    """
    b, g = batch["box_valid"].shape
    if num_boxes < g:
        raise ValueError(f"cannot pad {g} ground-truth rows down to {num_boxes}")
    if num_boxes == g:
        return batch
    extra = num_boxes - g

    def widened(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x.new_zeros((b, extra, *x.shape[2:]))], dim=1)

    return dict(batch, boxes=widened(batch["boxes"]), labels=widened(batch["labels"]),
                box_valid=widened(batch["box_valid"]))


class Collate:
    """A picklable collate_fn for DataLoader: `collate` with fixed box limits and buckets."""

    def __init__(self, max_boxes: int, max_ignore_boxes: int, box_buckets: Sequence[int] = ()):
        if max_boxes <= 0 or max_ignore_boxes < 0:
            raise ValueError(f"need max_boxes > 0 and max_ignore_boxes >= 0, got {max_boxes}, {max_ignore_boxes}")
        self.max_boxes = max_boxes
        self.max_ignore_boxes = max_ignore_boxes
        self.box_buckets = bucket_sizes(box_buckets, max_boxes) if box_buckets else ()

    def __call__(self, samples: Sequence[dict]) -> dict[str, torch.Tensor]:
        return collate(samples, self.max_boxes, self.max_ignore_boxes, self.box_buckets)
