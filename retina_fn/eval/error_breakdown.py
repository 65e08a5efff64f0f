"""The COCO analyze tool's error breakdown (after Hoiem et al., "Diagnosing error in object detectors"), by
re-running COCOeval with changed parameters and ground truth. Each curve (DESCRIPTIONS) relaxes the one before. From
Loc on each only turns false positives into ignored detections, so Loc <= Sim <= Oth <= BG <= FN = 1 at every
recall; C75 <= C50 <= Loc holds as a rule (a looser threshold can let COCOeval's greedy matching pair boxes
differently). Sim needs every category to name a supercategory. All at area 'all', 100 detections per image.

C75, C50 and Loc come from one COCOeval run with iouThrs [0.75, 0.5, 0.1]; Sim and Oth from one run per
category at IoU 0.1 whose ground truth is the category's own boxes plus, on the images where it has
detections, copies of the other (similar) categories' boxes relabelled to it and ignored by 'area' -1 (not
by iscrowd, which would change the overlap and absorb any number of detections), as the analyze tool does.
COCOeval matches an ignored box only when no ordinary box is left above the threshold, so copies never take
a true positive away. BG and FN follow from Oth."""

from __future__ import annotations

import collections
import contextlib
import io
from typing import NamedTuple, Sequence

import numpy as np

from retina_fn.eval import coco_backend, coco_eval, coco_results

KINDS = ("C75", "C50", "Loc", "Sim", "Oth", "BG", "FN")
DESCRIPTIONS = {
    "C75": "PR at IoU 0.75",
    "C50": "PR at IoU 0.50",
    "Loc": "PR at IoU 0.10: localisation errors forgiven, duplicates still false positives",
    "Sim": "Loc, and detections on boxes of another class of the same supercategory ignored",
    "Oth": "Loc, and detections on boxes of any other class ignored",
    "BG": "Oth without its remaining (background) false positives: precision 1 up to the recall it reaches",
    "FN": "every miss removed too: precision 1 at every recall",
}
MAX_DETS = 100
_ALL_AREAS = [0.0, 1e5**2]  # COCOeval's 'all' range
_LOOSE_IOU = 0.1


class ErrorBreakdown(NamedTuple):
    """The breakdown's curves: kinds, E names of KINDS in order ('Sim' left out when a category names no
    supercategory); precision float64 [E, R, K], interpolated, -1 for a category without ground truth;
    rec_thrs float64 [R]; cat_ids int64 [K] ascending; names: K names; num_gt int64 [K] non-crowd boxes;
    skipped: {kind: why it is not in `kinds`}."""
    kinds: tuple[str, ...]
    precision: np.ndarray
    rec_thrs: np.ndarray
    cat_ids: np.ndarray
    names: tuple[str, ...]
    num_gt: np.ndarray
    skipped: dict[str, str]


def _precision(lib: coco_backend.Backend, gt, dt, img_ids: Sequence[int], cat_ids: Sequence[int],
               iou_thrs: Sequence[float], out: io.StringIO) -> tuple[np.ndarray, np.ndarray]:
    """(precision float64 [T, R, K], rec_thrs float64 [R]) of COCOeval at area 'all', MAX_DETS detections."""
    with contextlib.redirect_stdout(out):
        ev = lib.cocoeval(gt, dt)
        p = ev.params
        p.imgIds, p.catIds = [int(i) for i in img_ids], [int(c) for c in cat_ids]
        p.iouThrs = np.asarray(iou_thrs, dtype=np.float64)
        p.maxDets, p.areaRng, p.areaRngLbl = [MAX_DETS], [list(_ALL_AREAS)], ["all"]
        ev.evaluate()
        ev.accumulate()
    return coco_eval.all_area_precision(ev, MAX_DETS), np.asarray(ev.params.recThrs, dtype=np.float64)


