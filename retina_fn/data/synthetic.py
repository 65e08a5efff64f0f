"""A synthetic shapes dataset written as a real COCO-format dataset (images: `synthetic_render.render_image`).

Layout under the root: train/ and val/ (<image id, 12 digits>.jpg), annotations/instances_<split>.json, and the
marker synthetic.json (generator version, parameters, summary). Class k has category id k + 1 + k // 2
(1, 2, 4, 5, ...), so code that confuses ids with indices fails visibly. Each image is drawn from its own stream
(seed folded with its id; val ids start at VAL_ID_OFFSET + 1), and JSON is written with sorted keys and rounded
floats, so a seed gives the same files whatever the count or order.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image

from retina_fn import errors
from retina_fn.data.synthetic_render import image_size_range, render_image
from retina_fn.data.synthetic_shapes import SHAPE_NAMES, check_num_classes

__all__ = ["GENERATOR_VERSION", "JPEG_QUALITY", "LARGE_AREA", "LAYOUT", "MARKER_FILE", "SHAPE_NAMES", "SMALL_AREA",
           "SPLITS", "SyntheticPaths", "VAL_ID_OFFSET", "category_ids", "ensure_synthetic", "format_summary",
           "generate_split", "generate_synthetic", "image_ids", "image_size_range", "render_image", "summarize"]

GENERATOR_VERSION = 1
VAL_ID_OFFSET = 1_000_000
SPLITS = ("train", "val")
MARKER_FILE = "synthetic.json"
JPEG_QUALITY = 90
LAYOUT = {"train_ann": "annotations/instances_train.json", "train_images": "train",
          "val_ann": "annotations/instances_val.json", "val_images": "val"}

# COCO's size bins on annotation area (pycocotools' areaRng).
SMALL_AREA = 32.0**2
LARGE_AREA = 96.0**2


class SyntheticPaths(NamedTuple):
    """Where a generated dataset lives (absolute paths) and its `summarize` summary per split."""

    root: Path
    train_images: Path
    val_images: Path
    train_ann: Path
    val_ann: Path
    summary: dict


def category_ids(num_classes: int) -> list[int]:
    """The category id of each class 0..K-1 (K in 1..len(SHAPE_NAMES), ValueError otherwise)."""
    check_num_classes(num_classes)
    return [k + 1 + k // 2 for k in range(num_classes)]


def _params(num_train: int, num_val: int, seed: int, image_size: int, num_classes: int) -> dict:
    """The marker's parameters, checked."""
    check_num_classes(num_classes)
    for name, count in (("num_train", num_train), ("num_val", num_val)):
        if not 0 <= int(count) < VAL_ID_OFFSET:
            raise errors.ConfigError(f"{name} must be in 0..{VAL_ID_OFFSET - 1}, got {count}")
    if int(image_size) < 64:
        raise errors.ConfigError(f"image_size must be at least 64, got {image_size}")
    if int(seed) < 0:
        raise errors.ConfigError(f"seed must be non-negative, got {seed}")
    return {"generator_version": GENERATOR_VERSION, "num_train": int(num_train), "num_val": int(num_val),
            "seed": int(seed), "image_size": int(image_size), "num_classes": int(num_classes)}


