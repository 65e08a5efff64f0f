"""Anchor-to-ground-truth assignment: mmdetection 2.9.0's MaxIoUAssigner followed by its PseudoSampler
(every positive and negative is kept), batched over padded ground truth with no loop over images or boxes.

Per image, on the valid anchors and valid gt only:
  1. IoU of every anchor with every gt; with ignore_iof_thr > 0, an anchor whose largest IoF with a crowd box
     exceeds it gets IoU -1 with every gt.
  2. Per anchor max IoU and its gt (ties to the lowest index): negative if 0 <= max < neg_iou_thr, positive if
     max >= pos_iou_thr.
  3. match_low_quality: for each gt whose best IoU is >= min_pos_iou and > 0 (the guard keeps a gt overlapping
     nothing from claiming everything), every anchor at that best becomes positive, matched to it with the
     highest such gt winning ('mmdet', later gts overwrite) or keeping its own argmax ('torchvision').
  4. An image without valid gt: every valid anchor is negative (crowds aside, as mmdetection). Invalid anchors
     are neither.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from retina_fn.boxes import pairwise_iou
from retina_fn.spec import AssignerSpec


class Assignment(NamedTuple):
    """Per-anchor assignment for a batch; every field is [B, A]."""

    positive: torch.Tensor  # bool: a foreground anchor
    negative: torch.Tensor  # bool: a background anchor (neither positive nor negative: ignored)
    matched: torch.Tensor  # int64: index into the G gt rows for positives, 0 elsewhere
    max_iou: torch.Tensor  # float32: largest IoU with a valid gt; -1 for invalid or crowd-ignored anchors
    # and for every anchor of an image without gt


def _check_inputs(anchors, anchor_valid, gt_boxes, gt_valid, ignore_boxes, ignore_valid) -> None:
    if anchors.dim() != 2 or anchors.shape[-1] != 4:
        raise ValueError(f"anchors must have shape [A, 4], got {tuple(anchors.shape)}")
    if gt_boxes.dim() != 3 or gt_boxes.shape[-1] != 4:
        raise ValueError(f"gt_boxes must have shape [B, G, 4], got {tuple(gt_boxes.shape)}")
    b, a = gt_boxes.shape[0], anchors.shape[0]
    if tuple(anchor_valid.shape) != (b, a) or anchor_valid.dtype != torch.bool:
        raise ValueError(f"anchor_valid must be bool [B, A] = [{b}, {a}], got {anchor_valid.dtype} "
                         f"{tuple(anchor_valid.shape)}")
    if tuple(gt_valid.shape) != tuple(gt_boxes.shape[:2]) or gt_valid.dtype != torch.bool:
        raise ValueError(f"gt_valid must be bool [B, G] = {list(gt_boxes.shape[:2])}, got {gt_valid.dtype} "
                         f"{tuple(gt_valid.shape)}")
    if (ignore_boxes is None) != (ignore_valid is None):
        raise ValueError("ignore_boxes and ignore_valid must be given together")
    if ignore_boxes is not None:
        if ignore_boxes.dim() != 3 or ignore_boxes.shape[0] != b or ignore_boxes.shape[-1] != 4:
            raise ValueError(f"ignore_boxes must have shape [B={b}, Gi, 4], got {tuple(ignore_boxes.shape)}")
        if tuple(ignore_valid.shape) != tuple(ignore_boxes.shape[:2]) or ignore_valid.dtype != torch.bool:
            raise ValueError(f"ignore_valid must be bool [B, Gi] = {list(ignore_boxes.shape[:2])}, got "
                             f"{ignore_valid.dtype} {tuple(ignore_valid.shape)}")


def crowd_ignored(anchors: torch.Tensor, ignore_boxes: torch.Tensor, ignore_valid: torch.Tensor,
                  iof_thr: float) -> torch.Tensor:
    """bool [B, A]: anchors float [A, 4] whose largest IoF (intersection / anchor area) with a valid crowd box
    (ignore_boxes [B, Gi, 4] xyxy, ignore_valid bool [B, Gi]) exceeds iof_thr; all False when Gi = 0."""
    iof = pairwise_iou(anchors, ignore_boxes.float(), mode="iof")  # [B, A, Gi]
    iof = iof.masked_fill(~ignore_valid[:, None, :], -1.0)
    if iof.shape[-1] == 0:
        return torch.zeros(iof.shape[:2], dtype=torch.bool, device=iof.device)
    return iof.amax(dim=-1) > iof_thr


def _index_dtype(size: int) -> torch.dtype:
    """int16 where 2 * size - 1 fits (half a float32 [B, A, G] tensor), else int32."""
    return torch.int16 if 2 * size - 1 <= torch.iinfo(torch.int16).max else torch.int32


def _first_index_of_max(values: torch.Tensor, maxima: torch.Tensor) -> torch.Tensor:
    """int64 [...]: the first index along the last dim of float [..., G] `values` not below `maxima` [...],
    their amax (0 in a row with a NaN)."""
    g = values.shape[-1]
    index = torch.arange(g, dtype=_index_dtype(g), device=values.device)
    # entries below the maximum count g past their index, so the least of the row is the first maximum
    return torch.add(index, values < maxima[..., None], alpha=g).amin(dim=-1).long()


def _last_true_index(mask: torch.Tensor) -> torch.Tensor:
    """int64 [...]: the index of the last True along the last dim of bool [..., G] `mask` (0 if none)."""
    g = mask.shape[-1]
    index = torch.arange(g, dtype=_index_dtype(g), device=mask.device)
    return (index * mask).amax(dim=-1).long()


def assign(anchors: torch.Tensor, anchor_valid: torch.Tensor, gt_boxes: torch.Tensor, gt_valid: torch.Tensor,
           spec: AssignerSpec, ignore_boxes: torch.Tensor | None = None,
           ignore_valid: torch.Tensor | None = None) -> Assignment:
    """Assigns anchors float [A, 4] xyxy (anchor_valid bool [B, A]) to padded ground truth gt_boxes float
    [B, G, 4] (gt_valid bool [B, G]) by the module docstring's rules -> `Assignment`.

    Args:
      ignore_boxes: optional float [B, Gi, 4] crowd regions (read when spec.ignore_iof_thr > 0), with
        ignore_valid bool [B, Gi].

    Raises:
      ValueError: a shape or dtype that does not fit, or ignore_boxes without ignore_valid (or the reverse).
    """
    _check_inputs(anchors, anchor_valid, gt_boxes, gt_valid, ignore_boxes, ignore_valid)
    anchors = anchors.float()
    num_gt = gt_boxes.shape[1]

    # [B, A, G]; the one large float tensor here, edited in place to keep a single copy alive.
    iou = pairwise_iou(anchors, gt_boxes.float())
    excluded = ~anchor_valid
    if ignore_boxes is not None and spec.ignore_iof_thr > 0:
        excluded = excluded | crowd_ignored(anchors, ignore_boxes, ignore_valid, spec.ignore_iof_thr)
    iou.masked_fill_(excluded[:, :, None] | ~gt_valid[:, None, :], -1.0)

    has_gt = gt_valid.any(dim=1, keepdim=True)  # [B, 1]; without gt every IoU above is -1
    if num_gt > 0:
        if torch.compiler.is_compiling():
            # amax and an integer min instead of torch.max's indices: torch 2.11's CPU inductor returns wrong
            # indices from a max / argmax over gts vectorised across anchors (pytorch#178964; also #183082).
            # Eager keeps torch.max: one pass over the IoU where this form takes four.
            max_iou = iou.amax(dim=2)
            argmax = _first_index_of_max(iou, max_iou)
        else:
            max_iou, argmax = iou.max(dim=2)  # torch.max returns the first index among ties
    else:
        max_iou = torch.full(anchor_valid.shape, -1.0, device=iou.device)
        argmax = torch.zeros(anchor_valid.shape, dtype=torch.int64, device=iou.device)

    positive = max_iou >= spec.pos_iou_thr
    matched = argmax
    if spec.match_low_quality and num_gt > 0:
        best_per_gt = iou.amax(dim=1, keepdim=True)  # [B, 1, G], over valid anchors
        claims = (best_per_gt >= spec.min_pos_iou) & (best_per_gt > 0)
        low_quality = (iou == best_per_gt) & claims  # [B, A, G]; -1 entries never equal a claiming best
        is_low_quality = low_quality.any(dim=2)
        positive = positive | is_low_quality
        if spec.low_quality == "mmdet":
            matched = torch.where(is_low_quality, _last_true_index(low_quality), argmax)
    positive = positive & anchor_valid & has_gt
    in_negative_band = (max_iou >= 0) & (max_iou < spec.neg_iou_thr)
    negative = anchor_valid & ~positive & (in_negative_band | ~has_gt)
    matched = torch.where(positive, matched, torch.zeros_like(matched))
    return Assignment(positive=positive, negative=negative, matched=matched, max_iou=max_iou)
