"""Focal loss and the RetinaNet loss against published values, closed forms and a loop reference."""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import numpy as np
import pytest
import torch

from configs.common import base_config
from tests.model_fixtures import spec_of
from retina_fn.losses import loss_normalizer, retinanet_loss, sigmoid_focal_loss

FLT_MIN = float(np.finfo(np.float32).tiny)
ALPHA, GAMMA = 0.25, 2.0


class Assignment(NamedTuple):
    positive: torch.Tensor
    negative: torch.Tensor
    matched: torch.Tensor


def one_hot(labels, k):
    return torch.nn.functional.one_hot(torch.tensor(labels), k).to(torch.float32)


# ----------------------------------------------------------------------------------------- focal loss
@pytest.mark.parametrize(
    "logits, labels, expected",
    [
        ([[1.0, 0.0], [0.0, 1.0]], [0, 1], 0.13562961),
        ([[1.0, 0.0, -1.0], [0.0, 1.0, 2.0]], [2, 1], 1.10251057),
        ([[1e-6, 2e-6, 3e-6], [4e-6, 5e-5, 6e-4], [7e-3, 8e-2, 9e-1]], [1, 2, 0], 0.42287254),
    ],
)
def test_focal_loss_mmcv_published_values(logits, labels, expected):
    x = torch.tensor(logits)
    mean = sigmoid_focal_loss(x, one_hot(labels, x.shape[1]), ALPHA, GAMMA).sum() / x.shape[0]
    assert mean.dtype == torch.float32
    assert abs(mean.item() - expected) < 1e-6


def test_focal_loss_mmcv_published_gradient():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    mean = sigmoid_focal_loss(x, one_hot([0, 1], 2)).sum() / 2
    (grad,) = torch.autograd.grad(mean, x)
    expected = torch.tensor([[-0.00657264, 0.11185755], [0.11185755, -0.00657264]])
    torch.testing.assert_close(grad, expected, atol=1e-7, rtol=0)


def _closed_form(x: float, t: int) -> float:
    """mmcv's per-element formula in exact arithmetic, logs floored at FLT_MIN."""
    p, q = 1.0 / (1.0 + math.exp(-x)), 1.0 / (1.0 + math.exp(x))
    if t:
        return -ALPHA * q**GAMMA * math.log(max(p, FLT_MIN))
    return -(1 - ALPHA) * p**GAMMA * math.log(max(q, FLT_MIN))


def _closed_form_grad(x: float, t: int) -> float:
    """mmcv's hand-written backward kernel formula, in exact arithmetic."""
    p, q = 1.0 / (1.0 + math.exp(-x)), 1.0 / (1.0 + math.exp(x))
    if t:
        return -ALPHA * q**GAMMA * (q - GAMMA * p * math.log(max(p, FLT_MIN)))
    return -(1 - ALPHA) * p**GAMMA * (GAMMA * q * math.log(max(q, FLT_MIN)) - p)


