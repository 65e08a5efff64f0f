"""ResNet backbones (18, 34, 50, 101, 152) as pure functions over a parameter dict.

Parameter names follow torchvision's ResNet ('conv1', 'bn1', 'layer1'/'0'/'conv1', 'downsample'/'0'...),
so an ImageNet checkpoint maps on by path alone. Batch norm is always frozen (stored statistics): the
functional design has no mutable state, and detection fine-tuning keeps BN statistics fixed anyway
(mmdetection's norm_eval=True, detectron2's FrozenBN). Each frozen BN is folded into the conv before it
at every call (retina_fn.nn.fold): the same function up to float rounding, one elementwise pass fewer.

The settings (`spec` = retina_fn.spec.BackboneSpec):
  depth: 18 | 34 | 50 | 101 | 152
  style: 'pytorch' (stride on the 3x3 conv, torchvision) | 'caffe' (stride on the first 1x1 conv)
  bn_eps: float, 1e-5 (torchvision's RetinaNet v1 checkpoint expects 0.0)
  norm: 'frozen_bn' (stored statistics; for pretrained backbones) | 'gn' (GroupNorm with `gn_groups`
    groups: stateless, so it also trains from scratch, where frozen identity statistics would leave the
    network unnormalised). The norm slots keep torchvision's names ('bn1', 'downsample'/'1') either way.
  base_width: channels of the stem and first stage (64 in every standard ResNet); narrower backbones
    (e.g. 32) for small CPU demos.
  frozen_stages, norm_affine_trainable: read by retina_fn.model.retinanet.trainable_mask (frozen_stages
    through `frozen_prefixes`), not by `apply`.
"""

from __future__ import annotations

import torch

from retina_fn import nn, rng
from retina_fn.extent import ExtentMasks, zero_outside
from retina_fn.spec import BackboneSpec

BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def stage_widths(spec: BackboneSpec) -> tuple[int, int, int, int]:
    """Bottleneck widths of layer1..layer4.

    Args:
      spec: the backbone's settings; reads base_width.

    Returns:
      (w, 2w, 4w, 8w) with w = base_width.
    """
    w = int(spec.base_width)
    return (w, 2 * w, 4 * w, 8 * w)


def is_bottleneck(depth: int) -> bool:
    """Whether a ResNet of this depth uses bottleneck blocks.

    Args:
      depth: 18 | 34 | 50 | 101 | 152.

    Returns:
      True for depth >= 50.
    """
    return depth >= 50


def out_channels(spec: BackboneSpec) -> tuple[int, int, int, int]:
    """Channels of C2..C5.

    Args:
      spec: the backbone's settings; reads depth and base_width.

    Returns:
      (256, 512, 1024, 2048) for bottleneck ResNets, (64, 128, 256, 512) otherwise, scaled by
      base_width / 64.
    """
    expansion = 4 if is_bottleneck(spec.depth) else 1
    return tuple(w * expansion for w in stage_widths(spec))


def _norm_params(channels: int, spec) -> dict:
    if spec.norm == "gn":
        return {"weight": nn.init.constant((channels,), 1.0), "bias": nn.init.constant((channels,), 0.0)}
    return nn.init.batch_norm(channels)


def _conv_norm(conv: dict, norm: dict, x: torch.Tensor, spec, stride: int = 1, padding: int = 0,
               masks: ExtentMasks | None = None, out_stride: int = 1, relu: bool = False,
               zero_outside_after: bool = False) -> torch.Tensor:
    """A conv, the norm after it, and optionally a ReLU and the zeroing outside the extent (before a layer
    that reads neighbours). A frozen BN is folded into the conv (one conv with a bias, no elementwise passes:
    retina_fn.nn.fold); GroupNorm runs after the conv, with masks its statistics over each image's extent at
    the output's stride only, fused with the ReLU and the zeroing (retina_fn.nn.masked_group_norm)."""
    if "running_mean" in norm:
        y = nn.conv_frozen_bn(conv, norm, x, float(spec.bn_eps), stride=stride, padding=padding)
        y = nn.relu(y) if relu else y
        return zero_outside(y, masks, out_stride) if zero_outside_after else y
    y = nn.conv2d(conv, x, stride=stride, padding=padding)
    gn_mask = None if masks is None else masks.mask(out_stride, y.shape[-2:])
    return nn.group_norm(norm, y, int(spec.gn_groups), mask=gn_mask, relu=relu, zero_outside=zero_outside_after)


