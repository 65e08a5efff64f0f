"""The two COCO evaluation libraries behind one interface, and what they read: pycocotools or faster-coco-eval
(`backend`), the ground truth and the results as their COCO objects, the image ids to score and the ground
truth's counts and names.

    lib = backend(use_faster=True)                 # faster-coco-eval when installed, else pycocotools
    gt = load_ground_truth(val_ann_file, lib, out) # out: an io.StringIO for what the library prints
    dt = load_results(gt, results, out)            # results checked first (coco_results.check_results)
    coco_eval = lib.cocoeval(gt, dt)

Both libraries give the same numbers and leave the same `eval['precision']` array. An image-info file
(images and categories, no 'annotations', as COCO test-dev's) cannot be scored: loading one as ground truth
is a ValueError.

The ground truth is built from the entries the loader's schema checked (`retina_fn.data.coco_schema`), not
by the library reading the file itself: a file that loaded for training is scored the same way, whatever its
encoding or its flags' types, and a file the schema refuses is refused here with the same CocoFormatError.
The annotations get the ids 1..N in file order: COCOeval marks a detection's match with the id of its ground
truth and takes 0 for "unmatched", so a file whose ids start at 0 would lose a true positive. Each
annotation keeps its bbox, its iscrowd flag and its area (w * h where the file has none); COCOeval reads
no 'ignore' flag (it takes iscrowd for it), and neither does this ground truth.
"""

from __future__ import annotations

import contextlib
import io
import os
from typing import Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from retina_fn.data import coco_schema

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
      coco_gt: an annotation file path, a `retina_fn.data.coco.CocoSet` (its checked entries are used, the
        file is not read again), a `coco_schema.GroundTruth`, a COCO-format dict, or a COCO object of
        either library: `lib`'s own is used as is (the caller vouches for it), the other's dataset is
        checked like a dict.
      lib: the library.
      out: receives what the library prints.

    Returns:
      A `lib.coco_cls` instance with its index built (`coco_dataset`).

    Raises:
      FileNotFoundError: coco_gt is a path that does not exist.
      CocoFormatError: (a ValueError) the file or dict breaks the schema, naming the entry.
      ValueError: coco_gt is none of the above, or has no 'annotations' list (an image-info file, such as COCO
        test-dev's, has nothing to score against).
    """
    if isinstance(coco_gt, lib.coco_cls):
        _require_lists(coco_gt.dataset, "coco_gt")
        return coco_gt
    truth = ground_truth_of(coco_gt)
    if not truth.has_annotations:
        raise ValueError(_missing(truth.source, "annotations"))
    gt = lib.coco_cls()
    gt.dataset = coco_dataset(truth)
    with contextlib.redirect_stdout(out):
        gt.createIndex()
    return gt


def ground_truth_of(coco_gt) -> coco_schema.GroundTruth:
    """The checked entries of any ground truth `load_ground_truth` takes but a COCO object of its library.

    Raises:
      FileNotFoundError, CocoFormatError: for a path, as `coco_schema.read_json`; CocoFormatError for a dict
        that breaks the schema; ValueError for anything else.
    """
    if isinstance(coco_gt, coco_schema.GroundTruth):
        return coco_gt
    if isinstance(getattr(coco_gt, "ground_truth", None), coco_schema.GroundTruth):  # a CocoSet
        return coco_gt.ground_truth
    if isinstance(getattr(coco_gt, "ann_file", None), str):  # a CocoSet built without its entries
        coco_gt = coco_gt.ann_file
    if isinstance(coco_gt, (str, os.PathLike)):
        path = os.fspath(coco_gt)
        return coco_schema.parse_ground_truth(coco_schema.read_json(path), path)
    if not isinstance(coco_gt, Mapping) and isinstance(getattr(coco_gt, "dataset", None), Mapping):
        coco_gt = coco_gt.dataset  # the other library's COCO object
    if isinstance(coco_gt, Mapping):
        return coco_schema.parse_ground_truth(coco_gt, "coco_gt")
    raise ValueError(f"coco_gt must be a path, a CocoSet, a COCO dict or a COCO object, got {type(coco_gt).__name__}")


def coco_dataset(truth: coco_schema.GroundTruth) -> dict:
    """A COCO ground-truth dict of checked entries, for a COCO object's `dataset`.

    Args:
      truth: the checked entries of an annotation file.

    Returns:
      {'images': [{'id', 'height', 'width', 'file_name'}], 'categories': [{'id', 'name', 'supercategory' where
      the file gives one}], 'annotations': [{'id': 1..N in file order, 'image_id', 'category_id', 'bbox'
      [x, y, w, h], 'area', 'iscrowd' 0 / 1}]}, Python numbers only.
    """
    images = [{"id": i, "height": h, "width": w, "file_name": name} for i, h, w, name in
              zip(truth.image_ids.tolist(), truth.heights.tolist(), truth.widths.tolist(), truth.file_names)]
    categories = [{"id": c, "name": name, **({} if sup is None else {"supercategory": sup})} for c, name, sup in
                  zip(truth.category_ids.tolist(), truth.names, truth.supercategories)]
    annotations = [{"id": k + 1, "image_id": i, "category_id": c, "bbox": box, "area": area, "iscrowd": int(crowd)}
                   for k, (i, c, box, area, crowd) in enumerate(zip(
                       truth.ann_image_ids.tolist(), truth.ann_category_ids.tolist(), truth.bboxes.tolist(),
                       truth.areas.tolist(), truth.iscrowd.tolist()))]
    return {"images": images, "categories": categories, "annotations": annotations}


def _require_lists(dataset: Mapping, source: str) -> None:
    for key in ("images", "annotations", "categories"):
        if key not in dataset:
            raise ValueError(_missing(source, key))


def _missing(source: str, key: str) -> str:
    hint = (" (an image-info file, such as COCO test-dev's: detections on it can be written as a results file, "
            "not scored)") if key == "annotations" else ""
    return f"{source}: the ground truth has no '{key}' list{hint}"


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

