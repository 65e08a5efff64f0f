"""Feature pyramid (FPN) with RetinaNet's two extra levels, as pure functions.

C3..C5 in (mmdetection's start_level=1), P3..P7 out. 1x1 laterals; the top-down path upsamples (nearest) each
coarser map to the exact size of the finer one and adds; 3x3 convs give P3..P5. P6 is a 3x3 stride-2 conv on C5
(extra_source 'input', mmdetection) or P5 ('output', torchvision v1); P7 one on P6, after a ReLU when
relu_before_extra. Every conv has a bias, no norm; init xavier uniform, bias 0 (mmdetection).
"""

from __future__ import annotations

import torch

from retina_fn import nn, rng
from retina_fn.extent import ExtentMasks, zero_outside
from retina_fn.spec import FPNSpec


def init(key: rng.Key, in_channels: tuple[int, int, int], spec: FPNSpec) -> dict:
    """FPN parameters for (C3, C4, C5) `in_channels`.

    Returns:
      {'lateral': {'0','1','2'}, 'output': {'0','1','2'}, 'p6', 'p7'}, each {'weight', 'bias'}, float32 on the
      CPU; laterals [C, c_i, 1, 1], the rest [C, c_in, 3, 3], C = spec.out_channels.
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


def apply(params: dict, feats: dict[str, torch.Tensor], spec: FPNSpec,
          masks: ExtentMasks | None = None) -> list[torch.Tensor]:
    """feats {'C3': float [B, c3, H/8, W/8], .., 'C5'} -> [P3 [B, C, H/8, W/8], .., P7 [B, C, H/128, W/128]]
    (sizes rounded up); with masks (retina_fn.extent), 3x3 conv inputs are zeroed outside each image's extent."""
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
