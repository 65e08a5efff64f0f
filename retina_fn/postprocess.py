"""Test-time post-processing: head outputs -> a fixed number of scored, labelled boxes per image.

Two candidate selections (model.test.pre_select):
  'anchor' (mmdetection v2.9.0): per level, the top nms_pre anchors by their best class score; decode
    and clip every kept anchor; then every (anchor, class) pair with score > score_thr is a candidate.
  'pair' (torchvision): per level, the (anchor, class) pairs with score > score_thr, the top nms_pre of
    them; decode and clip.
Then class-aware greedy NMS over the candidates of all levels and the top max_per_img survivors.

The candidates are capped at the top `max_candidates` pairs by score (static shapes). The cap changes nothing
once max_per_img boxes survive NMS among them: greedy NMS decides each box from those ranked above it only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from retina_fn import boxes as box_lib  # `boxes` is a local name here
from retina_fn.nms import batched_nms
from retina_fn.precision import float32_region
from retina_fn.spec import CoderSpec, PostprocessSpec
from retina_fn.topk import top_k_sorted_indices


class Detections(NamedTuple):
    """Per-image detections, padded to M = max_per_img rows, sorted by score (descending)."""

    boxes: torch.Tensor  # float32 [B, M, 4], xyxy (original-image pixels when rescaled)
    scores: torch.Tensor  # float32 [B, M], sigmoid probabilities; 0 in padding rows
    labels: torch.Tensor  # int64 [B, M], 0..K-1; 0 in padding rows
    valid: torch.Tensor  # bool [B, M], True for real detections


class _Candidates(NamedTuple):
    boxes: torch.Tensor  # [B, C, 4]
    scores: torch.Tensor  # [B, C]
    labels: torch.Tensor  # int64 [B, C]
    valid: torch.Tensor  # bool [B, C]


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _decode(anchors, deltas, image_hw, coder) -> torch.Tensor:
    return box_lib.decode(anchors, deltas, coder.means, coder.stds, max_shape=image_hw[:, None, :],
                          scale_clamp=coder.scale_clamp, clamp_lower=coder.clamp_lower)


def _level_candidates_by_anchor(scores, deltas, anchors, image_hw, nms_pre, score_thr, coder) -> _Candidates:
    """mmdetection: top nms_pre anchors by max class score, then every pair of them above score_thr."""
    batch, n, num_classes = scores.shape
    if 0 < nms_pre < n:
        chosen = top_k_sorted_indices(scores.max(dim=-1).values, nms_pre)
        scores, deltas, anchors = (_gather_rows(t, chosen) for t in (scores, deltas, anchors))
    boxes = _decode(anchors, deltas, image_hw, coder)
    rows = boxes.shape[1]
    pair_boxes = boxes.unsqueeze(2).expand(batch, rows, num_classes, 4).reshape(batch, rows * num_classes, 4)
    pair_scores = scores.reshape(batch, rows * num_classes)
    labels = torch.arange(num_classes, device=scores.device).repeat(rows).expand(batch, -1)
    return _Candidates(pair_boxes, pair_scores, labels, pair_scores > score_thr)


def _level_candidates_by_pair(scores, deltas, anchors, image_hw, nms_pre, score_thr, coder) -> _Candidates:
    """torchvision: pairs above score_thr, the top nms_pre of them by score, decoded."""
    batch, n, num_classes = scores.shape
    flat = scores.reshape(batch, n * num_classes)
    passing = flat > score_thr
    count = n * num_classes if nms_pre <= 0 else min(nms_pre, n * num_classes)
    chosen = top_k_sorted_indices(torch.where(passing, flat, torch.full_like(flat, -torch.inf)), count)
    rows = torch.div(chosen, num_classes, rounding_mode="floor")
    boxes = _decode(_gather_rows(anchors, rows), _gather_rows(deltas, rows), image_hw, coder)
    return _Candidates(boxes, flat.gather(1, chosen), chosen % num_classes, passing.gather(1, chosen))


def _cap(c: _Candidates, max_candidates: int) -> _Candidates:
    """The top max_candidates valid candidates by score (all when there are fewer)."""
    if max_candidates <= 0 or c.scores.shape[1] <= max_candidates:
        return c
    chosen = top_k_sorted_indices(torch.where(c.valid, c.scores, torch.full_like(c.scores, -torch.inf)), max_candidates)
    return _Candidates(_gather_rows(c.boxes, chosen), c.scores.gather(1, chosen), c.labels.gather(1, chosen),
                       c.valid.gather(1, chosen))


def _trim_to_valid(c: _Candidates, minimum: int = 128) -> _Candidates:
    """The top 2**ceil(log2(n)) candidates (at least `minimum`), n an image's largest valid count: only invalid
    rows go, and O(k^2) NMS stays fast for an uncertain model (one host sync: not for static shapes)."""
    largest = int(c.valid.sum(dim=1).max()) if c.scores.shape[1] else 0
    return _cap(c, max(minimum, 1 << max(largest - 1, 0).bit_length()))


def _check_inputs(cls_logits, box_deltas, anchors, level_counts, image_hw, scale_factor, anchor_valid) -> None:
    if cls_logits.ndim != 3:
        raise ValueError(f"cls_logits must be [B, A, K], got {tuple(cls_logits.shape)}")
    b, a, _ = cls_logits.shape
    if tuple(box_deltas.shape) != (b, a, 4):
        raise ValueError(f"box_deltas must be [B, A, 4] = {(b, a, 4)}, got {tuple(box_deltas.shape)}")
    if tuple(anchors.shape) not in ((a, 4), (b, a, 4)):
        raise ValueError(f"anchors must be [A, 4] = {(a, 4)} or [B, A, 4], got {tuple(anchors.shape)}")
    if sum(level_counts) != a or any(c < 0 for c in level_counts):
        raise ValueError(f"level_counts {tuple(level_counts)} must be non-negative and sum to A = {a}")
    if tuple(image_hw.shape) != (b, 2):
        raise ValueError(f"image_hw must be [B, 2] = {(b, 2)}, got {tuple(image_hw.shape)}")
    if scale_factor is not None and tuple(scale_factor.shape) != (b, 2):
        raise ValueError(f"scale_factor must be [B, 2] = {(b, 2)} or None, got {tuple(scale_factor.shape)}")
    if anchor_valid is not None and tuple(anchor_valid.shape) != (b, a):
        raise ValueError(f"anchor_valid must be [B, A] = {(b, a)} or None, got {tuple(anchor_valid.shape)}")


def detect(cls_logits: torch.Tensor, box_deltas: torch.Tensor, anchors: torch.Tensor, level_counts: tuple[int, ...],
           image_hw: torch.Tensor, scale_factor: torch.Tensor | None, test: PostprocessSpec, coder: CoderSpec,
           anchor_valid: torch.Tensor | None = None) -> Detections:
    """Detections from the head outputs of a batch, in float32 with autocast disabled. Equal scores go to the
    lower anchor index (per level selection) or the earlier candidate (NMS).

    Args:
      cls_logits: float [B, A, K]; box_deltas: float [B, A, 4].
      anchors: float [A, 4] xyxy, levels concatenated in order, or [B, A, 4]: each image's own.
      level_counts: anchors per level (sums to A).
      image_hw: int64 [B, 2] resized (h, w) of each image: decoded boxes are clipped to it.
      scale_factor: float [B, 2] (sx, sy) or None: boxes divided by it into original-image pixels (mmdetection's
        rescale, before NMS as there; no clipping afterwards).
      test: nms_pre <= 0 or max_candidates <= 0 mean no limit; unless static_shapes, the candidates entering NMS
        are trimmed to a power-of-two count covering every valid one.
      anchor_valid: bool [B, A] or None: False anchors never become candidates, as if absent (as in the image
        padded alone).

    Returns:
      Detections with M = test.max_per_img rows; padding rows are all 0 / False.

    Raises:
      ValueError: shapes that do not fit together, or level_counts that do not sum to A.
    """
    _check_inputs(cls_logits, box_deltas, anchors, level_counts, image_hw, scale_factor, anchor_valid)
    select = _level_candidates_by_anchor if test.pre_select == "anchor" else _level_candidates_by_pair
    batch = cls_logits.shape[0]
    with float32_region(cls_logits.device.type):
        scores = torch.sigmoid(cls_logits.float())
        if anchor_valid is not None:
            scores = torch.where(anchor_valid.unsqueeze(-1), scores, -1.0)
        deltas = box_deltas.float()
        batch_anchors = anchors.float() if anchors.dim() == 3 else anchors.float().unsqueeze(0).expand(batch, -1, -1)
        per_level = []
        start = 0
        for count in level_counts:
            level = slice(start, start + count)
            start += count
            per_level.append(select(scores[:, level], deltas[:, level], batch_anchors[:, level], image_hw,
                                    test.nms_pre, test.score_thr, coder))
        candidates = _cap(_Candidates(*(torch.cat(parts, dim=1) for parts in zip(*per_level))),
                          test.max_candidates)
        if not test.static_shapes:
            candidates = _trim_to_valid(candidates)

        boxes = candidates.boxes
        if scale_factor is not None:
            boxes = boxes / scale_factor.float().repeat(1, 2)[:, None, :]
        index, valid = batched_nms(boxes, candidates.scores, candidates.labels, candidates.valid,
                                   test.nms_iou, test.max_per_img)
        return Detections(torch.where(valid.unsqueeze(-1), _gather_rows(boxes, index), 0.0),
                          torch.where(valid, candidates.scores.gather(1, index), 0.0),
                          torch.where(valid, candidates.labels.gather(1, index), torch.zeros_like(index)), valid)
