"""Weights in and out without torchvision: mmdetection and torchvision key layouts built by hand here,
round trips, the mismatch report, class-head handling, format recognition."""

from __future__ import annotations

import math
import re

import pytest
import torch

from configs import retinanet_r50_fpn_1x_coco, torchvision_retinanet_v1
from retina_fn import checkpoint, rng, tree
from retina_fn.interop import (COCO80_IDS, COCO80_NAMES, COCO91_NAMES, CheckpointMismatch, detect_format,
                               from_mmdet, from_torchvision, label_map_for, load_detector_weights, to_mmdet,
                               to_torchvision)
from retina_fn.interop.detector import template
from retina_fn.model import retinanet
from tests.model_fixtures import spec_of, tiny_config


def small_config(num_classes: int = 3, depth: int = 50):
    """A narrow bottleneck ResNet (the mmdetection / torchvision structure, 8 base channels) so the
    tests run in moments."""
    cfg = tiny_config(num_classes=num_classes)
    cfg.model.backbone.depth = depth
    cfg.model.backbone.base_width = 8
    return cfg


def random_params(model_cfg, seed: int = 0) -> dict:
    """Every leaf drawn independently (BN statistics too, variances positive), so a swapped or
    misrouted tensor cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    like = template(model_cfg)

    def draw(path, leaf):
        x = torch.randn(tuple(leaf.shape), generator=g)
        if leaf.ndim == 4:  # conv weights at a scale that keeps 50 layers finite
            return x / math.sqrt(leaf[0].numel())
        if path.endswith("running_var"):
            return x.abs() + 0.5
        return 1.0 + 0.1 * x if path.endswith("weight") else 0.1 * x

    return tree.map_with_path(draw, like)


# ----------------------------------------------------------------------------------------------------
# Hand-written key tables (independent of retina_fn.interop's own)

_MMDET_RULES = [
    (r"^backbone/(.+)$", lambda m: "backbone." + m[1].replace("/", ".")),
    (r"^fpn/lateral/(\d)/(\w+)$", r"neck.lateral_convs.\1.conv.\2"),
    (r"^fpn/output/(\d)/(\w+)$", r"neck.fpn_convs.\1.conv.\2"),
    (r"^fpn/p6/(\w+)$", r"neck.fpn_convs.3.conv.\1"),
    (r"^fpn/p7/(\w+)$", r"neck.fpn_convs.4.conv.\1"),
    (r"^head/(cls|reg)_convs/(\d+)/(\w+)$", r"bbox_head.\1_convs.\2.conv.\3"),
    (r"^head/cls_logits/(\w+)$", r"bbox_head.retina_cls.\1"),
    (r"^head/bbox_reg/(\w+)$", r"bbox_head.retina_reg.\1"),
]

_TORCHVISION_RULES = [
    (r"^backbone/(.+)$", lambda m: "backbone.body." + m[1].replace("/", ".")),
    (r"^fpn/lateral/(\d)/(\w+)$", r"backbone.fpn.inner_blocks.\1.0.\2"),
    (r"^fpn/output/(\d)/(\w+)$", r"backbone.fpn.layer_blocks.\1.0.\2"),
    (r"^fpn/(p6|p7)/(\w+)$", r"backbone.fpn.extra_blocks.\1.\2"),
    (r"^head/cls_convs/(\d+)/(\w+)$", r"head.classification_head.conv.\1.0.\2"),
    (r"^head/reg_convs/(\d+)/(\w+)$", r"head.regression_head.conv.\1.0.\2"),
    (r"^head/cls_logits/(\w+)$", r"head.classification_head.cls_logits.\1"),
    (r"^head/bbox_reg/(\w+)$", r"head.regression_head.bbox_reg.\1"),
]


def rename(path: str, rules) -> str:
    for pattern, replacement in rules:
        if re.match(pattern, path):
            return re.sub(pattern, replacement, path)
    raise AssertionError(f"no rule for {path}")


def mmdet_checkpoint(params: dict) -> dict:
    """What mmdetection v2 saves: {'state_dict', 'meta'}, BN layers with num_batches_tracked."""
    sd = {rename(p, _MMDET_RULES): x.clone() for p, x in tree.leaves_with_paths(params)}
    for key in [k for k in sd if k.endswith(".running_mean")]:
        sd[key.replace(".running_mean", ".num_batches_tracked")] = torch.tensor(1000, dtype=torch.int64)
    return {"state_dict": sd, "meta": {"mmdet_version": "2.9.0", "CLASSES": ("a", "b", "c")}}


def torchvision_state_dict(params: dict) -> dict:
    return {rename(p, _TORCHVISION_RULES): x.clone() for p, x in tree.leaves_with_paths(params)}


def outputs(params, cfg, seed: int = 5):
    image = torch.randn(1, 3, *cfg.data.landscape_canvas, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return retinanet.apply(params, image, spec_of(cfg))


# ----------------------------------------------------------------------------------------------------
# mmdetection


def test_mmdet_import_export_reimport_identical():
    cfg = small_config()
    cfg.model.fpn.extra_source = "input"  # mmdetection's P6 on C5
    params = random_params(cfg.model)
    ckpt = mmdet_checkpoint(params)

    imported = from_mmdet(ckpt, cfg.model)
    assert tree.all_equal(imported, params)

    exported = to_mmdet(imported, cfg.model, class_names=("a", "b", "c"))
    assert set(exported["state_dict"]) == set(ckpt["state_dict"])
    for k, v in ckpt["state_dict"].items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(exported["state_dict"][k], v), k
    assert exported["meta"]["CLASSES"] == ("a", "b", "c")

    again = from_mmdet(exported, cfg.model)
    assert tree.all_equal(again, params)
    for ours, theirs in zip(outputs(params, cfg), outputs(again, cfg)):
        assert torch.isfinite(ours).all() and torch.equal(ours, theirs)


def test_mmdet_bare_state_dict_and_group_norm_head():
    cfg = small_config()
    cfg.model.head.norm = "gn"
    cfg.model.head.gn_groups = 8
    params = random_params(cfg.model, seed=1)
    sd = to_mmdet(params, cfg.model)["state_dict"]
    # ConvModule with GroupNorm: an unbiased conv and a 'gn' submodule
    assert "bbox_head.cls_convs.1.gn.weight" in sd and "bbox_head.cls_convs.1.conv.bias" not in sd
    assert tree.all_equal(from_mmdet(sd, cfg.model), params)


def test_full_size_mmdet_layout_matches_the_published_model():
    cfg = retinanet_r50_fpn_1x_coco.get_config()  # mmdetection's retinanet_r50_fpn_1x
    params = tree.map(lambda x: torch.zeros(tuple(x.shape)), template(cfg.model))
    sd = to_mmdet(params, cfg.model)["state_dict"]
    # 301 tensors as in torchvision's v1 file plus num_batches_tracked for ResNet-50's 53 BN layers
    assert len(sd) == 301 + 53
    expected_shapes = {
        "backbone.conv1.weight": (64, 3, 7, 7),
        "backbone.layer4.2.bn3.running_var": (2048,),
        "backbone.layer2.0.downsample.0.weight": (512, 256, 1, 1),
        "neck.lateral_convs.0.conv.weight": (256, 512, 1, 1),
        "neck.lateral_convs.2.conv.weight": (256, 2048, 1, 1),
        "neck.fpn_convs.2.conv.weight": (256, 256, 3, 3),
        "neck.fpn_convs.3.conv.weight": (256, 2048, 3, 3),  # P6 on C5
        "neck.fpn_convs.4.conv.weight": (256, 256, 3, 3),
        "bbox_head.cls_convs.3.conv.bias": (256,),
        "bbox_head.retina_cls.weight": (720, 256, 3, 3),  # 9 anchors x 80 classes
        "bbox_head.retina_reg.weight": (36, 256, 3, 3),
    }
    for key, shape in expected_shapes.items():
        assert tuple(sd[key].shape) == shape, key


# ----------------------------------------------------------------------------------------------------
# torchvision layout


def test_torchvision_layout_round_trip_and_hand_table():
    cfg = small_config()
    params = random_params(cfg.model, seed=2)
    sd = to_torchvision(params, cfg.model)
    assert set(sd) == set(torchvision_state_dict(params))
    imported = from_torchvision(sd, cfg.model)
    assert tree.all_equal(imported, params)
    assert tree.all_equal(from_torchvision(torchvision_state_dict(params), cfg.model), params)


def test_old_torchvision_key_layout_is_accepted():
    cfg = small_config()
    cfg.model.head.stacked_convs = 4
    params = random_params(cfg.model, seed=3)
    old = {}
    for key, value in torchvision_state_dict(params).items():
        m = re.match(r"^(head\.\w+_head\.conv)\.(\d)\.0\.(\w+)$", key)
        f = re.match(r"^(backbone\.fpn\.\w+_blocks)\.(\d)\.0\.(\w+)$", key)
        if m:  # the towers used to be one Sequential of conv, ReLU, conv, ...: convs at 0, 2, 4, 6
            key = f"{m[1]}.{2 * int(m[2])}.{m[3]}"
        elif f:
            key = f"{f[1]}.{f[2]}.{f[3]}"
        old[key] = value
    assert "head.classification_head.conv.6.weight" in old and "backbone.fpn.inner_blocks.2.bias" in old
    assert tree.all_equal(from_torchvision(old, cfg.model), params)


def test_full_size_torchvision_v1_layout():
    cfg = torchvision_retinanet_v1.get_config()
    params = tree.map(lambda x: torch.zeros(tuple(x.shape)), template(cfg.model))
    sd = to_torchvision(params, cfg.model)
    assert len(sd) == 301  # the v1 COCO file's tensor count (FrozenBN: no num_batches_tracked)
    assert not any(k.endswith("num_batches_tracked") for k in sd)
    assert tuple(sd["head.classification_head.cls_logits.weight"].shape) == (819, 256, 3, 3)
    assert tuple(sd["backbone.fpn.extra_blocks.p6.weight"].shape) == (256, 256, 3, 3)  # P6 on P5
    assert tuple(sd["backbone.fpn.inner_blocks.2.0.weight"].shape) == (256, 2048, 1, 1)
    assert tuple(sd["head.regression_head.conv.3.0.bias"].shape) == (256,)


# ----------------------------------------------------------------------------------------------------
# Reports and class heads


def test_report_lists_missing_unexpected_and_misshaped_together():
    cfg = small_config()
    sd = to_torchvision(random_params(cfg.model), cfg.model)
    del sd["backbone.body.layer1.0.conv2.weight"]
    sd["backbone.fpn.layer_blocks.1.0.bias"] = torch.zeros(7)
    sd["head.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatch) as err:
        from_torchvision(sd, cfg.model, source="ckpt.pth")
    text = str(err.value)
    assert text.startswith("ckpt.pth does not match the model:")
    assert "1 missing:" in text and "backbone.body.layer1.0.conv2.weight (for backbone/layer1/0/conv2/weight)" in text
    assert "1 mis-shaped:" in text and "backbone.fpn.layer_blocks.1.0.bias: checkpoint (7,) vs model (32,)" in text
    assert "1 unexpected:" in text and "head.extra.weight" in text


def test_class_count_mismatch_is_reported_with_the_fix():
    cfg3, cfg5 = small_config(3), small_config(5)
    sd = to_torchvision(random_params(cfg3.model), cfg3.model)
    with pytest.raises(CheckpointMismatch) as err:
        from_torchvision(sd, cfg5.model)
    text = str(err.value)
    assert "27 output channels = 3 classes x 9 anchors" in text
    assert "model.num_classes=5" in text and "--config.model.num_classes=3" in text
    assert "load_detector_weights(path, spec, reinit_class_head=True)" in text  # the Python call; no flag sets it
    assert "mis-shaped" not in text  # reported once, as a class count
    with pytest.raises(CheckpointMismatch, match="3 classes x 9 anchors"):
        from_mmdet(to_mmdet(random_params(cfg3.model), cfg3.model), cfg5.model)


def test_reinit_class_head_keeps_everything_else():
    cfg3, cfg5 = small_config(3), small_config(5)
    params = random_params(cfg3.model, seed=4)
    sd = to_mmdet(params, cfg3.model)
    new = from_mmdet(sd, cfg5.model, reinit_class_head=True, key=rng.key(7))
    flat_old, flat_new = tree.flatten_by_path(params), tree.flatten_by_path(new)
    assert set(flat_old) == set(flat_new)
    for path in flat_old:
        if not path.startswith("head/cls_logits/"):
            assert torch.equal(flat_old[path], flat_new[path]), path
    weight, bias = flat_new["head/cls_logits/weight"], flat_new["head/cls_logits/bias"]
    assert tuple(weight.shape) == (9 * 5, 32, 3, 3)
    assert torch.allclose(bias, torch.full((45,), -math.log(99.0)))  # prior probability 0.01
    assert 0.008 < float(weight.std()) < 0.012 and abs(float(weight.mean())) < 0.002
    again = from_mmdet(sd, cfg5.model, reinit_class_head=True, key=rng.key(7))
    other = from_mmdet(sd, cfg5.model, reinit_class_head=True, key=rng.key(8))
    assert torch.equal(again["head"]["cls_logits"]["weight"], weight)
    assert not torch.equal(other["head"]["cls_logits"]["weight"], weight)


def test_torchvision_91_classes_into_an_80_class_model_keeps_the_coco_channels():
    cfg91, cfg80 = small_config(91), small_config(80)
    params91 = random_params(cfg91.model, seed=5)
    sd = to_torchvision(params91, cfg91.model)
    params80 = from_torchvision(sd, cfg80.model)
    w91, b91 = params91["head"]["cls_logits"]["weight"], params91["head"]["cls_logits"]["bias"]
    w80, b80 = params80["head"]["cls_logits"]["weight"], params80["head"]["cls_logits"]["bias"]
    for a in range(9):
        for i, cid in enumerate(COCO80_IDS):
            assert torch.equal(w80[a * 80 + i], w91[a * 91 + cid])
            assert torch.equal(b80[a * 80 + i], b91[a * 91 + cid])
    for path, leaf in tree.leaves_with_paths(params80):
        if not path.startswith("head/cls_logits"):
            assert torch.equal(leaf, tree.flatten_by_path(params91)[path])

    # and back: an 80-class model exported in torchvision's 91-output layout
    wide = to_torchvision(params80, cfg80.model, coco91=True)
    assert tuple(wide["head.classification_head.cls_logits.weight"].shape)[0] == 9 * 91
    unused = [c for c in range(91) if c not in COCO80_IDS]
    assert len(unused) == 11
    assert torch.all(wide["head.classification_head.cls_logits.bias"].view(9, 91)[:, unused] < -50)
    assert torch.all(wide["head.classification_head.cls_logits.weight"].view(9, 91, -1)[:, unused] == 0)
    assert tree.all_equal(from_torchvision(wide, cfg80.model), params80)


# ----------------------------------------------------------------------------------------------------
# Files and formats


def test_load_detector_weights_recognises_every_format(tmp_path):
    cfg = small_config()
    params = random_params(cfg.model, seed=6)
    files = {
        "torchvision": to_torchvision(params, cfg.model),
        "mmdet": to_mmdet(params, cfg.model),
        "retina_fn": tree.flatten_by_path(params),
        "dataparallel": {"module." + k: v for k, v in to_torchvision(params, cfg.model).items()},
    }
    for name, obj in files.items():
        path = tmp_path / f"{name}.pth"
        torch.save(obj, path)
        assert tree.all_equal(load_detector_weights(path, spec_of(cfg)).params, params), name
    trainable, frozen = retinanet.split_trainable(params, spec_of(cfg))
    saved = checkpoint.save(str(tmp_path / "run"), 3, {"params": trainable, "frozen": frozen, "step": torch.tensor(3)},
                            meta={"label_map": {"category_ids": [7]}})
    loaded = load_detector_weights(saved, spec_of(cfg))
    assert tree.all_equal(loaded.params, params) and loaded.format == "retina_fn"
    assert loaded.meta["label_map"] == {"category_ids": [7]}  # the checkpoint's metadata comes along
    assert detect_format(files["torchvision"]) == "torchvision"
    assert detect_format(files["mmdet"]["state_dict"]) == "mmdet"


def test_load_detector_weights_explains_what_is_not_a_detector(tmp_path):
    cfg = small_config()
    resnet_file = tmp_path / "resnet50.pth"
    backbone = tree.flatten_by_path(random_params(cfg.model)["backbone"])
    torch.save({**{p.replace("/", "."): x for p, x in backbone.items()}, "fc.weight": torch.zeros(10, 256)},
               resnet_file)
    with pytest.raises(CheckpointMismatch, match="ResNet classification checkpoint.*backbone.pretrained"):
        load_detector_weights(resnet_file, spec_of(cfg))
    odd = tmp_path / "odd.pth"
    torch.save({"encoder.weight": torch.zeros(2)}, odd)
    with pytest.raises(CheckpointMismatch, match="unknown checkpoint layout.*encoder.weight"):
        load_detector_weights(odd, spec_of(cfg))
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_detector_weights(tmp_path / "nowhere.pth", spec_of(cfg))


def test_coco_tables():
    assert len(COCO80_IDS) == len(COCO80_NAMES) == 80 and list(COCO80_IDS) == sorted(set(COCO80_IDS))
    # the ten ids COCO 2017 detection leaves unused
    assert sorted(set(range(1, 91)) - set(COCO80_IDS)) == [12, 26, 29, 30, 45, 66, 68, 69, 71, 83]
    assert len(COCO91_NAMES) == 91 and COCO91_NAMES[0] == "__background__" and COCO91_NAMES[12] == "N/A"
    assert all(COCO91_NAMES[cid] == name for cid, name in zip(COCO80_IDS, COCO80_NAMES))
    assert COCO80_NAMES[0] == "person" and COCO91_NAMES[90] == "toothbrush" and COCO91_NAMES[1] == "person"
    assert label_map_for(91)[0] == tuple(range(91))
    assert label_map_for(80) == (COCO80_IDS, COCO80_NAMES)
    assert label_map_for(3) == ((1, 2, 3), ("1", "2", "3"))


def test_torchvision_config_builds_the_v1_model():
    cfg = torchvision_retinanet_v1.get_config()
    m = cfg.model
    assert (m.num_classes, m.backbone.bn_eps, m.backbone.norm_affine_trainable) == (91, 0.0, False)
    assert m.backbone.frozen_stages == 1 and m.loss.normalizer == "image" and m.assigner.low_quality == "torchvision"
    assert (m.fpn.extra_source, m.fpn.relu_before_extra, m.anchors.style) == ("output", True, "torchvision")
    assert (m.test.pre_select, m.test.nms_pre, m.test.max_per_img, m.coder.clamp_lower) == ("pair", 1000, 300, False)
    assert cfg.data.resize_mode == "torchvision"
    like = tree.flatten_by_path(template(m))
    trainable = [p for p in like if retinanet.is_trainable(p, m)]
    assert not any(p.startswith(("backbone/conv1", "backbone/bn1", "backbone/layer1/")) for p in trainable)
    assert not any(re.search(r"/(bn\d|downsample/1)/", p) for p in trainable)  # FrozenBN: affine frozen too
    assert "backbone/layer2/0/conv1/weight" in trainable
