"""A synthetic shapes detection dataset written as a real COCO-format dataset.

Layout under a root directory:

    train/<image id, 12 digits>.jpg     val/<...>.jpg
    annotations/instances_train.json    annotations/instances_val.json
    synthetic.json                      marker: generator version, parameters, summary

Content of an image: see `retina_fn.data.synthetic_render` (`render_image`); shapes and their
rasterisation: `retina_fn.data.synthetic_shapes`. Category ids are not 0..K-1: class k has id
k + 1 + k // 2 (1, 2, 4, 5, 7, ...), so code that confuses ids with indices fails visibly.

Determinism: image `image_id` is drawn from `rng.numpy_generator(rng.fold_in(rng.key(seed), image_id))`,
so images do not depend on generation order or on how many images are made; train ids are 1..N and
val ids start at VAL_ID_OFFSET + 1, so the splits never share a stream. JSON is written with sorted keys
and rounded floats, so the same seed gives byte-identical files (JPEG bytes are identical for the same
Pillow/libjpeg build).
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

__all__ = [
    "GENERATOR_VERSION", "JPEG_QUALITY", "LARGE_AREA", "LAYOUT", "MARKER_FILE", "SHAPE_NAMES", "SMALL_AREA", "SPLITS",
    "SyntheticPaths", "VAL_ID_OFFSET", "category_ids", "ensure_synthetic", "format_summary", "generate_split",
    "generate_synthetic", "image_ids", "image_size_range", "render_image", "summarize",
]

GENERATOR_VERSION = 1
VAL_ID_OFFSET = 1_000_000
SPLITS = ("train", "val")
MARKER_FILE = "synthetic.json"
JPEG_QUALITY = 90
# Where the files of each split go under the root, as the data config's fields name them.
LAYOUT = {"train_ann": "annotations/instances_train.json", "train_images": "train",
          "val_ann": "annotations/instances_val.json", "val_images": "val"}

# COCO's size bins on annotation area (pycocotools' areaRng).
SMALL_AREA = 32.0**2
LARGE_AREA = 96.0**2


class SyntheticPaths(NamedTuple):
    """Where a generated dataset lives (absolute paths) and its summary (see `summarize`)."""

    root: Path
    train_images: Path
    val_images: Path
    train_ann: Path
    val_ann: Path
    summary: dict


def category_ids(num_classes: int) -> list[int]:
    """The annotation file's category ids.

    Args:
        num_classes: K, in 1..len(SHAPE_NAMES) (ValueError otherwise).

    Returns:
        K ints, the id of each contiguous class 0..K-1: 1, 2, 4, 5, 7, 8, 10 (every third skipped).
    """
    check_num_classes(num_classes)
    return [k + 1 + k // 2 for k in range(num_classes)]


def _check_params(num_train: int, num_val: int, seed: int, image_size: int, num_classes: int) -> None:
    check_num_classes(num_classes)
    for name, count in (("num_train", num_train), ("num_val", num_val)):
        if not 0 <= int(count) < VAL_ID_OFFSET:
            raise errors.ConfigError(f"{name} must be in 0..{VAL_ID_OFFSET - 1}, got {count}")
    if int(image_size) < 64:
        raise errors.ConfigError(f"image_size must be at least 64, got {image_size}")
    if int(seed) < 0:
        raise errors.ConfigError(f"seed must be non-negative, got {seed}")


def image_ids(split: str, count: int) -> list[int]:
    """The image ids of a split.

    Args:
        split: 'train' or 'val' (ValueError otherwise).
        count: the number of images.

    Returns:
        `count` ints: train 1..N, val VAL_ID_OFFSET + 1 .. VAL_ID_OFFSET + M.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    first = 1 if split == "train" else VAL_ID_OFFSET + 1
    return list(range(first, first + count))


def _round(x: float) -> float:
    # Boxes lie on a 1/4 px grid; rounding only strips float noise so the JSON is stable.
    return round(float(x), 4)


