"""Images in memory (numpy HWC, torch CHW on any device, PIL) as the uint8 RGB arrays the transforms take.

Conversions match `images.decode_image` for files: grey becomes 3 channels, alpha is dropped (not composited),
PIL images go through `images.pil_to_rgb`. uint8 is taken as is; floats must lie in [0, 1] (torchvision's
`to_tensor` convention) and become round(255 x). Other dtypes and shapes are refused, naming the input.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from retina_fn.data.images import pil_to_rgb

_CHANNELS = (1, 3, 4)  # grey, RGB, RGBA


def as_rgb_uint8(image, what: str = "the image") -> np.ndarray:
    """One image in memory as uint8 [h, w, 3] RGB pixels, C-contiguous and writable (a read-only array, such as
    `np.asarray(pil_image)`, is copied: torch warns on reading one).

    Args:
        image: numpy [h, w, C] / [h, w], torch [C, h, w] / [h, w] (C in 1, 3, 4; uint8, or floats in [0, 1]),
            or a PIL image.
        what: how errors name the input, e.g. 'image 2 of the list'.

    Raises:
        TypeError: not a numpy array, torch tensor or PIL image.
        ValueError: another layout, size or dtype, or floats outside [0, 1] or not finite.
    """
    if isinstance(image, Image.Image):
        try:
            return pil_to_rgb(image)
        except (OSError, ValueError) as e:
            raise ValueError(f"{what}: cannot read the PIL image's pixels (mode {image.mode}): {e}") from None
    if isinstance(image, torch.Tensor):
        return _hwc_to_rgb(_tensor_to_hwc(image, what), what)
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[-1] not in _CHANNELS and image.shape[0] in _CHANNELS:
            raise ValueError(f"{what}: numpy array of shape {image.shape}: expected HWC ([h, w, 3] RGB, [h, w] or "
                             f"[h, w, 1] grey, [h, w, 4] RGBA); for a CHW array pass array.transpose(1, 2, 0)")
        return _hwc_to_rgb(image, what)
    raise TypeError(f"{what}: got {type(image).__module__}.{type(image).__qualname__}; expected a numpy array "
                    f"(HWC), a torch tensor (CHW) or a PIL image (read a file with PIL.Image.open)")


def _tensor_to_hwc(tensor: torch.Tensor, what: str) -> np.ndarray:
    """A CHW (or HW) tensor as a host numpy HWC (or HW) array."""
    if tensor.ndim == 3 and tensor.shape[0] not in _CHANNELS:
        hint = (": for an HWC tensor pass tensor.permute(2, 0, 1)" if tensor.shape[-1] in _CHANNELS else "")
        raise ValueError(f"{what}: torch tensor of shape {tuple(tensor.shape)}: expected CHW ([3, h, w] RGB, [h, w] "
                         f"or [1, h, w] grey, [4, h, w] RGBA){hint}")
    if tensor.ndim not in (2, 3):
        raise ValueError(f"{what}: torch tensor of shape {tuple(tensor.shape)}: expected one CHW image ([3, h, w] "
                         f"RGB, [h, w] or [1, h, w] grey, [4, h, w] RGBA); for a batch [B, 3, h, w] pass "
                         f"list(tensor)")
    host = tensor.detach().cpu()
    if host.dtype in (torch.bfloat16, torch.float16):
        host = host.float()  # numpy has no bfloat16; float16 widened alike
    array = host.numpy()
    return array.transpose(1, 2, 0) if array.ndim == 3 else array


def _hwc_to_rgb(array: np.ndarray, what: str) -> np.ndarray:
    """HWC (or HW) pixels of any accepted dtype as uint8 [h, w, 3]."""
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[-1] not in _CHANNELS:
        raise ValueError(f"{what}: array of shape {array.shape}: expected one image, [h, w, 3] RGB, [h, w] or "
                         f"[h, w, 1] grey, or [h, w, 4] RGBA (torch tensors: CHW)")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{what}: empty image ({array.shape[0]} x {array.shape[1]} pixels)")
    if array.dtype == np.uint8:
        pixels = array
    elif not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{what}: {array.dtype} pixels; expected uint8 (0..255) or floats in [0, 1]: for integers "
                         f"in 0..255 pass array.astype(np.uint8)")
    else:
        values = array.astype(np.float64)
        if not np.isfinite(values).all():
            raise ValueError(f"{what}: {array.dtype} pixels with NaN or infinite values")
        low, high = float(values.min()), float(values.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(f"{what}: {array.dtype} pixels in [{low:g}, {high:g}]; float images must lie in [0, 1] "
                             f"(they are scaled by 255): for floats in 0..255 pass array.round().astype(np.uint8)")
        pixels = np.rint(values * 255.0).astype(np.uint8)
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    elif pixels.shape[-1] == 4:
        pixels = pixels[:, :, :3]
    return np.require(pixels, requirements=("C", "W"))
