"""Class-aware greedy non-maximum suppression over a padded batch, in plain torch.

Semantics (mmcv / torchvision greedy NMS, per image): sort the valid boxes by score, descending, ties in
input order; walk down the list keeping a box unless a box kept before it, with the same label, overlaps it
with IoU strictly greater than the threshold.

Without a loop over boxes: in sorted order let S[j, i] = (j < i) and same label and IoU(j, i) > threshold.
Greedy's answer g is the unique solution of g[i] = valid[i] and not any_j (g[j] and S[j, i]); iterating that
from k = valid makes entry t exact after t + 1 iterations, so its fixed point is g (one [1, N] x [N, N] product
and one host sync per iteration). Blocks of 256 boxes in score order are first cleared against the boxes kept in
earlier blocks, then solved; the walk stops once every image has `max_output` kept boxes.
"""

from __future__ import annotations

import numpy as np
import torch

from retina_fn.precision import float32_region
from retina_fn.topk import exporting

_IMPLS = ("auto", "torch", "torchvision")


def _float32_floor(value: float) -> float:
    """The largest float32 not above `value`: for a float32 IoU v, v > value (in double, as torchvision
    compares) exactly when v > _float32_floor(value) in float32."""
    rounded = np.float32(value)
    if float(rounded) > value:
        rounded = np.nextafter(rounded, np.float32(-np.inf))
    return float(rounded)


def _pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [B, N, 4], b [B, M, 4] -> IoU [B, N, M] in the NMS kernels' order of operations (no floor on the
    union), bit for bit torchvision's CPU kernel; a zero union gives nan, which never exceeds the threshold."""
    ax1, ay1, ax2, ay2 = a.unbind(-1)
    bx1, by1, bx2, by2 = b.unbind(-1)
    area_a, area_b = (ax2 - ax1) * (ay2 - ay1), (bx2 - bx1) * (by2 - by1)
    w = (torch.minimum(ax2[:, :, None], bx2[:, None, :]) - torch.maximum(ax1[:, :, None], bx1[:, None, :])).clamp(min=0)
    h = (torch.minimum(ay2[:, :, None], by2[:, None, :]) - torch.maximum(ay1[:, :, None], by1[:, None, :])).clamp(min=0)
    inter = w * h
    return inter / (area_a[:, :, None] + area_b[:, None, :] - inter)


