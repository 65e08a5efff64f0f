"""RetinaNet training losses: sigmoid focal loss over every anchor and class, an L1 (or GIoU) box loss over
positive anchors, normalised per batch (mmdetection) or per image (torchvision). Dense, with masks, never boolean
indexing: static shapes, no host sync, and every head output gets a (possibly zero) gradient.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from retina_fn import boxes as box_lib
from retina_fn import focal_loss
from retina_fn.precision import float32_region
from retina_fn.spec import CoderSpec, LossSpec


class AssignmentLike(Protocol):
    """What the loss reads from an assignment (retina_fn.assign.Assignment)."""

    positive: torch.Tensor  # bool [B, A]
    negative: torch.Tensor  # bool [B, A]
    matched: torch.Tensor  # int64 [B, A], index into G; only read where positive


def _saturate(nll: torch.Tensor) -> torch.Tensor:
    """min(nll, -log(FLT_MIN)) in value with the unclamped gradient, as mmcv's kernel (forward log(max(p, FLT_MIN)),
    analytic backward, which keeps pushing a hopeless logit)."""
    # (nll - nll.detach()) is exactly 0 in value but carries nll's gradient.
    return torch.where(nll > focal_loss.MAX_NLL, focal_loss.MAX_NLL + (nll - nll.detach()), nll)


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                       gamma: float = 2.0) -> torch.Tensor:
    """Elementwise sigmoid focal loss (Lin et al. 2017; mmcv's `sigmoid_focal_loss`, reduction 'none').

    logits [..., K] (any float dtype), targets [..., K] in {0, 1} -> loss [..., K], float32 (float64 stays
    float64), autocast disabled. Logs from softplus, capped at -log(FLT_MIN) as mmcv's kernel; mmcv's float32
    rounding of 1 - p to 0 above logit ~16.6 is not reproduced (there this equals mmdetection's CPU path)."""
    if logits.shape != targets.shape:
        raise ValueError(f"sigmoid_focal_loss: logits {tuple(logits.shape)} and targets "
                         f"{tuple(targets.shape)} must have the same shape")
    with float32_region(logits.device.type):
        dtype = torch.promote_types(logits.dtype, torch.float32)
        x = logits.to(dtype)
        t = targets.to(dtype)
        prob = torch.sigmoid(x)
        prob_not = torch.sigmoid(-x)  # 1 - p without cancellation
        nll_one = _saturate(F.softplus(-x))  # -log p
        nll_zero = _saturate(F.softplus(x))  # -log(1 - p)
        loss_one = alpha * prob_not.pow(gamma) * nll_one
        loss_zero = (1.0 - alpha) * prob.pow(gamma) * nll_zero
        return t * loss_one + (1.0 - t) * loss_zero


def _check_shapes(cls_logits, box_deltas, anchors, anchor_valid, assignment, gt_boxes, gt_labels,
                  image_hw) -> None:
    if cls_logits.ndim != 3:
        raise ValueError(f"cls_logits must be [B, A, K], got shape {tuple(cls_logits.shape)}")
    b, a, _ = cls_logits.shape
    expected = {"box_deltas": (box_deltas, (b, a, 4)), "anchors": (anchors, (a, 4)),
                "anchor_valid": (anchor_valid, (b, a))}
    expected.update({f"assignment.{f}": (getattr(assignment, f), (b, a)) for f in ("positive", "negative", "matched")})
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} to match cls_logits "
                             f"{tuple(cls_logits.shape)}, got {tuple(tensor.shape)}")
    if gt_boxes.ndim != 3 or gt_boxes.shape[0] != b or gt_boxes.shape[2] != 4:
        raise ValueError(f"gt_boxes must be [B={b}, G, 4], got {tuple(gt_boxes.shape)}")
    if tuple(gt_labels.shape) != tuple(gt_boxes.shape[:2]):
        raise ValueError(f"gt_labels must be [B, G] = {tuple(gt_boxes.shape[:2])}, "
                         f"got {tuple(gt_labels.shape)}")
    for name, mask in (("anchor_valid", anchor_valid), ("assignment.positive", assignment.positive),
                       ("assignment.negative", assignment.negative)):
        if mask.dtype != torch.bool:
            raise ValueError(f"{name} must be bool, got {mask.dtype}")
    if image_hw is not None and tuple(image_hw.shape) != (b, 2):
        raise ValueError(f"image_hw must be [B={b}, 2], got {tuple(image_hw.shape)}")