def test_focal_loss_matches_closed_form_in_float64():
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(200, generator=gen, dtype=torch.float64) * 6,
                   torch.tensor([-120.0, -90.0, -87.0, -40.0, 0.0, 40.0, 87.0, 90.0, 120.0], dtype=torch.float64)])
    x = x.repeat(2)
    t = torch.cat([torch.zeros(x.numel() // 2), torch.ones(x.numel() // 2)]).to(torch.float64)
    x.requires_grad_(True)
    loss = sigmoid_focal_loss(x, t, ALPHA, GAMMA)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    expected = torch.tensor([_closed_form(xi, int(ti)) for xi, ti in zip(x.tolist(), t.tolist())], dtype=torch.float64)
    expected_grad = torch.tensor([_closed_form_grad(xi, int(ti)) for xi, ti in zip(x.tolist(), t.tolist())],
                                 dtype=torch.float64)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-14)


def test_focal_loss_extreme_logits_saturate_like_mmcv_and_stay_finite():
    x = torch.tensor([[-1e4, 1e4], [-100.0, 100.0]], requires_grad=True)
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    loss = sigmoid_focal_loss(x, t)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    cap = -math.log(FLT_MIN)
    torch.testing.assert_close(loss.detach(), torch.tensor([[ALPHA * cap, (1 - ALPHA) * cap]] * 2))
    # The analytic gradient keeps pointing the right way (mmcv's backward), not zero.
    torch.testing.assert_close(grad, torch.tensor([[-ALPHA, 1 - ALPHA]] * 2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_focal_loss_low_precision_inputs_computed_in_float32(dtype):
    x = (torch.randn(8, 5, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    t = (torch.rand(8, 5, generator=torch.Generator().manual_seed(2)) > 0.7).to(dtype)
    low = sigmoid_focal_loss(x, t)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, sigmoid_focal_loss(x.float(), t.float()), rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = sigmoid_focal_loss(x.float(), t.float())
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, low, rtol=0, atol=0)


def test_focal_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        sigmoid_focal_loss(torch.zeros(2, 3), torch.zeros(2, 4))


# ------------------------------------------------------------------------------------ retinanet loss
def configs(**loss_overrides):
    """(loss, coder) settings of the 1x recipe (mmdetection's), with some loss fields changed."""
    spec = spec_of(base_config())
    return dataclasses.replace(spec.loss, **loss_overrides), spec.coder


def _encode(anchor, gt):
    pw, ph = anchor[2] - anchor[0], anchor[3] - anchor[1]
    px, py = anchor[0] + 0.5 * pw, anchor[1] + 0.5 * ph
    gw, gh = gt[2] - gt[0], gt[3] - gt[1]
    gx, gy = gt[0] + 0.5 * gw, gt[1] + 0.5 * gh
    return [(gx - px) / pw, (gy - py) / ph, math.log(gw / pw), math.log(gh / ph)]


def _giou(a, b):
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull


def _decode(anchor, delta, clamp):
    pw, ph = anchor[2] - anchor[0], anchor[3] - anchor[1]
    px, py = anchor[0] + 0.5 * pw, anchor[1] + 0.5 * ph
    dw, dh = (max(-clamp, min(clamp, d)) for d in delta[2:])
    cx, cy, w, h = px + pw * delta[0], py + ph * delta[1], pw * math.exp(dw), ph * math.exp(dh)
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def reference_loss(inputs, loss_cfg, coder_cfg, reduce_factor=1.0):
    """Plain loops over images, anchors and classes; float64 maths."""
    logits, deltas, anchors, valid, asg, gt_boxes, gt_labels = inputs
    batch, num_anchors, num_classes = logits.shape
    cls_sums, box_sums, pos_counts = [], [], []
    for b in range(batch):
        cls_sum = box_sum = 0.0
        pos_count = 0
        for a in range(num_anchors):
            pos = bool(asg.positive[b, a]) and bool(valid[b, a])
            neg = bool(asg.negative[b, a]) and bool(valid[b, a]) and not pos
            if not (pos or neg):
                continue
            g = int(asg.matched[b, a])
            for k in range(num_classes):
                target = 1 if pos and int(gt_labels[b, g]) == k else 0
                cls_sum += _closed_form(float(logits[b, a, k]), target)
            if pos:
                pos_count += 1
                anchor, gt = anchors[a].tolist(), gt_boxes[b, g].tolist()
                if loss_cfg.box_loss == "l1":
                    box_sum += sum(abs(d - e) for d, e in zip(deltas[b, a].tolist(), _encode(anchor, gt)))
                else:
                    box_sum += 1.0 - _giou(_decode(anchor, deltas[b, a].tolist(), coder_cfg.scale_clamp), gt)
        cls_sums.append(cls_sum)
        box_sums.append(box_sum)
        pos_counts.append(pos_count)
    if loss_cfg.normalizer == "batch":
        norm = sum(max(n, 1) for n in pos_counts) * reduce_factor
        loss_cls, loss_box = sum(cls_sums) / norm, sum(box_sums) / norm
    else:
        loss_cls = sum(c / max(n, 1) for c, n in zip(cls_sums, pos_counts)) / batch
        loss_box = sum(s / max(n, 1) for s, n in zip(box_sums, pos_counts)) / batch
        norm = batch
    return loss_cfg.cls_weight * loss_cls, loss_cfg.box_weight * loss_box, sum(pos_counts), norm


def random_inputs(positives_per_image=(0, 1, 3), num_anchors=12, num_classes=3, max_gt=4, seed=0):
    """A batch where image i has exactly positives_per_image[i] positive anchors; gts padded with zero
    boxes; some anchors ignored, some invalid (an invalid anchor is also flagged positive once, to
    check it is dropped)."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(positives_per_image)
    xy = torch.rand(num_anchors, 2, generator=gen) * 80
    wh = torch.rand(num_anchors, 2, generator=gen) * 40 + 8
    anchors = torch.cat([xy, xy + wh], dim=1)
    gt_boxes = torch.zeros(batch, max_gt, 4)
    gt_labels = torch.zeros(batch, max_gt, dtype=torch.int64)
    positive = torch.zeros(batch, num_anchors, dtype=torch.bool)
    negative = torch.zeros(batch, num_anchors, dtype=torch.bool)
    matched = torch.zeros(batch, num_anchors, dtype=torch.int64)
    valid = torch.ones(batch, num_anchors, dtype=torch.bool)
    for b, n_pos in enumerate(positives_per_image):
        n_gt = min(n_pos, max_gt - 1)
        for g in range(n_gt):
            gxy = torch.rand(2, generator=gen) * 80
            gt_boxes[b, g] = torch.cat([gxy, gxy + torch.rand(2, generator=gen) * 40 + 5])
            gt_labels[b, g] = int(torch.randint(num_classes, (1,), generator=gen))
        for a in range(n_pos):
            positive[b, a] = True
            matched[b, a] = a % max(n_gt, 1)
        negative[b, n_pos:num_anchors - 3] = True  # the last three anchors: ignored / invalid
        valid[b, num_anchors - 1] = False
        positive[b, num_anchors - 1] = n_pos > 0  # invalid: must count neither as positive
        negative[b, num_anchors - 1] = True  # nor as negative
        matched[b, num_anchors - 1] = max_gt - 1  # points at a padded zero box
        matched[b, n_pos:num_anchors - 1] = max_gt - 1  # garbage on non-positives, padded slot
    logits = torch.randn(batch, num_anchors, num_classes, generator=gen) * 2
    deltas = torch.randn(batch, num_anchors, 4, generator=gen) * 0.3
    return logits, deltas, anchors, valid, Assignment(positive, negative, matched), gt_boxes, gt_labels


def images(inputs, which: slice):
    """The loss inputs of some images of the batch (anchors are shared)."""
    logits, deltas, anchors, valid, asg, gt_boxes, gt_labels = inputs
    return (logits[which], deltas[which], anchors, valid[which], Assignment(*(t[which] for t in asg)),
            gt_boxes[which], gt_labels[which])


def call(inputs, loss_cfg, coder_cfg, **kwargs):
    logits, deltas, anchors, valid, asg, gt_boxes, gt_labels = inputs
    return retinanet_loss(logits, deltas, anchors, valid, asg, gt_boxes, gt_labels, loss_cfg, coder_cfg, **kwargs)


@pytest.mark.parametrize("normalizer", ["batch", "image"])
@pytest.mark.parametrize("box_loss", ["l1", "giou"])
def test_loss_matches_loop_reference(normalizer, box_loss):
    loss_cfg, coder_cfg = configs(normalizer=normalizer, box_loss=box_loss, cls_weight=1.5, box_weight=0.5)
    inputs = random_inputs()
    loss, metrics = call(inputs, loss_cfg, coder_cfg)
    exp_cls, exp_box, exp_pos, exp_norm = reference_loss(inputs, loss_cfg, coder_cfg)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert metrics["loss_cls"].item() == pytest.approx(exp_cls, rel=1e-5)
    assert metrics["loss_box"].item() == pytest.approx(exp_box, rel=1e-5)
    assert loss.item() == pytest.approx(exp_cls + exp_box, rel=1e-5)
    assert metrics["num_pos"].item() == exp_pos == 4
    assert metrics["loss"].item() == pytest.approx(exp_cls + exp_box, rel=1e-5)
    positive = inputs[4].positive & inputs[3]
    assert loss_normalizer(positive, loss_cfg).item() == exp_norm
    assert all(v.ndim == 0 for v in metrics.values())


def test_batch_normalizer_by_hand_for_0_1_3_positives():
    """Images with 0, 1 and 3 positives: N = max(0,1) + max(1,1) + max(3,1) = 5; a given normaliser
    replaces it (here doubled, as a mean over two replicas with twice the positives would give)."""
    loss_cfg, coder_cfg = configs(normalizer="batch")
    inputs = random_inputs((0, 1, 3))
    loss, metrics = call(inputs, loss_cfg, coder_cfg)
    assert loss_normalizer(inputs[4].positive & inputs[3], loss_cfg).item() == 5.0
    assert metrics["num_pos"].item() == 4.0
    loss_red, metrics_red = call(inputs, loss_cfg, coder_cfg, normalizer=torch.tensor(10.0))
    assert loss_red.item() == pytest.approx(loss.item() / 2, rel=1e-6)
    # Only the sums over the batch matter: the per-image split 0/1/3 vs one image with 4 differs.
    exp_cls, exp_box, _, _ = reference_loss(inputs, loss_cfg, coder_cfg, reduce_factor=2.0)
    assert loss_red.item() == pytest.approx(exp_cls + exp_box, rel=1e-5)


def test_image_normalizer_by_hand_and_split_into_micro_batches():
    loss_cfg, coder_cfg = configs(normalizer="image")
    inputs = random_inputs((0, 1, 3))
    loss, _ = call(inputs, loss_cfg, coder_cfg)
    assert loss_normalizer(inputs[4].positive, loss_cfg).item() == 3.0  # the number of images
    # Two micro-batches (images 0-1 and 2) with the whole batch's normaliser add up to the loss.
    summed = sum(call(images(inputs, part), loss_cfg, coder_cfg, normalizer=torch.tensor(3.0))[0].item()
                 for part in (slice(0, 2), slice(2, 3)))
    assert summed == pytest.approx(loss.item(), rel=1e-6)
    # Per-image pieces by hand: image sums / max(1, pos_i), averaged over 3 images.
    per_image = []
    for b, n_pos in enumerate((0, 1, 3)):
        one = images(inputs, slice(b, b + 1))
        batch_cfg, _ = configs(normalizer="batch")
        single, _ = call(one, batch_cfg, coder_cfg)  # one image: sum / max(1, pos)
        per_image.append(single.item())
    assert loss.item() == pytest.approx(sum(per_image) / 3, rel=1e-6)


def test_t7_empty_and_one_gt():
    """mmdetection's anchor-head test: no gt -> loss_cls > 0, loss_box == 0; one gt -> both > 0."""
    loss_cfg, coder_cfg = configs()
    anchors = torch.tensor([[20.0, 20.0, 240.0, 150.0], [300.0, 300.0, 400.0, 400.0], [0.0, 0.0, 100.0, 100.0]])
    logits = torch.zeros(1, 3, 3)
    deltas = torch.zeros(1, 3, 4)
    valid = torch.ones(1, 3, dtype=torch.bool)
    gt = torch.tensor([[[23.6667, 23.8757, 238.6326, 151.8874], [0.0, 0.0, 0.0, 0.0]]])
    labels = torch.tensor([[2, 0]])

    empty = Assignment(torch.zeros(1, 3, dtype=torch.bool), torch.ones(1, 3, dtype=torch.bool),
                       torch.zeros(1, 3, dtype=torch.int64))
    no_gt_boxes, no_gt_labels = torch.zeros(1, 2, 4), torch.zeros(1, 2, dtype=torch.int64)
    _, m = retinanet_loss(logits, deltas, anchors, valid, empty, no_gt_boxes, no_gt_labels, loss_cfg, coder_cfg)
    assert m["loss_cls"].item() > 0 and m["loss_box"].item() == 0.0
    # All three anchors negative, 3 classes each, logit 0: 9 * 0.75 * 0.25 * ln 2, normaliser 1.
    assert m["loss_cls"].item() == pytest.approx(9 * 0.75 * 0.25 * math.log(2), rel=1e-6)

    one = Assignment(torch.tensor([[True, False, False]]), torch.tensor([[False, True, False]]),
                     torch.zeros(1, 3, dtype=torch.int64))
    _, m = retinanet_loss(logits, deltas, anchors, valid, one, gt, labels, loss_cfg, coder_cfg)
    assert m["loss_cls"].item() > 0 and m["loss_box"].item() > 0
    # Positive anchor: class 2 is the target (0.25 * 0.25 * ln 2), classes 0, 1 not (0.75 * 0.25 * ln 2 each);
    # the negative anchor adds 3 * 0.75 * 0.25 * ln 2; the ignored one nothing.
    expected_cls = (0.25 * 0.25 + 5 * 0.75 * 0.25) * math.log(2)
    assert m["loss_cls"].item() == pytest.approx(expected_cls, rel=1e-6)
    expected_box = sum(abs(d) for d in _encode(anchors[0].tolist(), gt[0, 0].tolist()))
    assert m["loss_box"].item() == pytest.approx(expected_box, rel=1e-5)


def test_empty_gt_slots_g_zero():
    loss_cfg, coder_cfg = configs()
    asg = Assignment(torch.zeros(2, 5, dtype=torch.bool), torch.ones(2, 5, dtype=torch.bool),
                     torch.zeros(2, 5, dtype=torch.int64))
    loss, m = retinanet_loss(torch.zeros(2, 5, 3), torch.zeros(2, 5, 4), torch.rand(5, 4) + torch.tensor([0, 0, 2, 2]),
                             torch.ones(2, 5, dtype=torch.bool), asg, torch.zeros(2, 0, 4),
                             torch.zeros(2, 0, dtype=torch.int64), loss_cfg, coder_cfg)
    assert torch.isfinite(loss) and m["loss_box"].item() == 0.0
    assert loss_normalizer(asg.positive, loss_cfg).item() == 2.0


@pytest.mark.parametrize("box_loss", ["l1", "giou"])
def test_no_nan_with_padded_gts_and_dense_finite_gradients(box_loss):
    loss_cfg, coder_cfg = configs(box_loss=box_loss)
    logits, deltas, anchors, valid, asg, gt_boxes, gt_labels = random_inputs((0, 1, 3))
    logits.requires_grad_(True)
    deltas.requires_grad_(True)
    loss, metrics = retinanet_loss(logits, deltas, anchors, valid, asg, gt_boxes, gt_labels, loss_cfg, coder_cfg)
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())
    g_logits, g_deltas = torch.autograd.grad(loss, [logits, deltas])
    assert torch.isfinite(g_logits).all() and torch.isfinite(g_deltas).all()
    pos = asg.positive & valid
    weighted = (asg.positive | asg.negative) & valid
    assert (g_logits[weighted] != 0).all()  # every class of every positive/negative anchor
    assert (g_logits[~weighted] == 0).all()
    assert (g_deltas[pos].abs().sum(-1) > 0).all()
    assert (g_deltas[~pos] == 0).all()


def test_batch_without_positives_still_differentiates_every_input():
    loss_cfg, coder_cfg = configs()
    logits, deltas, anchors, valid, asg, gt_boxes, gt_labels = random_inputs((0, 0))
    logits.requires_grad_(True)
    deltas.requires_grad_(True)
    loss, m = retinanet_loss(logits, deltas, anchors, valid, asg, gt_boxes, gt_labels, loss_cfg, coder_cfg)
    assert m["loss_box"].item() == 0.0
    # Raises if either input took no part in the graph.
    g_logits, g_deltas = torch.autograd.grad(loss, [logits, deltas])
    assert g_deltas.shape == deltas.shape and (g_deltas == 0).all()
    assert (g_logits != 0).any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_head_outputs_give_float32_loss(dtype):
    loss_cfg, coder_cfg = configs()
    logits, deltas, anchors, valid, asg, gt_boxes, gt_labels = random_inputs()
    low = retinanet_loss(logits.to(dtype), deltas.to(dtype), anchors, valid, asg, gt_boxes, gt_labels,
                         loss_cfg, coder_cfg)
    ref = retinanet_loss(logits.to(dtype).float(), deltas.to(dtype).float(), anchors, valid, asg, gt_boxes,
                         gt_labels, loss_cfg, coder_cfg)
    assert low[0].dtype == torch.float32
    torch.testing.assert_close(low[0], ref[0], rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = retinanet_loss(logits, deltas, anchors, valid, asg, gt_boxes, gt_labels, loss_cfg, coder_cfg)
    assert auto[0].dtype == torch.float32
    torch.testing.assert_close(auto[0], retinanet_loss(logits, deltas, anchors, valid, asg, gt_boxes, gt_labels,
                                                       loss_cfg, coder_cfg)[0], rtol=0, atol=0)


@pytest.mark.parametrize("box_loss", ["l1", "giou"])
def test_func_grad_matches_autograd(box_loss):
    loss_cfg, coder_cfg = configs(box_loss=box_loss)
    logits, deltas, anchors, valid, asg, gt_boxes, gt_labels = random_inputs()
    logits, deltas = logits.double(), deltas.double()

    def objective(head):
        loss, metrics = retinanet_loss(head["cls"], head["box"], anchors, valid, asg, gt_boxes, gt_labels,
                                       loss_cfg, coder_cfg)
        return loss, metrics

    head = {"cls": logits, "box": deltas}
    func_grads, metrics = torch.func.grad(objective, has_aux=True)(head)
    leaves = {k: v.clone().requires_grad_(True) for k, v in head.items()}
    loss, _ = objective(leaves)
    auto = torch.autograd.grad(loss, [leaves["cls"], leaves["box"]])
    torch.testing.assert_close(func_grads["cls"], auto[0], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(func_grads["box"], auto[1], rtol=1e-12, atol=1e-15)
    assert metrics["num_pos"].item() == 4


def test_bad_config_and_shapes_are_named():
    inputs = random_inputs()
    logits, deltas, anchors, valid, asg, gt_boxes, gt_labels = inputs
    with pytest.raises(ValueError, match="box_deltas"):
        retinanet_loss(logits, deltas[:, :-1], anchors, valid, asg, gt_boxes, gt_labels, *configs())
    with pytest.raises(ValueError, match="anchor_valid"):
        retinanet_loss(logits, deltas, anchors, valid.float(), asg, gt_boxes, gt_labels, *configs())
