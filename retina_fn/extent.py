"""Each image's reference extent on a shared canvas, and masks that make a canvas compute like it.

The references pad each image alone to a multiple of `size_divisor`; its feature map at stride s has
ceil(pad / s) rows and columns, and padded layers read zeros beyond it. Zeroing activations outside that extent
before every layer that reads neighbours makes each image's features inside it equal the reference's (a zero
changes no maximum after a ReLU); 1x1 convs, additions and exact 2x upsampling need no mask.
"""

from __future__ import annotations

import torch

from retina_fn import errors


def _ceil_div(a: torch.Tensor, b: int) -> torch.Tensor:
    return (a + b - 1) // b


def padded_hw(image_hw: torch.Tensor, divisor: int, canvas_hw) -> torch.Tensor:
    """int64 [B, 2]: each image's (h, w), image_hw int64 [B, 2], padded alone to a multiple of `divisor`
    (model.size_divisor; ConfigError if < 1) and at most canvas_hw (H, W)."""
    if divisor < 1:
        raise errors.ConfigError(f"model.size_divisor must be >= 1, got {divisor}")
    pad = _ceil_div(image_hw.to(torch.int64), int(divisor)) * int(divisor)
    # Python-scalar bounds: no host-to-device copy (capturable in a CUDA graph)
    return torch.stack([pad[:, 0].clamp(max=int(canvas_hw[0])), pad[:, 1].clamp(max=int(canvas_hw[1]))], dim=1)


def level_extent(pad_hw: torch.Tensor, stride: int) -> torch.Tensor:
    """int64 [B, 2] ceil(pad_hw / stride), pad_hw from `padded_hw`: the reference's feature-map size at a
    power-of-two stride (each stride-2 layer maps n to ceil(n / 2))."""
    return _ceil_div(pad_hw, int(stride))


def extent_mask(pad_hw: torch.Tensor, stride: int, map_hw) -> torch.Tensor:
    """bool [B, h, w] for a map_hw (h, w) map at `stride`: True at the cells inside each image's extent,
    i < ceil(pad_h / stride) and j < ceil(pad_w / stride), pad_hw int64 [B, 2] from `padded_hw`."""
    limit = level_extent(pad_hw, stride)
    rows = torch.arange(int(map_hw[0]), device=pad_hw.device) < limit[:, 0:1]  # [B, h]
    cols = torch.arange(int(map_hw[1]), device=pad_hw.device) < limit[:, 1:2]  # [B, w]
    return rows[:, :, None] & cols[:, None, :]


class ExtentMasks:
    """The masks of one forward pass over pad_hw int64 [B, 2] (`padded_hw`), made once per (stride, map size).
    A per-call cache built inside the forward function and dropped with it, not module state: the forward
    stays a pure function of params, images and image sizes."""

    def __init__(self, pad_hw: torch.Tensor):
        self.pad_hw = pad_hw
        self._masks: dict = {}

    def mask(self, stride: int, map_hw) -> torch.Tensor:
        """bool [B, 1, h, w] for a map_hw (h, w) map: True inside the extent."""
        key = (int(stride), int(map_hw[0]), int(map_hw[1]))
        if key not in self._masks:
            self._masks[key] = extent_mask(self.pad_hw, stride, map_hw).unsqueeze(1)
        return self._masks[key]

    def zero_outside(self, x: torch.Tensor, stride: int) -> torch.Tensor:
        """x float [B, C, h, w] at `stride` with every cell outside the extent set to 0: a select, not a
        product, so a non-finite value outside (an fp16 overflow) becomes 0 instead of NaN."""
        return torch.where(self.mask(stride, x.shape[-2:]), x, 0.0)


def zero_outside(x: torch.Tensor, masks: ExtentMasks | None, stride: int) -> torch.Tensor:
    """`masks.zero_outside(x, stride)`, or x unchanged when masks is None (masking switched off)."""
    return x if masks is None else masks.zero_outside(x, stride)
