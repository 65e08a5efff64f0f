"""COCO's results format (host side): detections -> COCO result dicts (`detections_to_coco`, per batch),
merged across ranks (`merge_results`), checked against the ground truth, written as the COCO evaluation
server's results file (`write_results`).

Results use the annotation file's category ids and xywh boxes in original-image pixels, w = x2 - x1.
COCOeval caps detections at 100 per image *and category*; the official protocol keeps at most 100 per
image (the post-processing's max_per_img)."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np


def _to_numpy(x, name: str, dtype) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, on any device
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x, dtype=dtype)
    except (TypeError, ValueError, OverflowError) as err:  # OverflowError: an int outside int64
        raise ValueError(f"{name}: cannot be read as an array of {np.dtype(dtype).name}: {err}") from None


def category_id_table(label_map: Any) -> list[int]:
    """The K category ids of the contiguous class indices 0..K-1.

    Args:
      label_map: a sequence of ids; an object with a `category_ids` or `cat_ids` attribute (e.g. a LabelMap)
        or a `to_dict()` method; a mapping with a 'category_ids' or 'cat_ids' entry, or {index: id} with
        keys 0..K-1.
    Raises:
      ValueError: no ids found, a non-integer or repeated id, or mapping keys that are not 0..K-1."""
    table = None
    if isinstance(label_map, Mapping):
        if "category_ids" in label_map or "cat_ids" in label_map:
            table = label_map["category_ids" if "category_ids" in label_map else "cat_ids"]
        else:
            keys = sorted(label_map)
            if keys != list(range(len(keys))):
                raise ValueError("label_map: a mapping must hold 'category_ids' or map class indices 0..K-1 to ids, "
                                 f"got keys {keys[:10]}")
            table = [label_map[k] for k in keys]
    elif hasattr(label_map, "category_ids") or hasattr(label_map, "cat_ids"):
        table = getattr(label_map, "category_ids" if hasattr(label_map, "category_ids") else "cat_ids")
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
    """COCO result dicts for a set of detections (torch tensors on any device, or array-likes).

    Args:
      boxes: float [N, 4] xyxy in original-image pixels (or batched [B, M, 4]).
      scores: float [N]; labels: int [N] contiguous class indices; valid: optional bool [N] rows to keep
        (batched: [B, M]).
      image_ids: int [N] (batched: [B] or [B, M]); rows with a negative id (padding slots) are dropped.
      label_map: see `category_id_table`.
    Returns:
      [{'image_id', 'category_id', 'bbox': [x, y, w, h], 'score'}], Python numbers only, in input order.
    Raises:
      ValueError: shapes that do not fit, a class index outside 0..K-1, a non-finite box or score, an
        unreadable input, or a bad label_map."""
    cat_ids = np.asarray(category_id_table(label_map), dtype=np.int64)
    boxes = _to_numpy(boxes, "boxes", np.float64)
    scores = _to_numpy(scores, "scores", np.float64)
    labels = _to_numpy(labels, "labels", np.int64)
    image_ids = _to_numpy(image_ids, "image_ids", np.int64)
    if boxes.ndim < 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have shape [..., 4], got {list(boxes.shape)}")
    lead = boxes.shape[:-1]
    if scores.shape != lead or labels.shape != lead:
        raise ValueError(f"scores {list(scores.shape)} and labels {list(labels.shape)} must have the boxes' leading "
                         f"shape {list(lead)}")
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
    return [{"image_id": int(i), "category_id": int(c), "bbox": [float(v) for v in b], "score": float(s)}
            for i, c, b, s in zip(image_ids.tolist(), cat_ids[labels].tolist(), xywh.tolist(), scores.tolist())]


def merge_results(result_lists: Iterable[Sequence[dict]]) -> list[dict]:
    """Concatenates per-rank result lists (rank order), dropping a rank's detections of an image an earlier
    rank already had (a distributed sampler's padding evaluates some images twice). An image without
    detections on its first rank keeps a later duplicate's: the same image's detections, so no harm."""
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


def check_results(results: Sequence[dict], gt) -> None:
    """Raises ValueError naming the first result that is not a dict, lacks a key, names an image or category
    id that is not in `gt` (a COCO object), or has a bbox that is not 4 finite numbers."""
    image_ids, cat_ids = set(gt.getImgIds()), set(gt.getCatIds())
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


def write_results(path: str, results: Sequence[dict]) -> str:
    """Writes result dicts (`detections_to_coco`; other keys kept) as a COCO results file at `path` (its
    folder must exist), through a temporary file; returns path. ValueError for a result that is not a dict
    or lacks one of the four keys."""
    for i, r in enumerate(results):
        _check_keys(i, r)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(list(results), f)
    os.replace(tmp, path)
    return path
