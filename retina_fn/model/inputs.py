"""The network's input image from a batch: a float canvas is taken as the loader normalised it; a uint8 canvas
(data.uint8_canvas: resized pixels, a quarter of the bytes to decode, ship and copy) is normalised here, on the
device, into the float32 image the host pipeline would have made, bit for bit.

The host pipeline (retina_fn.data.resize.mmdet_resize_normalize, mmdetection's order) resizes the uint8 image,
then computes, per channel c in float32, (pixel - float32(mean_c)) * float32(1 / std_c), with 1 / std_c taken in
float64, and leaves exact zeros (zero in normalised space) on the canvas outside the resized image. `normalize`
does the same two float32 operations per element, so the results are equal whichever device computes them.

    images = model_input(batch, spec.input)   # float [B, 3, H, W]; what retinanet.apply takes
"""

from __future__ import annotations

from typing import Sequence

import torch

from retina_fn import extent
from retina_fn.spec import InputSpec


def normalize(image: torch.Tensor, image_hw: torch.Tensor, mean: Sequence[float], std: Sequence[float],
              real: torch.Tensor | None = None) -> torch.Tensor:
    """A uint8 canvas normalised as the host pipeline normalises (see the module docstring).

    Args:
      image: uint8 [B, 3, H, W], each resized image at the top left of the canvas (what lies outside is
        not read).
      image_hw: int64 [B, 2], (h, w) of each resized image.
      mean: 3 per-channel means in 0..255 units (data.mean).
      std: 3 per-channel standard deviations in 0..255 units (data.std).
      real: optional bool [B]; False marks a padding slot (an evaluation batch's image_id -1), whose image is
        zero everywhere, as the host pipeline makes it.

    Returns:
      float32 [B, 3, H, W]: (pixel - float32(mean_c)) * float32(1 / std_c) at rows < h and columns < w of
      each real image, 0.0 elsewhere.

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
    # Python scalars: each op rounds them to float32, as numpy's float32(mean) and float32(1 / std) do; they
    # need no host-to-device copy, so a captured or compiled step can hold them as constants.
    planes = [(pixels[:, c] - float(mean[c])) * float(1.0 / float(std[c])) for c in range(3)]
    inside = extent.extent_mask(image_hw, 1, (h, w))  # [B, H, W]: rows < h and columns < w
    if real is not None:
        inside = inside & real[:, None, None]
    return torch.where(inside[:, None], torch.stack(planes, dim=1), 0.0)


def model_input(batch: dict, spec: InputSpec) -> torch.Tensor:
    """The image the network takes from a batch (docs/conventions.md).

    Args:
      batch: reads image: float [B, 3, H, W] (already normalised) or uint8 [B, 3, H, W] (data.uint8_canvas);
        for uint8 also image_hw int64 [B, 2] and, when present, image_id int64 [B] (-1: a padding slot).
      spec: the input's settings; mean and std are read for a uint8 image only.

    Returns:
      float [B, 3, H, W]: batch['image'] itself when it is floating, else `normalize`'s float32 image.

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
