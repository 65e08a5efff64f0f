"""retina_fn/data/synthetic_shapes.py: shapes, their placement and rasterisation."""

import math

import numpy as np
import pytest

from retina_fn.data import synthetic_shapes as S


# ---------------------------------------------------------------------------------------------------
# Rasterisation: boxes against analytic extents


def test_circle_box_and_area_match_geometry():
    circle = S.unit_shape("circle", np.random.default_rng(0))
    polygons = [(v * 20.0, fill) for v, fill in circle]
    mask = S.render_mask(polygons, (50.3, 60.7), height=200, width=200)
    np.testing.assert_allclose(mask.box, (30.3, 40.7, 70.3, 80.7), atol=0.3)
    assert mask.alpha.sum() == pytest.approx(math.pi * 20.0**2, rel=0.01)


def test_box_is_clipped_to_the_image():
    square = [(np.array([[-10.0, -10.0], [10.0, -10.0], [10.0, 10.0], [-10.0, 10.0]]), 1)]
    mask = S.render_mask(square, (5.0, 95.0), height=100, width=120)
    np.testing.assert_allclose(mask.box, (0.0, 85.0, 15.0, 100.0), atol=0.26)
    assert S.render_mask(square, (-50.0, 50.0), height=100, width=120) is None


def test_ring_hole_is_not_covered():
    ring = [(np.array(v) * 30.0, fill) for v, fill in S.unit_shape("ring", np.random.default_rng(1))]
    inner_radius = np.linalg.norm(ring[1][0][0])
    mask = S.render_mask(ring, (50.0, 50.0), height=100, width=100)
    expected = math.pi * (30.0**2 - inner_radius**2)
    assert mask.alpha.sum() == pytest.approx(expected, rel=0.02)
    assert mask.alpha[50 - mask.y0, 50 - mask.x0] == 0.0


def test_place_shape_gives_requested_size_and_aspect():
    gen = np.random.default_rng(2)
    polygons, (w, h) = S.place_shape(S.unit_shape("square", gen), 40.0, 2.0, 0.0, (1e3, 1e3))
    # An unrotated square stretched to aspect 2 with sqrt(w * h) = 40.
    assert (w, h) == pytest.approx((40.0 * math.sqrt(2.0), 40.0 / math.sqrt(2.0)))
    vertices = polygons[0][0]
    assert vertices[:, 0].max() - vertices[:, 0].min() == pytest.approx(w)


def test_every_class_has_a_shape_and_unknown_names_fail():
    gen = np.random.default_rng(3)
    for name in S.SHAPE_NAMES:
        polygons = S.unit_shape(name, gen)
        assert polygons[0][1] == 1 and all(v.shape[1] == 2 for v, _ in polygons)
    with pytest.raises(ValueError, match="unknown shape"):
        S.unit_shape("hexagon", gen)
    S.check_num_classes(len(S.SHAPE_NAMES))
    with pytest.raises(ValueError, match="num_classes"):
        S.check_num_classes(0)