def init(key: rng.Key, spec: BackboneSpec) -> dict:
    """Parameters of the ResNet body without its classifier.

    torchvision init: He normal fan_out conv weights (no conv biases), BN weight 1 and bias 0 with
    identity statistics; with norm 'gn' each norm slot holds only {'weight', 'bias'}.

    Args:
      key: rng key, int64 [2].
      spec: the backbone's settings.

    Returns:
      {'conv1', 'bn1', 'layer1'..'layer4'} in torchvision's names, float32 on the CPU.
    """
    bottleneck = is_bottleneck(spec.depth)
    keys = iter(rng.split(key, 512))
    widths = stage_widths(spec)
    norm = lambda c: _norm_params(c, spec)  # noqa: E731
    params: dict = {
        "conv1": nn.init.conv(next(keys), widths[0], 3, 7),
        "bn1": norm(widths[0]),
    }
    c_in = widths[0]
    for stage, (n_blocks, width) in enumerate(zip(BLOCKS[spec.depth], widths), start=1):
        c_out = width * (4 if bottleneck else 1)
        blocks = {}
        for i in range(n_blocks):
            if bottleneck:
                block = {
                    "conv1": nn.init.conv(next(keys), width, c_in, 1),
                    "bn1": norm(width),
                    "conv2": nn.init.conv(next(keys), width, width, 3),
                    "bn2": norm(width),
                    "conv3": nn.init.conv(next(keys), c_out, width, 1),
                    "bn3": norm(c_out),
                }
            else:
                block = {
                    "conv1": nn.init.conv(next(keys), width, c_in, 3),
                    "bn1": norm(width),
                    "conv2": nn.init.conv(next(keys), width, width, 3),
                    "bn2": norm(width),
                }
            if i == 0 and (c_in != c_out or stage > 1):
                block["downsample"] = {"0": nn.init.conv(next(keys), c_out, c_in, 1), "1": norm(c_out)}
            blocks[str(i)] = block
            c_in = c_out
        params[f"layer{stage}"] = blocks
    return params


def _block(p: dict, x: torch.Tensor, stride: int, bottleneck: bool, spec, masks: ExtentMasks | None,
           in_stride: int) -> torch.Tensor:
    """One residual block; x sits at `in_stride` of the image and the output at in_stride * stride.
    With masks, every input of a 3x3 conv is zeroed outside the image's extent (retina_fn.extent) and
    GroupNorm takes its statistics inside it."""
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
    """The backbone's feature maps.

    Args:
      params: the tree of `init` (or a mapped checkpoint).
      x: float [B, 3, H, W] images, zero outside each image.
      spec: the backbone's settings.
      masks: each image's extent (retina_fn.extent), or None. With masks, every cell inside an
        image's extent equals what the network computes on that image padded alone (the stem's and
        blocks' 3x3 / max-pool inputs are zeroed outside it; GroupNorm statistics stay inside it);
        cells outside hold values no cell inside depends on.

    Returns:
      {'C2': float [B, c2, H/4, W/4], 'C3': [B, c3, H/8, W/8], 'C4': [B, c4, H/16, W/16],
      'C5': [B, c5, H/32, W/32]} (sizes rounded up; channels from `out_channels(spec)`).

    Raises:

    """
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
    """Path prefixes (within the backbone) that `frozen_stages` freezes.

    The stem for frozen_stages >= 0, then layer1..layerN. mmdetection's frozen_stages=1 freezes the stem
    and layer1.

    Args:
      spec: the backbone's settings; reads frozen_stages (-1: nothing frozen).

    Returns:
      ('conv1/', 'bn1/', 'layer1/', ..., 'layerN/'), or () when frozen_stages < 0.
    """
    n = int(spec.frozen_stages)
    if n < 0:
        return ()
    return ("conv1/", "bn1/") + tuple(f"layer{i}/" for i in range(1, n + 1))
