"""retina_fn.boxes against hand-computed values and brute-force loops over plain Python floats."""

from __future__ import annotations

import math

import pytest
import torch

from retina_fn import boxes


def random_boxes(gen: torch.Generator, n: int, scale: float = 100.0, min_size: float = 1.0) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=gen) * scale
    wh = torch.rand(n, 2, generator=gen) * scale + min_size
    return torch.cat([xy, xy + wh], dim=-1)


def py_iou(a, b, mode="iou"):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    denom = area_a + area_b - inter if mode == "iou" else area_a
    return inter / max(denom, 1e-6)


def py_giou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull


# ----------------------------------------------------------------------------------------- conversions

def test_conversions_hand_values():
    b = torch.tensor([[1.0, 2.0, 5.0, 10.0]])
    torch.testing.assert_close(boxes.xyxy_to_cxcywh(b), torch.tensor([[3.0, 6.0, 4.0, 8.0]]))
    torch.testing.assert_close(boxes.cxcywh_to_xyxy(torch.tensor([[3.0, 6.0, 4.0, 8.0]])), b)
    assert boxes.area(b).tolist() == [32.0]


def test_conversions_round_trip_any_leading_dims():
    gen = torch.Generator().manual_seed(0)
    b = random_boxes(gen, 24).double().reshape(2, 3, 4, 4)
    torch.testing.assert_close(boxes.cxcywh_to_xyxy(boxes.xyxy_to_cxcywh(b)), b)
    assert boxes.xyxy_to_cxcywh(b).shape == (2, 3, 4, 4)


# ----------------------------------------------------------------------------------------- IoU family

def test_iou_hand_values():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 10.0, 5.0]])
    # [0,0,2,2] vs [0,0,10,5]: 4 / (4 + 50 - 4); [0,0,10,10] vs [1,1,3,3]: 4 / 100
    expected = torch.tensor([[1 / 7, 0.0, 4 / 50], [4 / 100, 0.0, 0.5]])
    torch.testing.assert_close(boxes.pairwise_iou(a, b), expected)


def test_iou_matches_brute_force_and_is_symmetric_and_bounded():
    gen = torch.Generator().manual_seed(1)
    a, b = random_boxes(gen, 13), random_boxes(gen, 9)
    b[0] = a[3]  # an identical pair
    iou = boxes.pairwise_iou(a, b)
    assert iou.shape == (13, 9)
    expected = torch.tensor([[py_iou(x, y) for y in b.tolist()] for x in a.tolist()])
    torch.testing.assert_close(iou, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(boxes.pairwise_iou(b, a), iou.T)
    assert (iou >= 0).all() and (iou <= 1).all()
    assert iou[3, 0] == pytest.approx(1.0)
    assert (iou > 0).any() and (iou == 0).any()


def test_iou_of_degenerate_boxes_is_zero_not_nan():
    z = torch.zeros(2, 4)
    iou = boxes.pairwise_iou(z, z)
    assert torch.equal(iou, torch.zeros(2, 2))


def test_iof_divides_by_first_argument_area():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 4.0, 4.0]])
    iof = boxes.pairwise_iou(a, b, mode="iof")
    torch.testing.assert_close(iof, torch.tensor([[0.25, 1.0], [1.0, 1.0]]))
    gen = torch.Generator().manual_seed(2)
    a, b = random_boxes(gen, 7), random_boxes(gen, 5)
    expected = torch.tensor([[py_iou(x, y, "iof") for y in b.tolist()] for x in a.tolist()])
    torch.testing.assert_close(boxes.pairwise_iou(a, b, mode="iof"), expected, rtol=1e-5, atol=1e-6)


def test_iou_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        boxes.pairwise_iou(torch.zeros(1, 4), torch.zeros(1, 4), mode="giou")


