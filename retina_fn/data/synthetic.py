"""A synthetic shapes detection dataset written as a real COCO-format dataset.

Layout under a root directory:

    train/<image id, 12 digits>.jpg     val/<...>.jpg
    annotations/instances_train.json    annotations/instances_val.json
    synthetic.json                      marker: generator version, parameters, summary

Content (one image, everything drawn from one numpy Generator, see `render_image`):
- Image sizes: width and height each uniform in [0.78, 1.25] x image_size, independently, so both
  landscape (w > h) and portrait (w <= h) images occur.
- Background: noisy flat colour, a linear gradient, or blurred colour blocks, always with pixel noise;
  some get a few thin distractor lines that are not objects.
- Objects: 1..7 per image (about 6% of images have none and no crowd region either). Classes are the first
  `num_classes` of SHAPE_NAMES, each randomly stretched (box aspect up to 2.5:1), rotated, coloured
  with a colour that differs from the local background, and filled solid, striped, noisy or with a
  gradient. Box size sqrt(w * h) is log-uniform from 10 px to 0.6 x the shorter image side, so COCO's
  small (< 32^2), medium and large (> 96^2) bins all occur. Larger objects are drawn first; centres are
  kept apart enough that objects overlap and occlude each other only partly; objects may be cut by the
  image border by up to ~15% of their box.
- Crowd regions: about 12% of non-empty images get a cluster of 8..16 tiny (5..10 px) shapes of one
  class, annotated as a single iscrowd=1 box (the union of the members' boxes).
- About 30% of images get a light Gaussian blur.

Boxes follow COCO: the tight box of the object's full rasterised shape (measured on a 4x supersampled
mask, so to 1/4 px), clipped to the image, whatever later objects occlude. `area` is w * h for ordinary
objects and the covered pixel area for crowd regions. Category ids are not 0..K-1: class k has id
k + 1 + k // 2 (1, 2, 4, 5, 7, ...), so code that confuses ids with indices fails visibly.

Determinism: image `image_id` is drawn from `rng.numpy_generator(rng.fold_in(rng.key(seed), image_id))`,
so images do not depend on generation order or on how many images are made; train ids are 1..N and
val ids start at VAL_ID_OFFSET + 1, so the splits never share a stream. JSON is written with sorted keys
and rounded floats, so the same seed gives byte-identical files (JPEG bytes are identical for the same
Pillow/libjpeg build).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from retina_fn import rng

GENERATOR_VERSION = 1
SHAPE_NAMES = ("circle", "square", "triangle", "ring", "cross", "star", "crescent")
VAL_ID_OFFSET = 1_000_000
SPLITS = ("train", "val")
MARKER_FILE = "synthetic.json"
JPEG_QUALITY = 90

# COCO's size bins on annotation area (pycocotools' areaRng).
SMALL_AREA = 32.0**2
LARGE_AREA = 96.0**2

_SUPERSAMPLE = 4
_MIN_OBJECT_SIDE = 10.0
_MAX_OBJECT_FRACTION = 0.6  # of the shorter image side
_MAX_ASPECT = 2.5
_MAX_OBJECTS = 7
_EMPTY_PROB = 0.06
_CROWD_PROB = 0.12
_BLUR_PROB = 0.3
_MIN_CONTRAST = 70.0  # Euclidean RGB distance between an object's colour and the background under it
_CIRCLE_VERTICES = 64


class SyntheticPaths(NamedTuple):
    """Where a generated dataset lives (absolute paths) and its summary (see `summarize`)."""

    root: Path
    train_images: Path
    val_images: Path
    train_ann: Path
    val_ann: Path
    summary: dict


def category_ids(num_classes: int) -> list[int]:
    """The file's category id of each contiguous class 0..K-1: 1, 2, 4, 5, 7, 8, 10 (every third skipped)."""
    _check_num_classes(num_classes)
    return [k + 1 + k // 2 for k in range(num_classes)]


def image_size_range(image_size: int) -> tuple[int, int]:
    """Inclusive (low, high) bounds of image widths and heights for a nominal `image_size`."""
    return int(round(0.78 * image_size)), int(round(1.25 * image_size))


# ----------------------------------------------------------------------------------------------------
# Geometry: shapes as polygons in a unit frame; holes are polygons drawn with fill 0.


def _regular_polygon(n: int, radius: float = 1.0, phase: float = 0.0, center=(0.0, 0.0)) -> np.ndarray:
    t = phase + 2.0 * np.pi * np.arange(n) / n
    return np.stack([center[0] + radius * np.cos(t), center[1] + radius * np.sin(t)], axis=-1)


def _unit_shape(name: str, gen: np.random.Generator) -> list[tuple[np.ndarray, int]]:
    """[(vertices [V, 2], fill 1 or 0)] of one shape of class `name`, within about [-1, 1]^2."""
    if name == "circle":
        return [(_regular_polygon(_CIRCLE_VERTICES), 1)]
    if name == "square":
        return [(np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]]), 1)]
    if name == "triangle":
        return [(_regular_polygon(3, phase=np.pi / 2), 1)]
    if name == "ring":
        inner = gen.uniform(0.45, 0.7)
        return [(_regular_polygon(_CIRCLE_VERTICES), 1), (_regular_polygon(_CIRCLE_VERTICES, inner), 0)]
    if name == "cross":
        t = gen.uniform(0.22, 0.38)
        arm = [(t, -1.0), (t, -t), (1.0, -t), (1.0, t), (t, t), (t, 1.0)]
        return [(np.array(arm + [(-x, -y) for x, y in arm]), 1)]
    if name == "star":
        inner = gen.uniform(0.4, 0.55)
        radii = np.where(np.arange(10) % 2 == 0, 1.0, inner)
        t = -np.pi / 2 + 2.0 * np.pi * np.arange(10) / 10
        return [(np.stack([radii * np.cos(t), radii * np.sin(t)], axis=-1), 1)]
    if name == "crescent":
        bite_radius = gen.uniform(0.8, 1.0)
        offset = gen.uniform(0.45, 0.75)
        return [
            (_regular_polygon(_CIRCLE_VERTICES), 1),
            (_regular_polygon(_CIRCLE_VERTICES, bite_radius, center=(offset, 0.0)), 0),
        ]
    raise ValueError(f"unknown shape {name!r}; known: {SHAPE_NAMES}")


