"""Per-class AP from COCOeval's own precision array (retina_fn.eval.analysis over coco_eval.evaluate_detailed),
checked against a brute-force evaluation of a hand-built case, with both COCO libraries."""

import math

import numpy as np
import pytest

from retina_fn.eval import analysis, coco_backend, coco_eval

BACKENDS = [False, pytest.param(True, marks=pytest.mark.skipif(coco_backend.faster_coco_eval_backend() is None,
                                                                reason="faster-coco-eval is not installed"))]
IOU_THRS = np.linspace(0.5, 0.95, 10)
REC_THRS = np.linspace(0.0, 1.0, 101)


def _box(x, y, w=100.0, h=100.0):
    return [float(x), float(y), float(w), float(h)]


def hand_built():
    """Two images, four categories:
      'perfect' (id 1): two boxes, each found exactly; and a crowd region (not counted, never detected);
      'missed' (id 5): one box; its only detection is on empty background;
      'mixed' (id 9): two boxes; a hit (IoU 1, score .9), a false positive (.8), a loose hit (IoU .64, .7);
      'absent' (id 12): no ground truth, one detection.
    """
    images = [{"id": 1, "file_name": "1.jpg", "width": 640, "height": 480},
              {"id": 2, "file_name": "2.jpg", "width": 640, "height": 480}]
    cats = [{"id": 1, "name": "perfect"}, {"id": 5, "name": "missed"}, {"id": 9, "name": "mixed"},
            {"id": 12, "name": "absent"}]
    boxes = [(1, 1, _box(0, 0), 0), (2, 1, _box(300, 0), 0), (3, 1, _box(300, 300), 1),
             (4, 5, _box(0, 200), 0),
             (5, 9, _box(200, 0), 0), (6, 9, _box(400, 200), 0)]
    anns = [{"id": i, "image_id": 1 if i % 2 else 2, "category_id": c, "bbox": b, "area": b[2] * b[3],
             "iscrowd": crowd} for i, c, b, crowd in boxes]
    image_of = {a["id"]: a["image_id"] for a in anns}
    results = [
        {"image_id": image_of[1], "category_id": 1, "bbox": _box(0, 0), "score": 0.6},
        {"image_id": image_of[2], "category_id": 1, "bbox": _box(300, 0), "score": 0.5},
        {"image_id": image_of[4], "category_id": 5, "bbox": _box(500, 380), "score": 0.95},
        {"image_id": image_of[5], "category_id": 9, "bbox": _box(200, 0), "score": 0.9},
        {"image_id": image_of[5], "category_id": 9, "bbox": _box(520, 380, 50, 50), "score": 0.8},
        {"image_id": image_of[6], "category_id": 9, "bbox": _box(400, 200, 64, 100), "score": 0.7},
        {"image_id": 1, "category_id": 12, "bbox": _box(10, 10), "score": 0.4},
    ]
    return {"images": images, "annotations": anns, "categories": cats}, results


def _iou(a, b):
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def brute_force_ap(gt, results, cat_id, iou):
    """101-point interpolated AP of one category at one IoU: greedy matching by score, no crowd boxes near
    any detection (true of the hand-built case), every image evaluated."""
    boxes = [a for a in gt["annotations"] if a["category_id"] == cat_id and not a["iscrowd"]]
    if not boxes:
        return math.nan
    dets = sorted((r for r in results if r["category_id"] == cat_id), key=lambda r: -r["score"])
    taken, hits = set(), []
    for d in dets:
        best, best_iou = None, iou
        for a in boxes:
            overlap = _iou(d["bbox"], a["bbox"])
            if a["image_id"] == d["image_id"] and a["id"] not in taken and overlap >= best_iou:
                best, best_iou = a["id"], overlap
        if best is not None:
            taken.add(best)
        hits.append(best is not None)
    tp = np.cumsum(hits)
    recall = tp / len(boxes)
    precision = tp / np.arange(1, len(dets) + 1)
    return float(np.mean([max([p for p, r in zip(precision, recall) if r >= t], default=0.0) for t in REC_THRS]))


