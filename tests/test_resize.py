"""retina_fn/data/resize.py: the two resize rules, their table, and the canvases."""

import numpy as np
import pytest

from retina_fn.data import resize as R
from retina_fn.data.transforms import TransformConfig

MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


@pytest.mark.parametrize("hw, expected", [
    ((480, 640), (800, 1067)),    # s = min(1333/640, 800/480) = 5/3; 640 * 5/3 = 1066.67 -> 1067
    ((640, 480), (1067, 800)),    # portrait
    ((2000, 3000), (800, 1200)),  # s = min(0.4443, 0.4) = 0.4
    ((500, 2000), (333, 1333)),   # long side binds: s = 0.6665; 500 * 0.6665 = 333.25 -> 333
    ((800, 1333), (800, 1333)),   # already at the limits
    ((427, 640), (800, 1199)),    # s = 800/427 = 1.873536; 640 * s = 1199.06 -> 1199
])
def test_rescaled_size_by_hand(hw, expected):
    assert R.rescaled_size(*hw, (1333, 800)) == expected
    assert R.rescaled_size(*hw, (800, 1333)) == expected  # order of the limits does not matter


@pytest.mark.parametrize("hw, expected", [
    ((480, 640), (800, 1066)),  # s = 800 / 480; 640 * s = 1066.67 is floored (mmdetection rounds to 1067)
    ((427, 640), (800, 1199)),  # 640 * 800 / 427 = 1199.06
    ((300, 1000), (399, 1333)),  # long side binds: s = 1.333, 300 * s = 399.9
])
def test_torchvision_size_floors(hw, expected):
    assert R.torchvision_size(*hw, (1333, 800)) == expected
    assert R.torchvision_size(*hw, (800, 1333)) == expected


def _bilinear_reference(img, out_h, out_w):
    """Half-pixel-centre bilinear with edge clamping, one output pixel at a time ([h, w, C] float64)."""
    in_h, in_w = img.shape[:2]
    out = np.zeros((out_h, out_w, img.shape[2]))
    for y in range(out_h):
        sy = min(max((y + 0.5) * in_h / out_h - 0.5, 0.0), in_h - 1)
        y0 = int(np.floor(sy)); y1 = min(y0 + 1, in_h - 1); fy = sy - y0
        for x in range(out_w):
            sx = min(max((x + 0.5) * in_w / out_w - 0.5, 0.0), in_w - 1)
            x0 = int(np.floor(sx)); x1 = min(x0 + 1, in_w - 1); fx = sx - x0
            top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
            bottom = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
            out[y, x] = top * (1 - fy) + bottom * fy
    return out


@pytest.mark.parametrize("src, dst", [((3, 4), (5, 7)), ((6, 8), (3, 5)), ((5, 5), (5, 9))])
def test_resize_is_plain_bilinear(src, dst):
    img = np.random.default_rng(1).integers(0, 256, size=(*src, 3), dtype=np.uint8)
    out = R.resize_image(img, dst)
    assert out.dtype == np.uint8 and out.shape == (*dst, 3)
    ref = _bilinear_reference(img.astype(np.float64), *dst)
    assert np.abs(out.astype(np.float64) - ref).max() <= 1.0  # uint8 rounding


def test_mmdet_resizes_uint8_then_normalises():
    img = np.random.default_rng(2).integers(0, 256, size=(9, 13, 3), dtype=np.uint8)
    out = R.mmdet_resize_normalize(img, (14, 6), MEAN, STD)
    assert out.shape == (3, 14, 6) and out.dtype == np.float32
    resized = R.resize_image(img, (14, 6)).astype(np.float64)
    for c in range(3):
        np.testing.assert_allclose(out[c], (resized[:, :, c] - MEAN[c]) / STD[c], rtol=1e-6, atol=1e-6)
    into = np.full((3, 14, 6), np.nan, np.float32)
    assert R.mmdet_resize_normalize(img, (14, 6), MEAN, STD, out=into) is into
    np.testing.assert_array_equal(into, out)


def test_torchvision_normalises_then_resamples():
    img = np.random.default_rng(0).integers(0, 256, size=(9, 13, 3), dtype=np.uint8)
    out = R.torchvision_normalize_resize(img, (14, 6), MEAN, STD)
    assert out.shape == (3, 14, 6) and out.dtype == np.float32
    normalised = (img / 255.0 - np.array(MEAN) / 255.0) / (np.array(STD) / 255.0)
    ref = _bilinear_reference(normalised, 14, 6).transpose(2, 0, 1)
    np.testing.assert_allclose(out, ref, atol=2e-5)
    into = np.zeros((3, 14, 6), np.float32)
    assert R.torchvision_normalize_resize(img, (14, 6), MEAN, STD, out=into) is into
    np.testing.assert_array_equal(into, out)
    with pytest.raises(ValueError, match="uint8"):
        R.torchvision_normalize_resize(img.astype(np.float32), (14, 6), MEAN, STD)


def test_the_table_holds_both_modes():
    assert set(R.RESIZE_MODES) == {"mmdet", "torchvision"}
    mmdet, tv = R.RESIZE_MODES["mmdet"], R.RESIZE_MODES["torchvision"]
    assert (mmdet.size, mmdet.resize_normalize, mmdet.flip_first) == (R.rescaled_size, R.mmdet_resize_normalize,
                                                                      False)
    assert (tv.size, tv.resize_normalize, tv.flip_first) == (R.torchvision_size, R.torchvision_normalize_resize,
                                                             True)
    assert R.resize_rule("torchvision") is tv
    with pytest.raises(ValueError, match=r"data.resize_mode must be one of \('mmdet', 'torchvision'\), got 'cv2'"):
        R.resize_rule("cv2")


def test_resized_size_follows_the_mode():
    cfg = TransformConfig()
    assert R.resized_size(480, 640, cfg) == (800, 1067)
    assert R.resized_size(480, 640, cfg._replace(resize_mode="torchvision")) == (800, 1066)
    with pytest.raises(ValueError, match="data.resize_mode"):
        R.resized_size(480, 640, cfg._replace(resize_mode="pil"))


def test_canvases():
    canvas = R.new_canvas((5, 7), (8, 7))
    assert canvas.shape == (3, 8, 7) and canvas.dtype == np.float32 and not canvas.any()
    with pytest.raises(ValueError, match="resized image 5x8 .* does not fit the canvas 8x7"):
        R.new_canvas((5, 8), (8, 7))
    assert R.tight_canvas((96, 54), 32) == (96, 64)
    assert R.tight_canvas((1, 33), 32) == (32, 64)
    assert R.batch_canvas([(320, 426), (479, 320)]) == (480, 448)
    assert R.batch_canvas([(100, 60)], 16) == (112, 64)