def _place_shape(polygons, size: float, aspect: float, angle: float, max_wh: tuple[float, float]):
    """Stretches a unit shape to box aspect ~`aspect` (w / h), rotates it by `angle`, and scales it so its
    box has sqrt(w * h) = `size` (shrunk to fit `max_wh`). Returns (polygons centred at 0, (w, h))."""
    stretch = np.array([math.sqrt(aspect), 1.0 / math.sqrt(aspect)])
    c, s = math.cos(angle), math.sin(angle)
    rotation = np.array([[c, -s], [s, c]])
    moved = [((v * stretch) @ rotation.T, fill) for v, fill in polygons]
    outer = np.concatenate([v for v, fill in moved if fill])
    lo, hi = outer.min(axis=0), outer.max(axis=0)
    w0, h0 = hi - lo
    scale = size / math.sqrt(w0 * h0)
    scale = min(scale, max_wh[0] / w0, max_wh[1] / h0)
    centre = (lo + hi) / 2
    return [((v - centre) * scale, fill) for v, fill in moved], (w0 * scale, h0 * scale)


class _Mask(NamedTuple):
    x0: int  # patch origin in image pixels
    y0: int
    alpha: np.ndarray  # float32 [ph, pw] coverage in [0, 1]
    box: tuple[float, float, float, float]  # tight xyxy of the shape inside the image