def generate_split(root: str | os.PathLike, split: str, count: int, seed: int, image_size: int = 256,
                   num_classes: int = 5) -> dict:
    """Renders one split: JPEGs into root/<split>/, annotations to root/annotations/instances_<split>.json.

    Args:
        root: the dataset folder.
        split: 'train' or 'val'.
        count: the number of images.
        seed, image_size, num_classes: as for `render_image`.

    Returns:
        The COCO dict written: 'info', 'images' [{'id', 'file_name', 'width', 'height'}], 'annotations'
        [{'id', 'image_id', 'category_id', 'bbox' [x, y, w, h], 'area', 'iscrowd'}] and 'categories'.
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
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": cat_ids[ann["label"]],
                "bbox": [_round(v) for v in ann["bbox"]],
                "area": _round(ann["area"]),
                "iscrowd": ann["iscrowd"],
            })
    coco = {
        "info": {"description": "synthetic shapes", "generator_version": GENERATOR_VERSION, "seed": int(seed),
                 "split": split},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cid, "name": SHAPE_NAMES[k], "supercategory": "shape"} for k, cid in enumerate(cat_ids)],
    }
    _write_json(root / LAYOUT[f"{split}_ann"], coco)
    return coco


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, sort_keys=True, separators=(",", ":")))
    os.replace(tmp, path)


def summarize(coco: dict) -> dict:
    """Counts for one split.

    Args:
        coco: a COCO dict (as `generate_split` returns).

    Returns:
        A dict of ints: images, landscape_images, portrait_images, empty_images (no annotation at all),
        crowd_regions, objects (non-crowd), and dicts objects_per_class {class name: count} and
        objects_per_size {'small', 'medium', 'large': count} (COCO size bins by annotation area).
    """
    names = {c["id"]: c["name"] for c in coco["categories"]}
    per_class = {name: 0 for name in names.values()}
    per_size = {"small": 0, "medium": 0, "large": 0}
    crowd = 0
    annotated = set()
    for ann in coco["annotations"]:
        annotated.add(ann["image_id"])
        if ann["iscrowd"]:
            crowd += 1
            continue
        per_class[names[ann["category_id"]]] += 1
        area = ann["area"]
        per_size["small" if area < SMALL_AREA else "medium" if area < LARGE_AREA else "large"] += 1
    landscape = sum(1 for im in coco["images"] if im["width"] > im["height"])
    return {
        "images": len(coco["images"]),
        "landscape_images": landscape,
        "portrait_images": len(coco["images"]) - landscape,
        "empty_images": len(coco["images"]) - len(annotated),
        "crowd_regions": crowd,
        "objects": sum(per_class.values()),
        "objects_per_class": per_class,
        "objects_per_size": per_size,
    }


def format_summary(summary: dict) -> str:
    """A summary for people.

    Args:
        summary: {split: `summarize(...)`}.

    Returns:
        Three lines per split (totals, per class, per size), joined by newlines.
    """
    lines = []
    for split, s in summary.items():
        classes = ", ".join(f"{k} {v}" for k, v in s["objects_per_class"].items())
        sizes = ", ".join(f"{k} {v}" for k, v in s["objects_per_size"].items())
        lines.append(
            f"{split}: {s['images']} images ({s['landscape_images']} landscape, {s['portrait_images']} portrait, "
            f"{s['empty_images']} empty), {s['objects']} objects, {s['crowd_regions']} crowd regions"
        )
        lines.append(f"  per class: {classes}")
        lines.append(f"  per size: {sizes}")
    return "\n".join(lines)


def _params(num_train, num_val, seed, image_size, num_classes) -> dict:
    return {"generator_version": GENERATOR_VERSION, "num_train": int(num_train), "num_val": int(num_val),
            "seed": int(seed), "image_size": int(image_size), "num_classes": int(num_classes)}


def _paths(root: Path, summary: dict) -> SyntheticPaths:
    return SyntheticPaths(root, root / LAYOUT["train_images"], root / LAYOUT["val_images"], root / LAYOUT["train_ann"],
                          root / LAYOUT["val_ann"], summary)


def generate_synthetic(root: str | os.PathLike, num_train: int, num_val: int, seed: int, image_size: int = 256,
                       num_classes: int = 5) -> SyntheticPaths:
    """Writes both splits and the marker file under `root`, overwriting files of the same names.

    Args:
        root: the dataset folder (created when absent).
        num_train, num_val: images per split, each in 0..VAL_ID_OFFSET - 1.
        seed: the dataset seed (>= 0).
        image_size: the nominal image side (>= 64).
        num_classes: K shape classes, in 1..len(SHAPE_NAMES).

    Returns:
        SyntheticPaths (absolute) with a {split: summarize(...)} summary; ValueError for bad parameters.
    """
    _check_params(num_train, num_val, seed, image_size, num_classes)
    root = Path(root).absolute()
    root.mkdir(parents=True, exist_ok=True)
    params = _params(num_train, num_val, seed, image_size, num_classes)
    # Written first as incomplete: an interrupted run is recognised as ours and regenerated.
    _write_json(root / MARKER_FILE, {"params": params, "complete": False})
    summary = {}
    for split, count in (("train", num_train), ("val", num_val)):
        summary[split] = summarize(generate_split(root, split, count, seed, image_size, num_classes))
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


def _is_intact(paths: SyntheticPaths, num_train: int, num_val: int) -> bool:
    for ann, images, count in ((paths.train_ann, paths.train_images, num_train),
                               (paths.val_ann, paths.val_images, num_val)):
        if not ann.is_file() or not images.is_dir():
            return False
        if sum(1 for name in os.listdir(images) if name.endswith(".jpg")) != count:
            return False
    return True


def ensure_synthetic(root: str | os.PathLike, num_train: int, num_val: int, seed: int, image_size: int = 256,
                     num_classes: int = 5) -> SyntheticPaths:
    """The dataset under `root`, generated only when absent, incomplete, or made with other parameters
    (or another generator version), as recorded in root/synthetic.json.

    Not safe against concurrent calls on one root: in a distributed run call it on one process and wait
    at a barrier.

    Args:
        root, num_train, num_val, seed, image_size, num_classes: as for `generate_synthetic`.

    Returns:
        SyntheticPaths with the summary. Raises FileExistsError rather than replace train/, val/ or
        annotations/ under a root that has no marker: those may be someone's real data.
    """
    _check_params(num_train, num_val, seed, image_size, num_classes)
    root = Path(root).absolute()
    marker = _read_marker(root)
    params = _params(num_train, num_val, seed, image_size, num_classes)
    if marker is None:
        existing = [name for name in ("train", "val", "annotations") if (root / name).exists()]
        if existing:
            raise errors.OutputExistsError(
                f"{root} holds {existing} but no {MARKER_FILE}; not a generated synthetic dataset, refusing to "
                "overwrite it (choose an empty directory)"
            )
    else:
        if marker.get("complete") and marker.get("params") == params:
            paths = _paths(root, marker.get("summary", {}))
            if _is_intact(paths, num_train, num_val):
                return paths
        for name in ("train", "val", "annotations"):
            shutil.rmtree(root / name, ignore_errors=True)
    return generate_synthetic(root, num_train, num_val, seed, image_size, num_classes)
