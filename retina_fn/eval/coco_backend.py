"""The two COCO evaluation libraries (pycocotools, faster-coco-eval: the same numbers and `eval['precision']`)
behind one interface (`backend`), and what they read: ground truth and results as their COCO objects, the
image ids to score, the ground truth's counts and names.

The ground truth is built from the entries `retina_fn.data.coco_schema` checked, not read by the library,
so a file that loads for training scores the same way and a refused file gets the same CocoFormatError.
Annotations get the ids 1..N in file order (COCOeval takes match id 0 for "unmatched", so a file whose ids
start at 0 would lose a true positive) and keep bbox, iscrowd and area (w * h where absent); COCOeval reads
no 'ignore' flag. An image-info file (no 'annotations') cannot be scored: ValueError."""

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
    """(COCO, COCOeval_faster) from faster-coco-eval, or None when it is absent or fails to import."""
    try:
        from faster_coco_eval import COCO, COCOeval_faster
    except Exception:  # absent, or a broken build: fall back to pycocotools
        return None
    return COCO, COCOeval_faster


class Backend(NamedTuple):
    """One COCO evaluation library: its COCO and COCOeval classes. After `accumulate()` both leave eval['precision']
    float64 [T, R, K, A, M] (IoU, recall threshold, category, area range, max detections; -1 without ground
    truth), 'recall' [T, K, A, M] and 'scores' like 'precision'."""
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
    """The ground truth as an indexed COCO object of `lib` (printing to `out`).

    Args:
      coco_gt: an annotation file path, a CocoSet (its checked entries, the file not read again), a
        `coco_schema.GroundTruth`, a COCO-format dict, or a COCO object: `lib`'s own is used as is, the
        other library's dataset is checked like a dict.
    Raises:
      FileNotFoundError: coco_gt is a path that does not exist.
      CocoFormatError: (a ValueError) the file or dict breaks the schema, naming the entry.
      ValueError: coco_gt is none of the above, or has no 'annotations' list."""
    if isinstance(coco_gt, lib.coco_cls):
        for key in ("images", "annotations", "categories"):
            if key not in coco_gt.dataset:
                raise ValueError(_missing("coco_gt", key))
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
    """The checked entries of any `load_ground_truth` input except a COCO object of its own library."""
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
    """A COCO object's `dataset` dict of checked entries (Python numbers only; annotation ids 1..N)."""
    images = [{"id": i, "height": h, "width": w, "file_name": name} for i, h, w, name in
              zip(truth.image_ids.tolist(), truth.heights.tolist(), truth.widths.tolist(), truth.file_names)]
    categories = [{"id": c, "name": name, **({} if sup is None else {"supercategory": sup})} for c, name, sup in
                  zip(truth.category_ids.tolist(), truth.names, truth.supercategories)]
    rows = zip(truth.ann_image_ids.tolist(), truth.ann_category_ids.tolist(), truth.bboxes.tolist(),
               truth.areas.tolist(), truth.iscrowd.tolist())
    annotations = [{"id": k + 1, "image_id": i, "category_id": c, "bbox": box, "area": area, "iscrowd": int(crowd)}
                   for k, (i, c, box, area, crowd) in enumerate(rows)]
    return {"images": images, "categories": categories, "annotations": annotations}


def _missing(source: str, key: str) -> str:
    hint = (" (an image-info file, such as COCO test-dev's: detections on it can be written as a results file, "
            "not scored)") if key == "annotations" else ""
    return f"{source}: the ground truth has no '{key}' list{hint}"


def load_results(gt, results: Sequence[dict], out: io.StringIO):
    """Non-empty, checked result dicts as gt's library's detections object (`loadRes`, printing to `out`), given
    copies: loadRes writes 'area', 'id' and 'iscrowd' into its dicts."""
    with contextlib.redirect_stdout(out):
        return gt.loadRes([dict(r, bbox=list(r["bbox"])) for r in results])


def eval_image_ids(img_ids, gt) -> list[int]:
    """The sorted image ids to score: `img_ids` (ValueError for ids not in `gt`), or all of gt's when None."""
    known = set(gt.getImgIds())
    if img_ids is None:
        return sorted(known)
    ids = sorted({int(i) for i in img_ids})
    if unknown := [i for i in ids if i not in known]:
        raise ValueError(f"img_ids: {len(unknown)} ids not in the ground truth, e.g. {unknown[:5]}")
    return ids


def count_ground_truth(gt, img_ids: Iterable[int], cat_ids: Sequence[int]) -> np.ndarray:
    """int64 [K]: the non-crowd boxes of each of the K cat_ids on the images img_ids (what COCOeval finds)."""
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
