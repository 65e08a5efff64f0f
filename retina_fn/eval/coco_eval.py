"""COCO bbox evaluation (host side): COCO result dicts (`retina_fn.eval.coco_results`) -> COCOeval's 12 summary
numbers and per-category precision, with a library and ground truth from `retina_fn.eval.coco_backend`.

Rules (pycocotools conventions): only images in `img_ids` are scored (all when None), so an image run without
detections counts its ground truth as misses and an image never run does not count; -1 means no object in
that setting (e.g. no large object); crowd ground truth is an ignore region. With no detections every metric
is 0 and COCOeval is not run (`loadRes` fails on an empty list)."""

from __future__ import annotations

import contextlib
import io
from typing import NamedTuple, Sequence

import numpy as np

from retina_fn.eval import coco_backend, coco_results

METRIC_NAMES = ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l",
                "AR_1", "AR_10", "AR_100", "AR_s", "AR_m", "AR_l")


def all_area_precision(coco_eval, max_dets: int = 100) -> np.ndarray:
    """float64 [T, R, K]: an accumulated COCOeval's precision at area 'all' and `max_dets` (one of
    params.maxDets); T, R, K follow params.iouThrs, recThrs, catIds; -1 without ground truth."""
    p = coco_eval.params
    area = list(p.areaRngLbl).index("all")
    dets = [int(m) for m in p.maxDets].index(int(max_dets))
    return np.asarray(coco_eval.eval["precision"], dtype=np.float64)[:, :, :, area, dets]


class CocoEvaluation(NamedTuple):
    """One COCO bbox evaluation: metrics {name: float} for METRIC_NAMES; summary, the text COCOeval printed;
    precision float64 [T, R, K] (`all_area_precision` at 100 detections), -1 where a category has no ground
    truth on the evaluated images (with no detections, 0 where there is); iou_thrs float64 [T] (0.50 .. 0.95);
    rec_thrs float64 [R] (0.00 .. 1.00); cat_ids int64 [K] ascending; names: K names; num_gt int64 [K]
    non-crowd boxes on the evaluated images; backend: coco_backend.PYCOCOTOOLS or FASTER_COCO_EVAL."""
    metrics: dict[str, float]
    summary: str
    precision: np.ndarray
    iou_thrs: np.ndarray
    rec_thrs: np.ndarray
    cat_ids: np.ndarray
    names: tuple[str, ...]
    num_gt: np.ndarray
    backend: str


def evaluate_detailed(coco_gt, results: Sequence[dict], img_ids=None, use_faster: bool = True) -> CocoEvaluation:
    """`evaluate` returning a CocoEvaluation: also COCOeval's printed summary and per-category precision."""
    lib = coco_backend.backend(use_faster)
    out = io.StringIO()
    gt = coco_backend.load_ground_truth(coco_gt, lib, out)
    eval_ids = coco_backend.eval_image_ids(img_ids, gt)
    coco_results.check_results(results, gt)
    evaluated = set(eval_ids)
    if not eval_ids or not any(r["image_id"] in evaluated for r in results):
        params = lib.cocoeval(gt, None).params
        cat_ids = np.asarray(sorted(gt.getCatIds()), dtype=np.int64)
        num_gt = coco_backend.count_ground_truth(gt, eval_ids, cat_ids)
        shape = (len(params.iouThrs), len(params.recThrs), len(cat_ids))
        precision = np.broadcast_to(np.where(num_gt > 0, 0.0, -1.0), shape).copy()
        return CocoEvaluation({name: 0.0 for name in METRIC_NAMES},
                              "no detections on the evaluated images: every metric is 0\n", precision,
                              np.asarray(params.iouThrs, dtype=np.float64), np.asarray(params.recThrs, np.float64),
                              cat_ids, coco_backend.category_names(gt, cat_ids), num_gt, lib.name)
    dt = coco_backend.load_results(gt, results, out)
    with contextlib.redirect_stdout(out):
        coco_eval = lib.cocoeval(gt, dt)
        coco_eval.params.imgIds = eval_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    stats = np.asarray(coco_eval.stats, dtype=np.float64)[: len(METRIC_NAMES)]
    p = coco_eval.params
    cat_ids = np.asarray([int(c) for c in p.catIds], dtype=np.int64)
    return CocoEvaluation({name: float(v) for name, v in zip(METRIC_NAMES, stats)}, out.getvalue(),
                          all_area_precision(coco_eval), np.asarray(p.iouThrs, dtype=np.float64),
                          np.asarray(p.recThrs, dtype=np.float64), cat_ids, coco_backend.category_names(gt, cat_ids),
                          coco_backend.count_ground_truth(gt, eval_ids, cat_ids), lib.name)


def evaluate(coco_gt, results: Sequence[dict], img_ids=None, use_faster: bool = True) -> dict[str, float]:
    """COCO bbox metrics of `results` against the ground truth; nothing is printed.

    Args:
      coco_gt: any ground truth `coco_backend.load_ground_truth` takes (a path, CocoSet, dict, COCO object).
      results: result dicts (coco_results.detections_to_coco), gathered from every rank and de-duplicated.
      img_ids: the image ids that were run (default: every ground-truth image).
      use_faster: use faster-coco-eval when it is installed (same numbers).
    Returns:
      {name: float} for METRIC_NAMES; all 0.0 when no result falls on an evaluated image.
    Raises:
      FileNotFoundError: coco_gt is a path that does not exist.
      ValueError: an unusable coco_gt (an image-info file included), img_ids not in the ground truth, or a
        malformed result (`coco_results.check_results`)."""
    return evaluate_detailed(coco_gt, results, img_ids, use_faster).metrics

