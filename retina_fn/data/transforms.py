"""Host-side image and box transforms, pure functions over numpy arrays: keep-ratio resize -> horizontal flip
-> normalise -> zero-pad onto the aspect group's fixed canvas, by the rule of data.resize_mode
(`retina_fn.data.resize.RESIZE_MODES`: mmdetection's 1x pipeline or torchvision's preprocessing). The only
randomness is the flip, drawn from the sample's key. Boxes are xyxy; transformed ones are float32 in resized
pixels, clipped to the resized image.

With data.uint8_canvas the canvas carries the resized uint8 pixels instead (a quarter of the bytes) and
`retina_fn.model.inputs.normalize` normalises on the device, bit for bit the same; only a mode that resizes
before normalising ('mmdet') allows it."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch

from retina_fn import errors, rng
from retina_fn.data import resize

CANVAS_MODES = ("fixed", "tight")


class TransformConfig(NamedTuple):
    """What the transforms read from the `data` config block."""
    scale: tuple[int, int] = (1333, 800)  # (long side limit, short side limit)
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    flip_prob: float = 0.5
    landscape_canvas: tuple[int, int] = (800, 1344)  # (H, W) for w > h
    portrait_canvas: tuple[int, int] = (1344, 800)  # (H, W) for w <= h
    resize_mode: str = "mmdet"  # a key of resize.RESIZE_MODES: 'mmdet' | 'torchvision'
    uint8_canvas: bool = False  # ship resized uint8 pixels; normalised on the device (mmdet mode only)

    @classmethod
    def from_config(cls, data_cfg) -> "TransformConfig":
        """The transform settings of a `data` block; ConfigError for uint8_canvas with an unknown resize_mode or
        one that normalises before resizing."""
        cfg = cls(scale=tuple(data_cfg.scale), mean=tuple(data_cfg.mean), std=tuple(data_cfg.std),
                  flip_prob=float(data_cfg.flip_prob), landscape_canvas=tuple(data_cfg.landscape_canvas),
                  portrait_canvas=tuple(data_cfg.portrait_canvas), resize_mode=str(data_cfg.resize_mode),
                  uint8_canvas=bool(data_cfg.uint8_canvas))
        if cfg.uint8_canvas:
            _uint8_resize(resize.resize_rule(cfg.resize_mode), f"data.resize_mode={cfg.resize_mode!r}")
        return cfg

    @classmethod
    def for_inference(cls, spec) -> "TransformConfig":
        """The evaluation transform of a detector's InputSpec: no flip, float32 canvases."""
        return cls(scale=tuple(spec.scale), mean=tuple(spec.mean), std=tuple(spec.std), flip_prob=0.0,
                   landscape_canvas=tuple(spec.landscape_canvas), portrait_canvas=tuple(spec.portrait_canvas),
                   resize_mode=spec.resize_mode)


def canvas_dtype(cfg) -> np.dtype:
    """np.uint8 when cfg (a TransformConfig or `data` block) sets uint8_canvas, else np.float32."""
    return np.dtype(np.uint8 if getattr(cfg, "uint8_canvas", False) else np.float32)


def _uint8_resize(rule: resize.ResizeRule, mode: str):
    """The rule's uint8 resize; ConfigError naming data.uint8_canvas when the mode has none."""
    if rule.resize_uint8 is None:
        able = tuple(name for name, r in resize.RESIZE_MODES.items() if r.resize_uint8 is not None)
        raise errors.ConfigError(f"data.uint8_canvas=True needs a resize mode that resizes the uint8 image before "
                                 f"normalising it {able}; {mode} normalises first and resizes the float image, which a "
                                 f"uint8 canvas cannot carry exactly: set data.uint8_canvas=False")
    return rule.resize_uint8


def is_landscape(height: int, width: int) -> bool:
    """The aspect group of an image, as mmdetection's group flag w / h > 1: True (landscape) when w > h."""
    return width > height


def canvas_for(height: int, width: int, cfg: TransformConfig) -> tuple[int, int]:
    """(H, W): cfg.landscape_canvas when w > h, else cfg.portrait_canvas."""
    return tuple(cfg.landscape_canvas) if is_landscape(height, width) else tuple(cfg.portrait_canvas)