def _render_mask(polygons, offset_xy, height: int, width: int) -> _Mask | None:
    """Rasterises polygons (vertices in pixels relative to `offset_xy`) inside an image of the given size
    on a 4x supersampled grid. None when nothing of the shape falls inside the image."""
    ox, oy = offset_xy
    outer = np.concatenate([v for v, fill in polygons if fill]) + (ox, oy)
    x0 = max(0, int(math.floor(outer[:, 0].min())))
    y0 = max(0, int(math.floor(outer[:, 1].min())))
    x1 = min(width, int(math.ceil(outer[:, 0].max())) + 1)
    y1 = min(height, int(math.ceil(outer[:, 1].max())) + 1)
    if x1 <= x0 or y1 <= y0:
        return None
    ss = _SUPERSAMPLE
    canvas = Image.new("L", ((x1 - x0) * ss, (y1 - y0) * ss), 0)
    draw = ImageDraw.Draw(canvas)
    for v, fill in polygons:
        # Pixel (i, j) of the fine grid covers [i, i + 1) x [j, j + 1): shift by half a pixel so that
        # polygon coordinates are continuous image coordinates.
        pts = (v + (ox - x0, oy - y0)) * ss - 0.5
        draw.polygon([tuple(p) for p in pts.tolist()], fill=255 if fill else 0)
    fine = np.asarray(canvas)
    cols = np.flatnonzero(fine.any(axis=0))
    rows = np.flatnonzero(fine.any(axis=1))
    if cols.size == 0:
        return None
    box = (x0 + cols[0] / ss, y0 + rows[0] / ss, x0 + (cols[-1] + 1) / ss, y0 + (rows[-1] + 1) / ss)
    alpha = np.asarray(canvas.reduce(ss), dtype=np.float32) * (1.0 / 255.0)
    return _Mask(x0, y0, alpha, box)


# ----------------------------------------------------------------------------------------------------
# Pixels: backgrounds and fills (float32 RGB in 0..255).


def _random_colour(gen: np.random.Generator) -> np.ndarray:
    return gen.uniform(0.0, 255.0, size=3).astype(np.float32)


