"""The resize rules of the input pipeline, one per `data.resize_mode`, and the canvases resized images
are padded onto. Host-side functions over numpy arrays.

'mmdet' (mmdetection's 1x pipeline):
  1. size: s = min(long_max / long side, short_max / short side), new side = int(side * s + 0.5)
     (rounded);
  2. the uint8 image is resized bilinearly (half-pixel centres, no antialiasing: OpenCV's INTER_LINEAR,
     which mmcv uses), then normalised to float32 (pixel - mean) / std;
  3. a flip mirrors the resized image (mmdetection's RandomFlip follows Resize).
  Since normalising follows resizing, step 2's normalisation can run later, on the device: with
  data.uint8_canvas the canvas carries the resized uint8 pixels (`ResizeRule.resize_uint8`).
'torchvision' (GeneralizedRCNNTransform):
  1. size: s = min(min_size / short side, max_size / long side), new side = int(side * s) (floored);
  2. pixels become float32 in [0, 1] (uint8 / 255), are normalised with mean / 255 and std / 255
     ((0.485, 0.456, 0.406) / (0.229, 0.224, 0.225) for the default data.mean / data.std), and the
     *normalised float* image is resized bilinearly (half-pixel centres, no antialiasing);
  3. a flip mirrors the uint8 input (torchvision's training transforms flip before the model's own
     transform).
With data.scale = (1333, 800) both use the limits 1333 (long side) and 800 (short side); torchvision
calls them max_size and min_size.

Both zero-pad (zero in normalised space) at the bottom / right: onto the aspect group's fixed canvas
(data.landscape_canvas / data.portrait_canvas), or onto a tight canvas, the resized size rounded up to
a multiple of the model's size divisor, as mmdetection and torchvision pad a batch.

`RESIZE_MODES` is the one table of modes; `retina_fn.data.transforms.transform` reads it, so a new mode
is one entry here.
"""

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
    """An image that the configured resize would shrink to a side of 0 pixels (an extreme aspect ratio,
    such as 2000 x 1): nothing can be computed on it."""


def rescaled_size(height: int, width: int, scale: Sequence[int]) -> tuple[int, int]:
    """mmdetection's keep-ratio size (the 'mmdet' size rule).

    Args:
        height, width: the original image size in pixels.
        scale: (long side limit, short side limit), in either order (the larger is the long-side limit).

    Returns:
        (new_h, new_w) ints: s = min(long_max / long, short_max / short), new = int(dim * s + 0.5).
    """
    long_max, short_max = max(scale), min(scale)
    s = min(long_max / max(height, width), short_max / min(height, width))
    return int(height * s + 0.5), int(width * s + 0.5)


def torchvision_size(height: int, width: int, scale: Sequence[int]) -> tuple[int, int]:
    """torchvision's keep-ratio size (the 'torchvision' size rule).

    Args:
        height, width: the original image size in pixels.
        scale: (max_size, min_size), in either order (the larger is the long-side limit).

    Returns:
        (new_h, new_w) ints: s = min(min_size / short, max_size / long), new = int(dim * s) (floored).
    """
    max_size, min_size = max(scale), min(scale)
    s = min(min_size / min(height, width), max_size / max(height, width))
    return int(height * s), int(width * s)


def resize_image(image: np.ndarray, size_hw: Sequence[int]) -> np.ndarray:
    """Bilinear resize with half-pixel centres and no antialiasing, the semantics of OpenCV's
    INTER_LINEAR that mmcv uses (Pillow would antialias when shrinking).

    Args:
        image: uint8 [h, w, 3].
        size_hw: (H, W) of the result.

    Returns:
        uint8 [H, W, 3], a view of the interpolation's [3, H, W] result (so `[:, :, c]` is a contiguous
        plane and `.transpose(2, 0, 1)` the planar image, with no interleaving copy); `image` itself when it
        already has that size.
    """
    if tuple(image.shape[:2]) == tuple(size_hw):
        return image
    chw = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).unsqueeze(0)
    out = F.interpolate(chw, size=tuple(size_hw), mode="bilinear", align_corners=False, antialias=False)
    return out[0].numpy().transpose(1, 2, 0)


