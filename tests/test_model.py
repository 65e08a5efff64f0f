"""The assembled detector: FPN, head, parameter counts, trainable mask, loss gradients."""

import pytest
import torch

from configs.common import model_config
from retina_fn import anchors, assign, losses, rng, tree
from retina_fn.model import fpn, head, retinanet
from tests.model_fixtures import synthetic_batch, tiny_config


@pytest.fixture(scope="module")
def r50_params():
    return retinanet.init(rng.key(0), model_config())


def test_r50_fpn_parameter_counts_match_the_spec(r50_params):
    cfg = model_config()
    assert retinanet.num_parameters(r50_params) == 37_968_692
    assert retinanet.num_parameters(r50_params, cfg, trainable_only=True) == 37_743_348


def test_trainable_mask_freezes_stem_layer1_and_statistics(r50_params):
    cfg = model_config()
    mask = tree.flatten_by_path(retinanet.trainable_mask(r50_params, cfg))
    assert not mask["backbone/conv1/weight"] and not mask["backbone/bn1/weight"]
    assert not mask["backbone/layer1/0/conv1/weight"] and not mask["backbone/layer1/2/bn3/bias"]
    assert mask["backbone/layer2/0/conv1/weight"] and mask["backbone/layer2/0/bn1/weight"]
    assert not mask["backbone/layer2/0/bn1/running_mean"] and not mask["backbone/layer4/0/downsample/1/running_var"]
    assert mask["fpn/p6/weight"] and mask["head/cls_logits/bias"]
    cfg.backbone.norm_affine_trainable = False  # torchvision's FrozenBN
    mask = tree.flatten_by_path(retinanet.trainable_mask(r50_params, cfg))
    assert not mask["backbone/layer2/0/bn1/weight"] and not mask["backbone/layer4/0/downsample/1/bias"]
    assert mask["backbone/layer4/0/downsample/0/weight"]


def test_fpn_shapes_and_extra_level_sources():
    cfg = model_config().fpn
    feats = {"C3": torch.randn(1, 8, 20, 27), "C4": torch.randn(1, 16, 10, 14), "C5": torch.randn(1, 32, 5, 7)}
    cfg.out_channels = 4
    for source, p6_in in (("input", 32), ("output", 4)):
        cfg.extra_source = source
        params = fpn.init(rng.key(1), (8, 16, 32), cfg)
        assert params["p6"]["weight"].shape == (4, p6_in, 3, 3)
        outs = fpn.apply(params, feats, cfg)
        # the top-down path upsamples to the exact finer size (14 -> 27 is not a factor of 2)
        assert [tuple(o.shape[-2:]) for o in outs] == [(20, 27), (10, 14), (5, 7), (3, 4), (2, 2)]