def test_elementwise_giou_matches_formula_and_broadcasts():
    gen = torch.Generator().manual_seed(4)
    a, b = random_boxes(gen, 10).double(), random_boxes(gen, 10).double()
    expected = torch.tensor([py_giou(x, y) for x, y in zip(a.tolist(), b.tolist())], dtype=torch.float64)
    torch.testing.assert_close(boxes.elementwise_giou(a, b), expected, rtol=1e-6, atol=1e-6)
    out = boxes.elementwise_giou(a.reshape(2, 5, 4), b[:5])  # [2, 5, 4] with [5, 4]
    torch.testing.assert_close(out[1], boxes.elementwise_giou(a[5:], b[:5]))


def test_pairwise_broadcasts_leading_dims():
    gen = torch.Generator().manual_seed(5)
    a = random_boxes(gen, 2 * 4).reshape(2, 1, 4, 4)
    b = random_boxes(gen, 3 * 5).reshape(3, 5, 4)
    iou = boxes.pairwise_iou(a, b)
    assert iou.shape == (2, 3, 4, 5)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(iou[i, j], boxes.pairwise_iou(a[i, 0], b[j]))
    # shared anchors [N, 4] against per-image boxes [B, M, 4]
    shared = boxes.pairwise_iou(a[0, 0], b)
    assert shared.shape == (3, 4, 5)
    torch.testing.assert_close(shared[2], boxes.pairwise_iou(a[0, 0], b[2]))
    iof = boxes.pairwise_iou(a[0, 0], b, mode="iof")
    torch.testing.assert_close(iof[1], boxes.pairwise_iou(a[0, 0], b[1], mode="iof"))


# ----------------------------------------------------------------------------------------- coder

def test_encode_hand_values():
    anchor = torch.tensor([0.0, 0.0, 10.0, 20.0])  # centre (5, 10), size (10, 20)
    gt = torch.tensor([5.0, 0.0, 25.0, 10.0])  # centre (15, 5), size (20, 10)
    expected = torch.tensor([1.0, -0.25, math.log(2.0), math.log(0.5)])
    torch.testing.assert_close(boxes.encode(anchor, gt), expected)
    means, stds = (0.5, 0.0, 0.0, 1.0), (0.1, 0.1, 0.2, 0.2)
    scaled = torch.tensor([(1.0 - 0.5) / 0.1, -0.25 / 0.1, math.log(2.0) / 0.2, (math.log(0.5) - 1.0) / 0.2])
    torch.testing.assert_close(boxes.encode(anchor, gt, means, stds), scaled)


def test_decode_hand_values():
    anchor = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    deltas = torch.tensor([[1.0, -0.25, math.log(2.0), math.log(0.5)]])
    torch.testing.assert_close(boxes.decode(anchor, deltas), torch.tensor([[5.0, 0.0, 25.0, 10.0]]))


def test_decode_inverts_encode():
    gen = torch.Generator().manual_seed(6)
    # sizes within [10, 110], so no width ratio reaches the 1000 / 16 clamp
    anchors, gt = random_boxes(gen, 50, min_size=10.0), random_boxes(gen, 50, min_size=10.0)
    for means, stds in [((0.0,) * 4, (1.0,) * 4), ((0.1, -0.2, 0.0, 0.3), (0.1, 0.1, 0.2, 0.2))]:
        deltas = boxes.encode(anchors, gt, means, stds)
        torch.testing.assert_close(boxes.decode(anchors, deltas, means, stds), gt, rtol=1e-5, atol=1e-4)


def test_decode_clamps_log_scale_both_sides_by_default():
    anchor = torch.tensor([[0.0, 0.0, 16.0, 32.0]])  # centre (8, 16), size (16, 32)
    limit = 1000.0 / 16.0
    assert boxes.DEFAULT_SCALE_CLAMP == pytest.approx(math.log(limit))
    big = boxes.decode(anchor, torch.tensor([[0.0, 0.0, 10.0, -10.0]]))
    w, h = big[0, 2] - big[0, 0], big[0, 3] - big[0, 1]
    assert w.item() == pytest.approx(16.0 * limit, rel=1e-5)
    assert h.item() == pytest.approx(32.0 / limit, rel=1e-5)
    assert ((big[0, 0] + big[0, 2]) / 2).item() == pytest.approx(8.0)
    # inside the limit nothing is clamped
    inside = boxes.decode(anchor, torch.tensor([[0.0, 0.0, 4.0, -4.0]]))
    assert (inside[0, 2] - inside[0, 0]).item() == pytest.approx(16.0 * math.exp(4.0), rel=1e-5)