def _score_order(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Indices sorting each image's boxes by score descending, ties in input order, invalid last."""
    key = torch.where(valid, scores, torch.full_like(scores, -torch.inf))
    return torch.sort(key, dim=1, descending=True, stable=True).indices


def _block_fixed_point(candidate: torch.Tensor, suppresses: torch.Tensor, max_iters: int | None) -> torch.Tensor:
    """Solves keep[i] = candidate[i] and not any_j (keep[j] and suppresses[j, i]) for one block (under
    torch.export as a `torch.while_loop`: the convergence test cannot be a Python branch there)."""
    limit = candidate.shape[1] + 1 if max_iters is None else max_iters
    if exporting():
        return _exported_fixed_point(candidate, suppresses, limit)
    keep = candidate
    for _ in range(limit):
        # Counts of kept earlier boxes that would suppress each box; exact in float32 for any N < 2**24.
        hits = torch.bmm(keep.to(torch.float32).unsqueeze(1), suppresses).squeeze(1)
        updated = candidate & (hits == 0)
        if torch.equal(updated, keep):
            break
        keep = updated
    return keep


def _exported_fixed_point(candidate: torch.Tensor, suppresses: torch.Tensor, limit: int) -> torch.Tensor:
    """`_block_fixed_point`'s loop as one `torch.while_loop` (an ONNX Loop once translated), at most `limit`
    updates: candidate bool [B, n], suppresses float32 [B, n, n] -> the same keep mask bool [B, n]."""
    # The loop's carried tensors must keep their strides from one iteration to the next.
    candidate = candidate.clone(memory_format=torch.contiguous_format)

    def go_on(keep, changed, count):
        return changed & (count < limit)

    def update(keep, changed, count):
        hits = torch.bmm(keep.to(torch.float32).unsqueeze(1), suppresses).squeeze(1)
        updated = candidate & (hits == 0)
        return updated, (updated != keep).any(), count + 1

    start = (candidate.clone(), torch.ones((), dtype=torch.bool, device=candidate.device),
             torch.zeros((), dtype=torch.int64, device=candidate.device))
    return torch.while_loop(go_on, update, start)[0]


def _greedy_keep_sorted(boxes: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, iou_threshold: float,
                        max_iters: int | None, enough: int | None = None, block: int = 256) -> torch.Tensor:
    """Greedy keep mask for boxes already in score order: [B, N, 4], [B, N], [B, N] -> bool [B, N], by blocks
    (module docstring). Once every image has `enough` kept boxes the rest is left unkept (not under
    torch.export, where that test would branch on a tensor: every block is decided, same answer)."""
    threshold = _float32_floor(iou_threshold)
    n = boxes.shape[1]
    decided: list[torch.Tensor] = []
    for start in range(0, n, block):
        end = min(n, start + block)
        bb, bl = boxes[:, start:end], labels[:, start:end]
        candidate = valid[:, start:end]
        if decided:
            kept = torch.cat(decided, dim=1)
            clash = (_pairwise_iou(bb, boxes[:, :start]) > threshold) & (bl[:, :, None] == labels[:, None, :start])
            candidate = candidate & ~(clash & kept[:, None, :]).any(dim=2)
        earlier = torch.ones(end - start, end - start, dtype=torch.bool, device=boxes.device).triu(diagonal=1)
        suppresses = ((_pairwise_iou(bb, bb) > threshold) & (bl[:, :, None] == bl[:, None, :]) & earlier)
        decided.append(_block_fixed_point(candidate, suppresses.to(torch.float32), max_iters))
        if (enough is not None and end < n and not exporting()
                and int(torch.cat(decided, 1).sum(1).min()) >= enough):
            decided.append(torch.zeros_like(valid[:, end:]))
            break
    return torch.cat(decided, dim=1)


def _torchvision_keep(boxes: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, order: torch.Tensor,
                      iou_threshold: float) -> torch.Tensor:
    """The same keep mask (in input order) from torchvision's kernel, one call per image and class: not
    torchvision.ops.batched_nms, whose label offsets round coordinates and can flip decisions at the
    threshold. Scores are replaced by each box's rank in `order`, so ties break as on the torch path. On
    CUDA the kernel may fuse multiply-adds, so an IoU within one rounding of the threshold may differ."""
    import torchvision  # noqa: PLC0415 - optional dependency

    batch, n = valid.shape
    positions = torch.arange(n, 0, -1, device=boxes.device, dtype=torch.float32).expand(batch, n)
    rank_score = torch.empty_like(positions).scatter(1, order, positions)
    keep = torch.zeros_like(valid)
    for b in range(batch):  # host-driven fast path: loops over images and the classes present
        for c in torch.unique(labels[b][valid[b]]).tolist():
            members = torch.nonzero(valid[b] & (labels[b] == c)).squeeze(1)
            kept = torchvision.ops.nms(boxes[b, members], rank_score[b, members], iou_threshold)
            keep[b, members[kept]] = True
    return keep


def _torchvision_available() -> bool:
    try:
        import torchvision  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def _first_kept(order: torch.Tensor, keep_sorted: torch.Tensor, max_output: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `max_output` kept entries in score order, padded: -> (index [B, M], valid [B, M])."""
    batch, n = order.shape
    kept_first = torch.sort((~keep_sorted).to(torch.int32), dim=1, stable=True).indices[:, :max_output]
    index = order.gather(1, kept_first)
    kept = keep_sorted.gather(1, kept_first)
    index = torch.where(kept, index, torch.zeros_like(index))
    if kept.shape[1] < max_output:
        pad = max_output - kept.shape[1]
        index = torch.cat([index, index.new_zeros(batch, pad)], dim=1)
        kept = torch.cat([kept, kept.new_zeros(batch, pad)], dim=1)
    return index, kept


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
                iou_threshold: float, max_output: int, impl: str = "torch",
                max_iters: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-aware greedy NMS for each image of a padded batch, in float32 with autocast disabled.

    Args:
      boxes: float [B, N, 4] xyxy; scores: float [B, N]; labels: integer [B, N].
      valid: bool [B, N]; invalid entries and nan scores neither survive nor suppress.
      max_output: M, kept boxes returned per image.
      impl: 'torch' (batched), 'torchvision' (its kernel per image and class) or 'auto' (torchvision if it imports).
      max_iters: cap on the torch path's fixed-point iterations (None: until convergence).

    Returns:
      (keep_index int64 [B, M] into N, by score descending, 0 in padding; keep_valid bool [B, M]).

    Raises:
      ValueError: inconsistent shapes or dtypes, an unknown impl, max_output < 0 or max_iters < 1.
      ImportError: impl='torchvision' when torchvision is absent.
    """
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [B, N, 4], got {tuple(boxes.shape)}")
    shape = tuple(boxes.shape[:2])
    for name, tensor in (("scores", scores), ("labels", labels), ("valid", valid)):
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must be [B, N] = {shape} like boxes, got {tuple(tensor.shape)}")
    if valid.dtype != torch.bool:
        raise ValueError(f"valid must be bool, got {valid.dtype}")
    if labels.is_floating_point():
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if max_output < 0:
        raise ValueError(f"max_output must be >= 0, got {max_output}")
    if max_iters is not None and max_iters < 1:
        raise ValueError(f"max_iters must be >= 1 or None, got {max_iters}")

    batch, n = shape
    if n == 0:
        return (torch.zeros(batch, max_output, dtype=torch.int64, device=boxes.device),
                torch.zeros(batch, max_output, dtype=torch.bool, device=boxes.device))
    with float32_region(boxes.device.type):
        boxes = boxes.float()
        scores = scores.float()
        valid = valid & ~torch.isnan(scores)
        order = _score_order(scores, valid)
        use_torchvision = impl == "torchvision" or (impl == "auto" and _torchvision_available())
        if use_torchvision:
            keep_sorted = _torchvision_keep(boxes, labels, valid, order, iou_threshold).gather(1, order)
        else:
            keep_sorted = _greedy_keep_sorted(boxes.gather(1, order.unsqueeze(-1).expand(-1, -1, 4)),
                                              labels.gather(1, order), valid.gather(1, order),
                                              iou_threshold, max_iters, enough=max_output)
        return _first_kept(order, keep_sorted, max_output)