def _linear_ramp(gen: np.random.Generator, height: int, width: int) -> np.ndarray:
    """[H, W, 1] values in [0, 1] along a random direction."""
    angle = gen.uniform(0.0, 2.0 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    proj = xs * math.cos(angle) + ys * math.sin(angle)
    span = max(float(proj.max() - proj.min()), 1.0)
    return ((proj - proj.min()) / span)[..., None]


def _background(gen: np.random.Generator, height: int, width: int) -> np.ndarray:
    kind = gen.integers(3)
    if kind == 0:  # flat colour
        image = np.broadcast_to(_random_colour(gen), (height, width, 3)).astype(np.float32)
    elif kind == 1:  # gradient between two colours
        a, b = _random_colour(gen), _random_colour(gen)
        image = a + (b - a) * _linear_ramp(gen, height, width)
    else:  # blurred blocks
        grid_h, grid_w = int(gen.integers(3, 11)), int(gen.integers(3, 11))
        blocks = gen.uniform(0.0, 255.0, size=(grid_h, grid_w, 3)).astype(np.uint8)
        radius = float(gen.uniform(3.0, 10.0))
        pil = Image.fromarray(blocks).resize((width, height), Image.NEAREST)
        image = np.asarray(pil.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32)
    sigma = np.float32(gen.uniform(4.0, 20.0))
    image = image + sigma * gen.standard_normal((height, width, 3), dtype=np.float32)
    if gen.random() < 0.3:
        image = _distractor_lines(gen, image)
    return image


def _distractor_lines(gen: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """A few thin straight lines: texture that is not an object."""
    height, width = image.shape[:2]
    pil = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(int(gen.integers(1, 5))):
        xy = gen.uniform((0, 0, 0, 0), (width, height, width, height))
        colour = tuple(int(c) for c in _random_colour(gen))
        draw.line([tuple(xy[:2]), tuple(xy[2:])], fill=colour, width=int(gen.integers(1, 4)))
    return np.asarray(pil, dtype=np.float32)


def _contrasting_colour(gen: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random colour at least _MIN_CONTRAST from `under` (the mean background colour below the shape);
    the farthest of a few tries if none is."""
    best, best_dist = None, -1.0
    for _ in range(8):
        colour = _random_colour(gen)
        dist = float(np.linalg.norm(colour - under))
        if dist >= _MIN_CONTRAST:
            return colour
        if dist > best_dist:
            best, best_dist = colour, dist
    return best


def _fill(gen: np.random.Generator, colour: np.ndarray, height: int, width: int) -> np.ndarray:
    """[H, W, 3] texture of one object: solid, striped, noisy or a gradient, based on `colour`."""
    kind = gen.integers(4)
    if kind == 0:  # solid, slightly noisy
        return colour + np.float32(3.0) * gen.standard_normal((height, width, 3), dtype=np.float32)
    if kind == 1:  # stripes of two colours
        other = np.clip(colour + gen.uniform(-120.0, 120.0, size=3), 0, 255).astype(np.float32)
        period = gen.uniform(3.0, 10.0)
        angle = gen.uniform(0.0, np.pi)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        phase = (xs * math.cos(angle) + ys * math.sin(angle)) / period
        on = ((phase % 1.0) < 0.5)[..., None]
        return np.where(on, colour, other)
    if kind == 2:  # strong noise around the colour
        sigma = np.float32(gen.uniform(15.0, 35.0))
        return colour + sigma * gen.standard_normal((height, width, 3), dtype=np.float32)
    other = np.clip(colour + gen.uniform(-90.0, 90.0, size=3), 0, 255).astype(np.float32)
    return colour + (other - colour) * _linear_ramp(gen, height, width)


def _composite(image: np.ndarray, mask: _Mask, texture: np.ndarray) -> None:
    """Blends `texture` [ph, pw, 3] into `image` (in place) with the mask's coverage."""
    ph, pw = mask.alpha.shape
    region = image[mask.y0 : mask.y0 + ph, mask.x0 : mask.x0 + pw]
    a = mask.alpha[..., None]
    region += a * (texture - region)


def _mean_under(image: np.ndarray, mask: _Mask) -> np.ndarray:
    ph, pw = mask.alpha.shape
    region = image[mask.y0 : mask.y0 + ph, mask.x0 : mask.x0 + pw]
    weight = mask.alpha.sum()
    if weight <= 0:
        return region.reshape(-1, 3).mean(axis=0)
    return (region * mask.alpha[..., None]).sum(axis=(0, 1)) / weight


# ----------------------------------------------------------------------------------------------------
# Layout of one image.


class _Planned(NamedTuple):
    label: int
    polygons: list
    centre: tuple[float, float]
    wh: tuple[float, float]


def _sample_aspect(gen: np.random.Generator) -> float:
    limit = _MAX_ASPECT if gen.random() < 0.5 else 1.25
    return float(math.exp(gen.uniform(-math.log(limit), math.log(limit))))


def _inside(point, box) -> bool:
    return box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]


def _plan_objects(gen, height, width, num_classes, count, keep_out) -> list[_Planned]:
    """Samples `count` objects (fewer if placement fails), largest first."""
    max_side = _MAX_OBJECT_FRACTION * min(height, width)
    sizes = np.exp(gen.uniform(math.log(_MIN_OBJECT_SIDE), math.log(max_side), size=count))
    planned: list[_Planned] = []
    for size in sorted(sizes.tolist(), reverse=True):
        label = int(gen.integers(num_classes))
        polygons, (w, h) = _place_shape(
            _unit_shape(SHAPE_NAMES[label], gen), size, _sample_aspect(gen),
            gen.uniform(0.0, 2.0 * np.pi), (0.9 * width, 0.9 * height),
        )
        radius = 0.5 * max(w, h)
        for _ in range(30):
            # At most ~15% of the box may leave the image on each side.
            cx = gen.uniform(0.35 * w, width - 0.35 * w)
            cy = gen.uniform(0.35 * h, height - 0.35 * h)
            if keep_out is not None and _inside((cx, cy), keep_out):
                continue
            # Smaller objects are drawn on top of larger ones; keeping centres apart leaves every object
            # mostly visible while still allowing overlap.
            if all(
                math.hypot(cx - p.centre[0], cy - p.centre[1]) >= 0.45 * (radius + 0.5 * max(p.wh))
                for p in planned
            ):
                planned.append(_Planned(label, polygons, (cx, cy), (w, h)))
                break
    return planned


def _crowd_region(gen, image, num_classes, region) -> dict | None:
    """Draws a cluster of tiny same-class shapes inside `region` (xyxy); returns its annotation
    (iscrowd=1, box = union of the members' boxes, area = covered pixels) or None."""
    height, width = image.shape[:2]
    rx0, ry0, rx1, ry1 = region
    label = int(gen.integers(num_classes))
    base = None
    coverage = np.zeros((height, width), dtype=np.float32)
    boxes = []
    for _ in range(int(gen.integers(8, 17))):
        polygons, (w, h) = _place_shape(
            _unit_shape(SHAPE_NAMES[label], gen), gen.uniform(5.0, 10.0), _sample_aspect(gen),
            gen.uniform(0.0, 2.0 * np.pi), (rx1 - rx0, ry1 - ry0),
        )
        centre = (gen.uniform(rx0 + w / 2, rx1 - w / 2), gen.uniform(ry0 + h / 2, ry1 - h / 2))
        mask = _render_mask(polygons, centre, height, width)
        if mask is None:
            continue
        if base is None:  # one colour for the whole cluster, jittered per member
            base = _contrasting_colour(gen, _mean_under(image, mask))
        colour = np.clip(base + gen.uniform(-25.0, 25.0, size=3), 0, 255).astype(np.float32)
        ph, pw = mask.alpha.shape
        _composite(image, mask, _fill(gen, colour, ph, pw))
        cov = coverage[mask.y0 : mask.y0 + ph, mask.x0 : mask.x0 + pw]
        np.maximum(cov, mask.alpha, out=cov)
        boxes.append(mask.box)
    if not boxes:
        return None
    b = np.array(boxes)
    box = (b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max())
    return _annotation(label, box, area=float(coverage.sum()), iscrowd=1)


def _annotation(label: int, box, area: float, iscrowd: int) -> dict:
    x1, y1, x2, y2 = (float(v) for v in box)
    return {"label": label, "bbox": [x1, y1, x2 - x1, y2 - y1], "area": area, "iscrowd": iscrowd}


def render_image(seed: int, image_id: int, image_size: int = 256, num_classes: int = 5):
    """Draws image `image_id` of the dataset with this seed.

    Returns (pixels uint8 [H, W, 3], annotations): each annotation is a dict with 'label' (contiguous
    class 0..K-1), 'bbox' [x, y, w, h] in pixels, 'area' and 'iscrowd'. A pure function of its arguments.
    """
    _check_num_classes(num_classes)
    gen = rng.numpy_generator(rng.fold_in(rng.key(seed), int(image_id)))
    lo, hi = image_size_range(image_size)
    width, height = int(gen.integers(lo, hi + 1)), int(gen.integers(lo, hi + 1))
    image = _background(gen, height, width)
    annotations: list[dict] = []
    if gen.random() >= _EMPTY_PROB:
        crowd_region = None
        if gen.random() < _CROWD_PROB:
            # Chosen before the ordinary objects so their centres stay out of it; drawn after them.
            region_w, region_h = np.minimum(gen.uniform(35.0, 80.0, size=2), (0.6 * width, 0.6 * height))
            rx0, ry0 = gen.uniform(0.0, width - region_w), gen.uniform(0.0, height - region_h)
            crowd_region = (rx0, ry0, rx0 + region_w, ry0 + region_h)
        count = int(gen.integers(1, _MAX_OBJECTS + 1))
        for obj in _plan_objects(gen, height, width, num_classes, count, crowd_region):
            mask = _render_mask(obj.polygons, obj.centre, height, width)
            if mask is None:
                continue
            x1, y1, x2, y2 = mask.box
            if x2 - x1 < 2.0 or y2 - y1 < 2.0:  # a sliver left by the border: neither drawn nor annotated
                continue
            colour = _contrasting_colour(gen, _mean_under(image, mask))
            ph, pw = mask.alpha.shape
            _composite(image, mask, _fill(gen, colour, ph, pw))
            annotations.append(_annotation(obj.label, mask.box, area=(x2 - x1) * (y2 - y1), iscrowd=0))
        if crowd_region is not None:
            crowd = _crowd_region(gen, image, num_classes, crowd_region)
            if crowd is not None:
                annotations.append(crowd)
    pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    if gen.random() < _BLUR_PROB:
        radius = float(gen.uniform(0.4, 1.2))
        pixels = np.asarray(Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(radius)))
    return pixels, annotations


# ----------------------------------------------------------------------------------------------------
# Dataset files.


def _check_num_classes(num_classes: int) -> None:
    if not 1 <= int(num_classes) <= len(SHAPE_NAMES):
        raise ValueError(f"num_classes must be in 1..{len(SHAPE_NAMES)} (shapes {SHAPE_NAMES}), got {num_classes}")


def _check_params(num_train: int, num_val: int, seed: int, image_size: int, num_classes: int) -> None:
    _check_num_classes(num_classes)
    for name, count in (("num_train", num_train), ("num_val", num_val)):
        if not 0 <= int(count) < VAL_ID_OFFSET:
            raise ValueError(f"{name} must be in 0..{VAL_ID_OFFSET - 1}, got {count}")
    if int(image_size) < 64:
        raise ValueError(f"image_size must be at least 64, got {image_size}")
    if int(seed) < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")


def image_ids(split: str, count: int) -> list[int]:
    """The image ids of a split: train 1..N, val VAL_ID_OFFSET + 1 .. VAL_ID_OFFSET + M."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    first = 1 if split == "train" else VAL_ID_OFFSET + 1
    return list(range(first, first + count))


def _round(x: float) -> float:
    # Boxes lie on a 1/4 px grid; rounding only strips float noise so the JSON is stable.
    return round(float(x), 4)


def generate_split(root: str | os.PathLike, split: str, count: int, seed: int, image_size: int = 256,
                   num_classes: int = 5) -> dict:
    """Renders `count` images of `split` into root/<split>/ and returns the COCO dict (also written to
    root/annotations/instances_<split>.json)."""
    root = Path(root)
    image_dir = root / split
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
    _write_json(root / "annotations" / f"instances_{split}.json", coco)
    return coco


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, sort_keys=True, separators=(",", ":")))
    os.replace(tmp, path)


def summarize(coco: dict) -> dict:
    """Counts for one split: images, landscape/portrait images, empty images (no annotation at all), crowd
    regions, and non-crowd objects per class name and per COCO size bin (by annotation area)."""
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
    """Human-readable lines for a {split: summarize(...)} dict."""
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
    return SyntheticPaths(root, root / "train", root / "val", root / "annotations" / "instances_train.json",
                          root / "annotations" / "instances_val.json", summary)


def generate_synthetic(root: str | os.PathLike, num_train: int, num_val: int, seed: int, image_size: int = 256,
                       num_classes: int = 5) -> SyntheticPaths:
    """Writes both splits and the marker file under `root` (overwriting files of the same names) and
    returns the paths with a {split: summarize(...)} summary."""
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
    """Returns the dataset under `root`, generating it only when absent, incomplete, or made with other
    parameters (or another generator version), as recorded in root/synthetic.json.

    Refuses (FileExistsError) to replace train/, val/ or annotations/ under a root that has no marker:
    those may be someone's real data. Not safe against concurrent calls on one root: in a distributed
    run call it on one process and wait at a barrier.
    """
    _check_params(num_train, num_val, seed, image_size, num_classes)
    root = Path(root).absolute()
    marker = _read_marker(root)
    params = _params(num_train, num_val, seed, image_size, num_classes)
    if marker is None:
        existing = [name for name in ("train", "val", "annotations") if (root / name).exists()]
        if existing:
            raise FileExistsError(
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