def mmdet_resize_normalize(image: np.ndarray, size_hw: Sequence[int], mean, std,
                           out: np.ndarray | None = None) -> np.ndarray:
    """mmdetection's order: resize the uint8 image (`resize_image`), then normalise it in float32.

    Args:
        image: uint8 RGB [h, w, 3].
        size_hw: (new_h, new_w).
        mean, std: 3 per-channel floats in 0..255 units (the data config's).
        out: optional float32 [3, new_h, new_w] (e.g. a view of a canvas) written in place.

    Returns:
        float32 [3, new_h, new_w] = (pixel - mean) / std, computed as (pixel - mean) * float32(1 / std);
        `out` when given.
    """
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
    """torchvision's order: normalise in [0, 1] units, then resize the float image.

    Args:
        image: uint8 RGB [h, w, 3] (ValueError otherwise).
        size_hw: (new_h, new_w).
        mean, std: 3 per-channel floats in 0..255 units (the data config's); used as mean / 255 and
            std / 255.
        out: optional float32 [3, new_h, new_w] (e.g. a view of a canvas) written in place.

    Returns:
        float32 [3, new_h, new_w]: (pixel / 255 - mean / 255) / (std / 255) in float32, resized bilinearly
        (half-pixel centres, no antialiasing); `out` when given.
    """
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
    """How one resize mode turns a decoded image into normalised pixels.

    size: (height, width, scale) -> (new_h, new_w), as `rescaled_size` / `torchvision_size`.
    resize_normalize: (uint8 [h, w, 3], (new_h, new_w), mean, std, out=float32 [3, new_h, new_w] or None)
        -> float32 [3, new_h, new_w], as `mmdet_resize_normalize` / `torchvision_normalize_resize`.
    flip_first: True when a flip mirrors the uint8 input and its boxes (original pixels) before resizing;
        False when it mirrors the resized image and the resized boxes.
    resize_uint8: (uint8 [h, w, 3], (new_h, new_w)) -> uint8 [new_h, new_w, 3], the resize alone, for a mode
        whose normalisation follows its resize and can therefore run later, on the device
        (data.uint8_canvas); None for a mode that normalises before resizing.
    """

    size: SizeRule
    resize_normalize: ResizeNormalize
    flip_first: bool
    resize_uint8: Callable[[np.ndarray, Sequence[int]], np.ndarray] | None = None


RESIZE_MODES: dict[str, ResizeRule] = {
    "mmdet": ResizeRule(rescaled_size, mmdet_resize_normalize, flip_first=False, resize_uint8=resize_image),
    "torchvision": ResizeRule(torchvision_size, torchvision_normalize_resize, flip_first=True),
}


def resize_rule(mode: str) -> ResizeRule:
    """The table entry of a resize mode.

    Args:
        mode: a key of `RESIZE_MODES` (data.resize_mode).

    Returns:
        Its ResizeRule; ValueError naming data.resize_mode and the known modes for any other value.
    """
    try:
        return RESIZE_MODES[mode]
    except (KeyError, TypeError):
        raise errors.ConfigError(f"data.resize_mode must be one of {tuple(RESIZE_MODES)}, got {mode!r}") from None


def resized_size(height: int, width: int, cfg) -> tuple[int, int]:
    """The size an image is resized to under the configured mode.

    Args:
        height, width: the original image size in pixels.
        cfg: a TransformConfig (or anything with resize_mode and scale).

    Returns:
        (new_h, new_w) ints.
    """
    return resize_rule(cfg.resize_mode).size(height, width, tuple(cfg.scale))


