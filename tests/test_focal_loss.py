"""The fused focal loss against mmcv's published values, the closed form, the one-hot loss it replaces, and
the RetinaNet loss with model.loss.fused_focal on and off."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from retina_fn.focal_loss import BACKGROUND, IGNORE, sigmoid_focal_loss_sums
from retina_fn.losses import retinanet_loss, sigmoid_focal_loss
from tests.test_losses import ALPHA, GAMMA, _closed_form, _closed_form_grad, configs, random_inputs

K = 5
# Every kind of code: the classes, background, ignore, and values outside 0..K-1 (background too).
CODES = list(range(K)) + [BACKGROUND, IGNORE, K, K + 3, -7]


def _random_case(batch=2, anchors=300, scale=2.0, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, anchors, K, generator=gen, dtype=torch.float64) * scale).to(dtype)
    labels = torch.tensor(CODES)[torch.randint(len(CODES), (batch, anchors), generator=gen)]
    return logits, labels


def _one_hot_sums(logits, labels):
    """What the fused loss replaces: mmcv's elementwise loss on one-hot targets, times a 0/1 anchor weight."""
    targets = (labels.unsqueeze(-1) == torch.arange(logits.shape[-1])).to(logits.dtype)
    weight = (labels != IGNORE).to(logits.dtype).unsqueeze(-1)
    return (sigmoid_focal_loss(logits, targets, ALPHA, GAMMA) * weight).sum(dim=(1, 2))


def _weighted(sums_fn, image_weights):
    """sum_b w_b * sums_b: a different upstream gradient for each image, as the 'image' normaliser gives."""
    return lambda logits: (sums_fn(logits) * image_weights.to(logits.dtype)).sum()


# ------------------------------------------------------------------------------- mmcv's published values
@pytest.mark.parametrize(
    "logits, labels, expected",
    [
        ([[1.0, 0.0], [0.0, 1.0]], [0, 1], 0.13562961),
        ([[1.0, 0.0, -1.0], [0.0, 1.0, 2.0]], [2, 1], 1.10251057),
        ([[1e-6, 2e-6, 3e-6], [4e-6, 5e-5, 6e-4], [7e-3, 8e-2, 9e-1]], [1, 2, 0], 0.42287254),
    ],
)
def test_mmcv_published_values(logits, labels, expected):
    x = torch.tensor([logits])  # one image whose anchors are mmcv's rows
    mean = sigmoid_focal_loss_sums(x, torch.tensor([labels]), ALPHA, GAMMA).sum() / x.shape[1]
    assert mean.dtype == torch.float32
    assert abs(mean.item() - expected) < 1e-6


def test_mmcv_published_gradient():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    grad = torch.func.grad(lambda v: sigmoid_focal_loss_sums(v, torch.tensor([[0, 1]])).sum() / 2)(x)
    expected = torch.tensor([[[-0.00657264, 0.11185755], [0.11185755, -0.00657264]]])
    torch.testing.assert_close(grad, expected, atol=1e-7, rtol=0)


# ----------------------------------------------------------------------------------------- closed form
def test_float64_matches_the_closed_form_including_saturated_logits():
    logits, labels = _random_case(batch=1, anchors=60, scale=6.0, dtype=torch.float64)
    extreme = torch.tensor([-120.0, -90.0, -87.0, -40.0, 0.0, 40.0, 87.0, 90.0, 120.0], dtype=torch.float64)
    logits = torch.cat([logits, extreme.repeat(K, 1).T.unsqueeze(0)], dim=1)
    labels = torch.cat([labels, torch.tensor([[k % K for k in range(len(extreme))]])], dim=1)
    grad, value = torch.func.grad_and_value(lambda v: sigmoid_focal_loss_sums(v, labels).sum())(logits)
    expected_value, expected_grad = 0.0, torch.zeros_like(logits)
    for a, code in enumerate(labels[0].tolist()):
        if code == IGNORE:
            continue
        for k in range(K):
            x, t = float(logits[0, a, k]), int(code == k)
            expected_value += _closed_form(x, t)
            expected_grad[0, a, k] = _closed_form_grad(x, t)
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(expected_value, rel=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-14)


def test_hopeless_logits_saturate_like_mmcv_with_the_analytic_gradient():
    x = torch.tensor([[[-1e4, 1e4], [1e4, -1e4]]])
    grad, value = torch.func.grad_and_value(lambda v: sigmoid_focal_loss_sums(v, torch.tensor([[0, 1]])).sum())(x)
    cap = -math.log(float(np.finfo(np.float32).tiny))
    assert value.item() == pytest.approx(2 * (ALPHA + 1 - ALPHA) * cap, rel=1e-6)
    torch.testing.assert_close(grad, torch.tensor([[[-ALPHA, 1 - ALPHA], [1 - ALPHA, -ALPHA]]]))