def test_decode_clamp_upper_only_when_clamp_lower_is_false():
    anchor = torch.tensor([[-8.0, -16.0, 8.0, 16.0]])  # centred at 0 so tiny sizes keep float32 precision
    out = boxes.decode(anchor, torch.tensor([[0.0, 0.0, 10.0, -10.0]]), clamp_lower=False)
    w, h = out[0, 2] - out[0, 0], out[0, 3] - out[0, 1]
    assert w.item() == pytest.approx(16.0 * 1000.0 / 16.0, rel=1e-5)
    assert h.item() == pytest.approx(32.0 * math.exp(-10.0), rel=1e-4)
    custom = boxes.decode(anchor, torch.tensor([[0.0, 0.0, 3.0, -3.0]]), scale_clamp=1.0)
    assert (custom[0, 2] - custom[0, 0]).item() == pytest.approx(16.0 * math.e, rel=1e-5)
    assert (custom[0, 3] - custom[0, 1]).item() == pytest.approx(32.0 / math.e, rel=1e-5)


def test_decode_broadcasts_and_clips_to_max_shape():
    anchors = torch.tensor([[0.0, 0.0, 100.0, 50.0], [-10.0, -10.0, 10.0, 10.0]])  # [A, 4] shared
    deltas = torch.zeros(2, 2, 4)  # [B, A, 4]
    hw = torch.tensor([[[40, 60]], [[1000, 1000]]])  # [B, 1, 2] as (H, W)
    out = boxes.decode(anchors, deltas, max_shape=hw)
    assert out.dtype == torch.float32 and out.shape == (2, 2, 4)
    torch.testing.assert_close(out[0], torch.tensor([[0.0, 0.0, 60.0, 40.0], [0.0, 0.0, 10.0, 10.0]]))
    torch.testing.assert_close(out[1], torch.tensor([[0.0, 0.0, 100.0, 50.0], [0.0, 0.0, 10.0, 10.0]]))


def test_encode_broadcasts_shared_anchors_over_batch():
    gen = torch.Generator().manual_seed(7)
    anchors = random_boxes(gen, 5)
    gt = random_boxes(gen, 15).reshape(3, 5, 4)
    d = boxes.encode(anchors, gt)
    assert d.shape == (3, 5, 4)
    torch.testing.assert_close(d[2], boxes.encode(anchors, gt[2]))


# ----------------------------------------------------------------------------------------- clip

def test_clip_uses_w_and_h_not_minus_one():
    b = torch.tensor([[-5.0, -5.0, 70.0, 45.0], [10.0, 20.0, 30.0, 35.0]])
    out = boxes.clip(b, torch.tensor([40, 60]))  # (H, W)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, 60.0, 40.0], [10.0, 20.0, 30.0, 35.0]]))


def test_clip_per_image_sizes_against_loop():
    gen = torch.Generator().manual_seed(8)
    b = (random_boxes(gen, 12, scale=80.0) - 20.0).reshape(3, 4, 4)
    hw = torch.tensor([[30, 50], [60, 20], [100, 100]])
    out = boxes.clip(b, hw[:, None, :])
    for i in range(3):
        h, w = hw[i].tolist()
        for j in range(4):
            x1, y1, x2, y2 = b[i, j].tolist()
            expected = [min(max(x1, 0.0), w), min(max(y1, 0.0), h), min(max(x2, 0.0), w), min(max(y2, 0.0), h)]
            assert out[i, j].tolist() == pytest.approx(expected)
