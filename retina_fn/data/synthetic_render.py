"""One image of the synthetic shapes dataset (`retina_fn.data.synthetic`): background, objects, crowd
regions and their annotations, all drawn from one numpy Generator.

Width and height are each uniform in [0.78, 1.25] x image_size. The background is noisy flat colour, a
gradient or blurred colour blocks, some with thin distractor lines. 1..7 objects per image (about 6% of
images empty), of the first `num_classes` of SHAPE_NAMES, stretched (aspect up to 2.5:1), rotated, in a
colour contrasting with the background, with solid, striped, noisy or gradient fill; box side sqrt(w * h)
log-uniform from 10 px to 0.6 x the shorter image side (COCO's small, medium and large bins all occur);
larger objects drawn first, centres kept apart so occlusion is partial. About 12% of non-empty images get
a cluster of 8..16 tiny shapes of one class, annotated as one iscrowd=1 box; about 30% a light blur.

Pixels are float32 RGB in 0..255 until the end. Boxes follow COCO: the tight box of the full rasterised
shape (to 1/4 px), clipped to the image, whatever occludes it; `area` is w * h, or the covered pixel area
for crowd regions; labels are class indices 0..K-1.
Image `image_id` depends only on (seed, image_id, image_size, num_classes): its generator is
`rng.numpy_generator(rng.fold_in(rng.key(seed), image_id))`."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from retina_fn import rng
from retina_fn.data.synthetic_shapes import SHAPE_NAMES, Mask, check_num_classes, place_shape, render_mask, unit_shape

_MIN_OBJECT_SIDE = 10.0
_MAX_OBJECT_FRACTION = 0.6  # of the shorter image side
_MAX_ASPECT = 2.5
_MAX_OBJECTS = 7
_EMPTY_PROB = 0.06
_CROWD_PROB = 0.12
_BLUR_PROB = 0.3
_MIN_CONTRAST = 70.0  # Euclidean RGB distance between an object's colour and the background under it


def image_size_range(image_size: int) -> tuple[int, int]:
    """Inclusive (low, high) bounds of image sides for a nominal side: round(0.78 x), round(1.25 x)."""
    return int(round(0.78 * image_size)), int(round(1.25 * image_size))


def _random_colour(gen: np.random.Generator) -> np.ndarray:
    return gen.uniform(0.0, 255.0, size=3).astype(np.float32)


def _linear_ramp(gen: np.random.Generator, height: int, width: int) -> np.ndarray:
    """[H, W, 1] in [0, 1] along a random direction."""
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
        blur = ImageFilter.GaussianBlur(float(gen.uniform(3.0, 10.0)))
        pil = Image.fromarray(blocks).resize((width, height), Image.NEAREST)
        image = np.asarray(pil.filter(blur), dtype=np.float32)
    image = image + np.float32(gen.uniform(4.0, 20.0)) * gen.standard_normal((height, width, 3), dtype=np.float32)
    if gen.random() < 0.3:
        image = _distractor_lines(gen, image)
    return image


def _distractor_lines(gen: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """A few thin lines: texture that is not an object."""
    height, width = image.shape[:2]
    pil = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(int(gen.integers(1, 5))):
        xy = gen.uniform((0, 0, 0, 0), (width, height, width, height))
        colour = tuple(int(c) for c in _random_colour(gen))
        draw.line([tuple(xy[:2]), tuple(xy[2:])], fill=colour, width=int(gen.integers(1, 4)))
    return np.asarray(pil, dtype=np.float32)


def _contrasting_colour(gen: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random colour at least _MIN_CONTRAST from `under`, else the farthest of a few tries."""
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
    """[H, W, 3] texture of one object: solid, striped, noisy or a gradient."""
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
        return colour + np.float32(gen.uniform(15.0, 35.0)) * gen.standard_normal((height, width, 3), dtype=np.float32)
    other = np.clip(colour + gen.uniform(-90.0, 90.0, size=3), 0, 255).astype(np.float32)
    return colour + (other - colour) * _linear_ramp(gen, height, width)


def _patch(image: np.ndarray, mask: Mask) -> np.ndarray:
    """The view of `image` under the mask's patch."""
    ph, pw = mask.alpha.shape
    return image[mask.y0 : mask.y0 + ph, mask.x0 : mask.x0 + pw]


def _paint(gen: np.random.Generator, image: np.ndarray, mask: Mask, colour: np.ndarray) -> None:
    """Blends a `_fill` texture of `colour` into `image` in place, weighted by the mask's coverage."""
    texture = _fill(gen, colour, *mask.alpha.shape)
    region = _patch(image, mask)
    region += mask.alpha[..., None] * (texture - region)


def _mean_under(image: np.ndarray, mask: Mask) -> np.ndarray:
    region, weight = _patch(image, mask), mask.alpha.sum()
    if weight <= 0:
        return region.reshape(-1, 3).mean(axis=0)
    return (region * mask.alpha[..., None]).sum(axis=(0, 1)) / weight


class _Planned(NamedTuple):
    label: int
    polygons: list
    centre: tuple[float, float]
    wh: tuple[float, float]


def _sample_aspect(gen: np.random.Generator) -> float:
    limit = _MAX_ASPECT if gen.random() < 0.5 else 1.25
    return float(math.exp(gen.uniform(-math.log(limit), math.log(limit))))