def check_nonzero(size_hw: Sequence[int], height: int, width: int, scale: Sequence[int], mode: str,
                  what: str) -> tuple[int, int]:
    """A resized size, checked to keep at least one pixel on each side.

    Args:
        size_hw: (new_h, new_w), what the resize rule gave.
        height, width: the original image size in pixels.
        scale: data.scale; mode: the resize mode, as errors name it (e.g. "data.resize_mode='mmdet'").
        what: the image, as errors name it (a file and its image id, or 'image 2 of the list').

    Returns:
        (new_h, new_w) ints; ResizeError when either is below 1.
    """
    new_h, new_w = (int(v) for v in size_hw)
    if new_h < 1 or new_w < 1:
        raise ResizeError(f"{what} is {width}x{height} (w x h): data.scale={tuple(scale)} with {mode} resizes it "
                          f"to {new_w}x{new_h}, and an image with a side of 0 pixels cannot be run; crop or pad "
                          f"it to a less extreme aspect ratio, or leave it out")
    return new_h, new_w


# ----------------------------------------------------------------------------------------------------
# Canvases


def new_canvas(image_hw: Sequence[int], canvas_hw: Sequence[int], dtype=np.float32) -> np.ndarray:
    """The zero canvas a resized image is pasted onto, after checking that it fits (the one fit check
    of every mode).

    Args:
        image_hw: (h, w) of the resized image.
        canvas_hw: (H, W) of the canvas.
        dtype: float32 for normalised pixels, uint8 for resized pixels normalised later (data.uint8_canvas).

    Returns:
        zeros [3, H, W] of `dtype`; ValueError when h > H or w > W.
    """
    h, w = image_hw
    ch, cw = canvas_hw
    if h > ch or w > cw:
        raise errors.ConfigError(f"resized image {h}x{w} (h x w) does not fit the canvas {ch}x{cw}; make "
                                 f"data.scale fit data.landscape_canvas / data.portrait_canvas")
    return np.zeros((3, ch, cw), dtype=dtype)


def tight_canvas(size_hw: Sequence[int], divisor: int) -> tuple[int, int]:
    """The smallest canvas a model with this size divisor takes for one image.

    Args:
        size_hw: (h, w) of the resized image.
        divisor: the model's size divisor (model.size_divisor).

    Returns:
        (H, W) ints: h and w rounded up to multiples of `divisor`.
    """
    return tuple(int(math.ceil(int(v) / divisor) * divisor) for v in size_hw)


def batch_canvas(sizes_hw: Sequence[Sequence[int]], divisor: int = 32) -> tuple[int, int]:
    """torchvision's (and mmdetection's) padded size of a batch.

    Args:
        sizes_hw: the resized (h, w) of each image of the batch.
        divisor: the model's size divisor.

    Returns:
        (H, W) ints: the largest h and the largest w, each rounded up to a multiple of `divisor`.
    """
    return tight_canvas((max(int(s[0]) for s in sizes_hw), max(int(s[1]) for s in sizes_hw)), divisor)


def check_canvases_fit(data_cfg) -> None:
    """Checks that the fixed canvases can hold every image the configured scale resizes to.

    Args:
        data_cfg: the `data` config block or a TransformConfig (scale, landscape_canvas, portrait_canvas).

    Returns:
        None; ValueError naming the canvas when a landscape canvas (H, W) is smaller than (short limit,
        long limit) of data.scale or a portrait one smaller than (long limit, short limit).
    """
    long_max, short_max = max(data_cfg.scale), min(data_cfg.scale)
    for name, need in (("landscape_canvas", (short_max, long_max)), ("portrait_canvas", (long_max, short_max))):
        canvas = tuple(getattr(data_cfg, name))
        if canvas[0] < need[0] or canvas[1] < need[1]:
            raise errors.ConfigError(f"data.{name}={canvas} (H, W) cannot hold every image resized with data.scale="
                                     f"{tuple(data_cfg.scale)}: it needs at least {need}")
