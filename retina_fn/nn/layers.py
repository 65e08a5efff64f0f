"""Pure layers: each takes its parameters as a dict of tensors and returns a new tensor.

Parameter dicts use torch's names ('weight', 'bias', 'running_mean', 'running_var') so checkpoints from
torchvision and mmdetection map onto them by renaming prefixes only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from retina_fn.nn.masked_group_norm import masked_group_norm, masked_group_norm_maps

Params = dict[str, torch.Tensor]


def conv2d(p: Params, x: torch.Tensor, stride: int = 1, padding: int = 0, groups: int = 1) -> torch.Tensor:
    """2-D convolution.

    Args:
      p: {'weight': float [C_out, C_in/groups, kh, kw], optional 'bias': float [C_out]}.
      x: float [B, C_in, H, W].
      stride: the stride.
      padding: zero padding on each side.
      groups: the number of channel groups.

    Returns:
      float [B, C_out, H', W'], in x's memory format (channels_last stays channels_last).
    """
    return F.conv2d(x, p["weight"], p.get("bias"), stride=stride, padding=padding, groups=groups)


def frozen_bn_scale_shift(p: Params, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel affine of a frozen batch norm.

    Args:
      p: {'weight', 'bias', 'running_mean', 'running_var'}, each float [C].
      eps: added to running_var.

    Returns:
      (scale, shift), each float [C]: scale = weight / sqrt(running_var + eps) and
      shift = bias - running_mean * scale.
    """
    scale = p["weight"] * torch.rsqrt(p["running_var"] + eps)
    shift = p["bias"] - p["running_mean"] * scale
    return scale, shift


def frozen_batch_norm(p: Params, x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Batch norm with stored statistics, as one per-channel affine.

    y = (x - running_mean) / sqrt(running_var + eps) * weight + bias. The statistics never change (no
    mutable state); weight and bias may still be trained. torchvision's RetinaNet v1 checkpoint expects
    eps = 0. After a convolution, retina_fn.nn.fold.conv_frozen_bn computes the pair in one step.

    Args:
      p: {'weight', 'bias', 'running_mean', 'running_var'}, each float [C].
      x: float [B, C, H, W].
      eps: added to running_var.

    Returns:
      [B, C, H, W] in x's dtype.
    """
    scale, shift = frozen_bn_scale_shift(p, eps)
    return x * scale.to(x.dtype)[None, :, None, None] + shift.to(x.dtype)[None, :, None, None]


def group_norm(p: Params, x: torch.Tensor, num_groups: int, eps: float = 1e-5,
               mask: torch.Tensor | None = None, relu: bool = False, zero_outside: bool = False) -> torch.Tensor:
    """Group normalisation with a per-channel affine, its statistics optionally over a region only, and
    optionally the ReLU and the zeroing outside the region that follow it (one fused step with a mask).

    Args:
      p: {'weight', 'bias'}, each float [C].
      x: float [B, C, H, W].
      num_groups: the number of groups; must divide C.
      eps: added to the variance.
      mask: None (statistics over the whole map, F.group_norm), or bool [B, 1, H, W] (True inside): each
        image's mean and variance over the cells where it is True only (a map cropped to that region
        would give the same values there), so cells outside cannot change those inside.
      relu: apply max(y, 0) to the output.
      zero_outside: with a mask, set the output to 0 where the mask is False (ignored without a mask).

    Returns:
      float [B, C, H, W]; with a mask, computed in float32 (or x's wider dtype) and returned in x's dtype
      (retina_fn.nn.masked_group_norm: one pass for the statistics, a hand-written backward).
    """
    if mask is None:
        y = F.group_norm(x, num_groups, p["weight"], p["bias"], eps)
        return F.relu(y) if relu else y
    return masked_group_norm(x, p["weight"], p["bias"], mask, num_groups, eps, relu=relu, zero_outside=zero_outside)


def group_norm_maps(p: Params, xs: list[torch.Tensor], num_groups: int, eps: float = 1e-5,
                    masks: list[torch.Tensor] | None = None, relu: bool = False,
                    zero_outside: bool = False) -> list[torch.Tensor]:
    """`group_norm` with the same parameters on several maps (a shared head's pyramid levels).

    With masks the maps go through one autograd call (retina_fn.nn.masked_group_norm_maps: the per-call
    overhead once, not once per map); the values and gradients are those of one `group_norm` per map.

    Args:
      p: {'weight', 'bias'}, each float [C].
      xs: n float [B, C, H_i, W_i].
      num_groups, eps, relu, zero_outside: as `group_norm`.
      masks: None, or n bool [B, 1, H_i, W_i] (`group_norm`'s mask for the map of that index).

    Returns:
      n float [B, C, H_i, W_i].
    """
    if masks is None:
        return [group_norm(p, x, num_groups, eps, relu=relu) for x in xs]
    return masked_group_norm_maps(xs, p["weight"], p["bias"], masks, num_groups, eps, relu=relu,
                                  zero_outside=zero_outside)


def relu(x: torch.Tensor) -> torch.Tensor:
    """max(x, 0), out of place.

    Args:
      x: float tensor, any shape.

    Returns:
      A new tensor, x's shape and dtype.
    """
    return F.relu(x)


def max_pool2d(x: torch.Tensor, kernel_size: int = 3, stride: int = 2, padding: int = 1) -> torch.Tensor:
    """Max pooling.

    Args:
      x: float [B, C, H, W].
      kernel_size: the window size.
      stride: the stride.
      padding: implicit -inf padding on each side.

    Returns:
      float [B, C, H', W'].
    """
    return F.max_pool2d(x, kernel_size, stride, padding)


def upsample_nearest(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize to exactly `size` (FPN's top-down path).

    Args:
      x: float [B, C, h, w].
      size: the target (H, W).

    Returns:
      float [B, C, H, W].
    """
    return F.interpolate(x, size=size, mode="nearest")
