"""detect() on hand-built head outputs and against a per-image, per-level loop reference."""

from __future__ import annotations

import math

import pytest
import torch

import dataclasses

from configs.common import base_config
from retina_fn.postprocess import Detections, detect
from tests.model_fixtures import spec_of


def configs(**test_overrides):
    """(post-processing, coder) settings of the 1x recipe (mmdetection's), with some test fields changed."""
    spec = spec_of(base_config())
    return dataclasses.replace(spec.test, **test_overrides), spec.coder


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def run(logits, anchors, level_counts=None, image_hw=(100, 100), scale_factor=None, deltas=None, **overrides):
    """One image (B = 1) with zero deltas unless given; logits [A, K]."""
    test_cfg, coder_cfg = configs(**overrides)
    logits = torch.as_tensor(logits, dtype=torch.float32)[None]
    anchors = torch.as_tensor(anchors, dtype=torch.float32)
    deltas = torch.zeros(1, anchors.shape[0], 4) if deltas is None else torch.as_tensor(deltas)[None]
    counts = (anchors.shape[0],) if level_counts is None else level_counts
    sf = None if scale_factor is None else torch.tensor([scale_factor], dtype=torch.float32)
    return detect(logits, deltas, anchors, counts, torch.tensor([image_hw]), sf, test_cfg, coder_cfg)


def kept(det: Detections, b: int = 0):
    n = int(det.valid[b].sum())
    assert det.valid[b, :n].all() and not det.valid[b, n:].any()
    return det.boxes[b, :n].tolist(), det.scores[b, :n].tolist(), det.labels[b, :n].tolist()


def assert_boxes(got, expected, atol=1e-5):
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                               atol=atol, rtol=0)


LOW = -20.0  # sigmoid(-20) ~ 2e-9: never a candidate


def test_score_threshold_is_strict():
    anchors = [[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]]
    logits = [[0.0, LOW], [1e-3, LOW], [LOW, LOW]]  # scores 0.5 exactly, just above 0.5, nothing
    for mode in ("anchor", "pair"):
        _, scores, labels = kept(run(logits, anchors, score_thr=0.5, pre_select=mode))
        assert len(scores) == 1 and scores[0] > 0.5 and labels == [0]


def test_nms_overlap_and_per_class_independence():
    anchors = [[0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 10], [50, 50, 60, 60]]
    logits = [[logit(0.9), LOW], [logit(0.8), LOW], [LOW, logit(0.7)], [logit(0.6), LOW]]
    # 1 overlaps 0 (IoU 9/11) in class 0: suppressed; 2 is the same box as 0 but class 1: kept.
    for mode in ("anchor", "pair"):
        boxes, scores, labels = kept(run(logits, anchors, pre_select=mode))
        assert labels == [0, 1, 0]
        assert scores == pytest.approx([0.9, 0.7, 0.6])
        assert boxes == [[0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60]]


def test_one_anchor_can_give_several_classes():
    _, scores, labels = kept(run([[logit(0.9), logit(0.3), logit(0.2)]], [[0, 0, 10, 10]]))
    assert labels == [0, 1, 2] and scores == pytest.approx([0.9, 0.3, 0.2])


