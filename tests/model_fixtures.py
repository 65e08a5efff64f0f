"""Small configs and batches shared by model and step tests."""

from __future__ import annotations

import torch

from configs.common import base_config


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
    g = torch.Generator().manual_seed(seed)
    b = len(num_boxes)
    h, w = canvas
    xy = torch.rand(b, max_boxes, 2, generator=g, dtype=torch.float64) * torch.tensor([w * 0.6, h * 0.6], dtype=torch.float64)
    wh = torch.rand(b, max_boxes, 2, generator=g, dtype=torch.float64) * torch.tensor([w * 0.35, h * 0.35], dtype=torch.float64) + 8
    valid = torch.arange(max_boxes)[None, :] < torch.tensor(num_boxes)[:, None]
    boxes = torch.cat([xy, xy + wh], -1).to(dtype) * valid[..., None]
    return {
        "image": torch.randn(b, 3, h, w, generator=g, dtype=torch.float64).to(dtype),
        "image_hw": torch.tensor([[h, w]] * b),
        "boxes": boxes,
        "labels": torch.randint(0, num_classes, (b, max_boxes), generator=g) * valid,
        "box_valid": valid,
        "ignore_boxes": torch.zeros(b, 2, 4, dtype=dtype),
        "ignore_valid": torch.zeros(b, 2, dtype=torch.bool),
        "scale_factor": torch.ones(b, 2),
        "image_id": torch.arange(b),
    }