def _gather_matched(gt: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """gt [B, G, ...] gathered at index [B, A] along G -> [B, A, ...]."""
    if gt.shape[1] == 0:  # no ground-truth slots at all: one zero row, never read where it matters
        gt = gt.new_zeros((gt.shape[0], 1) + tuple(gt.shape[2:]))
    trailing = gt.shape[2:]
    idx = index.reshape(index.shape + (1,) * len(trailing)).expand(index.shape + trailing)
    return gt.gather(1, idx)


def _focal_codes(positive: torch.Tensor, negative: torch.Tensor, matched_labels: torch.Tensor,
                 num_classes: int) -> torch.Tensor:
    """int64 [B, A] focal_loss codes: a positive's class, BACKGROUND for a negative and for a positive with a label
    outside 0..K-1 (the one-hot path's all-zero target), IGNORE otherwise."""
    in_range = (matched_labels >= 0) & (matched_labels < num_classes)
    codes = torch.where(positive & in_range, matched_labels, focal_loss.BACKGROUND)
    return torch.where(positive | negative, codes, focal_loss.IGNORE)


def _box_loss_per_image(box_deltas, anchors, positive, matched_boxes, loss_spec: LossSpec, coder: CoderSpec,
                        image_hw) -> torch.Tensor:
    """[B]: the box loss summed over each image's positive anchors."""
    anchors = anchors.float().unsqueeze(0)  # [1, A, 4]
    pos = positive.unsqueeze(-1)
    # Non-positive anchors get their own anchor as target: encode/GIoU stay finite there (padded gts
    # are zero boxes, whose encoding is -inf/nan, and nan * 0 = nan would poison the sum and grads).
    target_boxes = torch.where(pos, matched_boxes.float(), anchors)
    weight = positive.to(box_deltas.dtype)
    if loss_spec.box_loss == "l1":
        target_deltas = box_lib.encode(anchors, target_boxes, coder.means, coder.stds)
        per_anchor = (box_deltas - target_deltas.to(box_deltas.dtype)).abs().sum(-1)
    else:  # 'giou' (torchvision v2): on decoded predictions, no clipping unless image_hw is given
        max_shape = None if image_hw is None else image_hw[:, None, :]
        predicted = box_lib.decode(anchors, box_deltas, coder.means, coder.stds, max_shape=max_shape,
                                   scale_clamp=coder.scale_clamp, clamp_lower=coder.clamp_lower)
        per_anchor = 1.0 - box_lib.elementwise_giou(predicted, target_boxes)
    return (per_anchor * weight).sum(-1)


def retinanet_loss(cls_logits: torch.Tensor, box_deltas: torch.Tensor, anchors: torch.Tensor,
                   anchor_valid: torch.Tensor, assignment: AssignmentLike, gt_boxes: torch.Tensor,
                   gt_labels: torch.Tensor, loss_spec: LossSpec, coder: CoderSpec, *,
                   normalizer: torch.Tensor | None = None,
                   image_hw: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """RetinaNet loss over a batch.

    A positive's classification target is the one-hot of its matched gt's label, a negative's all zeros (both
    weigh 1; ignored and invalid anchors 0), focal loss summed over anchors and classes (fused_focal: the same sum
    from retina_fn.focal_loss, equal up to float32 rounding). Box loss on positives: 'l1' |delta - encode(anchor,
    gt)| (mmdetection) or 'giou' 1 - GIoU(decode(anchor, delta), gt) (torchvision v2). Normaliser N: 'batch'
    (mmdetection) divides the sums by N = sum_i max(#pos_i, 1); 'image' (torchvision) divides each image's sums
    by max(1, #pos_i), then by N = B.

    Args:
      cls_logits: float [B, A, K] (computed in float32); box_deltas: float [B, A, 4] normalised deltas.
      anchors: float [A, 4] xyxy; anchor_valid: bool [B, A], invalid anchors weigh nothing.
      assignment: `positive`, `negative` bool [B, A] and `matched` int64 [B, A] (read only where positive).
      gt_boxes: float [B, G, 4]; gt_labels: int64 [B, G] in 0..K-1 (outside that: an all-zero target, unchecked).
      normalizer: float [] divisor of the summed terms; None: this batch's own (`loss_normalizer`). A train step
        passes its whole step's, so micro-batch losses add up to the batch's.
      image_hw: optional int64 [B, 2]; 'giou' clips decoded predictions to it (None matches torchvision).

    Returns:
      (loss float32 [] (float64 for float64 inputs), metrics): 0-d 'loss' (detached), 'loss_cls', 'loss_box'
      (weighted, adding up to loss) and 'num_pos'; all add up over micro-batches that share N.
    """
    _check_shapes(cls_logits, box_deltas, anchors, anchor_valid, assignment, gt_boxes, gt_labels, image_hw)

    with float32_region(cls_logits.device.type):
        dtype = torch.promote_types(cls_logits.dtype, torch.float32)
        deltas = box_deltas.to(dtype)
        num_classes = cls_logits.shape[-1]

        positive = assignment.positive & anchor_valid
        negative = assignment.negative & anchor_valid & ~positive
        matched = assignment.matched.to(torch.int64)
        matched = torch.where(positive, matched, torch.zeros_like(matched))
        matched_boxes = _gather_matched(gt_boxes, matched)  # [B, A, 4]
        matched_labels = _gather_matched(gt_labels, matched)  # [B, A]

        if loss_spec.fused_focal:
            codes = _focal_codes(positive, negative, matched_labels, num_classes)
            cls_sum = focal_loss.sigmoid_focal_loss_sums(cls_logits, codes, loss_spec.focal_alpha,
                                                         loss_spec.focal_gamma)  # [B]
        else:
            classes = torch.arange(num_classes, device=cls_logits.device)
            cls_targets = (matched_labels.unsqueeze(-1) == classes) & positive.unsqueeze(-1)
            cls_weight = (positive | negative).to(dtype).unsqueeze(-1)
            focal = sigmoid_focal_loss(cls_logits, cls_targets.to(dtype), loss_spec.focal_alpha,
                                       loss_spec.focal_gamma)
            cls_sum = (focal * cls_weight).sum(dim=(1, 2))  # [B]
        box_sum = _box_loss_per_image(deltas, anchors, positive, matched_boxes, loss_spec, coder,
                                      image_hw).to(dtype)  # [B]

        num_pos = positive.sum(dim=1).to(dtype)  # [B]
        if normalizer is None:
            normalizer = loss_normalizer(positive, loss_spec)
        normalizer = normalizer.to(dtype)
        if loss_spec.normalizer == "batch":
            loss_cls = loss_spec.cls_weight * cls_sum.sum() / normalizer
            loss_box = loss_spec.box_weight * box_sum.sum() / normalizer
        else:
            per_image_norm = num_pos.clamp(min=1.0)
            loss_cls = loss_spec.cls_weight * (cls_sum / per_image_norm).sum() / normalizer
            loss_box = loss_spec.box_weight * (box_sum / per_image_norm).sum() / normalizer
        loss = loss_cls + loss_box
        return loss, {"loss": (loss_cls + loss_box).detach(), "loss_cls": loss_cls.detach(),
                      "loss_box": loss_box.detach(), "num_pos": num_pos.sum().detach()}


def loss_normalizer(positive: torch.Tensor, loss_spec: LossSpec) -> torch.Tensor:
    """float32 []: a batch's loss divisor (`retinanet_loss`'s N) before any averaging over replicas.

    Args:
      positive: bool [B, A], positive and valid anchors.
    """
    if loss_spec.normalizer == "batch":
        return positive.sum(dim=1).clamp(min=1).sum().to(torch.float32)
    return torch.full((), float(positive.shape[0]), dtype=torch.float32, device=positive.device)