def test_top_k_per_level_by_anchor_and_by_pair():
    # Level 0: four separate anchors; level 1: one anchor. nms_pre = 2.
    anchors = [[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [60, 0, 70, 10], [0, 50, 10, 60]]
    logits = [
        [logit(0.30), LOW, LOW],
        [logit(0.90), logit(0.85), LOW],  # best anchor, two classes
        [logit(0.80), LOW, LOW],
        [logit(0.40), LOW, LOW],
        [logit(0.10), logit(0.20), LOW],  # level 1: under nms_pre, both classes kept
    ]
    counts = (4, 1)
    # 'anchor': top-2 anchors of level 0 by max score are 1 and 2; all their classes above 0.05 count.
    _, scores, labels = kept(run(logits, anchors, counts, nms_pre=2, pre_select="anchor"))
    assert scores == pytest.approx([0.9, 0.85, 0.8, 0.2, 0.1]) and labels == [0, 1, 0, 1, 0]
    # 'pair': top-2 pairs of level 0 are (1, class 0) and (1, class 1); anchor 2 is cut.
    _, scores, labels = kept(run(logits, anchors, counts, nms_pre=2, pre_select="pair"))
    assert scores == pytest.approx([0.9, 0.85, 0.2, 0.1]) and labels == [0, 1, 1, 0]


def test_max_per_img_keeps_the_best_sorted_and_pads():
    anchors = [[20.0 * i, 0, 20.0 * i + 10, 10] for i in range(5)]
    probs = [0.3, 0.9, 0.5, 0.7, 0.1]
    logits = [[logit(p), LOW] for p in probs]
    det = run(logits, anchors, max_per_img=3, image_hw=(100, 200))
    boxes, scores, labels = kept(det)
    assert scores == pytest.approx([0.9, 0.7, 0.5])
    assert boxes == [anchors[1], anchors[3], anchors[2]]
    det = run(logits, anchors, max_per_img=8, image_hw=(100, 200))
    assert det.boxes.shape == (1, 8, 4) and int(det.valid.sum()) == 5
    assert (det.scores[0, 5:] == 0).all() and (det.labels[0, 5:] == 0).all() and (det.boxes[0, 5:] == 0).all()
    assert det.labels.dtype == torch.int64 and det.scores.dtype == torch.float32


def test_decode_clip_to_image_then_rescale():
    anchors = [[-10, 20, 30, 60], [80, 90, 120, 130]]
    deltas = [[0.1, 0.0, 0.0, math.log(2.0)], [0.0, 0.0, 0.0, 0.0]]
    logits = [[logit(0.9), LOW], [logit(0.8), LOW]]
    # Box 0: centre x 10 + 0.1 * 40 = 14, width 40 -> x in [-6, 34] -> clipped to 0; height 80 around y 40
    # -> [0, 80]. Box 1 is clipped to the image (h, w) = (100, 110).
    boxes, _, _ = kept(run(logits, anchors, deltas=deltas, image_hw=(100, 110)))
    assert_boxes(boxes, [[0, 0, 34, 80], [80, 90, 110, 100]])
    boxes, _, _ = kept(run(logits, anchors, deltas=deltas, image_hw=(100, 110), scale_factor=(2.0, 4.0)))
    assert_boxes(boxes, [[0, 0, 17, 20], [40, 22.5, 55, 25]])


def test_batch_of_images_with_their_own_sizes():
    anchors = torch.tensor([[0.0, 0.0, 50.0, 50.0], [60.0, 60.0, 90.0, 90.0]])
    logits = torch.full((2, 2, 2), LOW)
    logits[0, 0, 0] = logit(0.9)
    logits[1, 1, 1] = logit(0.6)
    test_cfg, coder_cfg = configs(max_per_img=2)
    det = detect(logits, torch.zeros(2, 2, 4), anchors, (2,), torch.tensor([[40, 30], [100, 80]]),
                 torch.tensor([[1.0, 1.0], [0.5, 0.5]]), test_cfg, coder_cfg)
    assert det.valid.tolist() == [[True, False], [True, False]]
    assert det.boxes[0, 0].tolist() == [0, 0, 30, 40]
    assert det.boxes[1, 0].tolist() == [120, 120, 160, 180]  # clipped to w 80, h 100, then / 0.5
    assert det.labels[:, 0].tolist() == [0, 1]


def test_bad_inputs_are_named():
    anchors = torch.zeros(4, 4)
    test_cfg, coder_cfg = configs()
    args = (torch.zeros(1, 4, 2), torch.zeros(1, 4, 4), anchors)
    with pytest.raises(ValueError, match="level_counts"):
        detect(*args, (3,), torch.tensor([[10, 10]]), None, test_cfg, coder_cfg)
    with pytest.raises(ValueError, match="image_hw"):
        detect(*args, (4,), torch.tensor([10, 10]), None, test_cfg, coder_cfg)


# ------------------------------------------------------------------------------------------- reference
def _decode_clip(anchor, delta, coder, h, w):
    means, stds = coder.means, coder.stds
    d = [delta[i] * stds[i] + means[i] for i in range(4)]
    clamp = coder.scale_clamp
    dw = min(d[2], clamp) if not coder.clamp_lower else max(-clamp, min(d[2], clamp))
    dh = min(d[3], clamp) if not coder.clamp_lower else max(-clamp, min(d[3], clamp))
    pw, ph = anchor[2] - anchor[0], anchor[3] - anchor[1]
    cx, cy = anchor[0] + pw / 2 + pw * d[0], anchor[1] + ph / 2 + ph * d[1]
    bw, bh = pw * math.exp(dw), ph * math.exp(dh)
    box = [cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2]
    return [min(max(box[0], 0), w), min(max(box[1], 0), h), min(max(box[2], 0), w), min(max(box[3], 0), h)]


def _iou(a, b):
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def reference_detect(scores, deltas, anchors, level_counts, image_hw, scale_factor, test_cfg, coder):
    """Per image, per level, with loops. scores: float32 sigmoid probabilities [B, A, K] as lists."""
    results = []
    for b in range(len(scores)):
        h, w = image_hw[b]
        candidates = []  # (score, box, label) in candidate order
        start = 0
        for count in level_counts:
            level = range(start, start + count)
            start += count
            num_classes = len(scores[b][0])
            if test_cfg.pre_select == "anchor":
                rows = sorted(level, key=lambda a: (-max(scores[b][a]), a))
                if 0 < test_cfg.nms_pre < count:
                    rows = rows[:test_cfg.nms_pre]
                for a in rows:
                    box = _decode_clip(anchors[a], deltas[b][a], coder, h, w)
                    for k in range(num_classes):
                        if scores[b][a][k] > test_cfg.score_thr:
                            candidates.append((scores[b][a][k], box, k))
            else:
                pairs = [(a, k) for a in level for k in range(num_classes) if scores[b][a][k] > test_cfg.score_thr]
                pairs.sort(key=lambda p: (-scores[b][p[0]][p[1]], p[0], p[1]))
                for a, k in pairs[:test_cfg.nms_pre]:
                    candidates.append((scores[b][a][k], _decode_clip(anchors[a], deltas[b][a], coder, h, w), k))
        if scale_factor is not None:
            sx, sy = scale_factor[b]
            candidates = [(s, [box[0] / sx, box[1] / sy, box[2] / sx, box[3] / sy], k) for s, box, k in candidates]
        order = sorted(range(len(candidates)), key=lambda i: (-candidates[i][0], i))
        survivors = []
        for i in order:
            s, box, k = candidates[i]
            if all(kk != k or _iou(bb, box) <= test_cfg.nms_iou for _, bb, kk in survivors):
                survivors.append(candidates[i])
        results.append(survivors[:test_cfg.max_per_img])
    return results


def random_head_outputs(seed, batch=2, level_counts=(160, 80, 40, 20), num_classes=4):
    gen = torch.Generator().manual_seed(seed)
    num_anchors = sum(level_counts)
    centre = torch.rand(num_anchors, 2, generator=gen) * 120
    size = torch.rand(num_anchors, 2, generator=gen) * 40 + 8
    anchors = torch.cat([centre - size / 2, centre + size / 2], dim=1)
    logits = torch.randn(batch, num_anchors, num_classes, generator=gen) * 1.5 - 2.5
    deltas = torch.randn(batch, num_anchors, 4, generator=gen) * 0.2
    image_hw = torch.tensor([[110, 120], [96, 128]])[:batch]
    scale_factor = torch.tensor([[1.5, 1.25], [0.5, 0.8]])[:batch]
    return logits, deltas, anchors, image_hw, scale_factor


@pytest.mark.parametrize("pre_select", ["anchor", "pair"])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_loop_reference(pre_select, seed):
    logits, deltas, anchors, image_hw, scale_factor = random_head_outputs(seed)
    counts = (160, 80, 40, 20)
    overrides = dict(pre_select=pre_select, nms_pre=30, max_per_img=25, score_thr=0.05, nms_iou=0.5,
                     max_candidates=100000)
    test_cfg, coder_cfg = configs(**overrides)
    coder_cfg = dataclasses.replace(coder_cfg, clamp_lower=pre_select == "anchor")
    det = detect(logits, deltas, anchors, counts, image_hw, scale_factor, test_cfg, coder_cfg)
    scores = torch.sigmoid(logits.float()).tolist()
    expected = reference_detect(scores, deltas.tolist(), anchors.tolist(), counts, image_hw.tolist(),
                                scale_factor.tolist(), test_cfg, coder_cfg)
    for b, survivors in enumerate(expected):
        assert len(survivors) == 25  # the case exercises the max_per_img cut
        boxes, got_scores, labels = kept(det, b)
        assert got_scores == [s for s, _, _ in survivors]
        assert labels == [k for _, _, k in survivors]
        assert_boxes(boxes, [box for _, box, _ in survivors], atol=1e-3)

    # A candidate cap that still leaves >= max_per_img survivors does not change the result.
    capped_cfg, _ = configs(**dict(overrides, max_candidates=60))
    capped = detect(logits, deltas, anchors, counts, image_hw, scale_factor, capped_cfg, coder_cfg)
    for field in Detections._fields:
        assert torch.equal(getattr(capped, field), getattr(det, field))


@pytest.mark.parametrize("pre_select", ["anchor", "pair"])
def test_trimming_to_valid_candidates_matches_static_shapes(pre_select):
    """Without static_shapes NMS sees only a power-of-two prefix covering every valid candidate; the
    detections must equal those of the full static-shape path."""
    logits, deltas, anchors, image_hw, scale_factor = random_head_outputs(3)
    logits = logits - 4.0  # few candidates pass the threshold (26 of 1200), so trimming really cuts rows
    counts = (160, 80, 40, 20)
    results = []
    for static in (True, False):
        test_cfg, coder_cfg = configs(pre_select=pre_select, nms_pre=100, max_per_img=25, max_candidates=1200,
                                      static_shapes=static)
        results.append(detect(logits, deltas, anchors, counts, image_hw, scale_factor, test_cfg, coder_cfg))
    assert 0 < int(results[0].valid.sum()) < 50
    for field in Detections._fields:
        assert torch.equal(getattr(results[0], field), getattr(results[1], field))


def test_low_precision_logits_under_autocast():
    logits, deltas, anchors, image_hw, scale_factor = random_head_outputs(3, batch=1)
    test_cfg, coder_cfg = configs(nms_pre=30, max_per_img=10)
    counts = (160, 80, 40, 20)
    ref = detect(logits.half().float(), deltas.half().float(), anchors, counts, image_hw, scale_factor, test_cfg,
                 coder_cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = detect(logits.half(), deltas.half(), anchors, counts, image_hw, scale_factor, test_cfg, coder_cfg)
    assert half.boxes.dtype == torch.float32 and half.scores.dtype == torch.float32
    for field in Detections._fields:
        assert torch.equal(getattr(half, field), getattr(ref, field))
