"""batched_nms against a plain-loop greedy NMS."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retina_fn.nms import batched_nms


def _iou_float32(a, b) -> float:
    """IoU with torchvision's kernel arithmetic (float32, same order of operations)."""
    f = np.float32
    a, b = [f(v) for v in a], [f(v) for v in b]
    area_a, area_b = (a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])
    w = max(f(0), min(a[2], b[2]) - max(a[0], b[0]))
    h = max(f(0), min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = area_a + area_b - inter
    return float(inter / union) if union > 0 else float("nan")


def greedy_reference(boxes, scores, labels, valid, threshold, max_output):
    """One image: loops over boxes in (score desc, index asc) order; returns the kept indices."""
    order = sorted((i for i in range(len(scores)) if valid[i]), key=lambda i: (-scores[i], i))
    kept: list[int] = []
    for i in order:
        # A Python-float comparison against the real threshold, as torchvision's kernel (double) makes it.
        if all(labels[k] != labels[i] or not _iou_float32(boxes[k], boxes[i]) > threshold for k in kept):
            kept.append(i)
    return kept[:max_output]


def check_against_reference(boxes, scores, labels, valid, threshold, max_output, **kwargs):
    index, keep = batched_nms(boxes, scores, labels, valid, threshold, max_output, **kwargs)
    assert index.shape == keep.shape == (boxes.shape[0], max_output)
    assert index.dtype == torch.int64 and keep.dtype == torch.bool
    for b in range(boxes.shape[0]):
        expected = greedy_reference(boxes[b].tolist(), scores[b].tolist(), labels[b].tolist(), valid[b].tolist(),
                                    threshold, max_output)
        n = len(expected)
        assert keep[b, :n].all() and not keep[b, n:].any()
        assert index[b, :n].tolist() == expected
        assert (index[b, n:] == 0).all()
    return index, keep


def random_case(batch, n, num_classes, seed, duplicates=True, tie_scores=True):
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(batch, n, 2, generator=gen) * 40
    wh = torch.rand(batch, n, 2, generator=gen) * 30 + 1
    boxes = torch.cat([xy, xy + wh], dim=-1)
    scores = torch.rand(batch, n, generator=gen)
    if tie_scores:
        scores = (scores * 8).round() / 8  # many exact ties
    labels = torch.randint(num_classes, (batch, n), generator=gen)
    valid = torch.rand(batch, n, generator=gen) > 0.15
    if duplicates:  # exact copies of other boxes (IoU 1), with their own score and label
        src = torch.randint(n, (batch, n // 4), generator=gen)
        dst = torch.randint(n, (batch, n // 4), generator=gen)
        for b in range(batch):
            boxes[b, dst[b]] = boxes[b, src[b]]
    return boxes, scores, labels, valid


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.6, 0.7])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_greedy_reference_on_random_boxes(threshold, seed):
    boxes, scores, labels, valid = random_case(batch=3, n=60, num_classes=3, seed=seed)
    check_against_reference(boxes, scores, labels, valid, threshold, max_output=60)
    check_against_reference(boxes, scores, labels, valid, threshold, max_output=7)


@pytest.mark.parametrize("max_output", [5, 40, 2000])
def test_several_blocks_and_early_stop_match_the_reference(max_output):
    """700 boxes span three 256-box blocks; a small max_output stops the walk early, a large one walks
    every block. The kept prefix must equal greedy NMS either way."""
    boxes, scores, labels, valid = random_case(2, 700, 3, seed=11)
    check_against_reference(boxes, scores, labels, valid, 0.5, max_output)


def test_walk_continues_until_enough_boxes_are_kept():
    """The first 256-box block holds only three distinct boxes (copies of each other), so it keeps 3;
    with max_output 5 the walk must go on into the next block to find the other two."""
    copies = torch.tensor([[0.0, 0, 10, 10], [50, 50, 60, 60], [100, 0, 110, 10]]).repeat(86, 1)[:256]
    xy = torch.arange(300, dtype=torch.float32)[:, None] * 20 + 200
    rest = torch.cat([xy, xy, xy + 10, xy + 10], dim=1)
    boxes = torch.cat([copies, rest])[None]
    scores = torch.linspace(1.0, 0.01, boxes.shape[1])[None]
    labels = torch.zeros(1, boxes.shape[1], dtype=torch.int64)
    valid = torch.ones(1, boxes.shape[1], dtype=torch.bool)
    index, keep = check_against_reference(boxes, scores, labels, valid, 0.5, 5)
    assert index[0].tolist() == [0, 1, 2, 256, 257]


def test_dense_overlaps_one_class():
    """Many heavily overlapping boxes of one class: long dependency chains for the fixed point."""
    gen = torch.Generator().manual_seed(5)
    x = torch.cumsum(torch.rand(2, 80, generator=gen) * 1.5, dim=1)
    boxes = torch.stack([x, torch.zeros_like(x), x + 10, torch.full_like(x, 10)], dim=-1)
    scores = torch.rand(2, 80, generator=gen)
    labels = torch.zeros(2, 80, dtype=torch.int64)
    check_against_reference(boxes, scores, labels, torch.ones(2, 80, dtype=torch.bool), 0.5, 80)


def test_chain_keeps_every_other_box():
    """A suppresses B; B would suppress C but is gone, so C survives, and so on along the chain."""
    x = torch.arange(7, dtype=torch.float32) * 3  # neighbours overlap 7/13 > 0.5, next-but-one 4/16
    boxes = torch.stack([x, torch.zeros(7), x + 10, torch.full((7,), 10.0)], dim=-1)[None]
    scores = torch.linspace(1.0, 0.4, 7)[None]
    index, keep = batched_nms(boxes, scores, torch.zeros(1, 7, dtype=torch.int64), torch.ones(1, 7, dtype=torch.bool),
                              0.5, 7)
    assert index[0, keep[0]].tolist() == [0, 2, 4, 6]


def test_iou_exactly_at_threshold_is_not_suppressed():
    boxes = torch.tensor([[[0.0, 0.0, 2.0, 1.0], [0.0, 0.0, 1.0, 1.0], [10.0, 0.0, 13.0, 1.0], [10.0, 0.0, 12.0, 1.0]]])
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6]])
    labels = torch.zeros(1, 4, dtype=torch.int64)
    valid = torch.ones(1, 4, dtype=torch.bool)
    # IoU(0, 1) = 1/2 exactly: kept at 0.5; IoU(2, 3) = 2/3: suppressed.
    index, keep = batched_nms(boxes, scores, labels, valid, 0.5, 4)
    assert index[0, keep[0]].tolist() == [0, 1, 2]
    # 3/5 in float32 is 0.6000000238 > 0.6: suppressed, as torchvision's double comparison decides.
    boxes = torch.tensor([[[0.0, 0.0, 5.0, 1.0], [0.0, 0.0, 3.0, 1.0]]])
    index, keep = batched_nms(boxes, scores[:, :2], labels[:, :2], valid[:, :2], 0.6, 2)
    assert index[0, keep[0]].tolist() == [0]