def _plan_objects(gen, height, width, num_classes, count, keep_out) -> list[_Planned]:
    """`count` objects (fewer if placement fails), largest first."""
    max_side = _MAX_OBJECT_FRACTION * min(height, width)
    sizes = np.exp(gen.uniform(math.log(_MIN_OBJECT_SIDE), math.log(max_side), size=count))
    planned: list[_Planned] = []
    for size in sorted(sizes.tolist(), reverse=True):
        label = int(gen.integers(num_classes))
        polygons, (w, h) = place_shape(unit_shape(SHAPE_NAMES[label], gen), size, _sample_aspect(gen),
                                       gen.uniform(0.0, 2.0 * np.pi), (0.9 * width, 0.9 * height))
        radius = 0.5 * max(w, h)
        for _ in range(30):
            cx = gen.uniform(0.35 * w, width - 0.35 * w)
            cy = gen.uniform(0.35 * h, height - 0.35 * h)
            if keep_out is not None and keep_out[0] <= cx <= keep_out[2] and keep_out[1] <= cy <= keep_out[3]:
                continue
            # centres apart: every object mostly visible, overlap still possible
            if all(math.hypot(cx - p.centre[0], cy - p.centre[1]) >= 0.45 * (radius + 0.5 * max(p.wh))
                   for p in planned):
                planned.append(_Planned(label, polygons, (cx, cy), (w, h)))
                break
    return planned


def _crowd_region(gen, image, num_classes, region) -> dict | None:
    """Draws a cluster of tiny same-class shapes inside `region` (xyxy); its iscrowd annotation or None."""
    height, width = image.shape[:2]
    rx0, ry0, rx1, ry1 = region
    label = int(gen.integers(num_classes))
    base = None
    coverage = np.zeros((height, width), dtype=np.float32)
    boxes = []
    for _ in range(int(gen.integers(8, 17))):
        polygons, (w, h) = place_shape(unit_shape(SHAPE_NAMES[label], gen), gen.uniform(5.0, 10.0),
                                       _sample_aspect(gen), gen.uniform(0.0, 2.0 * np.pi), (rx1 - rx0, ry1 - ry0))
        centre = (gen.uniform(rx0 + w / 2, rx1 - w / 2), gen.uniform(ry0 + h / 2, ry1 - h / 2))
        mask = render_mask(polygons, centre, height, width)
        if mask is None:
            continue
        if base is None:  # one colour for the whole cluster, jittered per member
            base = _contrasting_colour(gen, _mean_under(image, mask))
        _paint(gen, image, mask, np.clip(base + gen.uniform(-25.0, 25.0, size=3), 0, 255).astype(np.float32))
        cov = _patch(coverage, mask)
        np.maximum(cov, mask.alpha, out=cov)
        boxes.append(mask.box)
    if not boxes:
        return None
    b = np.array(boxes)
    return _annotation(label, (b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()), float(coverage.sum()), 1)


def _annotation(label: int, box, area: float, iscrowd: int) -> dict:
    x1, y1, x2, y2 = (float(v) for v in box)
    return {"label": label, "bbox": [x1, y1, x2 - x1, y2 - y1], "area": area, "iscrowd": iscrowd}


def render_image(seed: int, image_id: int, image_size: int = 256, num_classes: int = 5):
    """Image `image_id` of the dataset with seed `seed` (>= 0), a pure function of its arguments.

    Args:
        image_size: the nominal side (`image_size_range`); num_classes: K, the first K of SHAPE_NAMES.
    Returns:
        (pixels uint8 [H, W, 3], annotations): dicts with 'label' (0..K-1), 'bbox' [x, y, w, h] floats in
        pixels, 'area' float and 'iscrowd' 0 or 1."""
    check_num_classes(num_classes)
    gen = rng.numpy_generator(rng.fold_in(rng.key(seed), int(image_id)))
    lo, hi = image_size_range(image_size)
    width, height = int(gen.integers(lo, hi + 1)), int(gen.integers(lo, hi + 1))
    image = _background(gen, height, width)
    annotations: list[dict] = []
    if gen.random() >= _EMPTY_PROB:
        crowd_region = None
        if gen.random() < _CROWD_PROB:
            # chosen before the objects so their centres stay out of it; drawn after them
            region_w, region_h = np.minimum(gen.uniform(35.0, 80.0, size=2), (0.6 * width, 0.6 * height))
            rx0, ry0 = gen.uniform(0.0, width - region_w), gen.uniform(0.0, height - region_h)
            crowd_region = (rx0, ry0, rx0 + region_w, ry0 + region_h)
        count = int(gen.integers(1, _MAX_OBJECTS + 1))
        for obj in _plan_objects(gen, height, width, num_classes, count, crowd_region):
            mask = render_mask(obj.polygons, obj.centre, height, width)
            if mask is None:
                continue
            x1, y1, x2, y2 = mask.box
            if x2 - x1 < 2.0 or y2 - y1 < 2.0:  # a sliver left by the border: neither drawn nor annotated
                continue
            _paint(gen, image, mask, _contrasting_colour(gen, _mean_under(image, mask)))
            annotations.append(_annotation(obj.label, mask.box, area=(x2 - x1) * (y2 - y1), iscrowd=0))
        if crowd_region is not None:
            crowd = _crowd_region(gen, image, num_classes, crowd_region)
            if crowd is not None:
                annotations.append(crowd)
    pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    if gen.random() < _BLUR_PROB:
        pixels = np.asarray(Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(float(gen.uniform(0.4, 1.2)))))
    return pixels, annotations
