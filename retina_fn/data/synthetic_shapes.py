"""Shapes of the synthetic dataset (`retina_fn.data.synthetic`): each class a polygon set in a unit frame
(holes, such as the ring's centre, drawn with fill 0), stretched, rotated and scaled into place, then
rasterised on a 4x supersampled grid into a coverage mask with the tight box of the whole shape (to 1/4 px)."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from retina_fn import errors

SHAPE_NAMES = ("circle", "square", "triangle", "ring", "cross", "star", "crescent")

_SUPERSAMPLE = 4
_CIRCLE_VERTICES = 64


def check_num_classes(num_classes: int) -> None:
    """ConfigError (a ValueError) unless 1 <= num_classes <= len(SHAPE_NAMES)."""
    if not 1 <= int(num_classes) <= len(SHAPE_NAMES):
        raise errors.ConfigError(f"num_classes must be in 1..{len(SHAPE_NAMES)} (shapes {SHAPE_NAMES}), got "
                                 f"{num_classes}")


def _regular_polygon(n: int, radius: float = 1.0, phase: float = 0.0, center=(0.0, 0.0)) -> np.ndarray:
    t = phase + 2.0 * np.pi * np.arange(n) / n
    return np.stack([center[0] + radius * np.cos(t), center[1] + radius * np.sin(t)], axis=-1)


def unit_shape(name: str, gen: np.random.Generator) -> list[tuple[np.ndarray, int]]:
    """One shape of class `name` (of SHAPE_NAMES) in its unit frame, some proportions drawn from `gen`:
    [(vertices float64 [V, 2] (x, y) within about [-1, 1]^2, fill 1 or 0 (a hole))]."""
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
        return [(_regular_polygon(_CIRCLE_VERTICES), 1),
                (_regular_polygon(_CIRCLE_VERTICES, bite_radius, center=(offset, 0.0)), 0)]
    raise ValueError(f"unknown shape {name!r}; known: {SHAPE_NAMES}")


def place_shape(polygons, size: float, aspect: float, angle: float,
                max_wh: tuple[float, float]) -> tuple[list[tuple[np.ndarray, int]], tuple[float, float]]:
    """A `unit_shape` stretched to box aspect ~`aspect` (w / h, before rotating), rotated by `angle` radians
    and scaled to box side sqrt(w * h) = size pixels, shrunk to fit max_wh (w, h): (polygons [(vertices
    float64 [V, 2] in pixels, centred at 0, fill)], (w, h) of the box)."""
    stretch = np.array([math.sqrt(aspect), 1.0 / math.sqrt(aspect)])
    c, s = math.cos(angle), math.sin(angle)
    rotation = np.array([[c, -s], [s, c]])
    moved = [((v * stretch) @ rotation.T, fill) for v, fill in polygons]
    outer = np.concatenate([v for v, fill in moved if fill])
    lo, hi = outer.min(axis=0), outer.max(axis=0)
    w0, h0 = hi - lo
    scale = min(size / math.sqrt(w0 * h0), max_wh[0] / w0, max_wh[1] / h0)
    centre = (lo + hi) / 2
    return [((v - centre) * scale, fill) for v, fill in moved], (w0 * scale, h0 * scale)


class Mask(NamedTuple):
    """A rasterised shape: coverage over a patch of the image and the shape's tight box."""
    x0: int  # patch origin in image pixels
    y0: int
    alpha: np.ndarray  # float32 [ph, pw] coverage in [0, 1]
    box: tuple[float, float, float, float]  # tight xyxy of the shape inside the image


def render_mask(polygons, offset_xy, height: int, width: int) -> Mask | None:
    """Rasterises placed `polygons` centred at offset_xy (x, y) inside a height x width image: a Mask (box
    clipped to the image), or None when nothing of the shape falls inside."""
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
        # fine pixel (i, j) covers [i, i + 1) x [j, j + 1): shift by half a pixel to continuous coordinates
        pts = (v + (ox - x0, oy - y0)) * ss - 0.5
        draw.polygon([tuple(p) for p in pts.tolist()], fill=255 if fill else 0)
    fine = np.asarray(canvas)
    cols = np.flatnonzero(fine.any(axis=0))
    rows = np.flatnonzero(fine.any(axis=1))
    if cols.size == 0:
        return None
    box = (x0 + cols[0] / ss, y0 + rows[0] / ss, x0 + (cols[-1] + 1) / ss, y0 + (rows[-1] + 1) / ss)
    alpha = np.asarray(canvas.reduce(ss), dtype=np.float32) * (1.0 / 255.0)
    return Mask(x0, y0, alpha, box)
