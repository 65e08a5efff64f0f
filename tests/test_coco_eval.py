import json

import numpy as np
import pytest
import torch

from retina_fn.data import synthetic
from retina_fn.eval import coco_backend, coco_eval
from retina_fn.eval.coco_eval import evaluate, evaluate_detailed
from retina_fn.eval.coco_results import detections_to_coco, merge_results


@pytest.fixture(scope="module")
def val_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco_eval")
    paths = synthetic.generate_synthetic(root, num_train=0, num_val=40, seed=11)
    with open(paths.val_ann) as f:
        coco = json.load(f)
    assert any(a["iscrowd"] for a in coco["annotations"])  # the crowd test below needs one
    return paths.val_ann, coco


def _gt_as_arrays(coco, keep=lambda ann: True):
    """Every non-crowd ground-truth box as a detection: xyxy, score 1, contiguous label."""
    cat_ids = sorted(c["id"] for c in coco["categories"])
    anns = [a for a in coco["annotations"] if not a["iscrowd"] and keep(a)]
    xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64)
    boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
    labels = torch.tensor([cat_ids.index(a["category_id"]) for a in anns])
    image_ids = torch.tensor([a["image_id"] for a in anns])
    return boxes, torch.ones(len(anns)), labels, image_ids, cat_ids


# ---------------------------------------------------------------------------------------------------
# Hand-computed AP


def _two_box_ground_truth():
    return {
        "images": [{"id": 7, "file_name": "a.jpg", "width": 100, "height": 100}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 3, "bbox": [10, 10, 40, 40], "area": 1600, "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 3, "bbox": [55, 50, 40, 40], "area": 1600, "iscrowd": 0},
        ],
        "categories": [{"id": 3, "name": "thing"}],
    }


def test_hand_computed_ap_with_a_higher_scored_false_positive():
    # Detections: a false positive (score 0.9, small, touching nothing), then a match of gt 1 at IoU 0.975.
    boxes = np.array([[0.0, 80.0, 15.0, 95.0], [10.5, 10.0, 50.5, 50.0]])
    results = detections_to_coco(boxes, [0.9, 0.8], [0, 0], [7, 7], [3])
    assert results[1]["bbox"] == [10.5, 10.0, 40.0, 40.0]
    metrics = evaluate(_two_box_ground_truth(), results)
    # Ranked: FP (recall 0, precision 0), TP (recall 0.5, precision 0.5). The precision envelope is 0.5 for
    # recall thresholds 0.00..0.50 (51 of COCO's 101 points) and 0 beyond: AP = 51 * 0.5 / 101 at every
    # IoU threshold, since the match has IoU 1580 / 1620 = 0.975.
    ap = 51 * 0.5 / 101
    assert metrics["bbox_mAP"] == pytest.approx(ap)
    assert metrics["bbox_mAP_50"] == pytest.approx(ap)
    assert metrics["bbox_mAP_75"] == pytest.approx(ap)
    # Medium range: the unmatched FP has area 225 (small), so it is ignored there -> precision 1 up to 0.5.
    assert metrics["bbox_mAP_m"] == pytest.approx(51 / 101)
    assert metrics["bbox_mAP_s"] == -1.0 and metrics["bbox_mAP_l"] == -1.0  # no such ground truth
    assert metrics["AR_1"] == 0.0  # the top-1 detection is the FP
    assert metrics["AR_10"] == pytest.approx(0.5) and metrics["AR_100"] == pytest.approx(0.5)
    assert metrics["AR_m"] == pytest.approx(0.5)


def test_iou_below_threshold_only_counts_at_low_thresholds():
    # One detection on gt 1 with IoU 1248 / 1600 = 0.78 (a 31.2 x 40 box inside it): a TP for thresholds
    # 0.50..0.75 (6 of 10) and a miss above; AP at a hit threshold is 51 / 101 (recall 0.5, precision 1).
    results = detections_to_coco([[10.0, 10.0, 41.2, 50.0]], [0.5], [0], [7], [3])
    metrics = evaluate(_two_box_ground_truth(), results)
    assert metrics["bbox_mAP_50"] == pytest.approx(51 / 101)
    assert metrics["bbox_mAP_75"] == pytest.approx(51 / 101)
    assert metrics["bbox_mAP"] == pytest.approx(6 / 10 * 51 / 101)


