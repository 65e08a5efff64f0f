"""Box arithmetic over any leading dimensions. Boxes are float (x1, y1, x2, y2) with no '+1' anywhere
(mmdetection 2.x and torchvision conventions).

A box tensor is [..., 4]; pairwise functions take [..., N, 4] and [..., M, 4] and return [..., N, M],
broadcasting the leading dimensions. Results keep the inputs' floating dtype, except `encode` and `decode`,
which compute and return float32.
"""

from __future__ import annotations

import math

import torch

# Largest |dw|, |dh| a decoded delta may have: a box at most 1000/16 times its anchor.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16.0)
_UNION_EPS = 1e-6


def xyxy_to_cxcywh(b: torch.Tensor) -> torch.Tensor:
    """[..., 4] (x1, y1, x2, y2) -> [..., 4] (cx, cy, w, h)."""
    return torch.cat([(b[..., :2] + b[..., 2:]) * 0.5, b[..., 2:] - b[..., :2]], dim=-1)


def cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    """[..., 4] (cx, cy, w, h) -> [..., 4] (x1, y1, x2, y2)."""
    half = b[..., 2:] * 0.5
    return torch.cat([b[..., :2] - half, b[..., :2] + half], dim=-1)


def area(b: torch.Tensor) -> torch.Tensor:
    """[..., 4] xyxy -> [...], (x2 - x1) * (y2 - y1)."""
    return (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])


def _pairwise_intersection(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # width and height separately: no [..., N, M, 2] intermediates, about half the peak memory
    iw = (torch.minimum(a[..., :, None, 2], b[..., None, :, 2]) - torch.maximum(a[..., :, None, 0], b[..., None, :, 0]))
    ih = (torch.minimum(a[..., :, None, 3], b[..., None, :, 3]) - torch.maximum(a[..., :, None, 1], b[..., None, :, 1]))
    return iw.clamp(min=0) * ih.clamp(min=0)


def pairwise_iou(a: torch.Tensor, b: torch.Tensor, mode: str = "iou") -> torch.Tensor:
    """float [..., N, M] overlaps of a [..., N, 4] with b [..., M, 4] (leading dims broadcast): mode 'iou'
    (intersection / union) or 'iof' (intersection / area(a)), the denominator floored at 1e-6 (mmdetection)."""
    if mode not in ("iou", "iof"):
        raise ValueError(f"mode must be 'iou' or 'iof', got {mode!r}")
    inter = _pairwise_intersection(a, b)
    area_a = area(a)[..., :, None]
    if mode == "iou":
        denom = area_a + area(b)[..., None, :] - inter
    else:
        denom = area_a.expand_as(inter)
    return inter / denom.clamp(min=_UNION_EPS)


def elementwise_giou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """GIoU in [-1, 1] of matching pairs, a [..., 4] with b [..., 4] (broadcast) -> [...]; `eps` is added to
    the union and the enclosing-box area."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area(a) + area(b) - inter + eps
    hull_wh = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])).clamp(min=0)
    hull = hull_wh[..., 0] * hull_wh[..., 1] + eps
    return inter / union - (hull - union) / hull


def _identity_coder(means, stds) -> bool:
    return all(float(m) == 0.0 for m in means) and all(float(v) == 1.0 for v in stds)


def _per_coordinate(d: torch.Tensor, fn) -> torch.Tensor:
    """fn(column, i) on each of the 4 coordinates of d [..., 4], restacked: the coder's constants stay Python
    floats (no host-to-device copy inside a step)."""
    return torch.stack([fn(d[..., i], i) for i in range(4)], dim=-1)


def encode(anchors: torch.Tensor, gt: torch.Tensor, means=(0.0, 0.0, 0.0, 0.0),
           stds=(1.0, 1.0, 1.0, 1.0)) -> torch.Tensor:
    """DeltaXYWH encoding of gt boxes relative to anchors: float32 [..., 4] deltas
    ((gx - px) / pw, (gy - py) / ph, log(gw / pw), log(gh / ph)), then (d - means) / stds, from anchors and gt
    float [..., 4] xyxy (broadcast), (px, py, pw, ph) and (gx, gy, gw, gh) their centres and sizes."""
    p = xyxy_to_cxcywh(anchors.float())
    g = xyxy_to_cxcywh(gt.float())
    d = torch.cat([(g[..., :2] - p[..., :2]) / p[..., 2:], torch.log(g[..., 2:] / p[..., 2:])], dim=-1)
    if _identity_coder(means, stds):
        return d
    return _per_coordinate(d, lambda c, i: (c - float(means[i])) / float(stds[i]))


def decode(anchors: torch.Tensor, deltas: torch.Tensor, means=(0.0, 0.0, 0.0, 0.0), stds=(1.0, 1.0, 1.0, 1.0),
           max_shape: torch.Tensor | None = None, scale_clamp: float = DEFAULT_SCALE_CLAMP,
           clamp_lower: bool = True) -> torch.Tensor:
    """Inverse of `encode`: anchors float [..., 4] xyxy and deltas [..., 4] -> float32 [..., 4] xyxy boxes.

    Args:
      max_shape: optional [..., 2] (H, W): boxes are `clip`ped to it.
      scale_clamp: dw, dh clamped to <= scale_clamp, and >= -scale_clamp when clamp_lower (mmdetection; torchvision
        clamps only the upper side).
    """
    d = deltas.float()
    if not _identity_coder(means, stds):
        d = _per_coordinate(d, lambda c, i: c * float(stds[i]) + float(means[i]))
    dwh = d[..., 2:].clamp(min=-scale_clamp if clamp_lower else None, max=scale_clamp)
    p = xyxy_to_cxcywh(anchors.float())
    centre = p[..., :2] + p[..., 2:] * d[..., :2]
    size = p[..., 2:] * torch.exp(dwh)
    boxes = cxcywh_to_xyxy(torch.cat([centre, size], dim=-1))
    if max_shape is not None:
        boxes = clip(boxes, max_shape)
    return boxes


def clip(boxes: torch.Tensor, hw: torch.Tensor) -> torch.Tensor:
    """boxes float [..., 4] xyxy with x clipped to [0, W] and y to [0, H] (not W - 1), in boxes' dtype;
    hw [..., 2] = (H, W), any numeric dtype, broadcast over boxes' leading dims (boxes [B, N, 4], hw [B, 1, 2])."""
    hw = torch.as_tensor(hw, device=boxes.device).to(boxes.dtype)
    wh = hw.flip(-1)
    upper = torch.cat([wh, wh], dim=-1)
    return torch.minimum(boxes.clamp(min=0), upper)