def test_classes_never_suppress_each_other_and_ties_keep_input_order():
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0]] * 4])
    scores = torch.tensor([[0.5, 0.5, 0.5, 0.9]])
    labels = torch.tensor([[1, 0, 1, 2]])
    index, keep = batched_nms(boxes, scores, labels, torch.ones(1, 4, dtype=torch.bool), 0.5, 5)
    # Score order: 3, then the tie 0, 1, 2 in input order; 2 is a duplicate of 0 in class 1.
    assert index[0, keep[0]].tolist() == [3, 0, 1]
    assert keep[0].tolist() == [True, True, True, False, False]


def test_invalid_entries_neither_survive_nor_suppress():
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]]])
    scores = torch.tensor([[0.9, 0.8, float("nan")]])
    labels = torch.zeros(1, 3, dtype=torch.int64)
    index, keep = batched_nms(boxes, scores, labels, torch.tensor([[False, True, True]]), 0.5, 3)
    assert index[0, keep[0]].tolist() == [1]


def test_batched_equals_per_image():
    boxes, scores, labels, valid = random_case(batch=4, n=50, num_classes=4, seed=9)
    index, keep = batched_nms(boxes, scores, labels, valid, 0.5, 20)
    for b in range(4):
        i1, k1 = batched_nms(boxes[b:b + 1], scores[b:b + 1], labels[b:b + 1], valid[b:b + 1], 0.5, 20)
        assert torch.equal(i1[0], index[b]) and torch.equal(k1[0], keep[b])