# --------------------------------------------------------------------------- the one-hot loss it replaces
def test_float32_equals_the_one_hot_loss_and_its_gradient():
    logits, labels = _random_case()
    original = logits.clone()
    image_weights = torch.tensor([0.7, 1.9])
    fused_grad, fused = torch.func.grad_and_value(_weighted(lambda v: sigmoid_focal_loss_sums(v, labels),
                                                            image_weights))(logits)
    ref_grad, ref = torch.func.grad_and_value(_weighted(lambda v: _one_hot_sums(v, labels), image_weights))(logits)
    assert fused.dtype == fused_grad.dtype == torch.float32
    torch.testing.assert_close(sigmoid_focal_loss_sums(logits, labels), _one_hot_sums(logits, labels),
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(fused, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(fused_grad, ref_grad, rtol=1e-6, atol=1e-9)
    assert torch.equal(logits, original)  # the in-place work stays on the function's own temporaries
    ignored = labels == IGNORE
    assert ignored.any() and (fused_grad[ignored] == 0).all() and (fused_grad[~ignored] != 0).all()


def test_plain_autograd_gives_the_same_gradient_as_func_grad():
    logits, labels = _random_case(dtype=torch.float64)
    leaf = logits.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(sigmoid_focal_loss_sums(leaf, labels).sum(), leaf)
    func = torch.func.grad(lambda v: sigmoid_focal_loss_sums(v, labels).sum())(logits)
    torch.testing.assert_close(auto, func, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------- low precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits_are_computed_in_float32(dtype):
    logits, labels = _random_case(dtype=dtype)
    image_weights = torch.tensor([0.5, 3.0])
    grad, sums = torch.func.grad_and_value(_weighted(lambda v: sigmoid_focal_loss_sums(v, labels),
                                                     image_weights))(logits)
    grad32, sums32 = torch.func.grad_and_value(_weighted(lambda v: sigmoid_focal_loss_sums(v, labels),
                                                         image_weights))(logits.float())
    assert sums.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(sums, sums32, rtol=0, atol=0)
    torch.testing.assert_close(grad, grad32.to(dtype), rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = sigmoid_focal_loss_sums(logits.float(), labels)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, sigmoid_focal_loss_sums(logits.float(), labels), rtol=0, atol=0)


def test_rejects_bad_shapes_and_float_labels():
    logits, labels = _random_case()
    with pytest.raises(ValueError, match=r"\[B, A, K\]"):
        sigmoid_focal_loss_sums(logits[0], labels[0])
    with pytest.raises(ValueError, match=r"labels must be \[B, A\]"):
        sigmoid_focal_loss_sums(logits, labels[:, :-1])
    with pytest.raises(ValueError, match="integer"):
        sigmoid_focal_loss_sums(logits, labels.float())


# --------------------------------------------------------------------------- the RetinaNet loss, flag on/off
@pytest.mark.parametrize("normalizer", ["batch", "image"])
def test_retinanet_loss_and_func_grad_equal_with_the_flag_on_and_off(normalizer):
    logits, deltas, anchors, valid, asg, gt_boxes, gt_labels = random_inputs((0, 1, 3), num_anchors=40)
    # Labels outside 0..K-1 on matched gts: the one-hot path gives them an all-zero target of weight 1.
    gt_labels[2, 0], gt_labels[2, 1] = 3, IGNORE

    def objective(head, fused):
        loss_cfg, coder_cfg = configs(normalizer=normalizer, fused_focal=fused, cls_weight=1.5)
        return retinanet_loss(head["cls"], head["box"], anchors, valid, asg, gt_boxes, gt_labels, loss_cfg,
                              coder_cfg)

    head = {"cls": logits, "box": deltas}
    on_grads, on = torch.func.grad(lambda h: objective(h, True), has_aux=True)(head)
    off_grads, off = torch.func.grad(lambda h: objective(h, False), has_aux=True)(head)
    exact_grads, _ = torch.func.grad(lambda h: objective(h, False), has_aux=True)(
        {k: v.double() for k, v in head.items()})
    assert on["num_pos"].item() == off["num_pos"].item() == 4
    for name in ("loss", "loss_cls"):
        torch.testing.assert_close(on[name], off[name], rtol=1e-6, atol=0)
    torch.testing.assert_close(on["loss_box"], off["loss_box"], rtol=0, atol=0)
    torch.testing.assert_close(on_grads["box"], off_grads["box"], rtol=0, atol=0)
    # Each float32 gradient is within 1e-6 of the float64 one, so the two may differ by up to twice that.
    torch.testing.assert_close(on_grads["cls"].double(), exact_grads["cls"], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(off_grads["cls"].double(), exact_grads["cls"], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(on_grads["cls"], off_grads["cls"], rtol=2e-6, atol=1e-9)
    weighted = (asg.positive | asg.negative) & valid
    assert (on_grads["cls"][~weighted] == 0).all() and (on_grads["cls"][weighted] != 0).all()


def test_retinanet_loss_with_bfloat16_logits_and_the_flag_on():
    logits, deltas, anchors, valid, asg, gt_boxes, gt_labels = random_inputs()
    head = {"cls": logits.bfloat16(), "box": deltas.bfloat16()}

    def objective(h, fused):
        loss_cfg, coder_cfg = configs(fused_focal=fused)
        return retinanet_loss(h["cls"], h["box"], anchors, valid, asg, gt_boxes, gt_labels, loss_cfg, coder_cfg)

    on_grads, on = torch.func.grad(lambda h: objective(h, True), has_aux=True)(head)
    off_grads, off = torch.func.grad(lambda h: objective(h, False), has_aux=True)(head)
    assert on["loss"].dtype == torch.float32 and on_grads["cls"].dtype == torch.bfloat16
    torch.testing.assert_close(on["loss"], off["loss"], rtol=1e-6, atol=0)
    # Both round the same float32 gradient to bfloat16, up to one bfloat16 step where float32 differs.
    torch.testing.assert_close(on_grads["cls"], off_grads["cls"], rtol=2**-7, atol=0)
