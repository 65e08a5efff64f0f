import numpy as np
import pytest

from retina_fn import rng
from retina_fn.data import transforms as T

CFG = T.TransformConfig()  # the 1x pipeline: (1333, 800), canvases 800x1344 / 1344x800


@pytest.mark.parametrize("hw, expected", [
    ((480, 640), (800, 1067)),    # s = min(1333/640, 800/480) = 5/3; 640 * 5/3 = 1066.67 -> 1067
    ((640, 480), (1067, 800)),    # portrait
    ((2000, 3000), (800, 1200)),  # s = min(0.4443, 0.4) = 0.4
    ((500, 2000), (333, 1333)),   # long side binds: s = 0.6665; 500 * 0.6665 = 333.25 -> 333
    ((800, 1333), (800, 1333)),   # already at the limits
    ((427, 640), (800, 1199)),    # s = 800/427 = 1.873536; 640 * s = 1199.06 -> 1199
])
def test_rescaled_size_by_hand(hw, expected):
    assert T.rescaled_size(*hw, (1333, 800)) == expected
    assert T.rescaled_size(*hw, (800, 1333)) == expected  # order of the limits does not matter


def test_canvas_by_aspect_group():
    assert T.canvas_for(480, 640, CFG) == (800, 1344)
    assert T.canvas_for(640, 480, CFG) == (1344, 800)
    assert T.canvas_for(500, 500, CFG) == (1344, 800)  # w <= h is the portrait group


def _bilinear_reference(img, out_h, out_w):
    """Half-pixel-centre bilinear with edge clamping, one output pixel at a time."""
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
    out = T.resize_image(img, dst)
    assert out.dtype == np.uint8 and out.shape == (*dst, 3)
    ref = _bilinear_reference(img.astype(np.float64), *dst)
    assert np.abs(out.astype(np.float64) - ref).max() <= 1.0  # uint8 rounding


def test_boxes_scaled_and_clipped_by_hand():
    image = np.zeros((480, 640, 3), np.uint8)
    boxes = np.array([[10, 20, 110, 220], [600, 400, 700, 500]], np.float32)
    ignore = np.array([[0, 0, 640, 480]], np.float32)
    out = T.eval_transform(image, boxes, ignore, CFG)
    sx, sy = 1067 / 640, 800 / 480
    expected = [[10 * sx, 20 * sy, 110 * sx, 220 * sy], [600 * sx, 400 * sy, 1067, 800]]
    np.testing.assert_allclose(out["boxes"], expected, rtol=1e-6)
    np.testing.assert_allclose(out["ignore_boxes"], [[0, 0, 1067, 800]], rtol=1e-6)
    np.testing.assert_allclose(out["scale_factor"], [sx, sy], rtol=1e-7)
    assert out["image_hw"].tolist() == [800, 1067] and out["orig_hw"].tolist() == [480, 640]
    assert out["image"].shape == (3, 800, 1344) and out["image"].dtype == np.float32
    assert out["flipped"] is False
    # original boxes are recovered by dividing by (sx, sy, sx, sy), apart from the clipped corner
    np.testing.assert_allclose(out["boxes"][0] / np.tile(out["scale_factor"], 2), boxes[0], rtol=1e-5)


def test_flip_boxes_and_pixels_by_hand():
    image = np.random.default_rng(0).integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    cfg = CFG._replace(scale=(8, 6), landscape_canvas=(6, 10))  # no resize: s = 1
    boxes = np.array([[1, 2, 3, 5]], np.float32)
    plain = T.transform(image, boxes, boxes, cfg, flip=False)
    flipped = T.transform(image, boxes, boxes, cfg, flip=True)
    np.testing.assert_array_equal(flipped["boxes"], [[8 - 3, 2, 8 - 1, 5]])
    np.testing.assert_array_equal(flipped["ignore_boxes"], [[5, 2, 7, 5]])
    assert flipped["flipped"] is True
    # mirrored inside the image, padding stays on the right
    np.testing.assert_array_equal(flipped["image"][:, :, :8], plain["image"][:, :, 7::-1])
    assert (flipped["image"][:, :, 8:] == 0).all()


def test_normalise_then_zero_pad():
    image = np.empty((480, 640, 3), np.uint8)
    image[:] = (200, 100, 50)
    out = T.eval_transform(image, np.zeros((0, 4)), np.zeros((0, 4)), CFG)
    inside = out["image"][:, :800, :1067]
    for c, v in enumerate((200, 100, 50)):
        np.testing.assert_allclose(inside[c], (v - CFG.mean[c]) / CFG.std[c], rtol=1e-6)
    assert (out["image"][:, :, 1067:] == 0).all() and (out["image"][:, 800:, :] == 0).all()
    assert out["boxes"].shape == (0, 4)


def test_portrait_image_goes_on_portrait_canvas():
    out = T.eval_transform(np.zeros((640, 480, 3), np.uint8), np.zeros((0, 4)), np.zeros((0, 4)), CFG)
    assert out["image"].shape == (3, 1344, 800) and out["image_hw"].tolist() == [1067, 800]


def test_canvas_too_small_is_an_error():
    cfg = CFG._replace(landscape_canvas=(800, 1000))
    with pytest.raises(ValueError, match="800x1067 .* does not fit the canvas 800x1000"):
        T.eval_transform(np.zeros((480, 640, 3), np.uint8), np.zeros((0, 4)), np.zeros((0, 4)), cfg)


def test_flip_comes_from_the_key():
    keys = [rng.fold_in(rng.key(3), i) for i in range(400)]
    decisions = [T.flip_decision(k, 0.5) for k in keys]
    assert 150 < sum(decisions) < 250
    assert decisions == [T.flip_decision(k, 0.5) for k in keys]  # a pure function of the key
    assert not any(T.flip_decision(k, 0.0) for k in keys[:50])
    assert all(T.flip_decision(k, 1.0) for k in keys[:50])
    image = np.zeros((6, 8, 3), np.uint8)
    boxes = np.array([[1, 2, 3, 5]], np.float32)
    cfg = CFG._replace(scale=(8, 6), landscape_canvas=(6, 8))
    for k, d in zip(keys[:20], decisions[:20]):
        assert T.train_transform(image, boxes, boxes, cfg, k)["flipped"] is d
