"""Each image's reference extent on a shared canvas, and masks that make a canvas compute like it.

The references (mmdetection, torchvision) pad each image alone to a multiple of `size_divisor` (32) and
run the network on that padded image; its feature map at stride s has ceil(pad / s) rows and columns,
and every padded convolution or pooling reads zeros (or -inf for max pooling) beyond it. On a larger
canvas the activations beyond that extent are not zero after the first biased layer, so a 3x3
convolution at the extent's border would read them. Zeroing them before every layer that reads
neighbours makes each image's features inside its extent equal the reference's (max pooling after a
ReLU reads values >= 0, so a zero there changes no maximum either). 1x1 convolutions, additions and
the FPN's exact 2x nearest upsampling read only positions inside the extent and need no mask.

    pad_hw = padded_hw(image_hw, 32, canvas_hw)            # int64 [B, 2]
    masks = ExtentMasks(pad_hw)
    x = masks.zero_outside(x, stride=8)                    # x [B, C, H/8, W/8]
"""

from __future__ import annotations

import torch

from retina_fn import errors


def _ceil_div(a: torch.Tensor, b: int) -> torch.Tensor:
    return (a + b - 1) // b


def padded_hw(image_hw: torch.Tensor, divisor: int, canvas_hw) -> torch.Tensor:
    """Each image's size padded alone to a multiple of `divisor`, at most the canvas.

    Args:
      image_hw: int64 [B, 2], (h, w) of each resized image.
      divisor: the padding multiple (model.size_divisor), >= 1.
      canvas_hw: (H, W) of the canvas the images sit on.

    Returns:
      int64 [B, 2]: min(ceil(image_hw / divisor) * divisor, canvas_hw).
    """
    if divisor < 1:
        raise errors.ConfigError(f"model.size_divisor must be >= 1, got {divisor}")
    pad = _ceil_div(image_hw.to(torch.int64), int(divisor)) * int(divisor)
    # Python-scalar bounds: no host-to-device copy (capturable in a CUDA graph)
    return torch.stack([pad[:, 0].clamp(max=int(canvas_hw[0])), pad[:, 1].clamp(max=int(canvas_hw[1]))], dim=1)


def level_extent(pad_hw: torch.Tensor, stride: int) -> torch.Tensor:
    """The reference's feature-map size at a stride: each stride-2 layer maps n to ceil(n / 2), and
    ceil-halving k times equals ceil(n / 2**k).

    Args:
      pad_hw: int64 [B, 2] from `padded_hw`.
      stride: a power of two.

    Returns:
      int64 [B, 2]: ceil(pad_hw / stride).
    """
    return _ceil_div(pad_hw, int(stride))


def extent_mask(pad_hw: torch.Tensor, stride: int, map_hw) -> torch.Tensor:
    """Which cells of a feature map lie inside each image's reference extent.

    Args:
      pad_hw: int64 [B, 2] from `padded_hw`.
      stride: the map's stride (a power of two).
      map_hw: (h, w) of the map on the canvas.

    Returns:
      bool [B, h, w]: cell (i, j) of image b is True when i < ceil(pad_h / stride) and
      j < ceil(pad_w / stride).
    """
    limit = level_extent(pad_hw, stride)
    rows = torch.arange(int(map_hw[0]), device=pad_hw.device) < limit[:, 0:1]  # [B, h]
    cols = torch.arange(int(map_hw[1]), device=pad_hw.device) < limit[:, 1:2]  # [B, w]
    return rows[:, :, None] & cols[:, None, :]


class ExtentMasks:
    """The masks of one forward pass, made once per (stride, map size) and reused.

    A per-call cache (built inside the forward function from its inputs, dropped with it), not
    module state: the forward stays a pure function of params, images and image sizes.

    Args:
      pad_hw: int64 [B, 2] from `padded_hw`.
    """

    def __init__(self, pad_hw: torch.Tensor):
        self.pad_hw = pad_hw
        self._masks: dict = {}

    def mask(self, stride: int, map_hw) -> torch.Tensor:
        """Args: stride; map_hw (h, w). Returns: bool [B, 1, h, w], True inside the extent."""
        key = (int(stride), int(map_hw[0]), int(map_hw[1]))
        if key not in self._masks:
            self._masks[key] = extent_mask(self.pad_hw, stride, map_hw).unsqueeze(1)
        return self._masks[key]

    def zero_outside(self, x: torch.Tensor, stride: int) -> torch.Tensor:
        """Args: x float [B, C, h, w] at `stride`. Returns: x with every cell outside the extent set to 0.

        A select, not a product with the mask: a non-finite value outside (an fp16 overflow) becomes 0 there
        instead of NaN, which the next 3x3 convolution would read into the image."""
        return torch.where(self.mask(stride, x.shape[-2:]), x, 0.0)


def zero_outside(x: torch.Tensor, masks: ExtentMasks | None, stride: int) -> torch.Tensor:
    """`masks.zero_outside(x, stride)`, or x unchanged when masks is None (masking switched off).

    Args:
      x: float [B, C, h, w] at `stride`.
      masks: the forward pass's masks, or None.
      stride: x's stride.

    Returns:
      float [B, C, h, w].
    """
    return x if masks is None else masks.zero_outside(x, stride)
