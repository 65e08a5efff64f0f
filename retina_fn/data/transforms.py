"""Host-side image and box transforms of mmdetection's 1x pipeline, as pure functions over numpy arrays:
keep-ratio resize -> horizontal flip -> normalise -> zero-pad onto the aspect group's fixed canvas.

The only randomness is the flip, drawn from the sample's key (`retina_fn.rng.numpy_generator`), so a
sample is augmented the same in any worker or process.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from retina_fn import rng


class TransformConfig(NamedTuple):
    """What the transforms read from the `data` config block."""

    scale: tuple[int, int] = (1333, 800)  # (long side limit, short side limit)
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    flip_prob: float = 0.5
    landscape_canvas: tuple[int, int] = (800, 1344)  # (H, W) for w > h
    portrait_canvas: tuple[int, int] = (1344, 800)  # (H, W) for w <= h
    resize_mode: str = "mmdet"  # 'mmdet': resize uint8, then normalise | 'torchvision': normalise, then resize

    @classmethod
    def from_config(cls, data_cfg) -> "TransformConfig":
        return cls(scale=tuple(data_cfg.scale), mean=tuple(data_cfg.mean), std=tuple(data_cfg.std),
                   flip_prob=float(data_cfg.flip_prob), landscape_canvas=tuple(data_cfg.landscape_canvas),
                   portrait_canvas=tuple(data_cfg.portrait_canvas),
                   resize_mode=str(data_cfg.get("resize_mode", "mmdet")))


def is_landscape(height: int, width: int) -> bool:
    """The aspect group: True (landscape) when w > h, as mmdetection's group flag w / h > 1."""
    return width > height


def canvas_for(height: int, width: int, cfg: TransformConfig) -> tuple[int, int]:
    """(H, W) of the canvas an image of this original size is padded onto."""
    return tuple(cfg.landscape_canvas) if is_landscape(height, width) else tuple(cfg.portrait_canvas)


def rescaled_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmdetection's keep-ratio size: s = min(long_max / long, short_max / short), new = int(dim * s + 0.5).
    Returns (new_h, new_w)."""
    long_max, short_max = max(scale), min(scale)
    s = min(long_max / max(height, width), short_max / min(height, width))
    return int(height * s + 0.5), int(width * s + 0.5)


def resize_image(image: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of uint8 [h, w, 3] to [H, W, 3] uint8 with half-pixel centres and no antialiasing,
    the semantics of OpenCV's INTER_LINEAR that mmcv uses (Pillow would antialias when shrinking)."""
    if tuple(image.shape[:2]) == tuple(size_hw):
        return image
    chw = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).unsqueeze(0)
    out = F.interpolate(chw, size=tuple(size_hw), mode="bilinear", align_corners=False, antialias=False)
    return out[0].permute(1, 2, 0).contiguous().numpy()


def scale_boxes(boxes: np.ndarray, sx: float, sy: float, clip_hw: tuple[int, int]) -> np.ndarray:
    """Boxes [N, 4] xyxy times (sx, sy, sx, sy), then x clipped to [0, W] and y to [0, H] (float32)."""
    factors = np.array([sx, sy, sx, sy], dtype=np.float32)
    out = boxes.astype(np.float32) * factors
    h, w = clip_hw
    out[:, 0::2] = np.clip(out[:, 0::2], 0, w)
    out[:, 1::2] = np.clip(out[:, 1::2], 0, h)
    return out


def flip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    """Horizontal flip of boxes [N, 4] in an image of this width: x1' = W - x2, x2' = W - x1."""
    out = boxes.copy()
    out[:, 0] = width - boxes[:, 2]
    out[:, 2] = width - boxes[:, 0]
    return out


def flip_image(image: np.ndarray) -> np.ndarray:
    """Mirror [H, W, C] left-right."""
    return image[:, ::-1]


