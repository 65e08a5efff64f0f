"""torchvision's detection preprocessing (GeneralizedRCNNTransform), as host-side functions over numpy.

torchvision differs from mmdetection's pipeline (retina_fn.data.transforms) in order and rounding:
  1. pixels become float32 in [0, 1] (uint8 / 255), then are normalised with mean / std in [0, 1] units
     (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225), i.e. data.mean / 255 and data.std / 255;
  2. the *normalised float* image is resized bilinearly (half-pixel centres, no antialiasing) by
     s = min(min_size / short side, max_size / long side) to int(side * s) (floored, where mmdetection
     rounds the size and resizes the uint8 image before normalising);
  3. it is zero-padded at the bottom / right (zero in normalised space) to a multiple of 32.
Boxes scale by (new_w / w, new_h / h). With data.scale = (1333, 800) this is torchvision's default
min_size 800, max_size 1333.

`torchvision_transform` has the signature and result of `retina_fn.data.transforms.transform`, so the
data pipeline can dispatch to it on data.resize_mode == 'torchvision'.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from retina_fn.data import transforms


def torchvision_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """torchvision's resized (new_h, new_w) for an image of (height, width); scale = (max_size, min_size)
    in either order (the larger is the long-side limit): s = min(min_size / short, max_size / long),
    new = int(side * s) (floored)."""
    max_size, min_size = max(scale), min(scale)
    s = min(min_size / min(height, width), max_size / max(height, width))
    return int(height * s), int(width * s)


def torchvision_resize(image: np.ndarray, size_hw: tuple[int, int], mean, std) -> np.ndarray:
    """uint8 RGB [h, w, 3] -> float32 [3, new_h, new_w]: (pixel / 255 - mean / 255) / (std / 255) in
    float32, then a bilinear resize of the float image to size_hw (half-pixel centres, no antialias).
    mean, std: per-channel, in 0..255 units (the data config's)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 [h, w, 3], got {image.dtype} {tuple(image.shape)}")
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).to(torch.float32) / 255
    mean01 = torch.tensor([float(m) / 255.0 for m in mean], dtype=torch.float32)
    std01 = torch.tensor([float(s) / 255.0 for s in std], dtype=torch.float32)
    x = (x - mean01[:, None, None]) / std01[:, None, None]
    out = F.interpolate(x[None], size=tuple(int(v) for v in size_hw), mode="bilinear", align_corners=False,
                        antialias=False)
    return out[0].numpy()


def pad_to_canvas(chw: np.ndarray, canvas_hw: tuple[int, int]) -> np.ndarray:
    """float32 [3, h, w] placed at the top left of a zero float32 [3, H, W]."""
    _, h, w = chw.shape
    ch, cw = canvas_hw
    if h > ch or w > cw:
        raise ValueError(f"resized image {h}x{w} (h x w) does not fit the canvas {ch}x{cw}; make "
                         f"data.scale fit data.landscape_canvas / data.portrait_canvas")
    canvas = np.zeros((3, ch, cw), dtype=np.float32)
    canvas[:, :h, :w] = chw
    return canvas


def batch_canvas(sizes_hw, divisor: int = 32) -> tuple[int, int]:
    """torchvision's padded batch size for resized images of sizes [(h, w), ...]: the largest h and w,
    each rounded up to a multiple of `divisor`."""
    h = max(int(s[0]) for s in sizes_hw)
    w = max(int(s[1]) for s in sizes_hw)
    return int(math.ceil(h / divisor) * divisor), int(math.ceil(w / divisor) * divisor)


def torchvision_transform(image: np.ndarray, boxes: np.ndarray, ignore_boxes: np.ndarray, cfg, *, flip: bool,
                          canvas_hw: tuple[int, int] | None = None) -> dict:
    """`retina_fn.data.transforms.transform` with torchvision's preprocessing: the same arguments
    (cfg: a TransformConfig or anything with scale, mean, std and the two canvases) and the same result
    dict (image float32 [3, H, W] on the canvas; boxes, ignore_boxes float32 in resized pixels, clipped
    to the image; image_hw; orig_hw; scale_factor (sx, sy); flipped).

    The flip, when asked for, mirrors the uint8 image before it is normalised and resized, as
    torchvision's training transforms flip before the model's own transform. canvas_hw overrides the
    aspect group's canvas (e.g. torchvision's own padded size, `batch_canvas`)."""
    h, w = image.shape[:2]
    new_h, new_w = torchvision_size(h, w, tuple(cfg.scale))
    sx, sy = new_w / w, new_h / h
    boxes = boxes.reshape(-1, 4).astype(np.float32)
    ignore_boxes = ignore_boxes.reshape(-1, 4).astype(np.float32)
    if flip:
        image = transforms.flip_image(image)
        boxes = transforms.flip_boxes(boxes, w)
        ignore_boxes = transforms.flip_boxes(ignore_boxes, w)
    canvas = tuple(canvas_hw) if canvas_hw is not None else transforms.canvas_for(h, w, cfg)
    return dict(
        image=pad_to_canvas(torchvision_resize(image, (new_h, new_w), cfg.mean, cfg.std), canvas),
        boxes=transforms.scale_boxes(boxes, sx, sy, (new_h, new_w)),
        ignore_boxes=transforms.scale_boxes(ignore_boxes, sx, sy, (new_h, new_w)),
        image_hw=np.array([new_h, new_w], dtype=np.int64),
        orig_hw=np.array([h, w], dtype=np.int64),
        scale_factor=np.array([sx, sy], dtype=np.float32),
        flipped=bool(flip),
    )
