"""The resize rules of the input pipeline, one per `data.resize_mode` (the table `RESIZE_MODES`), and the
canvases resized images are padded onto. Host-side, numpy. data.scale = (1333, 800) gives the long-side
limit 1333 (max_size) and the short-side limit 800 (min_size).

'mmdet' (mmdetection's 1x pipeline): s = min(long_max / long side, short_max / short side), new side =
  int(side * s + 0.5); the uint8 image is resized bilinearly (half-pixel centres, no antialiasing: OpenCV's
  INTER_LINEAR, as mmcv), then normalised to float32 (so data.uint8_canvas can normalise on the device); a
  flip mirrors the resized image.
'torchvision' (GeneralizedRCNNTransform): s = min(min_size / short side, max_size / long side), new side =
  int(side * s); the uint8 / 255 image is normalised with mean / 255 and std / 255, then resized bilinearly
  (half-pixel centres, no antialiasing); a flip mirrors the uint8 input (as torchvision's training
  transforms flip before the model's transform).
Both zero-pad at the bottom / right (zero in normalised space), onto the aspect group's fixed canvas or a
tight one (the resized size rounded up to the model's size divisor, as both libraries pad)."""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from retina_fn import errors

SizeRule = Callable[[int, int, Sequence[int]], tuple[int, int]]
ResizeNormalize = Callable[..., np.ndarray]


class ResizeError(errors.UserError, ValueError):
    """An image the configured resize would shrink to a side of 0 pixels (such as 2000 x 1)."""


def rescaled_size(height: int, width: int, scale: Sequence[int]) -> tuple[int, int]:
    """mmdetection's keep-ratio (new_h, new_w) of an image under `scale` (the two limits, either order)."""
    long_max, short_max = max(scale), min(scale)
    s = min(long_max / max(height, width), short_max / min(height, width))
    return int(height * s + 0.5), int(width * s + 0.5)


def torchvision_size(height: int, width: int, scale: Sequence[int]) -> tuple[int, int]:
    """torchvision's keep-ratio (new_h, new_w) of an image under `scale` (the two limits, either order)."""
    max_size, min_size = max(scale), min(scale)
    s = min(min_size / min(height, width), max_size / max(height, width))
    return int(height * s), int(width * s)


def resize_image(image: np.ndarray, size_hw: Sequence[int]) -> np.ndarray:
    """uint8 [h, w, 3] -> uint8 [H, W, 3] (size_hw), resized as OpenCV's INTER_LINEAR (module docstring): a view
    of a planar [3, H, W] array (`.transpose(2, 0, 1)` costs no copy), or `image` when it already has that size."""
    if tuple(image.shape[:2]) == tuple(size_hw):
        return image
    chw = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).unsqueeze(0)
    out = F.interpolate(chw, size=tuple(size_hw), mode="bilinear", align_corners=False, antialias=False)
    return out[0].numpy().transpose(1, 2, 0)


def mmdet_resize_normalize(image: np.ndarray, size_hw: Sequence[int], mean, std,
                           out: np.ndarray | None = None) -> np.ndarray:
    """mmdetection's order: resize the uint8 image, then normalise in float32.

    Args:
        image: uint8 RGB [h, w, 3]; size_hw: (new_h, new_w); mean, std: 3 floats in 0..255 units.
        out: optional float32 [3, new_h, new_w] (e.g. a canvas view) written in place.
    Returns:
        float32 [3, new_h, new_w] = (pixel - mean) * float32(1 / std); `out` when given."""
    resized = resize_image(image, size_hw)
    if out is None:
        out = np.empty((3, *(int(v) for v in size_hw)), dtype=np.float32)
    inv_std = 1.0 / np.asarray(std, dtype=np.float64)
    for c in range(3):
        plane = resized[:, :, c].astype(np.float32)
        plane -= np.float32(mean[c])
        plane *= np.float32(inv_std[c])
        out[c] = plane
    return out


