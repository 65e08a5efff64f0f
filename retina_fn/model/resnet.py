"""ResNet backbones (18, 34, 50, 101, 152) as pure functions over a parameter dict (spec: BackboneSpec).

Parameter names are torchvision's ('conv1', 'bn1', 'layer1'/'0'/'conv1', 'downsample'/'0'), so an ImageNet
checkpoint maps on by path. Batch norm is frozen (stored statistics, as mmdetection's norm_eval=True) and folded
into the conv before it at every call (retina_fn.nn.fold); norm 'gn' (stateless GroupNorm, also for training
from scratch) keeps the same slot names. bn_eps: torchvision's RetinaNet v1 checkpoint expects 0.0.
frozen_stages and norm_affine_trainable are read by retinanet.trainable_mask, not by `apply`.
"""

from __future__ import annotations

import torch

from retina_fn import nn, rng
from retina_fn.extent import ExtentMasks, zero_outside
from retina_fn.spec import BackboneSpec

BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def stage_widths(spec: BackboneSpec) -> tuple[int, int, int, int]:
    """Bottleneck widths of layer1..layer4: (w, 2w, 4w, 8w), w = base_width."""
    w = int(spec.base_width)
    return (w, 2 * w, 4 * w, 8 * w)


def is_bottleneck(depth: int) -> bool:
    """Whether a ResNet of this depth uses bottleneck blocks (depth >= 50)."""
    return depth >= 50


def out_channels(spec: BackboneSpec) -> tuple[int, int, int, int]:
    """Channels of C2..C5: (256, 512, 1024, 2048) with bottlenecks, else (64, 128, 256, 512), times base_width / 64."""
    expansion = 4 if is_bottleneck(spec.depth) else 1
    return tuple(w * expansion for w in stage_widths(spec))


def _norm_params(channels: int, spec) -> dict:
    if spec.norm == "gn":
        return {"weight": nn.init.constant((channels,), 1.0), "bias": nn.init.constant((channels,), 0.0)}
    return nn.init.batch_norm(channels)


def _conv_norm(conv: dict, norm: dict, x: torch.Tensor, spec, stride: int = 1, padding: int = 0,
               masks: ExtentMasks | None = None, out_stride: int = 1, relu: bool = False,
               zero_outside_after: bool = False) -> torch.Tensor:
    """A conv, its norm (a frozen BN folded into the conv; GroupNorm with masks over each image's extent), an
    optional ReLU and zeroing outside the extent (before a layer that reads neighbours)."""
    if "running_mean" in norm:
        y = nn.conv_frozen_bn(conv, norm, x, float(spec.bn_eps), stride=stride, padding=padding)
        y = nn.relu(y) if relu else y
        return zero_outside(y, masks, out_stride) if zero_outside_after else y
    y = nn.conv2d(conv, x, stride=stride, padding=padding)
    gn_mask = None if masks is None else masks.mask(out_stride, y.shape[-2:])
    return nn.group_norm(norm, y, int(spec.gn_groups), mask=gn_mask, relu=relu, zero_outside=zero_outside_after)


def init(key: rng.Key, spec: BackboneSpec) -> dict:
    """Parameters of the ResNet body without its classifier, torchvision's init (He normal fan_out, no conv
    biases, BN weight 1, bias 0, identity statistics; 'gn' slots hold only weight and bias).

    Returns:
      {'conv1', 'bn1', 'layer1'..'layer4'} in torchvision's names, float32 on the CPU.
    """
    bottleneck = is_bottleneck(spec.depth)
    keys = iter(rng.split(key, 512))
    widths = stage_widths(spec)
    params: dict = {"conv1": nn.init.conv(next(keys), widths[0], 3, 7), "bn1": _norm_params(widths[0], spec)}
    c_in = widths[0]
    for stage, (n_blocks, width) in enumerate(zip(BLOCKS[spec.depth], widths), start=1):
        c_out = width * (4 if bottleneck else 1)
        blocks = {}
        for i in range(n_blocks):
            shapes = ([(width, c_in, 1), (width, width, 3), (c_out, width, 1)] if bottleneck
                      else [(width, c_in, 3), (width, width, 3)])  # (out, in, kernel) of conv1, conv2[, conv3]
            block = {}
            for j, (o, c, k) in enumerate(shapes, start=1):
                block[f"conv{j}"] = nn.init.conv(next(keys), o, c, k)
                block[f"bn{j}"] = _norm_params(o, spec)
            if i == 0 and (c_in != c_out or stage > 1):
                block["downsample"] = {"0": nn.init.conv(next(keys), c_out, c_in, 1), "1": _norm_params(c_out, spec)}
            blocks[str(i)] = block
            c_in = c_out
        params[f"layer{stage}"] = blocks
    return params


