"""The COCO error breakdown (retina_fn.eval.error_breakdown): hand-computed curves on a built case, the
ordering of the curves, and the same numbers from both COCO libraries."""

import json

import numpy as np
import pytest

from retina_fn.data import synthetic
from retina_fn.eval import analysis, coco_backend, coco_eval
from retina_fn.eval.error_breakdown import KINDS, error_breakdown

BACKENDS = [False, pytest.param(True, marks=pytest.mark.skipif(coco_backend.faster_coco_eval_backend() is None,
                                                                reason="faster-coco-eval is not installed"))]


def _box(x, y, w=100.0, h=100.0):
    return [float(x), float(y), float(w), float(h)]


def built_case(supercategories=True):
    """'cat' (id 1) and 'dog' (id 2) are animals, 'car' (id 3) a vehicle, 'bus' (id 4) has no ground truth.
    Ground truth: image 1 holds cat a1, dog b1 and car c1; image 2 holds cats a2 and a3.
    Detections of 'cat', best first: on dog b1 (IoU 1), on car c1 (IoU 1), on empty background, on a1 at
    IoU 0.6, on a2 at IoU 0.3; a3 is missed. One exact detection of the dog; none of the car."""
    cats = [{"id": 1, "name": "cat", "supercategory": "animal"}, {"id": 2, "name": "dog", "supercategory": "animal"},
            {"id": 3, "name": "car", "supercategory": "vehicle"}, {"id": 4, "name": "bus", "supercategory": "vehicle"}]
    if not supercategories:
        cats = [{"id": c["id"], "name": c["name"]} for c in cats]
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 640, "height": 480} for i in (1, 2)]
    boxes = [(1, 1, _box(0, 0)), (1, 2, _box(200, 0)), (1, 3, _box(0, 200)), (2, 1, _box(0, 0)),
             (2, 1, _box(300, 300, 50, 50))]
    anns = [{"id": n + 1, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for n, (i, c, b) in enumerate(boxes)]
    results = [
        {"image_id": 1, "category_id": 1, "bbox": _box(200, 0), "score": 0.95},
        {"image_id": 1, "category_id": 1, "bbox": _box(0, 200), "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": _box(500, 350), "score": 0.85},
        {"image_id": 1, "category_id": 1, "bbox": _box(0, 0, 60, 100), "score": 0.8},  # IoU 0.6
        {"image_id": 2, "category_id": 1, "bbox": _box(0, 0, 30, 100), "score": 0.7},  # IoU 0.3
        {"image_id": 1, "category_id": 2, "bbox": _box(200, 0), "score": 0.6},
    ]
    return {"images": images, "annotations": anns, "categories": cats}, results


@pytest.mark.parametrize("use_faster", BACKENDS)
def test_hand_computed_breakdown(use_faster):
    gt, results = built_case()
    b = error_breakdown(gt, results, use_faster=use_faster)
    assert b.kinds == KINDS and b.skipped == {}
    assert b.names == ("cat", "dog", "car", "bus") and b.num_gt.tolist() == [3, 1, 1, 0]
    assert b.precision.shape == (7, 101, 4)
    ap, overall, _ = analysis.breakdown_summary(b.precision)
    cat = dict(zip(b.kinds, ap[:, 0]))
    # 3 cats; the envelope of precision p up to recall 1/3 covers 34 of the 101 recall points, up to 2/3, 67.
    expected = {
        "C75": 0.0,                    # no hit at 0.75
        "C50": 34 * (1 / 4) / 101,     # FP FP FP TP FP: 1 of 4 at recall 1/3
        "Loc": 67 * (2 / 5) / 101,     # FP FP FP TP TP: 2 of 5 at recall 2/3
        "Sim": 67 * (2 / 4) / 101,     # the detection on the dog is ignored
        "Oth": 67 * (2 / 3) / 101,     # and the one on the car
        "BG": 67 / 101,                # precision 1 up to the recall Oth reaches
        "FN": 1.0,
    }
    assert cat == pytest.approx(expected, abs=1e-12)
    dog, car = dict(zip(b.kinds, ap[:, 1])), dict(zip(b.kinds, ap[:, 2]))
    assert dog == pytest.approx({k: 1.0 for k in KINDS})
    assert car == pytest.approx({**{k: 0.0 for k in KINDS}, "FN": 1.0})
    assert np.isnan(ap[:, 3]).all() and (b.precision[:, :, 3] == -1).all()
    assert overall == pytest.approx(np.nanmean(ap[:, :3], axis=1))


def test_without_supercategories_sim_is_left_out():
    gt, results = built_case(supercategories=False)
    b = error_breakdown(gt, results, use_faster=False)
    assert b.kinds == ("C75", "C50", "Loc", "Oth", "BG", "FN")
    assert "supercategory" in b.skipped["Sim"]
    with_sim = error_breakdown(built_case()[0], results, use_faster=False)
    np.testing.assert_array_equal(b.precision, np.delete(with_sim.precision, KINDS.index("Sim"), axis=0))


def test_no_detections_on_the_evaluated_images_is_an_error():
    gt, results = built_case()
    with pytest.raises(ValueError, match="no detections on the evaluated images"):
        error_breakdown(gt, [r for r in results if r["image_id"] == 2], img_ids=[1])
    with pytest.raises(ValueError, match="no 'annotations' list"):
        error_breakdown({"images": gt["images"], "categories": gt["categories"]}, results)


@pytest.fixture(scope="module")
def noisy_set(tmp_path_factory):
    """The synthetic validation set with its boxes as detections: jittered, a fifth relabelled, extra
    boxes on the background, random scores."""
    root = tmp_path_factory.mktemp("breakdown")
    paths = synthetic.generate_synthetic(root, num_train=0, num_val=24, seed=3, image_size=128)
    with open(paths.val_ann) as f:
        coco = json.load(f)
    cat_ids = sorted(c["id"] for c in coco["categories"])
    gen = np.random.default_rng(0)
    results = []
    for a in coco["annotations"]:
        if a["iscrowd"]:
            continue
        x, y, w, h = a["bbox"]
        label = a["category_id"] if gen.uniform() < 0.8 else int(gen.choice(cat_ids))
        results.append({"image_id": a["image_id"], "category_id": label, "score": float(gen.uniform()),
                        "bbox": [x + gen.normal(0, 0.2 * w), y + gen.normal(0, 0.2 * h), w, h]})
        if gen.uniform() < 0.3:
            results.append({"image_id": a["image_id"], "category_id": int(gen.choice(cat_ids)),
                            "bbox": [*gen.uniform(0, 100, 2).tolist(), 12.0, 12.0], "score": float(gen.uniform())})
    return paths.val_ann, results


@pytest.mark.parametrize("use_faster", BACKENDS)
def test_curves_are_ordered_and_c50_c75_are_the_evaluations_own(noisy_set, use_faster):
    ann_file, results = noisy_set
    b = error_breakdown(ann_file, results, use_faster=use_faster)
    ev = coco_eval.evaluate_detailed(ann_file, results, use_faster=use_faster)
    np.testing.assert_allclose(b.precision[0], ev.precision[analysis.iou_index(ev.iou_thrs, 0.75)], atol=1e-12)
    np.testing.assert_allclose(b.precision[1], ev.precision[analysis.iou_index(ev.iou_thrs, 0.5)], atol=1e-12)
    _, overall, _ = analysis.breakdown_summary(b.precision)
    assert np.all(np.diff(overall) >= 0), dict(zip(b.kinds, overall))
    assert overall[-1] == 1.0 and overall[0] < overall[-2] < 1.0
    # From Loc on, each curve only ignores more false positives: never lower at any recall, for any class.
    loose = b.precision[b.kinds.index("Loc"):]
    assert np.all(np.diff(loose, axis=0) >= 0)


def test_both_libraries_agree(noisy_set):
    if coco_backend.faster_coco_eval_backend() is None:
        pytest.skip("faster-coco-eval is not installed")
    ann_file, results = noisy_set
    slow, fast = error_breakdown(ann_file, results, use_faster=False), error_breakdown(ann_file, results)
    assert slow.kinds == fast.kinds
    np.testing.assert_allclose(slow.precision, fast.precision, rtol=0, atol=1e-12)