def check_resizable(records, cfg, source: str) -> None:
    """`resize.ResizeError` naming `source` (the annotation file), the image id and the sizes for the first
    of `records` (ImageRecords) that cfg's resize would give a side of 0 pixels."""
    mode = getattr(cfg, "resize_mode", "mmdet")  # the data block's default, as TransformConfig.from_config
    rule, scale = resize.resize_rule(mode), tuple(cfg.scale)
    for r in records:
        resize.check_nonzero(rule.size(r.height, r.width, scale), r.height, r.width, scale,
                             f"data.resize_mode={mode!r}", f"{source}: image id {r.image_id} ({r.path})")


def scale_boxes(boxes: np.ndarray, sx: float, sy: float, clip_hw: tuple[int, int]) -> np.ndarray:
    """float32 [N, 4]: boxes [N, 4] times float32 (sx, sy, sx, sy), clipped to clip_hw (H, W)."""
    out = boxes.astype(np.float32) * np.array([sx, sy, sx, sy], dtype=np.float32)
    h, w = clip_hw
    out[:, 0::2] = np.clip(out[:, 0::2], 0, w)
    out[:, 1::2] = np.clip(out[:, 1::2], 0, h)
    return out


def flip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    """A new [N, 4] array of boxes mirrored in an image of this width: x1' = W - x2, x2' = W - x1."""
    out = boxes.copy()
    out[:, 0] = width - boxes[:, 2]
    out[:, 2] = width - boxes[:, 0]
    return out


def flip_decision(key: torch.Tensor, prob: float) -> bool:
    """Whether the sample with this key (int64 [2]) is flipped: the first uniform draw of its numpy
    generator is < prob."""
    return bool(rng.numpy_generator(key).random() < prob)


def _apply(rule: resize.ResizeRule, image: np.ndarray, boxes: np.ndarray, ignore_boxes: np.ndarray, cfg, *,
           flip: bool, canvas_hw: Sequence[int] | None, mode: str, what: str = "the image") -> dict:
    """`transform` with an explicit rule (named `mode` in errors) and canvas (None: the aspect group's)."""
    dtype = canvas_dtype(cfg)
    resize_uint8 = _uint8_resize(rule, mode) if dtype == np.uint8 else None
    h, w = image.shape[:2]
    new_h, new_w = resize.check_nonzero(rule.size(h, w, tuple(cfg.scale)), h, w, cfg.scale, mode, what)
    sx, sy = new_w / w, new_h / h
    canvas_hw = canvas_for(h, w, cfg) if canvas_hw is None else tuple(canvas_hw)
    canvas = resize.new_canvas((new_h, new_w), canvas_hw, dtype)
    pixels = canvas[:, :new_h, :new_w]
    boxes, ignore_boxes = boxes.reshape(-1, 4), ignore_boxes.reshape(-1, 4)
    if flip and rule.flip_first:  # mirror the input, boxes in original pixels
        image = image[:, ::-1]
        boxes, ignore_boxes = flip_boxes(boxes.astype(np.float32), w), flip_boxes(ignore_boxes.astype(np.float32), w)
    elif flip:  # mirror the resized image: its pixels are written right to left
        pixels = pixels[:, :, ::-1]
    if resize_uint8 is None:
        rule.resize_normalize(image, (new_h, new_w), cfg.mean, cfg.std, out=pixels)
    else:
        pixels[...] = resize_uint8(image, (new_h, new_w)).transpose(2, 0, 1)
    boxes, ignore_boxes = scale_boxes(boxes, sx, sy, (new_h, new_w)), scale_boxes(ignore_boxes, sx, sy, (new_h, new_w))
    if flip and not rule.flip_first:  # mirror the resized boxes
        boxes, ignore_boxes = flip_boxes(boxes, new_w), flip_boxes(ignore_boxes, new_w)
    return dict(image=canvas, boxes=boxes, ignore_boxes=ignore_boxes, image_hw=np.array([new_h, new_w], dtype=np.int64),
                orig_hw=np.array([h, w], dtype=np.int64), scale_factor=np.array([sx, sy], dtype=np.float32),
                flipped=bool(flip))