def test_fpn_top_down_path_by_hand():
    """1-channel FPN with identity-like weights: P5 = C5, P4 = C4 + up(C5), P3 = C3 + up(P4)."""
    cfg = model_config().fpn
    cfg.out_channels = 1
    one = lambda k: {"weight": torch.zeros(1, 1, k, k).index_fill_(2, torch.tensor([k // 2]), 0)  # noqa: E731
                     .index_fill_(3, torch.tensor([k // 2]), 0), "bias": torch.zeros(1)}
    params = {"lateral": {str(i): {"weight": torch.ones(1, 1, 1, 1), "bias": torch.zeros(1)} for i in range(3)},
              "output": {str(i): one(3) for i in range(3)}, "p6": one(3), "p7": one(3)}
    for i in range(3):
        params["output"][str(i)]["weight"][0, 0, 1, 1] = 1.0
    c3, c4, c5 = torch.arange(16.0).reshape(1, 1, 4, 4), torch.ones(1, 1, 2, 2) * 100, torch.ones(1, 1, 1, 1) * 1000
    p3, p4, p5, _, _ = fpn.apply(params, {"C3": c3, "C4": c4, "C5": c5}, cfg)
    assert torch.equal(p5, c5)
    assert torch.equal(p4, c4 + 1000)
    assert torch.equal(p3, c3 + 1100)


def test_head_output_order_is_level_y_x_anchor_class():
    cfg = model_config().head
    cfg.stacked_convs, cfg.feat_channels = 1, 2
    params = head.init(rng.key(2), 2, 3, 4, cfg)
    levels = [torch.randn(2, 2, 3, 5), torch.randn(2, 2, 2, 3)]
    logits, deltas = head.apply(params, levels, 4, cfg)
    assert logits.shape == (2, (15 + 6) * 3, 4) and deltas.shape == (2, (15 + 6) * 3, 4)
    # recompute one level's raw conv output and index it the way mmdetection orders anchors
    x = torch.nn.functional.relu(torch.nn.functional.conv2d(levels[1], params["cls_convs"]["0"]["weight"],
                                                            params["cls_convs"]["0"]["bias"], padding=1))
    raw = torch.nn.functional.conv2d(x, params["cls_logits"]["weight"], params["cls_logits"]["bias"], padding=1)
    y, xcol, a, k = 1, 2, 2, 3
    flat = 15 * 3 + (y * 3 + xcol) * 3 + a
    assert torch.allclose(logits[1, flat, k], raw[1, a * 4 + k, y, xcol])


def test_head_init_prior_bias_and_gn_variant():
    cfg = model_config().head
    params = head.init(rng.key(3), 256, 9, 80, cfg)
    assert torch.allclose(torch.sigmoid(params["cls_logits"]["bias"]), torch.full((720,), 0.01))
    assert float(params["cls_convs"]["0"]["weight"].std()) == pytest.approx(0.01, rel=0.02)
    cfg.norm = "gn"
    gn = head.init(rng.key(3), 256, 9, 80, cfg)
    assert "bias" not in gn["cls_convs"]["0"] and gn["cls_convs"]["0"]["norm"]["weight"].shape == (256,)
    out, _ = head.apply(gn, [torch.randn(1, 256, 4, 4)], 80, cfg)
    assert out.shape == (1, 144, 80)


def test_anchor_count_matches_outputs_for_the_1x_canvas():
    cfg = model_config()
    assert anchors.anchors((800, 1344), cfg).shape == (201_600, 4)
    tiny = tiny_config()
    params = retinanet.init(rng.key(0), tiny.model)
    logits, deltas = retinanet.apply(params, torch.zeros(1, 3, 64, 96), tiny.model)
    assert logits.shape[1] == anchors.anchors((64, 96), tiny.model).shape[0]


def test_apply_rejects_bad_images():
    cfg = tiny_config()
    params = retinanet.init(rng.key(0), cfg.model)
    with pytest.raises(ValueError, match="multiple of size_divisor"):
        retinanet.apply(params, torch.zeros(1, 3, 50, 64), cfg.model)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        retinanet.apply(params, torch.zeros(3, 64, 64), cfg.model)


def _loss(params, batch, cfg):
    canvas = tuple(batch["image"].shape[-2:])
    a = anchors.anchors(canvas, cfg.model).to(batch["image"].dtype)
    valid = anchors.valid_flags(canvas, batch["image_hw"], cfg.model)
    asg = assign.assign(a, valid, batch["boxes"], batch["box_valid"], cfg.model.assigner)
    logits, deltas = retinanet.apply(params, batch["image"], cfg.model)
    return losses.retinanet_loss(logits, deltas, a, valid, asg, batch["boxes"], batch["labels"], cfg.model.loss,
                                 cfg.model.coder)


def test_loss_on_images_with_0_1_7_and_max_boxes_in_one_call():
    cfg = tiny_config()
    params = retinanet.init(rng.key(0), cfg.model)
    batch = synthetic_batch(num_boxes=(0, 1, 7, 10), max_boxes=10)
    loss, metrics = _loss(params, batch, cfg)
    assert torch.isfinite(loss) and float(metrics["loss_cls"]) > 0 and float(metrics["loss_box"]) > 0
    # the empty image adds exactly 1 to the normaliser (mmdetection's max(pos, 1))
    canvas = tuple(batch["image"].shape[-2:])
    valid = anchors.valid_flags(canvas, batch["image_hw"], cfg.model)
    asg = assign.assign(anchors.anchors(canvas, cfg.model), valid, batch["boxes"], batch["box_valid"],
                        cfg.model.assigner)
    assert float(losses.loss_normalizer(asg.positive & valid, cfg.model.loss)) == float(metrics["num_pos"]) + 1


def test_torch_func_gradients_match_autograd_float64():
    """torch.func.grad over the trainable leaves: exactly those leaves (no frozen stage, no BN statistic),
    each equal to autograd's to float64 tolerance and non-zero (every trainable leaf reaches the loss), and
    equal to central finite differences of the loss on one scalar of the head, the backbone's last stage and
    a trainable BN affine of a frozen-statistics BN, so a gradient that both differentiators get wrong the
    same way (a detach, a dropped term) fails too."""
    cfg = tiny_config()
    params = tree.cast(retinanet.init(rng.key(4), cfg.model), torch.float64)
    trainable, frozen = retinanet.split_trainable(params, cfg.model)
    batch = synthetic_batch(num_boxes=(0, 2), dtype=torch.float64)

    def objective(t):
        return _loss(tree.merge(t, frozen), batch, cfg)[0]

    g_func = tree.flatten_by_path(torch.func.grad(objective)(trainable))
    flat = tree.flatten_by_path(trainable)
    assert set(g_func) == set(flat)
    for path in ("backbone/conv1/weight", "backbone/layer1/0/conv1/weight", "backbone/layer2/0/bn1/running_mean"):
        assert path in tree.flatten_by_path(frozen) and path not in g_func, path
    leaves = {p: v.clone().requires_grad_(True) for p, v in flat.items()}
    g_auto = torch.autograd.grad(objective(tree.unflatten_by_path(leaves)), list(leaves.values()))
    for (path, _), expected in zip(leaves.items(), g_auto):
        assert torch.allclose(g_func[path], expected, rtol=1e-9, atol=1e-12), path
        assert float(g_func[path].abs().max()) > 0, path

    eps = 1e-6  # float64: truncation ~eps^2, rounding ~1e-16 / eps; the observed relative error is < 2e-7
    for path in ("head/cls_logits/bias", "backbone/layer4/1/conv2/weight", "backbone/layer2/0/bn1/weight"):
        index = int(g_func[path].abs().argmax())  # the largest entry, so the relative check is meaningful

        def shifted(delta, path=path, index=index):
            leaf = flat[path].clone()
            leaf.view(-1)[index] += delta
            return float(objective(tree.unflatten_by_path({**flat, path: leaf})))

        numeric = (shifted(eps) - shifted(-eps)) / (2 * eps)
        analytic = float(g_func[path].view(-1)[index])
        assert numeric == pytest.approx(analytic, rel=1e-5), (path, numeric, analytic)


def test_loss_and_gradient_compile_as_one_graph_and_match_eager():
    """Targets, loss and torch.func gradient of the whole detector, compiled with fullgraph=True (any graph
    break raises) on a small canvas, against the same function run eagerly."""
    cfg = tiny_config()
    cfg.model.backbone.base_width = 16
    params = retinanet.init(rng.key(5), cfg.model)
    trainable, frozen = retinanet.split_trainable(params, cfg.model)
    batch = synthetic_batch(num_boxes=(0, 1, 3, 5))

    def loss_and_grad(t, images, image_hw, boxes, box_valid, labels):
        def objective(t):
            b = {"image": images, "image_hw": image_hw, "boxes": boxes, "box_valid": box_valid, "labels": labels}
            return _loss(tree.merge(t, frozen), b, cfg)

        return torch.func.grad_and_value(objective, has_aux=True)(t)

    args = (trainable, batch["image"], batch["image_hw"], batch["boxes"], batch["box_valid"], batch["labels"])
    torch._dynamo.reset()
    # aot_eager: Dynamo's one graph and AOTAutograd's joint forward-backward trace, which is what this claims;
    # inductor's kernels for the same loss and gradient are checked by
    # tests/test_compile.py::test_compiled_train_step_matches_eager (the whole step, a few minutes of compiling).
    grads_c, (loss_c, metrics_c) = torch.compile(loss_and_grad, fullgraph=True, backend="aot_eager")(*args)
    grads_e, (loss_e, metrics_e) = loss_and_grad(*args)
    assert float(metrics_e["num_pos"]) > 0
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for k in ("loss", "loss_cls", "loss_box", "num_pos"):
        torch.testing.assert_close(metrics_c[k], metrics_e[k], rtol=1e-5, atol=1e-6)
    flat_c = tree.flatten_by_path(grads_c)
    for path, g in tree.flatten_by_path(grads_e).items():
        torch.testing.assert_close(flat_c[path], g, rtol=1e-3, atol=1e-5, msg=path)
