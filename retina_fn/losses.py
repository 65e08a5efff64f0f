"""RetinaNet training losses: sigmoid focal loss over every anchor and class, an L1 (or GIoU) box loss
over positive anchors, normalised per batch (mmdetection) or per image (torchvision).

Everything is computed densely with masks and multiplications, never with boolean indexing, so
shapes are static, no host sync happens and every element of the head outputs receives a (possibly
zero) gradient: no parameter ever drops out of the graph, even for a batch without positives.
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
    """What the loss reads from an assignment (retina_fn.assign.Assignment has these fields)."""

    positive: torch.Tensor  # bool [B, A]
    negative: torch.Tensor  # bool [B, A]
    matched: torch.Tensor  # int64 [B, A], index into G; only read where positive


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs; float64 stays float64 (useful for gradient checks)."""
    return torch.promote_types(dtype, torch.float32)


def _saturate(nll: torch.Tensor) -> torch.Tensor:
    """min(nll, -log(FLT_MIN)) in value, with the unclamped gradient.

    This is what mmcv's kernel does: its forward takes log(max(p, FLT_MIN)), while its hand-written
    backward is the analytic derivative, which keeps pushing a hopeless logit (x < -87) in the right
    direction instead of giving it a zero gradient."""
    # (nll - nll.detach()) is exactly 0 in value but carries nll's gradient.
    return torch.where(nll > focal_loss.MAX_NLL, focal_loss.MAX_NLL + (nll - nll.detach()), nll)


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                       gamma: float = 2.0) -> torch.Tensor:
    """Elementwise sigmoid focal loss (Lin et al. 2017; mmcv's `sigmoid_focal_loss`, reduction 'none').

    logits [..., K] (any float dtype), targets [..., K] in {0, 1} (same shape) -> loss [..., K].
    With p = sigmoid(x): a target-1 element costs -alpha (1 - p)^gamma log p, a target-0 element
    -(1 - alpha) p^gamma log(1 - p). The logs come from softplus (exact for any logit) and are capped
    at -log(FLT_MIN) as mmcv's kernel caps them; mmcv's float32 kernel also rounds 1 - p to 0 for
    logits above ~16.6 (so it saturates there early), which is not reproduced: for those elements
    the result equals mmdetection's CPU path (BCE-with-logits times the focal weight) instead.
    Computed in float32 (float64 stays float64) with autocast disabled, whatever the input dtype."""
    if logits.shape != targets.shape:
        raise ValueError(f"sigmoid_focal_loss: logits {tuple(logits.shape)} and targets "
                         f"{tuple(targets.shape)} must have the same shape")
    with float32_region(logits.device.type):
        dtype = _compute_dtype(logits.dtype)
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
    expected = {
        "box_deltas": (box_deltas, (b, a, 4)),
        "anchors": (anchors, (a, 4)),
        "anchor_valid": (anchor_valid, (b, a)),
        "assignment.positive": (assignment.positive, (b, a)),
        "assignment.negative": (assignment.negative, (b, a)),
        "assignment.matched": (assignment.matched, (b, a)),
    }
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
    """The fused focal loss's per-anchor codes: the matched class of a positive, BACKGROUND for a negative
    and for a positive whose label is outside 0..K-1 (the one-hot path gives it an all-zero target of
    weight 1), IGNORE for every other anchor. positive, negative: bool [B, A]; matched_labels: int64
    [B, A] -> int64 [B, A]."""
    in_range = (matched_labels >= 0) & (matched_labels < num_classes)
    codes = torch.where(positive & in_range, matched_labels, focal_loss.BACKGROUND)
    return torch.where(positive | negative, codes, focal_loss.IGNORE)


def _box_loss_per_image(box_deltas, anchors, positive, matched_boxes, loss_spec: LossSpec, coder: CoderSpec,
                        image_hw) -> torch.Tensor:
    """Box loss summed over positive anchors (and coordinates) per image -> [B]."""
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


