"""The network's input image from a batch: a float canvas as the loader normalised it, or a uint8 canvas
(data.uint8_canvas) normalised here, on the device, bit for bit as the host pipeline
(retina_fn.data.resize.mmdet_resize_normalize) would: per channel in float32, (pixel - float32(mean_c)) *
float32(1 / std_c) (1 / std_c taken in float64), exact zeros outside the resized image.
"""

from __future__ import annotations

from typing import Sequence

import torch

from retina_fn import extent
from retina_fn.spec import InputSpec


def normalize(image: torch.Tensor, image_hw: torch.Tensor, mean: Sequence[float], std: Sequence[float],
              real: torch.Tensor | None = None) -> torch.Tensor:
    """A uint8 canvas normalised as the host pipeline normalises (module docstring).

    Args:
      image: uint8 [B, 3, H, W], each resized image (h, w) = image_hw int64 [B, 2] at the top left.
      mean, std: 3 per-channel values in 0..255 units; real: optional bool [B], False for a padding slot.

    Returns:
      float32 [B, 3, H, W], 0.0 outside each real image's (h, w).

    Raises:
      ValueError: an image that is not uint8 [B, 3, H, W], image_hw not [B, 2] or real not [B].
    """
    if image.dtype != torch.uint8 or image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"image must be uint8 [B, 3, H, W], got {image.dtype} {tuple(image.shape)}")
    b, _, h, w = image.shape
    if tuple(image_hw.shape) != (b, 2):
        raise ValueError(f"image_hw must be [B, 2] = [{b}, 2], got {tuple(image_hw.shape)}")
    if real is not None and tuple(real.shape) != (b,):
        raise ValueError(f"real must be [B] = [{b}], got {tuple(real.shape)}")
    pixels = image.to(torch.float32)
    # Python scalars: each op rounds them to float32 as numpy does, and a compiled step holds them as constants.
    planes = [(pixels[:, c] - float(mean[c])) * float(1.0 / float(std[c])) for c in range(3)]
    inside = extent.extent_mask(image_hw, 1, (h, w))  # [B, H, W]: rows < h and columns < w
    if real is not None:
        inside = inside & real[:, None, None]
    return torch.where(inside[:, None], torch.stack(planes, dim=1), 0.0)


def model_input(batch: dict, spec: InputSpec) -> torch.Tensor:
    """float [B, 3, H, W]: batch['image'] itself when floating, else `normalize`'s image (docs/conventions.md).

    Args:
      batch: reads image float or uint8 [B, 3, H, W]; for uint8 also image_hw int64 [B, 2] and, when present,
        image_id int64 [B] (-1: a padding slot).

    Raises:
      ValueError: an image neither floating nor uint8 (and `normalize`'s errors).
    """
    image = batch["image"]
    if image.is_floating_point():
        return image
    if image.dtype != torch.uint8:
        raise ValueError(f"batch['image'] must be floating (normalised) or uint8 (data.uint8_canvas), got "
                         f"{image.dtype}")
    image_id = batch.get("image_id")
    return normalize(image, batch["image_hw"], spec.mean, spec.std,
                     None if image_id is None else image_id >= 0)