# ---------------------------------------------------------------------------------------------------
# On a generated synthetic validation set


def test_ground_truth_as_detections_scores_one(val_set):
    ann_file, coco = val_set
    boxes, scores, labels, image_ids, cat_ids = _gt_as_arrays(coco)
    results = detections_to_coco(boxes, scores, labels, image_ids, cat_ids)
    evaluation = evaluate_detailed(str(ann_file), results)
    metrics, summary = evaluation.metrics, evaluation.summary
    for name in ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l",
                 "AR_100", "AR_s", "AR_m", "AR_l"):
        assert metrics[name] == pytest.approx(1.0), name
    assert "Average Precision" in summary
    assert all(type(v) is float for v in metrics.values())
    json.dumps(results)  # plain Python numbers only


def test_detection_on_a_crowd_region_is_not_a_false_positive(val_set):
    ann_file, coco = val_set
    boxes, scores, labels, image_ids, cat_ids = _gt_as_arrays(coco)
    results = detections_to_coco(boxes, scores, labels, image_ids, cat_ids)
    crowd = [a for a in coco["annotations"] if a["iscrowd"]]
    on_crowd = [dict(image_id=a["image_id"], category_id=a["category_id"], bbox=a["bbox"], score=1.0) for a in crowd]
    assert evaluate(ann_file, results + on_crowd)["bbox_mAP"] == pytest.approx(1.0)
    # The same boxes where no crowd is (shifted to another image) are false positives.
    other_image = {a["image_id"] for a in crowd} ^ {im["id"] for im in coco["images"]}
    moved = [dict(r, image_id=min(other_image)) for r in on_crowd]
    assert evaluate(ann_file, results + moved)["bbox_mAP"] < 1.0


def test_wrong_class_scores_zero(val_set):
    ann_file, coco = val_set
    boxes, scores, labels, image_ids, cat_ids = _gt_as_arrays(coco)
    shifted = (labels + 1) % len(cat_ids)
    metrics = evaluate(ann_file, detections_to_coco(boxes, scores, shifted, image_ids, cat_ids))
    assert metrics["bbox_mAP"] == 0.0 and metrics["AR_100"] == 0.0
    # Writing contiguous indices as ids is caught: index 0 is no category of this file.
    bad = detections_to_coco(boxes, scores, labels, image_ids, list(range(len(cat_ids))))
    with pytest.raises(ValueError, match=r"category id \d+ is not in the ground truth"):
        evaluate(ann_file, bad)


def test_label_map_forms_agree(val_set):
    _, coco = val_set
    from retina_fn.data.coco import LabelMap

    boxes, scores, labels, image_ids, cat_ids = _gt_as_arrays(coco)
    label_map = LabelMap.from_categories(coco["categories"])
    expected = detections_to_coco(boxes, scores, labels, image_ids, cat_ids)
    for form in (label_map, label_map.to_dict(), {"cat_ids": cat_ids}, dict(enumerate(cat_ids)), np.array(cat_ids)):
        assert detections_to_coco(boxes, scores, labels, image_ids, form) == expected
    assert {r["category_id"] for r in expected} == set(cat_ids)