@pytest.mark.parametrize("use_faster", BACKENDS)
def test_per_class_ap_matches_a_brute_force_evaluation(use_faster):
    gt, results = hand_built()
    ev = coco_eval.evaluate_detailed(gt, results, use_faster=use_faster)
    rows = analysis.per_class_table(ev.precision, ev.iou_thrs, ev.cat_ids, ev.names, ev.num_gt)
    by_name = {r["name"]: r for r in rows}
    assert [r["category_id"] for r in rows] == [1, 5, 9, 12]
    assert {n: r["num_gt"] for n, r in by_name.items()} == {"perfect": 2, "missed": 1, "mixed": 2, "absent": 0}
    assert [by_name["perfect"][k] for k in ("AP", "AP50", "AP75")] == pytest.approx([1.0] * 3, abs=1e-12)
    assert [by_name["missed"][k] for k in ("AP", "AP50", "AP75")] == [0.0] * 3
    assert all(math.isnan(by_name["absent"][k]) for k in ("AP", "AP50", "AP75"))
    for row in rows:
        per_iou = [brute_force_ap(gt, results, row["category_id"], t) for t in IOU_THRS]
        if row["num_gt"]:
            assert row["AP"] == pytest.approx(np.mean(per_iou), abs=1e-12), row
            assert row["AP50"] == pytest.approx(per_iou[0], abs=1e-12), row
            assert row["AP75"] == pytest.approx(per_iou[5], abs=1e-12), row
    # The loose hit counts at IoU 0.50..0.60 only: by hand, (51 + 50 * 2/3) / 101 there, 51 / 101 above.
    assert by_name["mixed"]["AP50"] == pytest.approx((51 + 100 / 3) / 101)
    assert by_name["mixed"]["AP75"] == pytest.approx(51 / 101)
    # The mean over classes with ground truth is COCOeval's own summary number.
    mean = analysis.mean_row(rows)
    assert mean["AP"] == pytest.approx(ev.metrics["bbox_mAP"], abs=1e-12)
    assert mean["AP50"] == pytest.approx(ev.metrics["bbox_mAP_50"], abs=1e-12)
    assert mean["AP75"] == pytest.approx(ev.metrics["bbox_mAP_75"], abs=1e-12)
    assert mean["num_gt"] == 5 and mean["name"] == "mean (3 classes)"


def test_both_libraries_leave_the_same_arrays():
    if coco_backend.faster_coco_eval_backend() is None:
        pytest.skip("faster-coco-eval is not installed")
    gt, results = hand_built()
    slow = coco_eval.evaluate_detailed(gt, results, use_faster=False)
    fast = coco_eval.evaluate_detailed(gt, results, use_faster=True)
    assert (slow.backend, fast.backend) == (coco_backend.PYCOCOTOOLS, coco_backend.FASTER_COCO_EVAL)
    assert slow.precision.shape == fast.precision.shape == (10, 101, 4)
    np.testing.assert_allclose(slow.precision, fast.precision, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(slow.num_gt, fast.num_gt)


@pytest.mark.parametrize("use_faster", BACKENDS)
def test_only_evaluated_images_and_no_detections(use_faster):
    gt, results = hand_built()
    ev = coco_eval.evaluate_detailed(gt, results, img_ids=[1], use_faster=use_faster)  # boxes 1, 3 (crowd), 5
    assert ev.num_gt.tolist() == [1, 0, 1, 0]
    nothing = coco_eval.evaluate_detailed(gt, [], use_faster=use_faster)  # COCOeval is not run
    assert nothing.precision.shape == (10, 101, 4)
    rows = analysis.per_class_table(nothing.precision, nothing.iou_thrs, nothing.cat_ids, nothing.names,
                                    nothing.num_gt)
    assert [r["AP"] for r in rows[:3]] == [0.0, 0.0, 0.0] and math.isnan(rows[3]["AP"])


def test_class_ap_leaves_out_undefined_entries():
    p = np.array([[[0.5, -1.0, 1.0], [1.0, -1.0, -1.0]]])  # [T=1, R=2, K=3]
    ap = analysis.class_ap(p)
    assert ap[0] == 0.75 and math.isnan(ap[1]) and ap[2] == 1.0
    with pytest.raises(ValueError, match="IoU threshold 0.3"):
        analysis.iou_index(IOU_THRS, 0.3)
    with pytest.raises(ValueError, match=r"\[T=10, R, K=2\]"):
        analysis.per_class_table(np.zeros((10, 101, 3)), IOU_THRS, [1, 2], ["a", "b"], [1, 1])


def test_extreme_classes_pick_the_worst_and_the_best():
    ap = np.array([0.5, np.nan, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8])
    assert analysis.extreme_classes(ap, 3) == ([2, 6, 4], [3, 7, 5])
    worst, best = analysis.extreme_classes(np.array([0.4, np.nan, 0.2, 0.6]), 3)  # fewer than 2n: each once
    assert (worst, best) == ([2, 0], [3])
    assert analysis.extreme_classes(np.array([np.nan]), 3) == ([], [])


def test_markdown_tables():
    gt, results = hand_built()
    ev = coco_eval.evaluate_detailed(gt, results)
    text = analysis.format_per_class(analysis.per_class_table(ev.precision, ev.iou_thrs, ev.cat_ids, ev.names,
                                                              ev.num_gt))
    lines = text.splitlines()
    assert lines[0] == "| class | id | AP | AP50 | AP75 | GT |"
    assert "| perfect | 1 | 1.000 | 1.000 | 1.000 | 2 |" in lines
    assert "| absent | 12 | - | - | - | 0 |" in lines
    assert lines[-1].startswith("| **mean (3 classes)** |") and lines[-1].endswith("| 5 |")
    table = analysis.format_breakdown(("C50", "FN"), np.array([0.25, 1.0]), np.array([[0.5, np.nan], [1.0, np.nan]]),
                                      ["a", "b"], {"C50": "PR at IoU 0.50", "FN": "no misses"})
    assert "| C50 | 0.250 | PR at IoU 0.50 |" in table and "| b | - | - |" in table