def torchvision_normalize_resize(image: np.ndarray, size_hw: Sequence[int], mean, std,
                                 out: np.ndarray | None = None) -> np.ndarray:
    """torchvision's order: normalise in [0, 1] units, then resize the float image; arguments as
    `mmdet_resize_normalize` (ValueError unless image is uint8 [h, w, 3]). Returns float32 [3, new_h, new_w]:
    (pixel / 255 - mean / 255) / (std / 255), resized; `out` when given."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 [h, w, 3], got {image.dtype} {tuple(image.shape)}")
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).to(torch.float32) / 255
    mean01 = torch.tensor([float(m) / 255.0 for m in mean], dtype=torch.float32)
    std01 = torch.tensor([float(s) / 255.0 for s in std], dtype=torch.float32)
    x = (x - mean01[:, None, None]) / std01[:, None, None]
    resized = F.interpolate(x[None], size=tuple(int(v) for v in size_hw), mode="bilinear", align_corners=False,
                            antialias=False)[0].numpy()
    if out is None:
        return resized
    out[...] = resized
    return out


class ResizeRule(NamedTuple):
    """How one resize mode turns a decoded image into normalised pixels: size as `rescaled_size`;
    resize_normalize as `mmdet_resize_normalize`; flip_first: a flip mirrors the uint8 input and original boxes
    (else the resized image and boxes); resize_uint8: the resize alone, as `resize_image`, for a mode that
    normalises after resizing (so data.uint8_canvas can normalise on the device), else None."""
    size: SizeRule
    resize_normalize: ResizeNormalize
    flip_first: bool
    resize_uint8: Callable[[np.ndarray, Sequence[int]], np.ndarray] | None = None


RESIZE_MODES: dict[str, ResizeRule] = {
    "mmdet": ResizeRule(rescaled_size, mmdet_resize_normalize, flip_first=False, resize_uint8=resize_image),
    "torchvision": ResizeRule(torchvision_size, torchvision_normalize_resize, flip_first=True),
}


def resize_rule(mode: str) -> ResizeRule:
    """The RESIZE_MODES entry of data.resize_mode; ConfigError naming the known modes for another value."""
    try:
        return RESIZE_MODES[mode]
    except (KeyError, TypeError):
        raise errors.ConfigError(f"data.resize_mode must be one of {tuple(RESIZE_MODES)}, got {mode!r}") from None


def resized_size(height: int, width: int, cfg) -> tuple[int, int]:
    """(new_h, new_w) of an image under cfg's resize_mode and scale (a TransformConfig or alike)."""
    return resize_rule(cfg.resize_mode).size(height, width, tuple(cfg.scale))


def check_nonzero(size_hw: Sequence[int], height: int, width: int, scale: Sequence[int], mode: str,
                  what: str) -> tuple[int, int]:
    """size_hw (new_h, new_w) as ints; ResizeError naming the image (`what`), its size, data.scale and `mode`
    when a side is below 1."""
    new_h, new_w = (int(v) for v in size_hw)
    if new_h < 1 or new_w < 1:
        raise ResizeError(f"{what} is {width}x{height} (w x h): data.scale={tuple(scale)} with {mode} resizes it "
                          f"to {new_w}x{new_h}, and an image with a side of 0 pixels cannot be run; crop or pad "
                          f"it to a less extreme aspect ratio, or leave it out")
    return new_h, new_w


def new_canvas(image_hw: Sequence[int], canvas_hw: Sequence[int], dtype=np.float32) -> np.ndarray:
    """Zeros [3, H, W] (canvas_hw) of `dtype` for a resized image (h, w); ConfigError when it does not fit."""
    (h, w), (ch, cw) = image_hw, canvas_hw
    if h > ch or w > cw:
        raise errors.ConfigError(f"resized image {h}x{w} (h x w) does not fit the canvas {ch}x{cw}; make "
                                 f"data.scale fit data.landscape_canvas / data.portrait_canvas")
    return np.zeros((3, ch, cw), dtype=dtype)


def tight_canvas(size_hw: Sequence[int], divisor: int) -> tuple[int, int]:
    """(H, W): the resized (h, w) rounded up to multiples of the model's size divisor."""
    return tuple(int(math.ceil(int(v) / divisor) * divisor) for v in size_hw)


def batch_canvas(sizes_hw: Sequence[Sequence[int]], divisor: int = 32) -> tuple[int, int]:
    """torchvision's (and mmdetection's) padded (H, W) of a batch of resized (h, w) sizes."""
    return tight_canvas((max(int(s[0]) for s in sizes_hw), max(int(s[1]) for s in sizes_hw)), divisor)

