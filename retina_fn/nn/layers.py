"""Pure layers over parameter dicts with torch's names ('weight', 'bias', 'running_mean', 'running_var'), so
torchvision and mmdetection checkpoints map on by renaming prefixes only. Maps are float [B, C, H, W].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from retina_fn.nn.masked_group_norm import masked_group_norm, masked_group_norm_maps

Params = dict[str, torch.Tensor]


def conv2d(p: Params, x: torch.Tensor, stride: int = 1, padding: int = 0, groups: int = 1) -> torch.Tensor:
    """2-D convolution with p {'weight': [C_out, C_in/groups, kh, kw], optional 'bias': [C_out]}; keeps x's
    memory format."""
    return F.conv2d(x, p["weight"], p.get("bias"), stride=stride, padding=padding, groups=groups)


def frozen_bn_scale_shift(p: Params, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) float [C] of a frozen batch norm p: weight / sqrt(running_var + eps), bias - mean * scale."""
    scale = p["weight"] * torch.rsqrt(p["running_var"] + eps)
    shift = p["bias"] - p["running_mean"] * scale
    return scale, shift


def frozen_batch_norm(p: Params, x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Batch norm with stored statistics p (each float [C]) as one per-channel affine, in x's dtype."""
    scale, shift = frozen_bn_scale_shift(p, eps)
    return x * scale.to(x.dtype)[None, :, None, None] + shift.to(x.dtype)[None, :, None, None]


def group_norm(p: Params, x: torch.Tensor, num_groups: int, eps: float = 1e-5,
               mask: torch.Tensor | None = None, relu: bool = False, zero_outside: bool = False) -> torch.Tensor:
    """Group normalisation with affine p {'weight', 'bias'}, then an optional ReLU. mask: None (F.group_norm), or
    bool [B, 1, H, W]: each image's statistics over the True cells only (retina_fn.nn.masked_group_norm), and
    with zero_outside the output is 0 where it is False."""
    if mask is None:
        y = F.group_norm(x, num_groups, p["weight"], p["bias"], eps)
        return F.relu(y) if relu else y
    return masked_group_norm(x, p["weight"], p["bias"], mask, num_groups, eps, relu=relu, zero_outside=zero_outside)


def group_norm_maps(p: Params, xs: list[torch.Tensor], num_groups: int, eps: float = 1e-5,
                    masks: list[torch.Tensor] | None = None, relu: bool = False,
                    zero_outside: bool = False) -> list[torch.Tensor]:
    """`group_norm` with the same p on n maps xs [B, C, H_i, W_i] (a shared head's levels), with masks None or
    n bool [B, 1, H_i, W_i]; the values and gradients of one `group_norm` per map, in one autograd call."""
    if masks is None:
        return [group_norm(p, x, num_groups, eps, relu=relu) for x in xs]
    return masked_group_norm_maps(xs, p["weight"], p["bias"], masks, num_groups, eps, relu=relu,
                                  zero_outside=zero_outside)


def relu(x: torch.Tensor) -> torch.Tensor:
    """max(x, 0), out of place."""
    return F.relu(x)


def max_pool2d(x: torch.Tensor, kernel_size: int = 3, stride: int = 2, padding: int = 1) -> torch.Tensor:
    """Max pooling (implicit -inf padding)."""
    return F.max_pool2d(x, kernel_size, stride, padding)


def upsample_nearest(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize to exactly `size` (H, W) (FPN's top-down path)."""
    return F.interpolate(x, size=size, mode="nearest")
