"""Feature pyramid (FPN) with RetinaNet's two extra levels, as pure functions.

Inputs C3..C5 (C2 is unused: mmdetection's start_level=1); outputs P3..P7 with `out_channels` channels.
Laterals are 1x1 convs; the top-down path upsamples (nearest) each coarser map to the *exact* size of the
finer one and adds; 3x3 convs give P3..P5. P6 is a 3x3 stride-2 conv on C5 (extra_source 'input',
mmdetection) or on P5 ('output', torchvision v1); P7 is a 3x3 stride-2 conv on P6, after a ReLU when
relu_before_extra (torchvision v1). Every conv has a bias; no norm, no activation elsewhere.
Init: xavier uniform (gain 1), bias 0 (mmdetection).

Parameters: {'lateral': {'0','1','2'}, 'output': {'0','1','2'}, 'p6', 'p7'}, each {'weight', 'bias'}.
"""

from __future__ import annotations

import torch

from retina_fn import nn, rng
from retina_fn.extent import ExtentMasks, zero_outside
from retina_fn.spec import FPNSpec


def init(key: rng.Key, in_channels: tuple[int, int, int], spec: FPNSpec) -> dict:
    """FPN parameters (xavier uniform weights, zero biases).

    Args:
      key: rng key, int64 [2].
      in_channels: channels of (C3, C4, C5).
      spec: the FPN's settings (out_channels, extra_source, relu_before_extra).

    Returns:
      {'lateral': {'0','1','2'}, 'output': {'0','1','2'}, 'p6', 'p7'}, each {'weight', 'bias'}, float32 on
      the CPU; with C = spec.out_channels, laterals are [C, c_i, 1, 1], the rest [C, c_in, 3, 3].
    """
    c = spec.out_channels
    k = rng.split(key, 8)

    def conv(key, c_out, c_in, size):
        return nn.init.conv(key, c_out, c_in, size, "xavier_uniform", bias=True)

    p6_in = in_channels[2] if spec.extra_source == "input" else c
    return {
        "lateral": {str(i): conv(k[i], c, in_channels[i], 1) for i in range(3)},
        "output": {str(i): conv(k[3 + i], c, c, 3) for i in range(3)},
        "p6": conv(k[6], c, p6_in, 3),
        "p7": conv(k[7], c, c, 3),
    }


def apply(params: dict, feats: dict[str, torch.Tensor], spec: FPNSpec, masks: ExtentMasks | None = None) -> list[torch.Tensor]:
    """The pyramid P3..P7 from backbone features C3..C5.

    Args:
      params: the tree of `init`.
      feats: {'C3': float [B, c3, H/8, W/8], 'C4': [B, c4, H/16, W/16], 'C5': [B, c5, H/32, W/32]}
        (other entries, such as 'C2', are ignored).
      spec: the FPN's settings.
      masks: each image's extent (retina_fn.extent), or None: with masks, the inputs of the 3x3 convs
        are zeroed outside it, so the outputs inside it equal the image's alone.

    Returns:
      [P3 [B, C, H/8, W/8], P4 [B, C, H/16, W/16], P5 [B, C, H/32, W/32], P6 [B, C, H/64, W/64],
      P7 [B, C, H/128, W/128]], float, C = spec.out_channels (sizes rounded up).
    """
    inputs = [feats["C3"], feats["C4"], feats["C5"]]
    laterals = [nn.conv2d(params["lateral"][str(i)], x) for i, x in enumerate(inputs)]
    for i in (2, 1):
        finer = laterals[i - 1]
        laterals[i - 1] = finer + nn.upsample_nearest(laterals[i], finer.shape[-2:])
    outs = [nn.conv2d(params["output"][str(i)], zero_outside(x, masks, 8 << i), padding=1)
            for i, x in enumerate(laterals)]
    p6_source = inputs[2] if spec.extra_source == "input" else outs[2]
    p6 = nn.conv2d(params["p6"], zero_outside(p6_source, masks, 32), stride=2, padding=1)
    p7_source = nn.relu(p6) if spec.relu_before_extra else p6
    p7 = nn.conv2d(params["p7"], zero_outside(p7_source, masks, 64), stride=2, padding=1)
    return outs + [p6, p7]