def _block(p: dict, x: torch.Tensor, stride: int, bottleneck: bool, spec, masks: ExtentMasks | None,
           in_stride: int) -> torch.Tensor:
    """One residual block; x sits at `in_stride` of the image, the output at in_stride * stride."""
    out_stride = in_stride * stride
    identity = x
    if bottleneck:
        s1, s2 = (stride, 1) if spec.style == "caffe" else (1, stride)
        y = _conv_norm(p["conv1"], p["bn1"], x, spec, stride=s1, masks=masks, out_stride=in_stride * s1, relu=True,
                       zero_outside_after=True)
        y = _conv_norm(p["conv2"], p["bn2"], y, spec, stride=s2, padding=1, masks=masks, out_stride=out_stride,
                       relu=True)
        y = _conv_norm(p["conv3"], p["bn3"], y, spec, masks=masks, out_stride=out_stride)
    else:
        y = _conv_norm(p["conv1"], p["bn1"], zero_outside(x, masks, in_stride), spec, stride=stride, padding=1,
                       masks=masks, out_stride=out_stride, relu=True, zero_outside_after=True)
        y = _conv_norm(p["conv2"], p["bn2"], y, spec, padding=1, masks=masks, out_stride=out_stride)
    if "downsample" in p:
        ds = p["downsample"]
        identity = _conv_norm(ds["0"], ds["1"], x, spec, stride=stride, masks=masks, out_stride=out_stride)
    return nn.relu(y + identity)


def apply(params: dict, x: torch.Tensor, spec, masks: ExtentMasks | None = None) -> dict[str, torch.Tensor]:
    """x float [B, 3, H, W] (zero outside each image) -> {'C2': float [B, c2, H/4, W/4], .., 'C5': [B, c5, H/32,
    W/32]} (sizes rounded up). With masks (retina_fn.extent), every cell inside an image's extent equals the
    network's on that image padded alone."""
    bottleneck = is_bottleneck(spec.depth)
    x = _conv_norm(params["conv1"], params["bn1"], x, spec, stride=2, padding=3, masks=masks, out_stride=2, relu=True,
                   zero_outside_after=True)
    x = nn.max_pool2d(x, 3, 2, 1)
    feats, at = {}, 4
    for stage in range(1, 5):
        blocks = params[f"layer{stage}"]
        for i in range(len(blocks)):
            stride = 2 if (i == 0 and stage > 1) else 1
            x = _block(blocks[str(i)], x, stride, bottleneck, spec, masks, at)
            at *= stride
        feats[f"C{stage + 1}"] = x
    return feats


def frozen_prefixes(spec: BackboneSpec) -> tuple[str, ...]:
    """Backbone path prefixes that frozen_stages = N freezes: ('conv1/', 'bn1/', 'layer1/'.. 'layerN/'), () for N < 0
    (mmdetection's frozen_stages=1 freezes the stem and layer1)."""
    n = int(spec.frozen_stages)
    if n < 0:
        return ()
    return ("conv1/", "bn1/") + tuple(f"layer{i}/" for i in range(1, n + 1))
