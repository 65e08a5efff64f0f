"""Small configs and batches shared by model and step tests."""

from __future__ import annotations

import copy
import torch

from configs import smoke
from configs.common import base_config
from retina_fn import checkpoint, rng, schema
from retina_fn.data.random_batch import random_batch
from retina_fn.engine.hooks import config_json
from retina_fn.model import retinanet
from retina_fn.spec import DetectorSpec
from retina_fn.train import StepSettings


def spec_of(cfg, num_classes: int = 3) -> DetectorSpec:
    """The detector spec of a test config (an 'auto' class count becomes `num_classes`)."""
    cfg = copy.deepcopy(cfg)
    if cfg.model.num_classes == "auto":
        cfg.model.num_classes = num_classes
    return schema.detector_spec(cfg)


def settings_of(cfg) -> StepSettings:
    """The train step's settings of a test config."""
    return schema.step_settings(cfg)


def tiny_config(num_classes: int = 3, canvas=(64, 96)):
    """A ResNet-18 RetinaNet with 32-channel FPN and 2-conv head on a small canvas: fast on a CPU."""
    cfg = base_config()
    cfg.model.backbone.depth = 18
    cfg.model.num_classes = num_classes
    cfg.model.fpn.out_channels = 32
    cfg.model.head.feat_channels = 32
    cfg.model.head.stacked_convs = 2
    cfg.data.landscape_canvas = canvas
    cfg.data.portrait_canvas = canvas[::-1]
    cfg.data.scale = (max(canvas), min(canvas))
    cfg.optim.warmup_iters = 0
    cfg.optim.lr = 0.01
    return cfg


def synthetic_batch(num_boxes=(0, 1, 3, 5), canvas=(64, 96), max_boxes: int = 5, num_classes: int = 3, seed: int = 0,
                    dtype=torch.float32):
    """A batch in the conventions' layout with len(num_boxes) images and the given real box counts."""
    return random_batch(num_boxes, canvas=canvas, max_boxes=max_boxes, num_classes=num_classes, seed=seed,
                        dtype=dtype)


def smoke_checkpoint(directory, with_spec: bool = True) -> str:
    """A retina_fn checkpoint of configs/smoke.py's model (5 classes) with random weights, for the programs'
    tests, storing its spec as training does (with_spec=False: as checkpoints written before specs were);
    returns its path."""
    spec = spec_of(smoke.get_config())
    trainable, frozen = retinanet.split_trainable(retinanet.init(rng.key(0), spec), spec)
    meta = {"spec": spec.to_json(), "config": config_json(smoke.get_config())} if with_spec else {}
    return checkpoint.save(str(directory), 1, {"params": trainable, "frozen": frozen}, meta)


def eval_step_of(cfg, device="cpu", **kwargs):
    """make_eval_step for a test config: its spec, train.precision and train.cuda_graph."""
    from retina_fn.train import make_eval_step

    return make_eval_step(spec_of(cfg), device, precision_name=schema.precision_name(cfg.train),
                          cuda_graph=bool(cfg.train.cuda_graph), **kwargs)
