"""Image files: decoding to RGB uint8 arrays, checked against the size the annotation file states."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps


class ImageLoadError(RuntimeError):
    """An image that is missing or cannot be decoded."""

    def __init__(self, message: str, path: str, image_id: int):
        super().__init__(message)
        self.path = path
        self.image_id = image_id


def decode_image(path: str, image_id: int, expect_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Reads an image file as RGB, applying its EXIF orientation (as OpenCV's default colour read does).

    Args:
        path: the image file.
        image_id: the image's id, named in errors.
        expect_hw: the (height, width) the annotation file states, or None; a different decoded size is an
            error because the boxes would not fit the pixels.

    Returns:
        uint8 [H, W, 3] RGB, writable (so torch.from_numpy is safe). Raises ImageLoadError naming the file
        and image id when the file is missing, cannot be decoded or has another size.
    """
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            rgb = np.array(im.convert("RGB"))  # writable, so torch.from_numpy is safe
    except FileNotFoundError:
        raise ImageLoadError(f"image file not found: {path} (image id {image_id})", path, image_id) from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageLoadError(f"cannot decode image {path} (image id {image_id}): {e}", path, image_id) from None
    if expect_hw is not None and tuple(rgb.shape[:2]) != tuple(expect_hw):
        raise ImageLoadError(
            f"image {path} (image id {image_id}) decodes to {rgb.shape[1]}x{rgb.shape[0]} (w x h) but the "
            f"annotation file says {expect_hw[1]}x{expect_hw[0]} (EXIF orientation is applied)", path, image_id)
    return rgb


def load_record_image(record) -> np.ndarray:
    """`decode_image` for a record of an annotation file, checked against the record's size.

    Args:
        record: a `retina_fn.data.coco.ImageRecord` (or anything with path, image_id, height, width).

    Returns:
        uint8 [height, width, 3] RGB; ImageLoadError as for `decode_image`.
    """
    return decode_image(record.path, record.image_id, (record.height, record.width))
