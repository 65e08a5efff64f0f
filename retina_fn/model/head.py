"""RetinaNet's head, shared over the pyramid levels, as pure functions.

Two towers of `stacked_convs` 3x3 convs (+ optional GroupNorm) + ReLU, then a classification conv to
n_anchors * K channels and a regression conv to n_anchors * 4. Init: N(0, 0.01), zero biases, the classification
bias at -log((1 - prior) / prior) so every anchor starts at probability `prior`. Outputs are flattened in
mmdetection's anchor order: level, row y, column x, anchor a, with channel a * K + k for class k.
"""

from __future__ import annotations

import torch

from retina_fn import nn, rng
from retina_fn.extent import ExtentMasks, zero_outside
from retina_fn.spec import HeadSpec


def init(key: rng.Key, in_channels: int, num_anchors: int, num_classes: int, spec: HeadSpec) -> dict:
    """Head parameters for `num_anchors` anchors per location and K = `num_classes`.

    Returns:
      {'cls_convs': {'0'..}, 'reg_convs': {'0'..}, 'cls_logits', 'bbox_reg'}, float32 on the CPU; a tower conv is
      {'weight', 'bias'} or, with GroupNorm, {'weight', 'norm': {'weight', 'bias'}}.
    """
    gn = spec.norm == "gn"
    keys = iter(rng.split(key, 2 * spec.stacked_convs + 2))

    def tower():
        convs, c_in = {}, in_channels
        for i in range(spec.stacked_convs):
            p = nn.init.conv(next(keys), spec.feat_channels, c_in, 3, "normal", bias=not gn, std=0.01)
            if gn:
                p["norm"] = {"weight": nn.init.constant((spec.feat_channels,), 1.0),
                             "bias": nn.init.constant((spec.feat_channels,), 0.0)}
            convs[str(i)] = p
            c_in = spec.feat_channels
        return convs

    cls_convs, reg_convs = tower(), tower()
    cls_logits = nn.init.conv(next(keys), num_anchors * num_classes, spec.feat_channels, 3, "normal", std=0.01)
    cls_logits["bias"] = nn.init.prior_prob_bias((num_anchors * num_classes,), spec.prior_prob)
    bbox_reg = nn.init.conv(next(keys), num_anchors * 4, spec.feat_channels, 3, "normal", bias=True, std=0.01)
    return {"cls_convs": cls_convs, "reg_convs": reg_convs, "cls_logits": cls_logits, "bbox_reg": bbox_reg}


def _tower(convs: dict, xs: list[torch.Tensor], spec: HeadSpec, masks: ExtentMasks | None,
           strides: list[int | None]) -> list[torch.Tensor]:
    """The stacked 3x3 convs (+ GroupNorm) + ReLU on every level, one layer at a time; with masks, outputs are
    zeroed outside the extent."""
    for i in range(len(convs)):
        p = convs[str(i)]
        xs = [nn.conv2d(p, x, padding=1) for x in xs]
        if "norm" in p:
            gn_masks = None if masks is None else [masks.mask(s, x.shape[-2:]) for x, s in zip(xs, strides)]
            xs = nn.group_norm_maps(p["norm"], xs, spec.gn_groups, masks=gn_masks, relu=True, zero_outside=True)
        else:
            xs = [zero_outside(nn.relu(x), masks, s) for x, s in zip(xs, strides)]
    return xs


def _flatten(x: torch.Tensor, per_anchor: int) -> torch.Tensor:
    """[B, n*c, H, W] -> [B, H*W*n, c] (row-major cells, anchor innermost)."""
    b, _, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(b, h * w * (x.shape[1] // per_anchor), per_anchor)


def apply(params: dict, levels: list[torch.Tensor], num_classes: int, spec: HeadSpec, masks: ExtentMasks | None = None,
          strides: tuple[int, ...] = (8, 16, 32, 64, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """levels [P3 .. P7] float [B, C, h_l, w_l] -> (cls_logits float [B, A, K], box_deltas float [B, A, 4]),
    A = sum_l h_l * w_l * n_anchors. With masks (retina_fn.extent; `strides` read then) every conv input is
    zeroed outside each image's extent."""
    if masks is not None and len(strides) != len(levels):
        raise ValueError(f"head.apply got {len(levels)} levels but {len(strides)} strides")
    strides = list(strides) if masks is not None else [None] * len(levels)
    xs = [zero_outside(x, masks, s) for x, s in zip(levels, strides)]
    cls_features = _tower(params["cls_convs"], xs, spec, masks, strides)
    logits = [_flatten(nn.conv2d(params["cls_logits"], f, padding=1), num_classes) for f in cls_features]
    reg_features = _tower(params["reg_convs"], xs, spec, masks, strides)
    deltas = [_flatten(nn.conv2d(params["bbox_reg"], f, padding=1), 4) for f in reg_features]
    return torch.cat(logits, dim=1), torch.cat(deltas, dim=1)
