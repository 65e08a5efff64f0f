"""COCO-format annotation files: mmdetection's box and image filters over the entries `coco_schema` checked,
the category table and the image records. The CocoSet keeps the parsed `GroundTruth`, which the evaluator
scores against.

Rules (mmdetection v2.9.0 `CocoDataset`):
- bbox [x, y, w, h] becomes [x, y, x + w, y + h] (float32, no '+1', not clipped here: the resize clips,
  as mmdetection's Resize with bbox_clip_border does).
- An annotation is dropped, and counted, when it has `ignore` 1, does not overlap the image, has `area` <= 0
  (the file's, w * h when absent), or w < 1 or h < 1. Surviving `iscrowd` boxes become ignore regions.
- Unlike mmdetection (which passes them on or drops them silently), a non-finite bbox or area, a repeated
  image or annotation id, and a category id missing from `categories` are errors.
- Training filters: `filter_empty_gt` keeps an image with at least one annotation of any kind (as
  mmdetection counts), `min_size` one whose shorter side is >= min_size.
- A file without 'annotations' (an image-info file, as COCO test-dev's) loads with `has_annotations`
  False, for detections only; `load_split` refuses it for training."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from retina_fn import errors
from retina_fn.data import transforms
from retina_fn.data.coco_schema import (CocoFormatError, GroundTruth, parse_categories, parse_ground_truth, read_json,
                                        resolve_image_path)
from retina_fn.data.images import ImageLoadError, decode_image, load_record_image

__all__ = ["DROP_REASONS", "CocoFormatError", "CocoSet", "GroundTruth", "ImageLoadError", "ImageRecord", "LabelMap",
           "decode_image", "load_coco", "load_record_image", "load_split", "resolve_image_path"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LabelMap:
    """Contiguous class index 0..K-1 <-> the file's category ids (sorted ascending) and names; stored with
    checkpoints and results so detections map back to the training file's ids."""
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
        ids, names, _ = parse_categories(categories, source)
        by_id = dict(zip(ids, names))
        return cls(tuple(sorted(by_id)), tuple(by_id[i] for i in sorted(by_id)))

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

    def to_dict(self) -> dict:
        """{'category_ids': [...], 'names': [...]}, JSON-serialisable."""
        return {"category_ids": list(self.category_ids), "names": list(self.names)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LabelMap":
        """Inverse of `to_dict`."""
        if missing := {"category_ids", "names"} - set(d):
            raise ValueError(f"LabelMap.from_dict: missing {sorted(missing)}")
        return cls(tuple(d["category_ids"]), tuple(d["names"]))


class ImageRecord(NamedTuple):
    """One image after the box filters: boxes float32 [N, 4] xyxy in original pixels; labels int64 [N]
    contiguous indices; ignore_boxes float32 [M, 4] crowd regions; num_annotations: all of the image's
    annotations before the filters, crowd included."""
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
    """A parsed annotation file: category table, image records (file order), counts of what the filters
    removed (`DROP_REASONS`, 'images_empty', 'images_small'), has_annotations (False for an image-info
    file), and ground_truth: every checked entry before any filter, what `retina_fn.eval` scores against."""
    ann_file: str
    image_root: str
    label_map: LabelMap
    records: tuple[ImageRecord, ...]
    counts: Mapping[str, int]
    has_annotations: bool = True
    ground_truth: GroundTruth | None = None

    def __len__(self) -> int:
        return len(self.records)


DROP_REASONS = ("ignore_flag", "outside_image", "zero_area", "too_small")


def _drop_reasons(gt: GroundTruth, image_index: np.ndarray) -> np.ndarray:
    """int64 [N]: 0 to keep each annotation, else 1 + the index in DROP_REASONS of the first filter that
    drops it; image_index int64 [N] is each annotation's row in gt's images."""
    x, y, w, h = gt.bboxes.T
    height, width = gt.heights[image_index].astype(np.float64), gt.widths[image_index].astype(np.float64)
    inter_w = np.maximum(0.0, np.minimum(x + w, width) - np.maximum(x, 0.0))
    inter_h = np.maximum(0.0, np.minimum(y + h, height) - np.maximum(y, 0.0))
    reasons = [gt.ignore, inter_w * inter_h == 0, gt.areas <= 0, (w < 1) | (h < 1)]
    return np.select(reasons, np.arange(1, len(reasons) + 1), 0)


def _rows_per_image(image_index: np.ndarray, rows: np.ndarray, num_images: int) -> list[np.ndarray]:
    """`rows` grouped by image: one int64 array per image, in annotation order."""
    rows = rows[np.argsort(image_index[rows], kind="stable")]
    return np.split(rows, np.cumsum(np.bincount(image_index[rows], minlength=num_images))[:-1])


def _records(gt: GroundTruth, label_map: LabelMap, image_root: str, filter_empty_gt: bool, min_size: int,
             counts: dict) -> list[ImageRecord]:
    """The ImageRecords of the images the training filters keep, in file order; fills `counts`."""
    num_images = len(gt.image_ids)
    order = np.argsort(gt.image_ids, kind="stable")
    image_index = order[np.searchsorted(gt.image_ids, gt.ann_image_ids, sorter=order)]
    reasons = _drop_reasons(gt, image_index)
    counts.update({reason: int((reasons == k + 1).sum()) for k, reason in enumerate(DROP_REASONS)})
    kept = reasons == 0
    box_rows = _rows_per_image(image_index, np.flatnonzero(kept & ~gt.iscrowd), num_images)
    crowd_rows = _rows_per_image(image_index, np.flatnonzero(kept & gt.iscrowd), num_images)
    counts.update(crowd=sum(map(len, crowd_rows)), boxes=sum(map(len, box_rows)), images_empty=0, images_small=0)
    x, y, w, h = gt.bboxes.T
    xyxy = np.stack([x, y, x + w, y + h], axis=1).astype(np.float32)
    labels = np.searchsorted(np.asarray(label_map.category_ids, np.int64), gt.ann_category_ids)
    per_image = np.bincount(image_index, minlength=num_images)
    records = []
    for i, (image_id, height, width) in enumerate(zip(gt.image_ids.tolist(), gt.heights.tolist(), gt.widths.tolist())):
        if filter_empty_gt and per_image[i] == 0:
            counts["images_empty"] += 1
            continue
        if min(height, width) < min_size:
            counts["images_small"] += 1
            continue
        file_name = gt.file_names[i]
        records.append(ImageRecord(
            image_id=image_id, file_name=file_name, path=resolve_image_path(image_root, file_name), height=height,
            width=width, boxes=xyxy[box_rows[i]], labels=labels[box_rows[i]].astype(np.int64),
            ignore_boxes=xyxy[crowd_rows[i]], num_annotations=int(per_image[i])))
    return records


def load_coco(ann_file: str, image_root: str, *, filter_empty_gt: bool = False, min_size: int = 0) -> CocoSet:
    """Reads and validates a COCO-format detection file; logs one summary line of what was dropped.

    Args:
        ann_file: the JSON file; image_root: the folder `file_name`s are relative to.
        filter_empty_gt, min_size: the training filters (evaluation keeps every image).
    Raises:
        MissingFileError: the file does not exist.
        CocoFormatError: anything the schema refuses, naming the file and the image or annotation id."""
    gt = parse_ground_truth(read_json(ann_file), ann_file)
    label_map = LabelMap(tuple(sorted(gt.category_ids.tolist())),
                         tuple(n for _, n in sorted(zip(gt.category_ids.tolist(), gt.names))))
    counts: dict[str, int] = {}
    records = _records(gt, label_map, image_root, filter_empty_gt, min_size, counts)
    if not gt.has_annotations:
        logger.info("%s: no 'annotations' (an image-info file): its images can be run for detections, not scored",
                    ann_file)
    dropped = sum(counts[r] for r in DROP_REASONS)
    log = logger.warning if dropped else logger.info
    log("%s: %d of %d images kept (%d without annotations, %d with short side < %d removed); %d boxes, "
        "%d crowd regions; %d annotations dropped (%s)", ann_file, len(records), len(gt.image_ids),
        counts["images_empty"], counts["images_small"], min_size, counts["boxes"], counts["crowd"], dropped,
        ", ".join(f"{r}={counts[r]}" for r in DROP_REASONS))
    return CocoSet(ann_file, image_root, label_map, tuple(records), dict(counts), gt.has_annotations, gt)


def load_split(data_cfg, split: str) -> CocoSet:
    """The 'train' or 'val' file of a config's `data` block (root joined with {split}_ann / {split}_images);
    training applies filter_empty_gt and min_size and refuses an image-info file (CocoFormatError).
    Raises:
        MissingFileError: naming the config fields that point at the missing file.
        ResizeError: (`retina_fn.data.resize`) a kept image data.scale would resize to a side of 0 pixels."""
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
        coco_set = load_coco(ann, images)
    else:
        coco_set = load_coco(ann, images, filter_empty_gt=data_cfg.filter_empty_gt, min_size=data_cfg.min_size)
        if not coco_set.has_annotations:
            raise CocoFormatError(f"{ann}: no 'annotations' list (an image-info file, such as COCO test-dev's): "
                                  f"nothing to train on; it can only be evaluated for detections "
                                  f"(--config.data.train_ann names the training file)")
    transforms.check_resizable(coco_set.records, data_cfg, ann)
    return coco_set
