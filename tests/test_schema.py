"""retina_fn.schema and retina_fn.spec: every config field checked once, with errors naming --config.<field>; the
typed spec and step settings built from a config; a stored spec read back and checked by the same rules; a config
reconciled with a stored spec."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from configs import common, demo, retinanet_r50_fpn_1x_coco, retinanet_r50_fpn_1x_coco_npu, torchvision_retinanet_v1
from retina_fn import errors, schema
from retina_fn import spec as spec_lib
from retina_fn.interop import weights


def r50():
    return retinanet_r50_fpn_1x_coco.get_config()


def refusal(cfg) -> str:
    with pytest.raises(errors.ConfigError) as caught:
        schema.check_config(cfg)
    return str(caught.value)


@pytest.mark.parametrize("path, value, message", [
    ("optim.lr", float("inf"), "--config.optim.lr=inf: must be a finite number > 0.0 (or None)"),
    ("optim.lr", -0.1, "--config.optim.lr=-0.1: must be a finite number > 0.0"),
    ("optim.base_lr", 0.0, "--config.optim.base_lr=0.0: must be a finite number > 0.0"),
    ("optim.schedule", "poly", "--config.optim.schedule='poly': must be one of ('step', 'cosine')"),
    ("optim.step_epochs", (11, 8), "--config.optim.step_epochs=(11, 8): must be increasing"),
    ("optim.warmup_ratio", 1.5, "--config.optim.warmup_ratio=1.5: must be a finite number >= 0.0 and <= 1.0"),
    ("optim.name", "lamb", "--config.optim.name='lamb': must be one of ('sgd', 'adamw')"),
    ("data.flip_prob", float("nan"), "--config.data.flip_prob=nan: must be a finite number"),
    ("data.mean", (1.0, 2.0), "--config.data.mean=(1.0, 2.0): must be a tuple of 3 values"),
    ("data.std", (0.0, 0.0, 0.0), "--config.data.std=(0.0, 0.0, 0.0): each value must be a finite number > 0.0"),
    ("data.images_per_device", -1, "--config.data.images_per_device=-1: must be an integer >= 1"),
    ("data.dataset", "cocoo", "--config.data.dataset='cocoo': must be one of ('coco', 'synthetic')"),
    ("train.log_every", 0, "--config.train.log_every=0: must be an integer >= 1"),
    ("train.eval_every_epochs", 0, "--config.train.eval_every_epochs=0: must be an integer >= 1"),
    ("train.keep_checkpoints", 0, "--config.train.keep_checkpoints=0: must be an integer >= 1"),
    ("train.precision", "fp17", "--config.train.precision='fp17': must be one of ('fp32', 'fp16', 'bf16')"),
    ("train.opt_level", "O3", "--config.train.opt_level='O3'"),
    ("train.loss_scale.factor", 1.0, "--config.train.loss_scale.factor=1.0: must be a finite number > 1.0"),
    ("train.overflow_check", "sometimes", "--config.train.overflow_check='sometimes'"),
    ("dist.device", "tpu", "--config.dist.device='tpu': must be one of ('auto', 'npu', 'cuda', 'cpu')"),
    ("dist.normalizer", "batch", "--config.dist.normalizer='batch': must be one of ('local', 'global')"),
    ("seed", -3, "--config.seed=-3: must be an integer in 0..9223372036854775807"),
    ("model.anchors.strides", (8, 12), "--config.model.anchors.strides=(8, 12): each value must be a power of two"),
    ("model.anchors.style", "detectron2", "--config.model.anchors.style='detectron2'"),
    ("model.anchors.octave_base_scale", -2.0, "--config.model.anchors.octave_base_scale=-2.0: must be a finite"),
    ("model.assigner.low_quality", "best", "--config.model.assigner.low_quality='best'"),
    ("model.loss.box_loss", "smooth_l1", "--config.model.loss.box_loss='smooth_l1': must be one of ('l1', 'giou')"),
    ("model.test.pre_select", "both", "--config.model.test.pre_select='both'"),
    ("model.test.max_per_img", 0, "--config.model.test.max_per_img=0: must be an integer >= 1"),
    ("model.backbone.depth", 42, "--config.model.backbone.depth=42: must be one of (18, 34, 50, 101, 152)"),
    ("model.coder.stds", (1.0, 1.0, 0.0, 1.0), "--config.model.coder.stds=(1.0, 1.0, 0.0, 1.0): each value"),
    ("model.num_classes", 0, "--config.model.num_classes=0: must be an integer >= 1 or must be one of ('auto',)"),
])
def test_each_field_has_a_rule_that_names_it(path, value, message):
    cfg = r50()
    common.set_by_path(cfg, path, value)
    assert message in refusal(cfg)


@pytest.mark.parametrize("changes, message", [
    ({"model.backbone.norm": "gn", "model.backbone.gn_groups": 48},
     "--config.model.backbone.gn_groups=48: must divide every stage width (64, 128, 256, 512)"),
    ({"model.head.norm": "gn", "model.head.gn_groups": 100}, "must divide model.head.feat_channels=256"),
    ({"model.assigner.neg_iou_thr": 0.6}, "--config.model.assigner.neg_iou_thr=0.6: must be <= "),
    ({"data.landscape_canvas": (800, 1300)}, "(H, W) must be multiples of model.size_divisor=32"),
    ({"data.scale": (2000, 800)}, "--config.data.landscape_canvas=(800, 1344): (H, W) cannot hold every image"),
    ({"data.uint8_canvas": True, "data.resize_mode": "torchvision"}, "needs data.resize_mode='mmdet'"),
    ({"optim.micro_batches": 3}, "must divide data.images_per_device=2"),
    ({"optim.backend": "apex", "optim.name": "adamw"}, "'apex' provides fused SGD only"),
    ({"optim.nesterov": True, "optim.momentum": 0.0}, "needs optim.momentum > 0"),
    ({"train.opt_level": "O1", "train.precision": "bf16"}, "means precision 'fp16', but train.precision='bf16'"),
])
def test_rules_that_tie_fields_together(changes, message):
    cfg = r50()
    common.override(cfg, **changes)
    assert message in refusal(cfg)


def test_every_problem_is_in_the_one_line():
    cfg = r50()
    common.override(cfg, **{"optim.lr": -1.0, "train.log_every": 0})
    text = refusal(cfg)
    assert "\n" not in text and "--config.optim.lr=-1.0" in text and "--config.train.log_every=0" in text


@pytest.mark.parametrize("get_config", [retinanet_r50_fpn_1x_coco.get_config, retinanet_r50_fpn_1x_coco_npu.get_config,
                                        torchvision_retinanet_v1.get_config, demo.get_config])
def test_the_configs_pass_and_their_settings_are_typed(get_config):
    cfg = get_config()
    schema.check_config(cfg)
    settings = schema.step_settings(cfg)
    assert settings.optim.name == cfg.optim.name and settings.loss_scale.init == cfg.train.loss_scale.init
    assert settings.precision == schema.precision_name(cfg.train)
    if cfg.model.num_classes != "auto":
        spec = schema.detector_spec(cfg)
        assert spec.num_classes == cfg.model.num_classes and spec.input.scale == tuple(cfg.data.scale)
        assert spec.anchors.ratios == tuple(cfg.model.anchors.ratios) and spec.test == spec_lib.PostprocessSpec(
            **{f.name: (tuple(v) if isinstance(v := cfg.model.test[f.name], list) else v)
               for f in dataclasses.fields(spec_lib.PostprocessSpec)})


def test_opt_levels_map_onto_precisions_and_an_empty_one_is_unset():
    train = common.train_config()
    assert schema.precision_name(train) == "fp32"
    for level, name in (("O0", "fp32"), ("O1", "fp16"), ("O2", "fp16")):
        train.opt_level = level
        assert schema.precision_name(train) == name
    train.opt_level = ""  # `--config.train.opt_level=` (the scripts' --precision_mode) clears a file's opt level
    train.precision = "bf16"
    assert schema.precision_name(train) == "bf16"


def test_the_spec_of_auto_classes_is_refused_until_resolved():
    with pytest.raises(errors.ConfigError, match="resolve it from the data or the weights"):
        schema.detector_spec(common.base_config())


def test_the_reference_layouts_are_the_configs_of_their_recipes():
    # interop's specs for foreign weights state the same numbers as the configs: two sources, one truth
    assert weights._mmdet_1x(50, 80) == schema.detector_spec(r50())
    tv = torchvision_retinanet_v1.get_config()
    assert weights._torchvision_v1() == schema.detector_spec(tv)


def test_a_spec_round_trips_through_json_and_a_bad_one_is_named():
    spec = schema.detector_spec(r50(), range(1, 81), [f"class {i}" for i in range(80)])
    stored = json.loads(json.dumps(spec.to_json()))
    assert schema.spec_from_json(stored, "ckpt.pt") == spec
    bad = json.loads(json.dumps(stored))
    bad["anchors"]["octave_base_scale"] = -4.0
    with pytest.raises(errors.InputFormatError, match=r"ckpt.pt: the stored detector spec is invalid: "
                                                      r"model.anchors.octave_base_scale=-4.0: must be a finite"):
        schema.spec_from_json(bad, "ckpt.pt")
    missing = json.loads(json.dumps(stored))
    del missing["coder"]["stds"]
    with pytest.raises(errors.InputFormatError, match="coder: missing stds"):
        schema.spec_from_json(missing, "ckpt.pt")
    with pytest.raises(errors.InputFormatError, match="version 7; this retina_fn reads version 1"):
        schema.spec_from_json(dict(stored, version=7), "ckpt.pt")
    with pytest.raises(errors.InputFormatError, match="label map has 80 ids and 80 names for 3 classes"):
        schema.spec_from_json(dict(stored, num_classes=3), "ckpt.pt")


def test_a_config_that_differs_from_the_stored_spec_is_refused_field_by_field():
    stored = schema.detector_spec(r50())
    cfg = r50()
    common.override(cfg, **{"model.anchors.octave_base_scale": 2.0, "model.test.score_thr": 0.3,
                            "model.loss.box_weight": 2.0, "model.backbone.channels_last": True})
    configured = schema.detector_spec(cfg)
    with pytest.raises(errors.ConfigError) as caught:
        spec_lib.reconcile(stored, configured, "ckpt.pt")
    text = str(caught.value)
    assert "--config.model.anchors.octave_base_scale=2.0 (the weights' 4.0)" in text
    assert "--config.model.test.score_thr=0.3 (the weights' 0.05)" in text
    assert "box_weight" not in text and "channels_last" not in text  # training-only and speed-only fields
    chosen, notes = spec_lib.reconcile(stored, configured, "ckpt.pt",
                                       ("model.test.score_thr", "model.anchors.octave_base_scale"))
    assert chosen.test.score_thr == 0.3 and chosen.anchors.octave_base_scale == 2.0
    assert chosen.loss == stored.loss and chosen.names == stored.names
    assert notes == ["model.anchors.octave_base_scale: 2.0 from the config instead of the weights' 4.0 "
                     "(--use_config_for)", "model.test.score_thr: 0.3 from the config instead of the weights' 0.05 "
                     "(--use_config_for)"]
    assert spec_lib.reconcile(stored, configured, "ckpt.pt", ("all",))[0].anchors.octave_base_scale == 2.0
    with pytest.raises(errors.ConfigError, match="names no detector field: model.test.scoar_thr"):
        spec_lib.reconcile(stored, configured, "ckpt.pt", ("model.test.scoar_thr",))


def test_spec_fields_are_named_as_the_config_names_them():
    assert spec_lib.config_path("anchors.octave_base_scale") == "model.anchors.octave_base_scale"
    assert spec_lib.config_path("input.scale") == "data.scale"
    assert spec_lib.config_path("size_divisor") == "model.size_divisor"
    assert math.isclose(schema.detector_spec(r50()).coder.scale_clamp, math.log(1000 / 16))
