"""data.uint8_canvas: the loader ships resized uint8 pixels and retina_fn.model.inputs normalises them on the
device into the float32 image of the host pipeline, bit for bit; the detector takes either."""

import numpy as np
import pytest
import torch

from configs.common import base_config, data_config
from retina_fn import rng, tree
from retina_fn.data import resize
from retina_fn.data import transforms as T
from retina_fn.data.batching import collate
from retina_fn.data.coco import load_coco
from retina_fn.data.loader import make_eval_loader, make_train_loader
from retina_fn.model import inputs
from retina_fn.train import build_optimizer, init_train_state, make_eval_step, make_train_step
from tests.coco_fixtures import small_dataset, tiny_data_config
from tests.model_fixtures import eval_step_of, settings_of, spec_of, tiny_config

CANVAS = (64, 96)
CFG = T.TransformConfig(scale=(96, 64), landscape_canvas=CANVAS, portrait_canvas=CANVAS[::-1])
U8 = CFG._replace(uint8_canvas=True)
# original (h, w): downscaled, upscaled, portrait, square, odd ratios
SIZES = [(120, 200), (30, 41), (90, 50), (64, 64), (17, 91), (77, 133)]


def _bits(x: torch.Tensor) -> torch.Tensor:
    """float32 -> its int32 bit patterns (so -0.0 and 0.0 differ, and NaNs compare)."""
    return x.contiguous().view(torch.int32)


