"""Drawing detections on images (host side, Pillow)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255)]
LEGEND = "white: ground truth; colours: detections with score"


def colour(label: int) -> tuple[int, int, int]:
    """The drawing colour of a class.

    Args:
      label: a class index.

    Returns:
      (r, g, b) from a fixed 12-colour palette, cycling with the label.
    """
    return _PALETTE[int(label) % len(_PALETTE)]


def draw_detections(image: np.ndarray | Image.Image, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                    class_names: Sequence[str], score_thr: float = 0.3,
                    gt_boxes: np.ndarray | None = None, min_side: int = 0) -> Image.Image:
    """An RGB copy of `image` with the detections drawn on it, each labelled '<class> <score>'.

    The best-scoring box is drawn last (on top). Ground truth boxes, when given, are drawn thin and white
    underneath, and LEGEND in a black strip at the bottom left says so.

    Args:
      image: uint8 [H, W, 3] array or a PIL image (not modified).
      boxes: float [N, 4] xyxy in the image's pixels.
      scores: float [N].
      labels: int [N], class indices; one without a name in `class_names` is written as its number.
      class_names: the name of each class index.
      score_thr: detections scoring below it are left out.
      gt_boxes: optional float [G, 4] xyxy.
      min_side: an image whose shorter side is below it is enlarged (nearest neighbour) to that shorter side
        before drawing, boxes with it; 0: drawn at its own size.

    Returns:
      PIL.Image.Image in RGB mode.
    """
    img = Image.fromarray(np.asarray(image)) if not isinstance(image, Image.Image) else image.copy()
    img = img.convert("RGB")
    w, h = img.size
    if min_side and min(w, h) < min_side:
        img = img.resize((round(w * min_side / min(w, h)), round(h * min_side / min(w, h))), Image.NEAREST)
    scale = np.array([img.width / w, img.height / h] * 2)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * scale
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    if gt_boxes is not None:
        for box in np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4) * scale:
            draw.rectangle([float(v) for v in box], outline=(255, 255, 255), width=1)
    order = np.argsort(-np.asarray(scores))
    for i in order[::-1]:  # the best on top
        if scores[i] < score_thr:
            continue
        x1, y1, x2, y2 = (float(v) for v in boxes[i])
        c = colour(labels[i])
        draw.rectangle([x1, y1, x2, y2], outline=c, width=2)
        name = class_names[int(labels[i])] if int(labels[i]) < len(class_names) else str(int(labels[i]))
        text = f"{name} {float(scores[i]):.2f}"
        left, top, right, bottom = draw.textbbox((x1, y1), text, font=font)
        ty = y1 - (bottom - top) - 2 if y1 - (bottom - top) - 2 >= 0 else y1
        draw.rectangle([x1, ty, x1 + (right - left) + 2, ty + (bottom - top) + 2], fill=c)
        draw.text((x1 + 1, ty), text, fill=(0, 0, 0), font=font)
    if gt_boxes is not None:
        left, top, right, bottom = draw.textbbox((0, 0), LEGEND, font=font)
        y = img.height - (bottom - top) - 4
        draw.rectangle([0, y, right - left + 4, img.height], fill=(0, 0, 0))
        draw.text((2, y + 1), LEGEND, fill=(255, 255, 255), font=font)
    return img
