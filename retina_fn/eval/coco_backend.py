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
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
from typing import Iterable, Mapping, NamedTuple, Sequence

import numpy as np

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

