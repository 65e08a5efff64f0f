"""Tiny COCO-format datasets written to a temporary folder, for the data-pipeline tests."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from configs.common import data_config


def write_image(path, height: int, width: int, seed: int = 0, fmt: str | None = None) -> np.ndarray:
    """Writes random RGB pixels (smoothed a little so JPEG keeps them recognisable) and returns them."""
    gen = np.random.default_rng(seed)
    pixels = gen.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    os.makedirs(os.path.dirname(str(path)) or ".", exist_ok=True)
    Image.fromarray(pixels).save(str(path), format=fmt)
    return pixels


def write_json(path, data) -> str:
    with open(path, "w") as f:
        json.dump(data, f)
    return str(path)


def coco_dict(images, annotations, categories=({"id": 1, "name": "a"}, {"id": 3, "name": "b"})) -> dict:
    return {"images": list(images), "annotations": list(annotations), "categories": list(categories)}


def image_entry(image_id: int, height: int, width: int, file_name: str | None = None) -> dict:
    return {"id": image_id, "file_name": file_name or f"{image_id:06d}.jpg", "height": height, "width": width}


def ann_entry(ann_id: int, image_id: int, bbox, category_id: int = 1, **extra) -> dict:
    entry = {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": list(bbox),
             "area": float(bbox[2] * bbox[3]), "iscrowd": 0}
    entry.update(extra)
    return entry


def write_dataset(root, data: dict, ann_name: str = "ann.json", images_dir: str = "images",
                  write_images: bool = True, fmt: str = "JPEG") -> tuple[str, str]:
    """Writes the JSON and (optionally) an image per entry with its stated size; returns (ann, image_root)."""
    image_root = os.path.join(str(root), images_dir)
    os.makedirs(image_root, exist_ok=True)
    if write_images:
        for img in data["images"]:
            write_image(os.path.join(image_root, img["file_name"]), img["height"], img["width"],
                        seed=img["id"], fmt=fmt)
    return write_json(os.path.join(str(root), ann_name), data), image_root


def small_dataset(root, sizes, boxes_per_image: int = 2, seed: int = 0) -> tuple[str, str]:
    """Images of the given (height, width) sizes, each with `boxes_per_image` random boxes in categories
    1 and 3, written as JPEG; returns (ann_file, image_root)."""
    gen = np.random.default_rng(seed)
    images, anns = [], []
    for i, (h, w) in enumerate(sizes):
        images.append(image_entry(i + 1, h, w))
        for _ in range(boxes_per_image):
            bw, bh = gen.uniform(2, w / 2), gen.uniform(2, h / 2)
            x, y = gen.uniform(0, w - bw), gen.uniform(0, h - bh)
            anns.append(ann_entry(len(anns) + 1, i + 1, [x, y, bw, bh], category_id=int(gen.choice([1, 3]))))
    return write_dataset(root, coco_dict(images, anns))


def tiny_data_config(**overrides):
    """The `data` block with tiny canvases: scale (64, 48), canvases 48x64 and 64x48, no workers."""
    cfg = data_config()
    cfg.scale = (64, 48)
    cfg.landscape_canvas = (48, 64)
    cfg.portrait_canvas = (64, 48)
    cfg.max_boxes = 4
    cfg.max_ignore_boxes = 2
    cfg.min_size = 1
    cfg.workers = 0
    for k, v in overrides.items():
        cfg[k] = v
    return cfg
