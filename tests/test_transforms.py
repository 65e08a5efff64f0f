"""retina_fn/data/transforms.py: the pipeline of one image, for both resize modes."""

import numpy as np
import pytest

from retina_fn import rng
from retina_fn.data import resize
from retina_fn.data import transforms as T

CFG = T.TransformConfig()  # the 1x pipeline: (1333, 800), canvases 800x1344 / 1344x800


def test_canvas_by_aspect_group():
    assert T.canvas_for(480, 640, CFG) == (800, 1344)
    assert T.canvas_for(640, 480, CFG) == (1344, 800)
    assert T.canvas_for(500, 500, CFG) == (1344, 800)  # w <= h is the portrait group


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


def test_mmdet_flip_mirrors_the_resized_image():
    image = np.random.default_rng(4).integers(0, 256, size=(45, 70, 3), dtype=np.uint8)
    cfg = CFG._replace(scale=(96, 64), landscape_canvas=(64, 96))
    flipped = T.transform(image, np.zeros((0, 4)), np.zeros((0, 4)), cfg, flip=True)
    new_h, new_w = flipped["image_hw"]
    mirrored = resize.mmdet_resize_normalize(image, (new_h, new_w), cfg.mean, cfg.std)[:, :, ::-1]
    np.testing.assert_array_equal(flipped["image"][:, :new_h, :new_w], mirrored)


def test_torchvision_transform_boxes_canvas_and_flip():
    cfg = CFG._replace(scale=(96, 64), landscape_canvas=(64, 96), portrait_canvas=(96, 64))
    image = np.random.default_rng(1).integers(0, 256, size=(45, 70, 3), dtype=np.uint8)
    boxes = np.array([[7.0, 9.0, 35.0, 40.0]], dtype=np.float32)
    out = T.torchvision_transform(image, boxes, np.zeros((0, 4)), cfg, flip=False)  # cfg says 'mmdet'
    # s = min(64 / 45, 96 / 70) = 96 / 70; h = 45 * 96 / 70 = 61.7 -> 61 (floored)
    assert tuple(out["image_hw"]) == (61, 96)
    sx, sy = 96 / 70, 61 / 45
    np.testing.assert_allclose(out["scale_factor"], [sx, sy], rtol=1e-6)
    np.testing.assert_allclose(out["boxes"][0], [7 * sx, 9 * sy, 35 * sx, 40 * sy], rtol=1e-6)
    assert out["image"].shape == (3, 64, 96) and np.all(out["image"][:, 61:, :] == 0)
    same = T.transform(image, boxes, np.zeros((0, 4)), cfg._replace(resize_mode="torchvision"), flip=False)
    for key in ("image", "boxes", "image_hw", "scale_factor"):
        np.testing.assert_array_equal(out[key], same[key])
    # the flip mirrors the uint8 input before it is normalised and resized
    flipped = T.torchvision_transform(image, boxes, np.zeros((0, 4)), cfg, flip=True)
    np.testing.assert_allclose(flipped["boxes"][0], [(70 - 35) * sx, 9 * sy, (70 - 7) * sx, 40 * sy], rtol=1e-6)
    mirrored = resize.torchvision_normalize_resize(np.ascontiguousarray(image[:, ::-1]), (61, 96), cfg.mean, cfg.std)
    np.testing.assert_array_equal(flipped["image"][:, :61, :96], mirrored)
    with pytest.raises(ValueError, match="does not fit the canvas"):
        T.torchvision_transform(image, boxes, np.zeros((0, 4)), cfg, flip=False, canvas_hw=(32, 32))
    assert T.torchvision_transform(image, boxes, boxes, cfg, flip=False, canvas_hw=(64, 128))["image"].shape == (
        3, 64, 128)


def test_transform_dispatches_through_the_table(monkeypatch):
    image = np.zeros((6, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="data.resize_mode"):
        T.eval_transform(image, np.zeros((0, 4)), np.zeros((0, 4)), CFG._replace(resize_mode="cv2"))

    def constant(img, size_hw, mean, std, out=None):
        out[...] = 7.0
        return out

    monkeypatch.setitem(resize.RESIZE_MODES, "halve", resize.ResizeRule(
        lambda h, w, scale: (h // 2, w // 2), constant, flip_first=False))
    out = T.eval_transform(image, np.array([[2.0, 2.0, 6.0, 4.0]]), np.zeros((0, 4)),
                           CFG._replace(resize_mode="halve", landscape_canvas=(4, 8)))
    assert out["image_hw"].tolist() == [3, 4] and out["image"].shape == (3, 4, 8)
    assert (out["image"][:, :3, :4] == 7).all() and (out["image"][:, 3:] == 0).all()
    np.testing.assert_array_equal(out["boxes"], [[1, 1, 3, 2]])


@pytest.mark.parametrize("mode", ["mmdet", "torchvision"])
def test_preprocess_for_inference(mode):
    cfg = CFG._replace(scale=(96, 64), landscape_canvas=(64, 96), portrait_canvas=(96, 64), resize_mode=mode)
    image = np.random.default_rng(3).integers(0, 256, size=(70, 40, 3), dtype=np.uint8)
    fixed = T.preprocess_for_inference(image, cfg)
    empty = np.zeros((0, 4), np.float32)
    expected = T.eval_transform(image, empty, empty, cfg)
    for key in ("image", "boxes", "ignore_boxes", "image_hw", "orig_hw", "scale_factor"):
        np.testing.assert_array_equal(fixed[key], expected[key])
    assert fixed["flipped"] is False and fixed["boxes"].shape == (0, 4)
    np.testing.assert_array_equal(T.preprocess_for_inference(image, cfg, None)["image"], fixed["image"])
    tight = T.preprocess_for_inference(image, cfg, "tight", size_divisor=32)
    new_h, new_w = resize.resized_size(70, 40, cfg)  # (96, 55) mmdet, (96, 54) torchvision
    assert tight["image"].shape == (3, 96, 64) and tight["image_hw"].tolist() == [new_h, new_w]
    np.testing.assert_array_equal(tight["image"], fixed["image"])  # the portrait canvas is already tight
    assert T.preprocess_for_inference(image, cfg, "tight", size_divisor=40)["image"].shape == (3, 120, 80)
    with pytest.raises(ValueError, match="canvas mode must be one of"):
        T.preprocess_for_inference(image, cfg, "loose")
