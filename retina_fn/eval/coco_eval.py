"""COCO bbox evaluation (host side): detections -> COCO result dicts -> pycocotools COCOeval numbers.

    results = detections_to_coco(boxes, scores, labels, image_ids, label_map)   # per batch, then gather
    results = merge_results(per_rank_results)                                  # drop padded duplicates
    metrics = evaluate(val_ann_file, results, img_ids=ids_that_were_run)
    detailed = evaluate_detailed(val_ann_file, results, img_ids)   # + per-category precision [T, R, K]
    write_results("detections_bbox.json", results)                 # the COCO evaluation server's format

Rules (pycocotools conventions, see the module's tests):
- Results use the annotation file's category ids and xywh boxes in original-image pixels, w = x2 - x1.
- Only images in `img_ids` are scored (all ground-truth images when None): an image that was run and
  produced nothing still counts its ground truth as misses, an image never run does not.
- Metrics are COCOeval's 12 summary numbers; -1 means the ground truth has no object in that setting
  (for example no large object). With no detections at all every metric is 0 and COCOeval is not run
  (`loadRes` fails on an empty list).
- Crowd ground truth is an ignore region (COCOeval's own rule); keep it in the ground-truth file.
- COCOeval caps detections at 100 per image *and category*; keep at most 100 per image before calling
  (the post-processing's max_per_img) to follow the official protocol.
- faster-coco-eval is used when installed and `use_faster` is true; it gives the same numbers and leaves
  the same `eval['precision']` array.
- An image-info file (images and categories, no 'annotations', as COCO test-dev's) cannot be scored:
  evaluating against one is a ValueError; write its results file instead.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

METRIC_NAMES = (
    "bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l",
    "AR_1", "AR_10", "AR_100", "AR_s", "AR_m", "AR_l",
)


# ----------------------------------------------------------------------------------------------------
# Detections -> result dicts


def _to_numpy(x, name: str, dtype) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, on any device
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x, dtype=dtype)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: cannot be read as an array of {np.dtype(dtype).name}: {err}") from None


def category_id_table(label_map: Any) -> list[int]:
    """The annotation file's category id of each contiguous class index.

    Args:
      label_map: any of: a sequence of ids; an object with a `category_ids` or `cat_ids` attribute (e.g.
        retina_fn.data.coco.LabelMap) or a `to_dict()` method; a mapping with a 'category_ids' or
        'cat_ids' entry; a mapping {index: category id} with keys 0..K-1.

    Returns:
      list[int] of K category ids, entry i for class index i.

    Raises:
      ValueError: no ids found, a non-integer id, repeated ids, no categories, or mapping keys that are
        not 0..K-1.
    """
    table = None
    for attr in ("category_ids", "cat_ids"):
        if not isinstance(label_map, Mapping) and hasattr(label_map, attr):
            table = getattr(label_map, attr)
            break
    else:
        if isinstance(label_map, Mapping):
            if "category_ids" in label_map:
                table = label_map["category_ids"]
            elif "cat_ids" in label_map:
                table = label_map["cat_ids"]
            else:
                keys = sorted(label_map)
                if keys != list(range(len(keys))):
                    raise ValueError(
                        "label_map: a mapping must hold 'category_ids' or map class indices 0..K-1 to ids, "
                        f"got keys {keys[:10]}"
                    )
                table = [label_map[k] for k in keys]
        elif hasattr(label_map, "to_dict"):
            return category_id_table(label_map.to_dict())
        elif isinstance(label_map, (Sequence, np.ndarray)) and not isinstance(label_map, (str, bytes)):
            table = label_map
    if table is None:
        raise ValueError(f"label_map: cannot find category ids in a {type(label_map).__name__}")
    ids = []
    for i, cid in enumerate(list(table)):
        if isinstance(cid, (bool, np.bool_)) or not isinstance(cid, (int, np.integer)):
            raise ValueError(f"label_map: category id of class {i} must be an integer, got {cid!r}")
        ids.append(int(cid))
    if not ids:
        raise ValueError("label_map: no categories")
    if len(set(ids)) != len(ids):
        raise ValueError(f"label_map: category ids repeat: {ids}")
    return ids


def detections_to_coco(boxes, scores, labels, image_ids, label_map, valid=None) -> list[dict]:
    """COCO result dicts for a set of detections.

    Inputs are torch tensors (any device) or array-likes. Batched input works too: boxes [B, M, 4],
    scores/labels/valid [B, M], image_ids [B] or [B, M]. Rows whose image id is negative (padding slots
    of an evaluation batch) are dropped.

    Args:
      boxes: float [N, 4] xyxy in original-image pixels.
      scores: float [N].
      labels: int [N], contiguous class indices.
      image_ids: int [N], the annotation file's image ids.
      label_map: see `category_id_table`.
      valid: optional bool [N]; only True rows are kept.

    Returns:
      [{'image_id': int, 'category_id': int, 'bbox': [x, y, w, h], 'score': float}] with Python numbers
      only (json.dump-able), in input order.

    Raises:
      ValueError: shapes that do not fit, a class index outside 0..K-1, a non-finite box or score, an
        input that cannot be read as an array, or a bad label_map.
    """
    cat_ids = np.asarray(category_id_table(label_map), dtype=np.int64)
    boxes = _to_numpy(boxes, "boxes", np.float64)
    scores = _to_numpy(scores, "scores", np.float64)
    labels = _to_numpy(labels, "labels", np.int64)
    image_ids = _to_numpy(image_ids, "image_ids", np.int64)
    if boxes.ndim < 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have shape [..., 4], got {list(boxes.shape)}")
    lead = boxes.shape[:-1]
    if scores.shape != lead or labels.shape != lead:
        raise ValueError(
            f"scores {list(scores.shape)} and labels {list(labels.shape)} must have the boxes' leading shape "
            f"{list(lead)}"
        )
    if image_ids.shape != lead:
        if image_ids.shape == lead[:1] and len(lead) == 2:
            image_ids = np.broadcast_to(image_ids[:, None], lead)
        else:
            raise ValueError(f"image_ids {list(image_ids.shape)} must have shape {list(lead)} or {list(lead[:1])}")
    keep = image_ids >= 0
    if valid is not None:
        valid = _to_numpy(valid, "valid", bool)
        if valid.shape != lead:
            raise ValueError(f"valid {list(valid.shape)} must have shape {list(lead)}")
        keep &= valid
    boxes, scores, labels, image_ids = boxes[keep], scores[keep], labels[keep], image_ids[keep]

    bad = np.flatnonzero((labels < 0) | (labels >= len(cat_ids)))
    if bad.size:
        raise ValueError(f"labels: class index {int(labels[bad[0]])} outside 0..{len(cat_ids) - 1} "
                         f"(image id {int(image_ids[bad[0]])})")
    bad = np.flatnonzero(~(np.isfinite(boxes).all(axis=1) & np.isfinite(scores)))
    if bad.size:
        raise ValueError(f"non-finite box or score for image id {int(image_ids[bad[0]])}: "
                         f"box {boxes[bad[0]].tolist()}, score {float(scores[bad[0]])}")

    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    return [
        {"image_id": int(i), "category_id": int(c), "bbox": [float(v) for v in b], "score": float(s)}
        for i, c, b, s in zip(image_ids.tolist(), cat_ids[labels].tolist(), xywh.tolist(), scores.tolist())
    ]


def merge_results(result_lists: Iterable[Sequence[dict]]) -> list[dict]:
    """Concatenates per-shard result lists, dropping an image's detections from a shard when an earlier
    shard already had that image (padding of a distributed sampler evaluates some images twice).

    Caveat: an image that produced no detections on its first shard is not known to that shard's list,
    so a later duplicate's detections are kept; they are the same image's detections, so no harm.

    Args:
      result_lists: one list of result dicts per shard (rank), in rank order.

    Returns:
      list of result dicts, in input order.
    """
    merged: list[dict] = []
    seen: set[int] = set()
    for results in result_lists:
        shard_ids = set()
        for r in results:
            image_id = int(r["image_id"])
            if image_id not in seen:
                merged.append(r)
                shard_ids.add(image_id)
        seen |= shard_ids
    return merged


# ----------------------------------------------------------------------------------------------------
# Evaluation

PYCOCOTOOLS = "pycocotools"
FASTER_COCO_EVAL = "faster-coco-eval"


def faster_coco_eval_backend():
    """The faster-coco-eval classes, when that optional package imports.

    Returns:
      (COCO, COCOeval_faster) from faster-coco-eval, or None when it is absent or fails to import.
    """
    try:
        from faster_coco_eval import COCO, COCOeval_faster
    except Exception:  # absent, or a broken build: fall back to pycocotools
        return None
    return COCO, COCOeval_faster


class Backend(NamedTuple):
    """One COCO evaluation library: its ground-truth class and its COCOeval class.

    Both libraries leave the same `eval` dict after `accumulate()`: 'precision' float64 [T, R, K, A, M] (IoU
    threshold, recall threshold, category, area range, max detections; -1 where a category has no ground
    truth in that setting), 'recall' [T, K, A, M] and 'scores' like 'precision'; faster-coco-eval adds keys.
    """

    name: str  # PYCOCOTOOLS or FASTER_COCO_EVAL
    coco_cls: type
    eval_cls: type

    def cocoeval(self, gt, dt):
        """A bbox COCOeval of `dt` against `gt` (COCO objects of this library); its messages go to stdout."""
        if self.name == FASTER_COCO_EVAL:
            return self.eval_cls(gt, dt, iouType="bbox", print_function=print)
        return self.eval_cls(gt, dt, iouType="bbox")


def backend(use_faster: bool = True) -> Backend:
    """faster-coco-eval when `use_faster` is true and it imports, pycocotools otherwise."""
    found = faster_coco_eval_backend() if use_faster else None
    if found is not None:
        return Backend(FASTER_COCO_EVAL, *found)
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    return Backend(PYCOCOTOOLS, COCO, COCOeval)


def load_ground_truth(coco_gt, lib: Backend, out: io.StringIO):
    """The ground truth as a COCO object of `lib`.

    Args:
      coco_gt: an annotation file path, a COCO-format dict, or a COCO object of either library (used as is
        when it is `lib`'s, copied otherwise).
      lib: the library.
      out: receives what the library prints.

    Returns:
      A `lib.coco_cls` instance with its index built.

    Raises:
      FileNotFoundError: coco_gt is a path that does not exist.
      ValueError: coco_gt is none of the above, or has no 'images', 'annotations' or 'categories' list (an
        image-info file, such as COCO test-dev's, has no 'annotations': there is nothing to score against).
    """
    source = "coco_gt"
    if isinstance(coco_gt, lib.coco_cls):
        gt = coco_gt
    elif isinstance(coco_gt, (str, os.PathLike)):
        source = os.fspath(coco_gt)
        if not os.path.isfile(source):
            raise FileNotFoundError(f"ground-truth annotation file not found: {source}")
        with contextlib.redirect_stdout(out):
            gt = lib.coco_cls(source)
    else:
        if isinstance(coco_gt, Mapping):
            dataset = dict(coco_gt)
        elif hasattr(coco_gt, "dataset") and isinstance(coco_gt.dataset, Mapping):
            dataset = coco_gt.dataset
        else:
            raise ValueError(f"coco_gt must be a path, a COCO dict or a COCO object, got {type(coco_gt).__name__}")
        gt = lib.coco_cls()
        # loadRes copies the image list from here, so keep the caller's structure untouched.
        gt.dataset = copy.deepcopy(dict(dataset))
        with contextlib.redirect_stdout(out):
            gt.createIndex()
    _require_lists(gt.dataset, source)
    return gt


def _require_lists(dataset: Mapping, source: str) -> None:
    for key in ("images", "annotations", "categories"):
        if key not in dataset:
            hint = (" (an image-info file, such as COCO test-dev's: detections on it can be written as a results "
                    "file, not scored)") if key == "annotations" else ""
            raise ValueError(f"{source}: the ground truth has no '{key}' list{hint}")


def load_results(gt, results: Sequence[dict], out: io.StringIO):
    """Result dicts as a detections COCO object of gt's library (its `loadRes`).

    Args:
      gt: a ground-truth COCO object (see `load_ground_truth`).
      results: non-empty, checked result dicts (loadRes reads the first one to learn the kind).
      out: receives what the library prints.

    Returns:
      The detections COCO object; `results` is not modified (loadRes writes 'area', 'id' and 'iscrowd' into
      the dicts it gets, so it gets copies).
    """
    with contextlib.redirect_stdout(out):
        return gt.loadRes([dict(r, bbox=list(r["bbox"])) for r in results])


def check_results(results: Sequence[dict], gt) -> None:
    """Raises ValueError naming the first result that is not a dict, lacks a key, names an image or category
    id that is not in `gt` (a COCO object), or has a bbox that is not 4 finite numbers."""
    image_ids = set(gt.getImgIds())
    cat_ids = set(gt.getCatIds())
    for i, r in enumerate(results):
        _check_keys(i, r)
        if r["image_id"] not in image_ids:
            raise ValueError(f"results[{i}]: image id {r['image_id']} is not in the ground truth")
        if r["category_id"] not in cat_ids:
            raise ValueError(f"results[{i}]: category id {r['category_id']} is not in the ground truth's "
                             f"categories {sorted(cat_ids)} (a contiguous index written instead of an id?)")
        bbox = r["bbox"]
        if len(bbox) != 4 or not all(math.isfinite(float(v)) for v in bbox):
            raise ValueError(f"results[{i}]: bbox must be 4 finite numbers [x, y, w, h], got {bbox}")


def _check_keys(i: int, result) -> None:
    if not isinstance(result, Mapping):
        raise ValueError(f"results[{i}] is not a dict")
    missing = {"image_id", "category_id", "bbox", "score"} - set(result)
    if missing:
        raise ValueError(f"results[{i}] lacks {sorted(missing)}")


def eval_image_ids(img_ids, gt) -> list[int]:
    """The sorted image ids to score: `img_ids`, or every image of `gt` when None; ValueError for ids that
    are not in the ground truth."""
    known = set(gt.getImgIds())
    if img_ids is None:
        return sorted(known)
    ids = sorted({int(i) for i in img_ids})
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise ValueError(f"img_ids: {len(unknown)} ids not in the ground truth, e.g. {unknown[:5]}")
    return ids


def count_ground_truth(gt, img_ids: Iterable[int], cat_ids: Sequence[int]) -> np.ndarray:
    """The boxes COCOeval counts as objects to find.

    Args:
      gt: a ground-truth COCO object.
      img_ids: the evaluated image ids.
      cat_ids: K category ids.

    Returns:
      int64 [K]: non-crowd ground-truth boxes of each category on those images (crowd boxes are ignore
      regions).
    """
    images = set(img_ids)
    index = {int(c): k for k, c in enumerate(cat_ids)}
    counts = np.zeros(len(index), dtype=np.int64)
    for ann in gt.dataset["annotations"]:
        if ann["image_id"] in images and not ann.get("iscrowd", 0) and ann["category_id"] in index:
            counts[index[ann["category_id"]]] += 1
    return counts


def category_names(gt, cat_ids: Sequence[int]) -> tuple[str, ...]:
    """The 'name' of each category id of `gt` (the id as text when a category has none)."""
    names = {c["id"]: str(c.get("name", c["id"])) for c in gt.dataset["categories"]}
    return tuple(names[int(c)] for c in cat_ids)


def all_area_precision(coco_eval, max_dets: int = 100) -> np.ndarray:
    """COCOeval's accumulated precision at area range 'all' and `max_dets` detections per image.

    Args:
      coco_eval: a COCOeval of either library after `accumulate()`.
      max_dets: one of its params.maxDets.

    Returns:
      float64 [T, R, K]: eval['precision'][:, :, :, 'all', max_dets]; T and K follow params.iouThrs and
      params.catIds, R params.recThrs; -1 where a category has no ground truth.
    """
    p = coco_eval.params
    area = list(p.areaRngLbl).index("all")
    dets = [int(m) for m in p.maxDets].index(int(max_dets))
    return np.asarray(coco_eval.eval["precision"], dtype=np.float64)[:, :, :, area, dets]


class CocoEvaluation(NamedTuple):
    """One COCO bbox evaluation: the summary numbers and the per-category precision behind them.

    metrics: {name: float} for METRIC_NAMES.
    summary: the text COCOeval printed.
    precision: float64 [T, R, K]: COCOeval's eval['precision'] at area 'all' and 100 detections per image,
      the interpolated precision at IoU threshold t and recall threshold r for category k; -1 where category
      k has no ground truth on the evaluated images. With no detections at all (COCOeval not run) it is what
      COCOeval gives then: 0 where there is ground truth.
    iou_thrs: float64 [T] (0.50, 0.55, ..., 0.95).
    rec_thrs: float64 [R] (0.00, 0.01, ..., 1.00).
    cat_ids: int64 [K], ascending (COCOeval's order).
    names: K category names, in cat_ids order.
    num_gt: int64 [K]: non-crowd ground-truth boxes per category on the evaluated images.
    backend: PYCOCOTOOLS or FASTER_COCO_EVAL.
    """

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
    """Like `evaluate`, and also returns COCOeval's printed summary and its per-category precision.

    Args:
      coco_gt: as for `evaluate`.
      results: as for `evaluate`.
      img_ids: as for `evaluate`.
      use_faster: use faster-coco-eval when it is installed.

    Returns:
      CocoEvaluation.

    Raises:
      FileNotFoundError: coco_gt is a path that does not exist.
      ValueError: an unusable coco_gt (one without annotations included), img_ids not in the ground truth,
        or malformed results (see `evaluate`).
    """
    lib = backend(use_faster)
    out = io.StringIO()
    gt = load_ground_truth(coco_gt, lib, out)
    eval_ids = eval_image_ids(img_ids, gt)
    check_results(results, gt)
    evaluated = set(eval_ids)
    if not eval_ids or not any(r["image_id"] in evaluated for r in results):
        params = lib.cocoeval(gt, None).params
        cat_ids = np.asarray(sorted(gt.getCatIds()), dtype=np.int64)
        num_gt = count_ground_truth(gt, eval_ids, cat_ids)
        shape = (len(params.iouThrs), len(params.recThrs), len(cat_ids))
        precision = np.broadcast_to(np.where(num_gt > 0, 0.0, -1.0), shape).copy()
        return CocoEvaluation({name: 0.0 for name in METRIC_NAMES},
                              "no detections on the evaluated images: every metric is 0\n", precision,
                              np.asarray(params.iouThrs, dtype=np.float64), np.asarray(params.recThrs, np.float64),
                              cat_ids, category_names(gt, cat_ids), num_gt, lib.name)
    dt = load_results(gt, results, out)
    with contextlib.redirect_stdout(out):
        coco_eval = lib.cocoeval(gt, dt)
        coco_eval.params.imgIds = eval_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    stats = np.asarray(coco_eval.stats, dtype=np.float64)[: len(METRIC_NAMES)]
    p = coco_eval.params
    cat_ids = np.asarray([int(c) for c in p.catIds], dtype=np.int64)
    return CocoEvaluation(
        metrics={name: float(v) for name, v in zip(METRIC_NAMES, stats)},
        summary=out.getvalue(),
        precision=all_area_precision(coco_eval),
        iou_thrs=np.asarray(p.iouThrs, dtype=np.float64),
        rec_thrs=np.asarray(p.recThrs, dtype=np.float64),
        cat_ids=cat_ids,
        names=category_names(gt, cat_ids),
        num_gt=count_ground_truth(gt, eval_ids, cat_ids),
        backend=lib.name,
    )


def evaluate(coco_gt, results: Sequence[dict], img_ids=None, use_faster: bool = True) -> dict[str, float]:
    """COCO bbox metrics of `results` against the ground truth; nothing is printed.

    Args:
      coco_gt: an annotation file path, a COCO-format dict, or a pycocotools / faster-coco-eval COCO object.
      results: result dicts (see `detections_to_coco`), gathered from every rank and de-duplicated.
      img_ids: the image ids that were run (default: every ground-truth image).
      use_faster: use faster-coco-eval when it is installed (same numbers).

    Returns:
      {name: float} for METRIC_NAMES (bbox_mAP, bbox_mAP_50, ..., AR_l); all 0.0 when no result falls on
      an evaluated image.

    Raises:
      FileNotFoundError: coco_gt is a path that does not exist.
      ValueError: an unusable coco_gt (an image-info file without 'annotations' included), img_ids not in
        the ground truth, or a result that is not a dict, lacks a key, names an unknown image or category
        id, or has a bbox that is not 4 finite numbers.
    """
    return evaluate_detailed(coco_gt, results, img_ids, use_faster).metrics


def write_results(path: str, results: Sequence[dict]) -> str:
    """Writes result dicts as a COCO results file (the format the COCO evaluation server takes): a JSON
    list of {'image_id', 'category_id' (the annotation file's id), 'bbox' [x, y, w, h], 'score'}; other keys
    are kept. Written to a temporary file first, then renamed.

    Args:
      path: the file to write; its folder must exist.
      results: result dicts (see `detections_to_coco`).

    Returns:
      path.

    Raises:
      ValueError: a result that is not a dict or lacks one of the four keys.
    """
    for i, r in enumerate(results):
        _check_keys(i, r)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(list(results), f)
    os.replace(tmp, path)
    return path