def _confusions_ignored(lib: coco_backend.Backend, gt, dt, eval_ids: Sequence[int], cat_ids: np.ndarray,
                        num_gt: np.ndarray, ignored: dict[int, set[int]], num_recall: int,
                        out: io.StringIO) -> np.ndarray:
    """float64 [R, K]: precision at IoU 0.1, category c's detections on boxes of ignored[c] ignored (-1: no ground
    truth, not run)."""
    evaluated = set(eval_ids)
    anns = [a for a in gt.dataset["annotations"] if a["image_id"] in evaluated]
    by_image, by_category = collections.defaultdict(list), collections.defaultdict(list)
    for a in anns:
        by_image[a["image_id"]].append(a)
        by_category[a["category_id"]].append(a)
    detections = collections.defaultdict(list)  # category id -> its detections
    for d in dt.dataset["annotations"]:
        detections[d["category_id"]].append(d)
    image_by_id = {image["id"]: image for image in gt.dataset["images"]}
    next_id = max((int(a["id"]) for a in gt.dataset["annotations"]), default=0) + 1
    precision = np.full((num_recall, len(cat_ids)), -1.0)
    for k, cid in enumerate(int(c) for c in cat_ids):
        if num_gt[k] == 0:
            continue
        detected_on = sorted({d["image_id"] for d in detections[cid]})
        copies = [dict(a, id=next_id + n, category_id=cid, area=-1.0)
                  for n, a in enumerate(a for image_id in detected_on for a in by_image[image_id]
                                        if a["category_id"] in ignored[cid])]
        # only the category's images, boxes and detections: COCOeval scans them in Python
        image_ids = sorted({a["image_id"] for a in by_category[cid]} | set(detected_on))
        images = [image_by_id[i] for i in image_ids]
        sub_gt = _coco_object(lib, images, gt, [dict(a) for a in by_category[cid]] + copies, out)
        sub_dt = _coco_object(lib, images, gt, detections[cid], out)
        precision[:, k] = _precision(lib, sub_gt, sub_dt, image_ids, [cid], [_LOOSE_IOU], out)[0][0, :, 0]
    return precision


def _coco_object(lib: coco_backend.Backend, images: list[dict], gt, annotations: list[dict], out: io.StringIO):
    coco = lib.coco_cls()
    coco.dataset = {"images": images, "categories": gt.dataset["categories"], "annotations": annotations}
    with contextlib.redirect_stdout(out):
        coco.createIndex()
    return coco


def _supercategory_groups(categories: Sequence[dict], cat_ids: np.ndarray) -> dict[int, set[int]] | None:
    """{category id: the other ids of its supercategory}, or None when a category names no supercategory."""
    sup = {c["id"]: c.get("supercategory") for c in categories}
    if not all(isinstance(sup.get(int(c)), str) and sup[int(c)] for c in cat_ids):
        return None
    return {int(c): {int(o) for o in cat_ids if o != c and sup[int(o)] == sup[int(c)]} for c in cat_ids}


def error_breakdown(coco_gt, results: Sequence[dict], img_ids=None, use_faster: bool = True) -> ErrorBreakdown:
    """The analyze tool's PR curves per category; arguments and errors as `coco_eval.evaluate` (results
    outside img_ids left out), and ValueError when no result falls on an evaluated image."""
    lib = coco_backend.backend(use_faster)
    out = io.StringIO()
    gt = coco_backend.load_ground_truth(coco_gt, lib, out)
    eval_ids = coco_backend.eval_image_ids(img_ids, gt)
    coco_results.check_results(results, gt)
    evaluated = set(eval_ids)
    results = [r for r in results if r["image_id"] in evaluated]
    if not results:
        raise ValueError("error_breakdown: no detections on the evaluated images, nothing to break down")
    dt = coco_backend.load_results(gt, results, out)
    cat_ids = np.asarray(sorted(int(c) for c in gt.getCatIds()), dtype=np.int64)
    num_gt = coco_backend.count_ground_truth(gt, eval_ids, cat_ids)

    thresholds, rec_thrs = _precision(lib, gt, dt, eval_ids, cat_ids, [0.75, 0.5, _LOOSE_IOU], out)
    curves = {"C75": thresholds[0], "C50": thresholds[1], "Loc": thresholds[2]}
    others = {int(c): {int(o) for o in cat_ids if o != c} for c in cat_ids}
    curves["Oth"] = _confusions_ignored(lib, gt, dt, eval_ids, cat_ids, num_gt, others, len(rec_thrs), out)
    skipped = {}
    similar = _supercategory_groups(gt.dataset["categories"], cat_ids)
    if similar is None:
        skipped["Sim"] = "the annotation file's categories name no supercategory"
    elif similar == others:  # one supercategory for all: the same runs as Oth
        curves["Sim"] = curves["Oth"].copy()
    else:
        curves["Sim"] = _confusions_ignored(lib, gt, dt, eval_ids, cat_ids, num_gt, similar, len(rec_thrs), out)
    defined = np.broadcast_to(num_gt > 0, curves["Oth"].shape)
    curves["BG"] = np.where(defined, (curves["Oth"] > 0).astype(np.float64), -1.0)
    curves["FN"] = np.where(defined, 1.0, -1.0)
    kinds = tuple(k for k in KINDS if k in curves)
    return ErrorBreakdown(kinds, np.stack([curves[k] for k in kinds]), rec_thrs, cat_ids,
                          coco_backend.category_names(gt, cat_ids), num_gt, skipped)
