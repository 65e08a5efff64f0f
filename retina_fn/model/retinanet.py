"""RetinaNet = ResNet -> FPN -> shared head, as pure functions of a parameter tree {'backbone', 'fpn', 'head'}.

Batch-norm statistics are leaves of the same tree but never train; `trainable_mask` says what the optimiser updates.
"""

from __future__ import annotations

import torch

from retina_fn import anchors, extent, rng, tree
from retina_fn.extent import ExtentMasks
from retina_fn.model import fpn, head, resnet
from retina_fn.spec import DetectorSpec

BN_STATISTICS = ("running_mean", "running_var")


def init(key: rng.Key, spec: DetectorSpec) -> dict:
    """A fresh parameter tree: ResNet (He init), FPN (xavier), head (N(0, 0.01), prior-prob bias)."""
    k_backbone, k_fpn, k_head = rng.split(key, 3)
    c2, c3, c4, c5 = resnet.out_channels(spec.backbone)
    return {
        "backbone": resnet.init(k_backbone, spec.backbone),
        "fpn": fpn.init(k_fpn, (c3, c4, c5), spec.fpn),
        "head": head.init(k_head, spec.fpn.out_channels, anchors.anchors_per_cell(spec.anchors), spec.num_classes,
                          spec.head),
    }


def extent_masks(images: torch.Tensor, image_hw: torch.Tensor | None, spec: DetectorSpec) -> ExtentMasks | None:
    """ExtentMasks making each image's outputs canvas-exact (retina_fn.extent); None when spec.canvas_exact is off
    or image_hw (int64 [B, 2]) is None. images: float [B, 3, H, W], its canvas size is read."""
    if image_hw is None or not spec.canvas_exact:
        return None
    return ExtentMasks(extent.padded_hw(image_hw, int(spec.size_divisor), images.shape[-2:]))


def _pyramid(params: dict, images: torch.Tensor, spec: DetectorSpec, masks: ExtentMasks | None) -> list[torch.Tensor]:
    if spec.backbone.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    feats = resnet.apply(params["backbone"], images, spec.backbone, masks)
    return fpn.apply(params["fpn"], feats, spec.fpn, masks)


def features(params: dict, images: torch.Tensor, spec: DetectorSpec, image_hw: torch.Tensor | None = None
             ) -> list[torch.Tensor]:
    """images [B, 3, H, W] -> pyramid [P3 .. P7], each [B, C, ceil(H/s), ceil(W/s)] for s = 8 .. 128.
    With image_hw int64 [B, 2] and spec.canvas_exact, canvas-exact as in `apply`."""
    return _pyramid(params, images, spec, extent_masks(images, image_hw, spec))


def apply(params: dict, images: torch.Tensor, spec: DetectorSpec, image_hw: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """images [B, 3, H, W] (normalised, zero outside each image, H and W multiples of size_divisor) ->
    (cls_logits [B, A, K], box_deltas [B, A, 4]) in the anchor order of `retina_fn.anchors.anchors`.

    With image_hw (int64 [B, 2] resized (h, w)) and spec.canvas_exact, the outputs at every anchor inside an
    image's extent equal the network's on that image padded alone to a multiple of spec.size_divisor."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
    div = int(spec.size_divisor)
    if images.shape[-2] % div or images.shape[-1] % div:
        raise ValueError(f"image canvas {tuple(images.shape[-2:])} must be a multiple of size_divisor {div}")
    if image_hw is not None and tuple(image_hw.shape) != (images.shape[0], 2):
        raise ValueError(f"image_hw must be [B, 2] = {(images.shape[0], 2)}, got {tuple(image_hw.shape)}")
    masks = extent_masks(images, image_hw, spec)
    levels = _pyramid(params, images, spec, masks)
    strides = tuple(int(s) for s in spec.anchors.strides)
    return head.apply(params["head"], levels, spec.num_classes, spec.head, masks, strides)


def is_trainable(path: str, spec: DetectorSpec) -> bool:
    """Whether the leaf at `path` (e.g. 'backbone/layer1/0/bn1/weight') is updated by training."""
    if path.rsplit(tree.SEP, 1)[-1] in BN_STATISTICS:
        return False
    if path.startswith("backbone/"):
        local = path[len("backbone/"):]
        if local.startswith(resnet.frozen_prefixes(spec.backbone)):
            return False
        is_bn_affine = (any(f"/{name}/" in f"/{local}" for name in ("bn1", "bn2", "bn3"))
                        or "/downsample/1/" in f"/{local}")
        if is_bn_affine and not spec.backbone.norm_affine_trainable:
            return False
    return True


def trainable_mask(params: dict, spec: DetectorSpec) -> dict:
    """A bool tree shaped like params: True where the leaf trains (`is_trainable`)."""
    return tree.map_with_path(lambda p, _: is_trainable(p, spec), params)


def split_trainable(params: dict, spec: DetectorSpec) -> tuple[dict, dict]:
    """(trainable, frozen) subtrees; `tree.merge(trainable, frozen)` gives params back."""
    trainable = tree.filter(params, lambda p, _: is_trainable(p, spec))
    frozen = tree.filter(params, lambda p, _: not is_trainable(p, spec))
    return trainable, frozen


def num_parameters(params: dict, spec: DetectorSpec | None = None, trainable_only: bool = False) -> int:
    """Parameter count in torch's sense (without BN statistics); `trainable_only`: what trains under `spec`."""
    total = 0
    for path, leaf in tree.leaves_with_paths(params):
        if path.rsplit(tree.SEP, 1)[-1] in BN_STATISTICS:
            continue
        if trainable_only and not is_trainable(path, spec):
            continue
        total += leaf.numel()
    return total