def retinanet_loss(
    cls_logits: torch.Tensor,
    box_deltas: torch.Tensor,
    anchors: torch.Tensor,
    anchor_valid: torch.Tensor,
    assignment: AssignmentLike,
    gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    loss_spec: LossSpec,
    coder: CoderSpec,
    *,
    normalizer: torch.Tensor | None = None,
    image_hw: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """RetinaNet loss over a batch.

    Args:
      cls_logits: [B, A, K] classification logits (any float dtype; computed in float32).
      box_deltas: [B, A, 4] predicted (normalised) deltas.
      anchors: [A, 4] xyxy.
      anchor_valid: bool [B, A]; invalid anchors (outside the image's padded extent) weigh nothing.
      assignment: anything with `positive` bool [B, A], `negative` bool [B, A] and `matched` int64
        [B, A] (index into G, read only where positive), e.g. retina_fn.assign.Assignment. Anchors
        neither positive nor negative are ignored.
      gt_boxes: [B, G, 4] padded ground truth; gt_labels: int64 [B, G] in 0..K-1 (a label outside that
        range silently gives an all-zero target: no value check, as that would need a host sync).
      loss_spec: the loss settings (focal_alpha, focal_gamma, fused_focal, cls_weight, box_loss, box_weight,
        normalizer).
      coder: the box coder (means, stds, scale_clamp, clamp_lower).
      normalizer: float [] the divisor of the summed terms; None: this batch's own
        (`loss_normalizer(assignment.positive & anchor_valid, loss_spec)`). A train step passes the
        normaliser of its whole step (all micro-batches, averaged over replicas for dist.normalizer
        'global'), so micro-batch losses add up to the loss of the whole batch.
      image_hw: optional int64 [B, 2]; only the 'giou' loss uses it, to clip decoded predictions
        (torchvision does not clip, so leave it None to match torchvision).

    Targets: a positive anchor's classification target is the one-hot of its matched gt's label, a
    negative's is all zeros; both weigh 1, ignored and invalid anchors 0. The focal loss is summed over
    anchors and classes; with loss_spec.fused_focal the same sum comes from retina_fn.focal_loss (integer
    codes, no one-hot, the gradient computed in the forward pass), equal up to float32 rounding. Box loss
    on positives only: 'l1' is |delta - encode(anchor, gt)| summed over anchors and the 4 coordinates
    (mmdetection), 'giou' is 1 - GIoU(decode(anchor, delta), gt) (torchvision v2).

    Normaliser N: 'batch' (mmdetection): N = sum over images of max(#pos_i, 1), and
    loss = cls_weight * cls_sum / N + box_weight * box_sum / N. 'image' (torchvision): N = the number
    of images, and each image's sums are divided by max(1, #pos_i) before the sum over images is
    divided by N (a mean over the images).

    Returns:
      (loss, metrics): loss is a 0-d float32 tensor (float64 for float64 inputs); metrics holds 0-d
      tensors 'loss' (= loss, detached), 'loss_cls' and 'loss_box' (weighted, so they add up to loss) and
      'num_pos' (positives in this batch, float). All of them add up over micro-batches that share N.
    """
    _check_shapes(cls_logits, box_deltas, anchors, anchor_valid, assignment, gt_boxes, gt_labels, image_hw)

    with float32_region(cls_logits.device.type):
        dtype = _compute_dtype(cls_logits.dtype)
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
        metrics = {
            "loss": (loss_cls + loss_box).detach(),
            "loss_cls": loss_cls.detach(),
            "loss_box": loss_box.detach(),
            "num_pos": num_pos.sum().detach(),
        }
        return loss, metrics


def loss_normalizer(positive: torch.Tensor, loss_spec: LossSpec) -> torch.Tensor:
    """The loss divisor of a batch before any averaging over replicas.

    Args:
      positive: bool [B, A], positive and valid anchors.
      loss_spec: the loss settings; its `normalizer` chooses 'batch' (mmdetection: the sum over images of
        max(#positives_i, 1)) or 'image' (torchvision: B, the per-image terms are averaged).

    Returns:
      float32 [], the divisor `retinanet_loss` takes as `normalizer`.
    """
    if loss_spec.normalizer == "batch":
        return positive.sum(dim=1).clamp(min=1).sum().to(torch.float32)
    return torch.full((), float(positive.shape[0]), dtype=torch.float32, device=positive.device)
