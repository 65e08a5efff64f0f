"""COCO-format annotation files: parsing, validation, mmdetection's box and image filters, the category
table and the records of its images.

Parsing is done here (json + checks) rather than through pycocotools' loader so that every problem names
the file, the image id or the annotation id and what is wrong; the evaluator still reads the original
JSON with pycocotools.

Rules (mmdetection v2.9.0 `CocoDataset`):
- bbox [x, y, w, h] becomes [x, y, x + w, y + h] (float32, no '+1', not clipped here: a box that starts
  left of or above the image keeps its negative x / y and the resize clips it to the image, as
  mmdetection's Resize with bbox_clip_border does).
- Errors (mmdetection would pass them on): a bbox or area that is not a finite number (Python's json
  reads NaN and Infinity), an image id or an annotation id that appears twice.
- An annotation is dropped, and counted, when it has a true `ignore` flag, does not overlap the image,
  has `area` <= 0 (the file's area, w * h when absent), or w < 1 or h < 1 (negative sizes included).
- `iscrowd` boxes that survive these checks become ignore regions, never positives.
- An annotation whose category id is not in `categories` is an error (mmdetection drops it silently;
  here it almost always means the wrong file or a mis-edited category list).
- Training filters (`filter_empty_gt`, `min_size`): an image is kept when it has at least one annotation
  (mmdetection counts any annotation, crowd or later dropped, not just usable boxes) and its shorter side
  is >= min_size.
- A file without an 'annotations' key is an image-info file (COCO test-dev's image_info_*.json): it loads
  (`CocoSet.has_annotations` False) for producing detections; `load_split` refuses it for training.

Entry-level checks of the file: `retina_fn.data.coco_schema`; image decoding: `retina_fn.data.images`
(both re-exported here).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from retina_fn import errors
from retina_fn.data.coco_schema import (CocoFormatError, bbox_field, int_field, parse_images, read_json,
                                        resolve_image_path)
from retina_fn.data.images import ImageLoadError, decode_image, load_record_image

__all__ = [
    "DROP_REASONS", "CocoFormatError", "CocoSet", "ImageLoadError", "ImageRecord", "LabelMap", "decode_image",
    "load_coco", "load_record_image", "load_split", "resolve_image_path",
]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------
# Category table


@dataclasses.dataclass(frozen=True)
class LabelMap:
    """Contiguous class index 0..K-1 <-> the file's category ids (sorted ascending) and names.

    Stored with checkpoints and results (`to_dict` / `from_dict`) so detections map back to the ids of
    the annotation file the model was trained on.
    """

    category_ids: tuple[int, ...]
    names: tuple[str, ...]

    def __post_init__(self):
        ids = tuple(int(i) for i in self.category_ids)
        names = tuple(str(n) for n in self.names)
        if len(ids) != len(names):
            raise ValueError(f"LabelMap: {len(ids)} category ids but {len(names)} names")
        if len(ids) == 0:
            raise ValueError("LabelMap: no categories")
        if list(ids) != sorted(set(ids)):
            raise ValueError(f"LabelMap: category ids must be unique and ascending, got {list(ids)}")
        object.__setattr__(self, "category_ids", ids)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "_index", {cid: i for i, cid in enumerate(ids)})

    @classmethod
    def from_categories(cls, categories: Sequence[Mapping[str, Any]], source: str = "categories") -> "LabelMap":
        """From a COCO `categories` list of {'id', 'name', ...}; `source` names the file in errors."""
        if not isinstance(categories, (list, tuple)) or not categories:
            raise CocoFormatError(f"{source}: 'categories' must be a non-empty list")
        by_id: dict[int, str] = {}
        for pos, cat in enumerate(categories):
            if not isinstance(cat, Mapping):
                raise CocoFormatError(f"{source}: categories[{pos}] is not an object")
            cid = int_field(cat, "id", f"{source}: categories[{pos}]")
            name = cat.get("name")
            if not isinstance(name, str):
                raise CocoFormatError(f"{source}: category id {cid} has no string 'name'")
            if cid in by_id:
                raise CocoFormatError(f"{source}: category id {cid} appears twice")
            by_id[cid] = name
        ids = sorted(by_id)
        return cls(tuple(ids), tuple(by_id[i] for i in ids))

    def __contains__(self, category_id: int) -> bool:
        return int(category_id) in self._index

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def index_of(self, category_id: int) -> int:
        """The contiguous index of a category id; ValueError when the id is unknown."""
        try:
            return self._index[int(category_id)]
        except KeyError:
            raise ValueError(f"unknown category id {category_id}; known ids: {list(self.category_ids)}") from None

    def category_id(self, index: int) -> int:
        """The category id of a contiguous index."""
        if not 0 <= int(index) < self.num_classes:
            raise ValueError(f"class index {index} outside 0..{self.num_classes - 1}")
        return self.category_ids[int(index)]

    def to_category_ids(self, indices) -> np.ndarray:
        """Array of contiguous indices (any shape, numpy or tensor) -> int64 array of category ids."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_classes):
            raise ValueError(f"class indices must be in 0..{self.num_classes - 1}")
        return np.asarray(self.category_ids, dtype=np.int64)[idx]

    def to_dict(self) -> dict:
        """{'category_ids': [...], 'names': [...]}, JSON-serialisable."""
        return {"category_ids": list(self.category_ids), "names": list(self.names)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LabelMap":
        """Inverse of `to_dict`."""
        missing = {"category_ids", "names"} - set(d)
        if missing:
            raise ValueError(f"LabelMap.from_dict: missing {sorted(missing)}")
        return cls(tuple(d["category_ids"]), tuple(d["names"]))

    def check_same(self, other: "LabelMap", what: str = "the two label maps") -> None:
        """Raises ValueError naming the first difference when `other` has other categories (for instance
        a validation file whose category list differs from the training file's)."""
        if self == other:
            return
        if self.num_classes != other.num_classes:
            raise ValueError(f"{what} differ: {self.num_classes} vs {other.num_classes} categories")
        for i, (a, b) in enumerate(zip(zip(self.category_ids, self.names), zip(other.category_ids, other.names))):
            if a != b:
                raise ValueError(f"{what} differ at class index {i}: (id, name) {a} vs {b}")


# ----------------------------------------------------------------------------------------------------
# Records


class ImageRecord(NamedTuple):
    """One image of an annotation file, after the box filters.

    boxes float32 [N, 4] xyxy in original pixels; labels int64 [N] contiguous indices;
    ignore_boxes float32 [M, 4] crowd regions; num_annotations counts every annotation of the image
    (before the filters, crowd included).
    """

    image_id: int
    file_name: str
    path: str
    height: int
    width: int
    boxes: np.ndarray
    labels: np.ndarray
    ignore_boxes: np.ndarray
    num_annotations: int


@dataclasses.dataclass(frozen=True)
class CocoSet:
    """A parsed annotation file: its category table, image records (file order) and counts of what the
    filters removed (keys: see `DROP_REASONS`, plus 'images_empty' and 'images_small').

    has_annotations is False for an image-info file (images and categories, no 'annotations' key, as COCO
    test-dev's): its records have no boxes, and it can be run and its detections written, not scored or
    trained on."""

    ann_file: str
    image_root: str
    label_map: LabelMap
    records: tuple[ImageRecord, ...]
    counts: Mapping[str, int]
    has_annotations: bool = True

    def __len__(self) -> int:
        return len(self.records)


DROP_REASONS = ("ignore_flag", "outside_image", "zero_area", "too_small")


@dataclasses.dataclass
class _ImageAnnotations:
    """What one image collects while the annotations are read."""

    boxes: list = dataclasses.field(default_factory=list)
    labels: list = dataclasses.field(default_factory=list)
    ignore_boxes: list = dataclasses.field(default_factory=list)
    count: int = 0


def _kept_records(images: dict, per_image: dict, filter_empty_gt: bool, min_size: int, counts: dict
                  ) -> list[ImageRecord]:
    """One ImageRecord per image that passes the training filters, in file order; counts the others
    (counts['images_empty'], counts['images_small'])."""
    records = []
    counts.update(images_empty=0, images_small=0)
    for image_id, (file_name, height, width, path) in images.items():
        acc = per_image[image_id]
        if filter_empty_gt and acc.count == 0:
            counts["images_empty"] += 1
            continue
        if min(height, width) < min_size:
            counts["images_small"] += 1
            continue
        records.append(ImageRecord(
            image_id=image_id, file_name=file_name, path=path, height=height, width=width,
            boxes=np.asarray(acc.boxes, dtype=np.float32).reshape(-1, 4),
            labels=np.asarray(acc.labels, dtype=np.int64).reshape(-1),
            ignore_boxes=np.asarray(acc.ignore_boxes, dtype=np.float32).reshape(-1, 4),
            num_annotations=acc.count))
    return records


def _annotation_ids(ann, pos: int, ann_file: str, images: Mapping, label_map: LabelMap,
                    seen_ids: dict[int, int]) -> tuple[str, int, int]:
    """Checks the ids of annotation number `pos` and records its id in `seen_ids`.

    Returns:
        (where, image_id, category_id): `where` names the file, annotation id and image id in errors.

    Raises:
        CocoFormatError: not an object, a missing or non-integer id, an annotation id seen before, an
            image id not in 'images' or a category id not in 'categories'.
    """
    where = f"{ann_file}: annotations[{pos}]"
    if not isinstance(ann, Mapping):
        raise CocoFormatError(f"{where} is not an object")
    ann_id = int_field(ann, "id", where)
    if ann_id in seen_ids:
        raise CocoFormatError(f"{ann_file}: annotation id {ann_id} appears twice in 'annotations' (at "
                              f"positions {seen_ids[ann_id]} and {pos}); pycocotools would keep only one")
    seen_ids[ann_id] = pos
    where = f"{ann_file}: annotation id {ann_id}"
    image_id = int_field(ann, "image_id", where)
    if image_id not in images:
        raise CocoFormatError(f"{where}: image_id {image_id} is not in 'images'")
    where = f"{where} (image id {image_id})"
    category_id = int_field(ann, "category_id", where)
    if category_id not in label_map:
        raise CocoFormatError(f"{where}: category_id {category_id} is not in 'categories' "
                              f"(known ids: {list(label_map.category_ids)})")
    return where, image_id, category_id


def load_coco(ann_file: str, image_root: str, *, filter_empty_gt: bool = False, min_size: int = 0) -> CocoSet:
    """Reads and validates a COCO-format detection file.

    ann_file: the JSON file; image_root: the folder `file_name`s are relative to. filter_empty_gt and
    min_size are the training filters (evaluation keeps every image). Raises CocoFormatError naming the
    file and the image or annotation id for malformed input; logs one summary line of dropped boxes.
    """
    data = read_json(ann_file)
    label_map = LabelMap.from_categories(data["categories"], ann_file)
    images = parse_images(data["images"], ann_file, image_root)
    counts = {reason: 0 for reason in DROP_REASONS}
    counts.update(crowd=0, boxes=0)
    per_image = {image_id: _ImageAnnotations() for image_id in images}
    seen_ids: dict[int, int] = {}  # annotation id -> its position in the list

    for pos, ann in enumerate(data.get("annotations", [])):
        where, image_id, category_id = _annotation_ids(ann, pos, ann_file, images, label_map, seen_ids)
        x, y, w, h = bbox_field(ann, where)
        acc = per_image[image_id]
        acc.count += 1
        height, width = images[image_id][1:3]
        reason = _drop_reason(ann, x, y, w, h, height, width, where)
        if reason is not None:
            counts[reason] += 1
            continue
        box = [x, y, x + w, y + h]
        if ann.get("iscrowd", 0):
            acc.ignore_boxes.append(box)
            counts["crowd"] += 1
        else:
            acc.boxes.append(box)
            acc.labels.append(label_map.index_of(category_id))
            counts["boxes"] += 1

    records = _kept_records(images, per_image, filter_empty_gt, min_size, counts)
    has_annotations = "annotations" in data
    if not has_annotations:
        logger.info("%s: no 'annotations' (an image-info file): its images can be run for detections, not scored",
                    ann_file)
    dropped = sum(counts[r] for r in DROP_REASONS)
    log = logger.warning if dropped else logger.info
    log("%s: %d of %d images kept (%d without annotations, %d with short side < %d removed); %d boxes, "
        "%d crowd regions; %d annotations dropped (%s)", ann_file, len(records), len(images),
        counts["images_empty"], counts["images_small"], min_size, counts["boxes"], counts["crowd"], dropped,
        ", ".join(f"{r}={counts[r]}" for r in DROP_REASONS))
    return CocoSet(ann_file, image_root, label_map, tuple(records), dict(counts), has_annotations)


def load_split(data_cfg, split: str) -> CocoSet:
    """The 'train' or 'val' file of a config's `data` block (root + train_ann/train_images or the val
    pair); training applies `filter_empty_gt` and `min_size`. The 'val' file may be an image-info file
    (no 'annotations', as COCO test-dev's); the 'train' file may not (CocoFormatError). A missing file is a
    MissingFileError naming the config fields that point at it."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if not data_cfg.root:
        raise errors.ConfigError("data.root is not set: --config.data.root=DIR names the dataset's folder")
    ann = os.path.join(data_cfg.root, data_cfg[f"{split}_ann"])
    images = os.path.join(data_cfg.root, data_cfg[f"{split}_images"])
    if not os.path.isfile(ann):
        raise errors.MissingFileError(
            f"annotation file not found: {ann} (data.root={data_cfg.root!r} joined with data.{split}_ann="
            f"{data_cfg[f'{split}_ann']!r}; point --config.data.root or --config.data.{split}_ann at the file)")
    if split == "val":
        return load_coco(ann, images)
    coco_set = load_coco(ann, images, filter_empty_gt=data_cfg.filter_empty_gt, min_size=data_cfg.min_size)
    if not coco_set.has_annotations:
        raise CocoFormatError(f"{ann}: no 'annotations' list (an image-info file, such as COCO test-dev's): "
                              f"nothing to train on; it can only be evaluated for detections "
                              f"(--config.data.train_ann names the training file)")
    return coco_set


def _drop_reason(ann: Mapping, x: float, y: float, w: float, h: float, height: int, width: int,
                 where: str) -> str | None:
    """Which of mmdetection's annotation filters removes this box, or None to keep it; CocoFormatError
    when its 'area' is not a finite number (checked for every annotation, dropped or not)."""
    area = ann.get("area", w * h)
    if isinstance(area, bool) or not isinstance(area, (int, float)) or not math.isfinite(area):
        raise CocoFormatError(f"{where}: 'area' must be a finite number, got {area!r}")
    if ann.get("ignore", False):
        return "ignore_flag"
    inter_w = max(0.0, min(x + w, width) - max(x, 0.0))
    inter_h = max(0.0, min(y + h, height) - max(y, 0.0))
    if inter_w * inter_h == 0:
        return "outside_image"
    if area <= 0:
        return "zero_area"
    if w < 1 or h < 1:
        return "too_small"
    return None