def image_ids(split: str, count: int) -> list[int]:
    """The `count` image ids of split 'train' (1..N) or 'val' (from VAL_ID_OFFSET + 1); ValueError otherwise."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    first = 1 if split == "train" else VAL_ID_OFFSET + 1
    return list(range(first, first + count))


def _round(x: float) -> float:
    return round(float(x), 4)  # boxes lie on a 1/4 px grid: this only strips float noise


def generate_split(root: str | os.PathLike, split: str, count: int, seed: int, image_size: int = 256,
                   num_classes: int = 5) -> dict:
    """Renders `count` images of split 'train' | 'val' under root (seed, image_size, num_classes: `render_image`).

    Returns:
        The COCO dict written ('info', 'images', 'annotations' with 'bbox' [x, y, w, h], 'categories').
    """
    root = Path(root)
    image_dir = root / LAYOUT[f"{split}_images"]
    image_dir.mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    cat_ids = category_ids(num_classes)
    images, annotations = [], []
    for image_id in image_ids(split, count):
        pixels, anns = render_image(seed, image_id, image_size, num_classes)
        file_name = f"{image_id:012d}.jpg"
        Image.fromarray(pixels).save(image_dir / file_name, format="JPEG", quality=JPEG_QUALITY)
        images.append({"id": image_id, "file_name": file_name, "width": pixels.shape[1], "height": pixels.shape[0]})
        for ann in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat_ids[ann["label"]],
                                "bbox": [_round(v) for v in ann["bbox"]], "area": _round(ann["area"]),
                                "iscrowd": ann["iscrowd"]})
    categories = [{"id": cid, "name": SHAPE_NAMES[k], "supercategory": "shape"} for k, cid in enumerate(cat_ids)]
    coco = {"info": {"description": "synthetic shapes", "generator_version": GENERATOR_VERSION, "seed": int(seed),
                     "split": split}, "images": images, "annotations": annotations, "categories": categories}
    _write_json(root / LAYOUT[f"{split}_ann"], coco)
    return coco


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, sort_keys=True, separators=(",", ":")))
    os.replace(tmp, path)


def summarize(coco: dict) -> dict:
    """Counts for one split's COCO dict.

    Returns:
        {images, landscape_images, portrait_images, empty_images (no annotation), crowd_regions, objects
        (non-crowd): int, objects_per_class: {name: int}, objects_per_size: {'small' | 'medium' | 'large': int}}.
    """
    names = {c["id"]: c["name"] for c in coco["categories"]}
    per_class = {name: 0 for name in names.values()}
    per_size = {"small": 0, "medium": 0, "large": 0}
    crowd, annotated = 0, set()
    for ann in coco["annotations"]:
        annotated.add(ann["image_id"])
        if ann["iscrowd"]:
            crowd += 1
            continue
        per_class[names[ann["category_id"]]] += 1
        area = ann["area"]
        per_size["small" if area < SMALL_AREA else "medium" if area < LARGE_AREA else "large"] += 1
    landscape = sum(1 for im in coco["images"] if im["width"] > im["height"])
    n = len(coco["images"])
    return {"images": n, "landscape_images": landscape, "portrait_images": n - landscape,
            "empty_images": n - len(annotated), "crowd_regions": crowd, "objects": sum(per_class.values()),
            "objects_per_class": per_class, "objects_per_size": per_size}


def format_summary(summary: dict) -> str:
    """{split: `summarize(...)`} as three lines per split (totals, per class, per size)."""
    lines = []
    for split, s in summary.items():
        classes = ", ".join(f"{k} {v}" for k, v in s["objects_per_class"].items())
        sizes = ", ".join(f"{k} {v}" for k, v in s["objects_per_size"].items())
        lines += [f"{split}: {s['images']} images ({s['landscape_images']} landscape, {s['portrait_images']} "
                  f"portrait, {s['empty_images']} empty), {s['objects']} objects, {s['crowd_regions']} crowd regions",
                  f"  per class: {classes}", f"  per size: {sizes}"]
    return "\n".join(lines)


def _paths(root: Path, summary: dict) -> SyntheticPaths:
    return SyntheticPaths(root, *(root / LAYOUT[k] for k in ("train_images", "val_images", "train_ann", "val_ann")),
                          summary)


def generate_synthetic(root: str | os.PathLike, num_train: int, num_val: int, seed: int, image_size: int = 256,
                       num_classes: int = 5) -> SyntheticPaths:
    """Writes both splits and the marker under `root` (created when absent), overwriting files of the same names.

    num_train, num_val: images per split, in 0..VAL_ID_OFFSET - 1; seed >= 0; image_size (nominal side) >= 64;
    num_classes in 1..len(SHAPE_NAMES). Raises ConfigError for a parameter out of range.
    """
    params = _params(num_train, num_val, seed, image_size, num_classes)
    root = Path(root).absolute()
    root.mkdir(parents=True, exist_ok=True)
    # written first as incomplete: an interrupted run is recognised as ours and regenerated
    _write_json(root / MARKER_FILE, {"params": params, "complete": False})
    summary = {split: summarize(generate_split(root, split, count, seed, image_size, num_classes))
               for split, count in (("train", num_train), ("val", num_val))}
    _write_json(root / MARKER_FILE, {"params": params, "complete": True, "summary": summary})
    return _paths(root, summary)


def _read_marker(root: Path) -> dict | None:
    try:
        marker = json.loads((root / MARKER_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def ensure_synthetic(root: str | os.PathLike, num_train: int, num_val: int, seed: int, image_size: int = 256,
                     num_classes: int = 5) -> SyntheticPaths:
    """The dataset under `root` (args: `generate_synthetic`), generated only when absent, incomplete, or made
    with other parameters or generator version. Not safe against concurrent calls on one root.

    Raises OutputExistsError: train/, val/ or annotations/ under a root with no marker (maybe someone's real data).
    """
    params = _params(num_train, num_val, seed, image_size, num_classes)
    root = Path(root).absolute()
    marker = _read_marker(root)
    if marker is None:
        existing = [name for name in ("train", "val", "annotations") if (root / name).exists()]
        if existing:
            raise errors.OutputExistsError(f"{root} holds {existing} but no {MARKER_FILE}; not a generated synthetic "
                                           "dataset, refusing to overwrite it (choose an empty directory)")
    else:
        if marker.get("complete") and marker.get("params") == params:
            paths = _paths(root, marker.get("summary", {}))
            if all(ann.is_file() and images.is_dir() and sum(n.endswith(".jpg") for n in os.listdir(images)) == count
                   for ann, images, count in ((paths.train_ann, paths.train_images, num_train),
                                              (paths.val_ann, paths.val_images, num_val))):
                return paths
        for name in ("train", "val", "annotations"):
            shutil.rmtree(root / name, ignore_errors=True)
    return generate_synthetic(root, num_train, num_val, seed, image_size, num_classes)
