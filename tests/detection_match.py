"""Matching one detector's detections against a reference's: every reference box needs a twin."""

from __future__ import annotations

import numpy as np


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of xyxy boxes a [N, 4] and b [M, 4] -> [N, M] (float64)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=-1)
    area_a = (a[:, 2:] - a[:, :2]).clip(0).prod(axis=-1)
    area_b = (b[:, 2:] - b[:, :2]).clip(0).prod(axis=-1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def count_twins(ref_boxes, ref_scores, ref_labels, boxes, scores, labels, *, top: int = 100,
                min_iou: float = 0.99, score_tol: float = 1e-3, flat_tol: float = 0.01) -> int:
    """How many of the reference's `top` highest-scored detections have a twin among ours: the same label,
    IoU >= min_iou and a score within score_tol; each of ours serves one reference box at most. Boxes
    clipped flat at the image border have no area, hence no IoU: there, every coordinate within
    flat_tol pixels counts as the same box.

    Args:
      ref_boxes [N, 4], ref_scores [N], ref_labels [N]: the reference's detections (any order).
      boxes [M, 4], scores [M], labels [M]: ours.
      top: how many reference detections to check (by score).
      min_iou, score_tol: the twin criteria.

    Returns:
      The number of matched reference detections (at most min(top, N)).
    """
    ref_boxes, ref_scores, ref_labels = (np.asarray(v) for v in (ref_boxes, ref_scores, ref_labels))
    boxes, scores, labels = (np.asarray(v) for v in (boxes, scores, labels))
    order = np.argsort(-ref_scores, kind="stable")[:top]
    if len(boxes) == 0:
        return 0
    iou = iou_matrix(ref_boxes[order], boxes)
    same_corners = np.abs(ref_boxes[order][:, None, :] - boxes[None, :, :]).max(axis=-1) <= flat_tol
    iou = np.where(same_corners, 1.0, iou)
    used = np.zeros(len(boxes), dtype=bool)
    matched = 0
    for row, i in enumerate(order):
        ok = (labels == ref_labels[i]) & (iou[row] >= min_iou) & (np.abs(scores - ref_scores[i]) <= score_tol)
        ok &= ~used
        if ok.any():
            used[np.flatnonzero(ok)[np.argmax(iou[row][ok])]] = True
            matched += 1
    return matched