def _image(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _by_hand(image, image_hw, canvas, flip, mean, std):
    """The float32 canvas from its definition: resize the uint8 image, mirror it, then per channel
    (pixel - float32(mean)) * float32(1 / std) inside the image and 0 outside."""
    h, w = image_hw
    resized = resize.resize_image(image, (h, w)).astype(np.float32)
    if flip:
        resized = resized[:, ::-1]
    out = np.zeros((3, *canvas), np.float32)
    for c in range(3):
        out[c, :h, :w] = (resized[:, :, c] - np.float32(mean[c])) * np.float32(1.0 / np.float64(std[c]))
    return torch.from_numpy(out)


@pytest.mark.parametrize("flip", [False, True])
def test_uint8_transform_normalised_on_the_device_is_the_float_transform(flip):
    for seed, (h, w) in enumerate(SIZES):
        image = _image(h, w, seed)
        boxes = np.array([[1.0, 2.0, w / 2, h / 2]], np.float32)
        ref = T.transform(image, boxes, boxes, CFG, flip=flip)
        out = T.transform(image, boxes, boxes, U8, flip=flip)
        assert out["image"].dtype == np.uint8 and out["image"].shape == ref["image"].shape
        for key in ("boxes", "ignore_boxes", "image_hw", "orig_hw", "scale_factor", "flipped"):
            np.testing.assert_array_equal(out[key], ref[key])
        new_h, new_w = out["image_hw"].tolist()
        assert not out["image"][:, new_h:].any() and not out["image"][:, :, new_w:].any()  # zero padding
        device = inputs.normalize(torch.from_numpy(out["image"])[None], torch.from_numpy(out["image_hw"])[None],
                                  CFG.mean, CFG.std)[0]
        assert device.dtype == torch.float32
        assert torch.equal(_bits(device), _bits(torch.from_numpy(ref["image"]))), (h, w)
        hand = _by_hand(image, (new_h, new_w), ref["image"].shape[1:], flip, CFG.mean, CFG.std)
        assert torch.equal(_bits(device), _bits(hand)), (h, w)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_normalises_to_the_host_pipeline_bits():
    samples = [(T.transform(_image(h, w, s), np.zeros((0, 4)), np.zeros((0, 4)), CFG, flip=s % 2 == 1),
                T.transform(_image(h, w, s), np.zeros((0, 4)), np.zeros((0, 4)), U8, flip=s % 2 == 1))
               for s, (h, w) in enumerate(SIZES) if w > h]  # the landscape ones share a canvas
    host = torch.from_numpy(np.stack([f["image"] for f, _ in samples]))
    shipped = torch.from_numpy(np.stack([u["image"] for _, u in samples])).cuda()
    hw = torch.from_numpy(np.stack([u["image_hw"] for _, u in samples])).cuda()
    assert torch.equal(_bits(inputs.normalize(shipped, hw, CFG.mean, CFG.std).cpu()), _bits(host))


def test_preprocess_for_inference_ships_uint8_too():
    image = _image(70, 40, 3)
    ref = T.preprocess_for_inference(image, CFG, "tight", size_divisor=32)
    out = T.preprocess_for_inference(image, U8, "tight", size_divisor=32)
    assert out["image"].dtype == np.uint8 and out["image"].shape == ref["image"].shape
    device = inputs.normalize(torch.from_numpy(out["image"])[None], torch.from_numpy(out["image_hw"])[None],
                              CFG.mean, CFG.std)
    assert torch.equal(_bits(device[0]), _bits(torch.from_numpy(ref["image"])))


def test_torchvision_mode_refuses_uint8_canvases():
    cfg = data_config()
    cfg.resize_mode = "torchvision"
    cfg.uint8_canvas = True
    with pytest.raises(ValueError, match=r"data.uint8_canvas=True needs a resize mode .*\('mmdet',\); "
                                         r"data.resize_mode='torchvision' normalises first"):
        T.TransformConfig.from_config(cfg)
    with pytest.raises(ValueError, match="data.uint8_canvas=True"):
        T.torchvision_transform(_image(40, 60, 0), np.zeros((0, 4)), np.zeros((0, 4)), U8, flip=False)
    with pytest.raises(ValueError, match="data.uint8_canvas=True"):
        T.transform(_image(40, 60, 0), np.zeros((0, 4)), np.zeros((0, 4)), U8._replace(resize_mode="torchvision"),
                    flip=False)
    cfg.resize_mode = "mmdet"
    assert T.TransformConfig.from_config(cfg).uint8_canvas


def test_normalize_padding_slots_and_errors():
    image = torch.full((2, 3, 4, 6), 255, dtype=torch.uint8)
    hw = torch.tensor([[4, 6], [2, 3]])
    out = inputs.normalize(image, hw, (0.0, 0.0, 0.0), (1.0, 2.0, 4.0), real=torch.tensor([True, False]))
    assert out[0, :, :, :].tolist() == [[[255.0] * 6] * 4, [[127.5] * 6] * 4, [[63.75] * 6] * 4]
    assert not out[1].any()  # a padding slot is zero everywhere, whatever its image_hw
    out = inputs.normalize(image, hw, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert out[1, :, :2, :3].eq(255).all() and not out[1, :, 2:].any() and not out[1, :, :, 3:].any()
    with pytest.raises(ValueError, match=r"image must be uint8 \[B, 3, H, W\]"):
        inputs.normalize(image.float(), hw, (0, 0, 0), (1, 1, 1))
    with pytest.raises(ValueError, match=r"image_hw must be \[B, 2\] = \[2, 2\]"):
        inputs.normalize(image, hw[:1], (0, 0, 0), (1, 1, 1))
    with pytest.raises(ValueError, match=r"real must be \[B\] = \[2\]"):
        inputs.normalize(image, hw, (0, 0, 0), (1, 1, 1), real=torch.tensor([True]))


def test_model_input_passes_floats_through_and_refuses_other_integers():
    cfg = spec_of(base_config()).input
    batch = {"image": torch.zeros(1, 3, 4, 4), "image_hw": torch.tensor([[4, 4]])}
    assert inputs.model_input(batch, cfg) is batch["image"]
    with pytest.raises(ValueError, match="floating .* or uint8 .* got torch.int32"):
        inputs.model_input(dict(batch, image=torch.zeros(1, 3, 4, 4, dtype=torch.int32)), cfg)


def test_the_model_normalises_with_the_data_mean_and_std():
    cfg = base_config()
    assert cfg.model.pixel_mean == cfg.data.mean and cfg.model.pixel_std == cfg.data.std
    cfg.data.mean, cfg.data.std = (1.0, 2.0, 3.0), (4.0, 5.0, 6.0)
    assert cfg.model.pixel_mean == (1.0, 2.0, 3.0) and cfg.model.pixel_std == (4.0, 5.0, 6.0)


def test_collate_refuses_mixed_canvas_dtypes():
    sample = dict(image=np.zeros((3, 4, 6), np.float32), boxes=np.zeros((0, 4), np.float32),
                  labels=np.zeros(0, np.int64), ignore_boxes=np.zeros((0, 4), np.float32),
                  image_hw=np.array([4, 6]), orig_hw=np.array([4, 6]), scale_factor=np.ones(2, np.float32),
                  flipped=False, image_id=1, index=0, replaced=False)
    with pytest.raises(ValueError, match="share a canvas and its dtype"):
        collate([sample, dict(sample, image=sample["image"].astype(np.uint8))], 2, 1)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    sizes = [(30, 40), (40, 30), (24, 40), (36, 36), (30, 45), (45, 30), (20, 32), (32, 20), (33, 41)]
    return load_coco(*small_dataset(tmp_path_factory.mktemp("coco_u8"), sizes, boxes_per_image=3))


def _assert_same_batches(float_batches, uint8_batches, model_cfg):
    assert len(float_batches) == len(uint8_batches) > 0
    for a, b in zip(float_batches, uint8_batches):
        assert a["image"].dtype == torch.float32 and b["image"].dtype == torch.uint8
        for key in a:
            if key != "image":
                assert torch.equal(a[key], b[key]), key
        assert torch.equal(_bits(inputs.model_input(b, model_cfg)), _bits(a["image"]))


def test_loaders_ship_uint8_that_normalise_to_their_float_batches(coco):
    model_cfg = spec_of(base_config()).input  # the data's mean and std
    key = rng.key(4)
    for loader in (make_train_loader, make_eval_loader):
        kwargs = dict(rank=0, world_size=1, key=key) if loader is make_train_loader else dict(rank=0, world_size=2)
        plain = list(loader(tiny_data_config(), coco, **kwargs))
        shipped = list(loader(tiny_data_config(uint8_canvas=True), coco, **kwargs))
        _assert_same_batches(plain, shipped, model_cfg)
        if loader is make_eval_loader:  # a padding slot (image_id -1) is all zero in both
            assert any((b["image_id"] < 0).any() for b in shipped)
        else:
            assert any(b["flipped"].any() for b in shipped)


def _detector_batches():
    """The same four generated images through the host pipeline: a float32 batch and a uint8 one."""
    float_samples, uint8_samples = [], []
    for i, (h, w) in enumerate([(120, 200), (30, 41), (50, 90), (77, 133)]):
        image = _image(h, w, 10 + i)
        boxes = np.array([[w * 0.1, h * 0.2, w * 0.6, h * 0.9], [0, 0, w * 0.3, h * 0.3]], np.float32)
        extra = dict(labels=np.array([i % 3, 1]), image_id=i + 1, index=i, replaced=False)
        float_samples.append(dict(T.transform(image, boxes, boxes[:0], CFG, flip=i % 2 == 1), **extra))
        uint8_samples.append(dict(T.transform(image, boxes, boxes[:0], U8, flip=i % 2 == 1), **extra))
    return collate(float_samples, 5, 2), collate(uint8_samples, 5, 2)


def test_train_step_and_predict_are_bitwise_the_same():
    cfg = tiny_config(canvas=CANVAS)
    cfg.data.mean, cfg.data.std = CFG.mean, CFG.std
    cfg.model.test.score_thr = 0.0  # an untrained head scores about 0.01: keep its detections to compare
    float_batch, uint8_batch = _detector_batches()
    optimizer = build_optimizer(settings_of(cfg))
    state = init_train_state(spec_of(cfg), settings_of(cfg), rng.key(0), optimizer)
    step = make_train_step(spec_of(cfg), settings_of(cfg), optimizer, steps_per_epoch=10, global_batch=4)
    state_a, metrics_a = step(state, float_batch)  # the step is pure: `state` is not changed
    state_b, metrics_b = step(state, uint8_batch)
    assert float(metrics_a["num_pos"]) > 0
    for k in metrics_a:
        assert torch.equal(metrics_a[k], metrics_b[k]), k
    fa, fb = tree.flatten_by_path(state_a), tree.flatten_by_path(state_b)
    for path in fa:
        assert torch.equal(fa[path], fb[path]), path
    eval_step = eval_step_of(cfg)
    params = tree.merge(state["params"], state["frozen"])
    det_a, det_b = eval_step(params, float_batch), eval_step(params, uint8_batch)
    assert det_a.valid.any()
    for name, a, b in zip(det_a._fields, det_a, det_b):
        assert torch.equal(a, b), name
