"""Frozen batch norm folded into the convolution that feeds it.

A frozen BN after z = conv(x, W) + b is y = z * s + t, s = weight / sqrt(running_var + eps),
t = bias - running_mean * s, so y = conv(x, W * s) + (b * s + t): one conv instead of a conv and two elementwise
passes, exact up to float rounding and differentiable in every input, recomputed each call.
"""

from __future__ import annotations

import torch

from retina_fn.nn.layers import Params, conv2d, frozen_bn_scale_shift


def fold_frozen_bn(conv: Params, bn: Params, eps: float = 1e-5) -> Params:
    """One conv's parameters computing a conv followed by a frozen BN.

    Args:
      conv: {'weight': float [C_out, C_in/g, kh, kw], optional 'bias': float [C_out]}.
      bn: frozen BN {'weight', 'bias', 'running_mean', 'running_var'}, each float [C_out].

    Returns:
      {'weight': [C_out, C_in/g, kh, kw], 'bias': [C_out]}, both in conv['weight']'s dtype.
    """
    scale, shift = frozen_bn_scale_shift(bn, eps)
    weight = conv["weight"] * scale.reshape(-1, 1, 1, 1).to(conv["weight"].dtype)
    bias = shift if conv.get("bias") is None else conv["bias"] * scale + shift
    return {"weight": weight, "bias": bias.to(weight.dtype)}


def conv_frozen_bn(conv: Params, bn: Params, x: torch.Tensor, eps: float = 1e-5, stride: int = 1,
                   padding: int = 0) -> torch.Tensor:
    """frozen_batch_norm(bn, conv2d(conv, x)) as one folded convolution: x float [B, C_in, H, W] ->
    float [B, C_out, H', W'] (`fold_frozen_bn`'s conv and bn)."""
    return conv2d(fold_frozen_bn(conv, bn, eps), x, stride=stride, padding=padding)
