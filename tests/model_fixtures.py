"""Small configs and batches shared by model and step tests."""

from __future__ import annotations

import torch

from configs import smoke
from configs.common import base_config
from retina_fn import checkpoint, rng
from retina_fn.data.random_batch import random_batch
from retina_fn.model import retinanet


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
    cfg.optim.warmup_iters = 0
    cfg.optim.lr = 0.01
    return cfg


def synthetic_batch(num_boxes=(0, 1, 3, 5), canvas=(64, 96), max_boxes: int = 5, num_classes: int = 3, seed: int = 0,
                    dtype=torch.float32):
    """A batch in the conventions' layout with len(num_boxes) images and the given real box counts."""
    return random_batch(num_boxes, canvas=canvas, max_boxes=max_boxes, num_classes=num_classes, seed=seed,
                        dtype=dtype)


def smoke_checkpoint(directory) -> str:
    """A retina_fn checkpoint of configs/smoke.py's model (5 classes) with random weights, for the programs'
    tests; returns its path."""
    cfg = smoke.get_config()
    trainable, frozen = retinanet.split_trainable(retinanet.init(rng.key(0), cfg.model), cfg.model)
    return checkpoint.save(str(directory), 1, {"params": trainable, "frozen": frozen})