def normalize_and_pad(image: np.ndarray, mean, std, canvas_hw: tuple[int, int]) -> np.ndarray:
    """uint8 RGB [h, w, 3] -> float32 [3, H, W]: (pixel - mean) / std inside the image and 0 (zero in
    normalised space, as mmdetection pads after normalising) on the bottom/right padding."""
    h, w = image.shape[:2]
    ch, cw = canvas_hw
    if h > ch or w > cw:
        raise ValueError(f"resized image {h}x{w} (h x w) does not fit the canvas {ch}x{cw}; make "
                         f"data.scale fit data.landscape_canvas / data.portrait_canvas")
    canvas = np.zeros((3, ch, cw), dtype=np.float32)
    inv_std = 1.0 / np.asarray(std, dtype=np.float64)
    for c in range(3):
        plane = image[:, :, c].astype(np.float32)
        plane -= np.float32(mean[c])
        plane *= np.float32(inv_std[c])
        canvas[c, :h, :w] = plane
    return canvas


def flip_decision(key: torch.Tensor, prob: float) -> bool:
    """Whether the sample with this key is flipped: the first uniform draw of its numpy generator < prob."""
    return bool(rng.numpy_generator(key).random() < prob)


def transform(image: np.ndarray, boxes: np.ndarray, ignore_boxes: np.ndarray, cfg: TransformConfig, *,
              flip: bool) -> dict:
    """The whole pipeline for one decoded image.

    image uint8 [h, w, 3]; boxes [N, 4] and ignore_boxes [M, 4] xyxy in original pixels.
    Returns a dict: image float32 [3, H, W] on the canvas of the image's aspect group; boxes [N, 4] and
    ignore_boxes [M, 4] float32 in resized pixels; image_hw (new_h, new_w); orig_hw (h, w);
    scale_factor float32 (sx, sy) = (new_w / w, new_h / h); flipped bool.
    """
    if cfg.resize_mode == "torchvision":
        from retina_fn.interop.torchvision_preprocess import torchvision_transform  # imports this module

        return torchvision_transform(image, boxes, ignore_boxes, cfg, flip=flip)
    if cfg.resize_mode != "mmdet":
        raise ValueError(f"data.resize_mode must be 'mmdet' or 'torchvision', got {cfg.resize_mode!r}")
    h, w = image.shape[:2]
    new_h, new_w = rescaled_size(h, w, cfg.scale)
    sx, sy = new_w / w, new_h / h
    resized = resize_image(image, (new_h, new_w))
    boxes = scale_boxes(boxes.reshape(-1, 4), sx, sy, (new_h, new_w))
    ignore_boxes = scale_boxes(ignore_boxes.reshape(-1, 4), sx, sy, (new_h, new_w))
    if flip:
        resized = flip_image(resized)
        boxes = flip_boxes(boxes, new_w)
        ignore_boxes = flip_boxes(ignore_boxes, new_w)
    return dict(
        image=normalize_and_pad(resized, cfg.mean, cfg.std, canvas_for(h, w, cfg)),
        boxes=boxes,
        ignore_boxes=ignore_boxes,
        image_hw=np.array([new_h, new_w], dtype=np.int64),
        orig_hw=np.array([h, w], dtype=np.int64),
        scale_factor=np.array([sx, sy], dtype=np.float32),
        flipped=bool(flip),
    )


def train_transform(image: np.ndarray, boxes: np.ndarray, ignore_boxes: np.ndarray, cfg: TransformConfig,
                    key: torch.Tensor) -> dict:
    """`transform` with the flip drawn from `key` (int64[2]) with probability cfg.flip_prob."""
    return transform(image, boxes, ignore_boxes, cfg, flip=flip_decision(key, cfg.flip_prob))


def eval_transform(image: np.ndarray, boxes: np.ndarray, ignore_boxes: np.ndarray, cfg: TransformConfig) -> dict:
    """`transform` without flipping (mmdetection's test pipeline: same resize, normalise, pad)."""
    return transform(image, boxes, ignore_boxes, cfg, flip=False)