def transform(image: np.ndarray, boxes: np.ndarray, ignore_boxes: np.ndarray, cfg: TransformConfig, *,
              flip: bool) -> dict:
    """The whole pipeline for one decoded image, by the rule of cfg.resize_mode.

    Args:
        image: uint8 RGB [h, w, 3]; boxes: [N, 4] xyxy in original pixels (any float dtype); ignore_boxes:
            [M, 4] likewise; flip: mirror the image left-right.
    Returns:
        A dict: image float32 [3, H, W] on the aspect group's canvas (uint8 with cfg.uint8_canvas); boxes
        float32 [N, 4], ignore_boxes float32 [M, 4]; image_hw int64 [2] (new_h, new_w); orig_hw int64 [2]
        (h, w); scale_factor float32 [2] (sx, sy) = (new_w / w, new_h / h); flipped bool.
    Raises:
        ValueError: an unknown resize mode, a resized image larger than its canvas, uint8_canvas with a mode
            that normalises first, or (`resize.ResizeError`) a side resized to 0 pixels."""
    return _apply(resize.resize_rule(cfg.resize_mode), image, boxes, ignore_boxes, cfg, flip=flip, canvas_hw=None,
                  mode=f"data.resize_mode={cfg.resize_mode!r}")


def torchvision_transform(image: np.ndarray, boxes: np.ndarray, ignore_boxes: np.ndarray, cfg, *, flip: bool,
                          canvas_hw: Sequence[int] | None = None) -> dict:
    """`transform` with torchvision's rule whatever cfg.resize_mode says, on canvas_hw (H, W) when given
    (e.g. `resize.batch_canvas`); ValueError with uint8_canvas set."""
    return _apply(resize.RESIZE_MODES["torchvision"], image, boxes, ignore_boxes, cfg, flip=flip,
                  canvas_hw=canvas_hw, mode="torchvision's resize")


def train_transform(image: np.ndarray, boxes: np.ndarray, ignore_boxes: np.ndarray, cfg: TransformConfig,
                    key: torch.Tensor) -> dict:
    """`transform`, flipped with probability cfg.flip_prob drawn from the sample's key (`flip_decision`)."""
    return transform(image, boxes, ignore_boxes, cfg, flip=flip_decision(key, cfg.flip_prob))


def eval_transform(image: np.ndarray, boxes: np.ndarray, ignore_boxes: np.ndarray, cfg: TransformConfig) -> dict:
    """`transform` without flipping (mmdetection's test pipeline)."""
    return transform(image, boxes, ignore_boxes, cfg, flip=False)


def preprocess_for_inference(image: np.ndarray, cfg: TransformConfig, canvas: str | None = "fixed",
                             size_divisor: int = 32, what: str = "the image") -> dict:
    """`eval_transform` of one decoded image without annotations, for prediction.

    Args:
        image: uint8 RGB [h, w, 3]; what: the image, as errors name it ('image 2 of the list').
        canvas: 'fixed' (or None): the aspect group's canvas; 'tight': the resized size rounded up to a
            multiple of `size_divisor` (as mmdetection and torchvision do at batch size 1).
    Returns:
        The dict of `transform` (boxes float32 [0, 4]); errors as `transform`, and for an unknown canvas mode."""
    rule = resize.resize_rule(cfg.resize_mode)
    canvas = "fixed" if canvas is None else canvas
    if canvas not in CANVAS_MODES:
        raise ValueError(f"canvas mode must be one of {CANVAS_MODES}, got {canvas!r}")
    canvas_hw = None
    if canvas == "tight":
        canvas_hw = resize.tight_canvas(rule.size(*image.shape[:2], tuple(cfg.scale)), int(size_divisor))
    no_boxes = np.zeros((0, 4), np.float32)
    return _apply(rule, image, no_boxes, no_boxes, cfg, flip=False, canvas_hw=canvas_hw,
                  mode=f"data.resize_mode={cfg.resize_mode!r}", what=what)