def test_empty_and_all_invalid_inputs():
    index, keep = batched_nms(torch.zeros(2, 0, 4), torch.zeros(2, 0), torch.zeros(2, 0, dtype=torch.int64),
                              torch.zeros(2, 0, dtype=torch.bool), 0.5, 5)
    assert index.shape == (2, 5) and not keep.any() and (index == 0).all()
    boxes, scores, labels, _ = random_case(batch=2, n=10, num_classes=2, seed=3)
    index, keep = batched_nms(boxes, scores, labels, torch.zeros(2, 10, dtype=torch.bool), 0.5, 4)
    assert not keep.any() and (index == 0).all()


def test_more_outputs_than_boxes_pads():
    boxes, scores, labels, valid = random_case(batch=2, n=6, num_classes=2, seed=4, duplicates=False)
    index, keep = check_against_reference(boxes, scores, labels, valid, 0.5, max_output=10)
    assert index.shape == (2, 10) and not keep[:, 6:].any()


def test_max_iters_bound_decides_the_first_boxes():
    x = torch.arange(7, dtype=torch.float32) * 3
    boxes = torch.stack([x, torch.zeros(7), x + 10, torch.full((7,), 10.0)], dim=-1)[None]
    scores = torch.linspace(1.0, 0.4, 7)[None]
    args = (torch.zeros(1, 7, dtype=torch.int64), torch.ones(1, 7, dtype=torch.bool), 0.5, 7)
    index, keep = batched_nms(boxes, scores, *args, max_iters=2)
    assert index[0, keep[0]].tolist()[:1] == [0]  # first two ranks (0 kept, 1 suppressed) are exact
    assert 1 not in index[0, keep[0]].tolist()
    full_index, full_keep = batched_nms(boxes, scores, *args, max_iters=100)
    assert full_index[0, full_keep[0]].tolist() == [0, 2, 4, 6]


def test_half_precision_and_bad_arguments():
    boxes, scores, labels, valid = random_case(batch=1, n=20, num_classes=2, seed=6, tie_scores=False)
    ref = batched_nms(boxes.half().float(), scores.half().float(), labels, valid, 0.5, 20)
    half = batched_nms(boxes.half(), scores.half(), labels, valid, 0.5, 20)
    assert torch.equal(ref[0], half[0]) and torch.equal(ref[1], half[1])
    with pytest.raises(ValueError, match="valid"):
        batched_nms(boxes, scores, labels, valid.int(), 0.5, 3)
    with pytest.raises(ValueError, match="scores"):
        batched_nms(boxes, scores[:, :-1], labels, valid, 0.5, 3)
    with pytest.raises(ValueError, match="impl"):
        batched_nms(boxes, scores, labels, valid, 0.5, 3, impl="cuda")


def _has_torchvision() -> bool:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _has_torchvision(), reason="torchvision is not installed (optional fast path)")
@pytest.mark.parametrize("seed", [0, 1])
def test_torchvision_path_keeps_the_same_set(seed):
    boxes, scores, labels, valid = random_case(batch=3, n=80, num_classes=3, seed=seed)
    for threshold in (0.5, 0.6):
        torch_out = check_against_reference(boxes, scores, labels, valid, threshold, 30, impl="torch")
        tv_out = batched_nms(boxes, scores, labels, valid, threshold, 30, impl="torchvision")
        auto_out = batched_nms(boxes, scores, labels, valid, threshold, 30, impl="auto")
        for out in (tv_out, auto_out):
            assert torch.equal(out[0], torch_out[0]) and torch.equal(out[1], torch_out[1])


@pytest.mark.skipif(_has_torchvision(), reason="checks the error when torchvision is absent")
def test_torchvision_path_without_torchvision_raises_and_auto_falls_back():
    boxes, scores, labels, valid = random_case(batch=1, n=10, num_classes=2, seed=7)
    with pytest.raises(ImportError):
        batched_nms(boxes, scores, labels, valid, 0.5, 5, impl="torchvision")
    auto = batched_nms(boxes, scores, labels, valid, 0.5, 5, impl="auto")
    ref = batched_nms(boxes, scores, labels, valid, 0.5, 5, impl="torch")
    assert torch.equal(auto[0], ref[0]) and torch.equal(auto[1], ref[1])
