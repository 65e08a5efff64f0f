"""Frozen batch norm folded into the convolution that feeds it.

A frozen BN is the per-channel affine y = z * s + t with s = weight / sqrt(running_var + eps) and
t = bias - running_mean * s. After a convolution z = conv(x, W) + b it gives

    y = conv(x, W * s[:, None, None, None]) + (b * s + t),

one convolution with a bias instead of a convolution and two elementwise passes over its output, in the
forward and again in the backward. The rewrite is exact in real arithmetic (only float rounding differs)
and stays differentiable in every input: gradients reach the conv weight through W * s, and a trainable
BN weight or bias through s and t, as reductions over the weight-sized tensors instead of over the
activations. Functional parameters make this a pure function of the parameter tree, recomputed each call.
"""

from __future__ import annotations

import torch

from retina_fn.nn.layers import Params, conv2d, frozen_bn_scale_shift


def fold_frozen_bn(conv: Params, bn: Params, eps: float = 1e-5) -> Params:
    """One conv's parameters computing a conv followed by a frozen BN (see the module docstring).

    Args:
      conv: {'weight': float [C_out, C_in/g, kh, kw], optional 'bias': float [C_out]}.
      bn: frozen BN {'weight', 'bias', 'running_mean', 'running_var'}, each float [C_out].
      eps: the BN's epsilon.

    Returns:
      {'weight': [C_out, C_in/g, kh, kw], 'bias': [C_out]}, both in conv['weight']'s dtype.
    """
    scale, shift = frozen_bn_scale_shift(bn, eps)
    weight = conv["weight"] * scale.reshape(-1, 1, 1, 1).to(conv["weight"].dtype)
    bias = shift if conv.get("bias") is None else conv["bias"] * scale + shift
    return {"weight": weight, "bias": bias.to(weight.dtype)}


def conv_frozen_bn(conv: Params, bn: Params, x: torch.Tensor, eps: float = 1e-5, stride: int = 1,
                   padding: int = 0) -> torch.Tensor:
    """frozen_batch_norm(bn, conv2d(conv, x)) computed as one folded convolution.

    Args:
      conv: {'weight': float [C_out, C_in, kh, kw], optional 'bias': float [C_out]}.
      bn: frozen BN {'weight', 'bias', 'running_mean', 'running_var'}, each float [C_out].
      x: float [B, C_in, H, W].
      eps: the BN's epsilon.
      stride: the conv's stride.
      padding: the conv's zero padding.

    Returns:
      float [B, C_out, H', W'].
    """
    return conv2d(fold_frozen_bn(conv, bn, eps), x, stride=stride, padding=padding)
