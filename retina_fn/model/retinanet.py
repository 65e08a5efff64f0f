"""RetinaNet = ResNet -> FPN -> shared head, as pure functions of a parameter tree.

    params = init(key, model_cfg)                         # {'backbone', 'fpn', 'head'}
    cls_logits, box_deltas = apply(params, images, model_cfg)   # [B, A, K], [B, A, 4]
    anchors = retina_fn.anchors.anchors(canvas_hw, model_cfg)   # [A, 4], same order as the outputs

Batch-norm statistics ('running_mean', 'running_var') are leaves of the same tree but never train;
`trainable_mask` says, per leaf, what the optimiser updates (the config, not flags hidden in objects).
"""

from __future__ import annotations

import torch

from retina_fn import anchors, extent, rng, tree
from retina_fn.extent import ExtentMasks
from retina_fn.model import fpn, head, resnet

BN_STATISTICS = ("running_mean", "running_var")


def init(key: rng.Key, model_cfg) -> dict:
    """A fresh parameter tree: ResNet (He init), FPN (xavier), head (N(0, 0.01), prior-prob bias)."""
    k_backbone, k_fpn, k_head = rng.split(key, 3)
    c2, c3, c4, c5 = resnet.out_channels(model_cfg.backbone)
    return {
        "backbone": resnet.init(k_backbone, model_cfg.backbone),
        "fpn": fpn.init(k_fpn, (c3, c4, c5), model_cfg.fpn),
        "head": head.init(k_head, model_cfg.fpn.out_channels, anchors.anchors_per_cell(model_cfg.anchors),
                          model_cfg.num_classes, model_cfg.head),
    }


def extent_masks(images: torch.Tensor, image_hw: torch.Tensor | None, model_cfg) -> ExtentMasks | None:
    """The masks that make each image's outputs canvas-exact (retina_fn.extent), or None when
    model.canvas_exact is off or image sizes are not given.

    Args:
      images: float [B, 3, H, W] (its canvas size is read).
      image_hw: int64 [B, 2] resized (h, w) of each image, or None.
      model_cfg: the model config (canvas_exact, size_divisor).

    Returns:
      ExtentMasks over [B] images, or None.
    """
    if image_hw is None or not model_cfg.get("canvas_exact", False):
        return None
    return ExtentMasks(extent.padded_hw(image_hw, int(model_cfg.size_divisor), images.shape[-2:]))


def _pyramid(params: dict, images: torch.Tensor, model_cfg, masks: ExtentMasks | None) -> list[torch.Tensor]:
    if model_cfg.backbone.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    feats = resnet.apply(params["backbone"], images, model_cfg.backbone, masks)
    return fpn.apply(params["fpn"], feats, model_cfg.fpn, masks)


def features(params: dict, images: torch.Tensor, model_cfg, image_hw: torch.Tensor | None = None
             ) -> list[torch.Tensor]:
    """images [B, 3, H, W] -> pyramid [P3 .. P7], each [B, C, ceil(H/s), ceil(W/s)] for s = 8 .. 128.
    With image_hw int64 [B, 2] and model.canvas_exact, canvas-exact as in `apply`."""
    return _pyramid(params, images, model_cfg, extent_masks(images, image_hw, model_cfg))


def apply(params: dict, images: torch.Tensor, model_cfg, image_hw: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """images [B, 3, H, W] (normalised, zero outside each image, H and W multiples of 32) ->
    (cls_logits [B, A, K], box_deltas [B, A, 4]) in the anchor order of `retina_fn.anchors.anchors`.

    With image_hw (int64 [B, 2], each image's resized (h, w)) and model.canvas_exact, the outputs at
    every anchor inside an image's extent (anchors.valid_flags) equal what the network computes on
    that image padded alone to a multiple of model.size_divisor: the canvas and the other images of
    the batch change nothing there (retina_fn.extent). Without, features near the image's border see
    the canvas's padding through the convolutions' receptive fields."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
    div = int(model_cfg.size_divisor)
    if images.shape[-2] % div or images.shape[-1] % div:
        raise ValueError(f"image canvas {tuple(images.shape[-2:])} must be a multiple of size_divisor {div}")
    if image_hw is not None and tuple(image_hw.shape) != (images.shape[0], 2):
        raise ValueError(f"image_hw must be [B, 2] = {(images.shape[0], 2)}, got {tuple(image_hw.shape)}")
    masks = extent_masks(images, image_hw, model_cfg)
    levels = _pyramid(params, images, model_cfg, masks)
    strides = tuple(int(s) for s in model_cfg.anchors.strides)
    return head.apply(params["head"], levels, model_cfg.num_classes, model_cfg.head, masks, strides)


def is_trainable(path: str, model_cfg) -> bool:
    """Whether the leaf at `path` (e.g. 'backbone/layer1/0/bn1/weight') is updated by training."""
    if path.rsplit(tree.SEP, 1)[-1] in BN_STATISTICS:
        return False
    if path.startswith("backbone/"):
        local = path[len("backbone/"):]
        if local.startswith(resnet.frozen_prefixes(model_cfg.backbone)):
            return False
        is_bn_affine = (any(f"/{name}/" in f"/{local}" for name in ("bn1", "bn2", "bn3"))
                        or "/downsample/1/" in f"/{local}")
        if is_bn_affine and not model_cfg.backbone.norm_affine_trainable:
            return False
    return True


def trainable_mask(params: dict, model_cfg) -> dict:
    """A bool tree shaped like params: True where the leaf trains (frozen stages, BN statistics and,
    when configured, BN affine parameters are False)."""
    return tree.map_with_path(lambda p, _: is_trainable(p, model_cfg), params)


def split_trainable(params: dict, model_cfg) -> tuple[dict, dict]:
    """(trainable, frozen) subtrees; `tree.merge(trainable, frozen)` gives params back."""
    trainable = tree.filter(params, lambda p, _: is_trainable(p, model_cfg))
    frozen = tree.filter(params, lambda p, _: not is_trainable(p, model_cfg))
    return trainable, frozen


def num_parameters(params: dict, model_cfg=None, trainable_only: bool = False) -> int:
    """Parameter count in torch's sense (BN statistics are buffers, not parameters); with
    `trainable_only`, only what the optimiser updates under model_cfg."""
    total = 0
    for path, leaf in tree.leaves_with_paths(params):
        if path.rsplit(tree.SEP, 1)[-1] in BN_STATISTICS:
            continue
        if trainable_only and not is_trainable(path, model_cfg):
            continue
        total += leaf.numel()
    return total