def test_only_evaluated_images_count(val_set):
    ann_file, coco = val_set
    with_objects = sorted({a["image_id"] for a in coco["annotations"] if not a["iscrowd"]})
    first, second = with_objects[: len(with_objects) // 2], with_objects[len(with_objects) // 2 :]
    boxes, scores, labels, image_ids, cat_ids = _gt_as_arrays(coco, keep=lambda a: a["image_id"] in first)
    results = detections_to_coco(boxes, scores, labels, image_ids, cat_ids)
    assert evaluate(ann_file, results, img_ids=first)["bbox_mAP"] == pytest.approx(1.0)
    # An image that was run but produced nothing keeps its ground truth as misses.
    assert evaluate(ann_file, results, img_ids=first + second[:1])["AR_100"] < 1.0
    assert evaluate(ann_file, results)["AR_100"] < 1.0
    with pytest.raises(ValueError, match="not in the ground truth"):
        evaluate(ann_file, results, img_ids=[123456789])


def test_empty_results_give_zeros(val_set):
    ann_file, _ = val_set
    evaluation = evaluate_detailed(ann_file, [])
    metrics, summary = evaluation.metrics, evaluation.summary
    assert set(metrics) == set(coco_eval.METRIC_NAMES)
    assert all(v == 0.0 for v in metrics.values())
    assert "no detections" in summary
    assert detections_to_coco(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long),
                              torch.zeros(0, dtype=torch.long), [1]) == []


def test_batched_input_drops_padding_and_invalid_rows():
    boxes = torch.tensor([[[0.0, 0.0, 2.0, 3.0], [1.0, 1.0, 2.0, 2.0]], [[5.0, 5.0, 6.0, 8.0], [0.0, 0.0, 1.0, 1.0]]])
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.7]])
    labels = torch.tensor([[1, 0], [0, 0]])
    valid = torch.tensor([[True, False], [True, True]])
    image_ids = torch.tensor([42, -1])  # the second slot of the batch is padding
    out = detections_to_coco(boxes, scores, labels, image_ids, [4, 9], valid=valid)
    assert out == [{"image_id": 42, "category_id": 9, "bbox": [0.0, 0.0, 2.0, 3.0], "score": pytest.approx(0.9)}]


def test_bad_detections_are_named():
    with pytest.raises(ValueError, match="class index 2"):
        detections_to_coco([[0.0, 0.0, 1.0, 1.0]], [0.5], [2], [1], [1, 2])
    with pytest.raises(ValueError, match="non-finite"):
        detections_to_coco([[0.0, float("nan"), 1.0, 1.0]], [0.5], [0], [1], [1])
    with pytest.raises(ValueError, match="repeat"):
        detections_to_coco([[0.0, 0.0, 1.0, 1.0]], [0.5], [0], [1], [1, 1])
    with pytest.raises(ValueError, match="image id 99"):
        evaluate(_two_box_ground_truth(), [{"image_id": 99, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 1.0}])


def test_merge_results_keeps_first_shard_per_image():
    a = [{"image_id": 1, "k": "a1"}, {"image_id": 1, "k": "a2"}, {"image_id": 2, "k": "a3"}]
    b = [{"image_id": 3, "k": "b1"}, {"image_id": 1, "k": "b2"}, {"image_id": 1, "k": "b3"}]
    c = [{"image_id": 2, "k": "c1"}, {"image_id": 3, "k": "c2"}, {"image_id": 4, "k": "c3"}]
    assert [r["k"] for r in merge_results([a, b, c])] == ["a1", "a2", "a3", "b1", "c3"]


def test_faster_coco_eval_gives_the_same_numbers(val_set):
    if coco_backend.faster_coco_eval_backend() is None:
        pytest.skip("faster-coco-eval is not installed (optional dependency)")
    ann_file, coco = val_set
    boxes, scores, labels, image_ids, cat_ids = _gt_as_arrays(coco)
    gen = np.random.default_rng(0)
    noisy = boxes + torch.from_numpy(gen.normal(0.0, 2.0, boxes.shape))
    results = detections_to_coco(noisy, torch.from_numpy(gen.uniform(size=len(scores))), labels, image_ids, cat_ids)
    slow = evaluate(ann_file, results, use_faster=False)
    fast = evaluate(ann_file, results, use_faster=True)
    assert fast == pytest.approx(slow, abs=1e-9)
