"""retina_fn/data/synthetic_render.py: one image and its annotations."""

import numpy as np

from retina_fn.data import synthetic_render as R


def test_render_image_is_a_pure_function_of_its_arguments():
    a_pixels, a_anns = R.render_image(7, 12, image_size=96, num_classes=3)
    b_pixels, b_anns = R.render_image(7, 12, image_size=96, num_classes=3)
    np.testing.assert_array_equal(a_pixels, b_pixels)
    assert a_anns == b_anns
    other, _ = R.render_image(7, 13, image_size=96, num_classes=3)
    assert other.shape != a_pixels.shape or (other != a_pixels).any()


def test_rendered_sizes_labels_and_boxes():
    lo, hi = R.image_size_range(96)
    assert (lo, hi) == (75, 120)
    for image_id in range(1, 9):
        pixels, anns = R.render_image(1, image_id, image_size=96, num_classes=2)
        h, w = pixels.shape[:2]
        assert pixels.dtype == np.uint8 and pixels.shape[2] == 3 and lo <= h <= hi and lo <= w <= hi
        for ann in anns:
            x, y, bw, bh = ann["bbox"]
            assert ann["label"] in (0, 1) and ann["iscrowd"] in (0, 1)
            assert 0 <= x and 0 <= y and x + bw <= w + 1e-6 and y + bh <= h + 1e-6 and bw > 0 and bh > 0
