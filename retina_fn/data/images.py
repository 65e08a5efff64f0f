"""Image files decoded to RGB uint8 as mmdetection v2.9 reads them, checked against the annotation file's size.

mmdetection's `LoadImageFromFile` uses OpenCV's `imdecode(IMREAD_COLOR)` and the config's `to_rgb`;
`decode_image` gives the same pixels with Pillow: grey, palette, CMYK and alpha images become 3-channel 8-bit
colour (alpha dropped, not composited); 16-bit samples keep their high byte (v >> 8; Pillow would clip grey
ones to 255); CMYK JPEGs use OpenCV's formula (Pillow's differs by a level or two); the EXIF orientation is
applied, as OpenCV does unless IMREAD_IGNORE_ORIENTATION.
Refused beyond OpenCV: a truncated file, damaged data anywhere (every decoder error is an error), more than
`MAX_IMAGE_PIXELS`; as OpenCV: a side over `MAX_IMAGE_SIDE`, checked from the header before decoding; and a
path that is not a regular file (opening a FIFO would wait for a writer forever)."""

from __future__ import annotations

import os
import stat
import struct
import zlib

import numpy as np
from PIL import Image

from retina_fn import errors

# Pillow's default refusal threshold, fixed here: independent of the process-wide PIL.Image.MAX_IMAGE_PIXELS.
MAX_IMAGE_PIXELS = 178_956_970
# OpenCV's CV_IO_MAX_IMAGE_WIDTH / CV_IO_MAX_IMAGE_HEIGHT.
MAX_IMAGE_SIDE = 1 << 20

_ORIENTATION_TAG = 0x0112
# EXIF orientation -> how the stored pixels are turned for display.
_ORIENTATIONS = {2: "mirrored left-right", 3: "rotated 180 degrees", 4: "mirrored top-bottom", 5: "transposed",
                 6: "rotated 90 degrees clockwise", 7: "transversed", 8: "rotated 90 degrees counter-clockwise"}
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# What Pillow's plugins raise on damaged files (besides OSError, which covers UnidentifiedImageError).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error, zlib.error,
                  Image.DecompressionBombError)
# What parsing a damaged EXIF block raises (ignored, as OpenCV does).
_EXIF_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError, TypeError, struct.error)


class ImageLoadError(errors.UserError, RuntimeError):
    """An image that is missing or cannot be decoded; path and image_id are None when rebuilt from the
    message alone (as torch's DataLoader rebuilds a worker's exception)."""

    def __init__(self, message: str, path: str | None = None, image_id: int | None = None):
        super().__init__(message)
        self.path, self.image_id = path, image_id


def decode_image(path: str, image_id: int, expect_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Reads an image file as mmdetection v2.9 does (see the module docstring), EXIF orientation applied.

    Args:
        path: the image file; image_id: named in errors.
        expect_hw: (height, width) the annotation file states, or None for no check. A quarter-turn
            orientation with the stored, unturned size given is an error that says so (mmdetection would
            silently pair boxes with turned pixels).
    Returns:
        uint8 [H, W, 3] RGB, C-contiguous and writable.
    Raises:
        ImageLoadError: naming the file and image id, for anything the module docstring refuses, too little
            memory, or a size other than expect_hw."""
    where = f"{path if str(path).isprintable() else repr(path)} (image id {image_id})"
    size = "its"
    with _open_regular_file(path, where, image_id) as f:
        try:
            with Image.open(f) as im:
                size = "its {}x{} (w x h)".format(*_check_size(im, where, path, image_id))
                im.load()  # every pixel decoded here, before anything else reads the file
                orientation = _exif_orientation(im)
                stored = pil_to_rgb(im)
        except _DECODE_ERRORS as e:
            raise ImageLoadError(f"cannot decode image {where}: {_decode_problem(f, e)}", path, image_id) from None
        except MemoryError:
            raise ImageLoadError(f"cannot decode image {where}: not enough memory for {size} pixels", path,
                                 image_id) from None
    rgb = apply_orientation(stored, orientation)
    if expect_hw is not None and tuple(rgb.shape[:2]) != tuple(expect_hw):
        raise ImageLoadError(_size_message(where, rgb.shape[:2], stored.shape[:2], orientation, expect_hw),
                             path, image_id)
    return rgb


def _open_regular_file(path: str, where: str, image_id: int):
    """The file opened for binary reading; ImageLoadError unless a readable regular file (checked again once
    opened without blocking, so a FIFO swapped in between is refused too)."""
    try:
        if stat.S_ISREG(os.stat(path).st_mode):
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
            if stat.S_ISREG(os.fstat(fd).st_mode):
                return os.fdopen(fd, "rb")
            os.close(fd)
    except FileNotFoundError:
        raise ImageLoadError(f"image file not found: {where}", path, image_id) from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise ImageLoadError(f"cannot read image {where}: {type(e).__name__}: {e}", path, image_id) from None
    raise ImageLoadError(f"cannot read image {where}: not a regular file (a folder, FIFO, device or socket)",
                         path, image_id)


def _check_size(im: Image.Image, where: str, path: str, image_id: int) -> tuple[int, int]:
    """(width, height) from the header; ImageLoadError beyond MAX_IMAGE_SIDE or MAX_IMAGE_PIXELS."""
    width, height = im.size
    if max(width, height) > MAX_IMAGE_SIDE:
        raise ImageLoadError(
            f"image {where} is {width}x{height} (w x h), a side over {MAX_IMAGE_SIDE} pixels "
            f"(retina_fn.data.images.MAX_IMAGE_SIDE, OpenCV's limit): a wrong file or a strip no detector can "
            f"take; crop it", path, image_id)
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageLoadError(
            f"image {where} is {width}x{height} (w x h) = {width * height} pixels, over the limit of "
            f"{MAX_IMAGE_PIXELS} (retina_fn.data.images.MAX_IMAGE_PIXELS): a decompression bomb or a wrong "
            f"file; raise the constant if the image is genuine", path, image_id)
    return width, height


def _decode_problem(f, error: Exception) -> str:
    if os.fstat(f.fileno()).st_size == 0:
        return "the file is empty (0 bytes)"
    return f"{type(error).__name__}: {error}"


def _exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation 1..8 (1 when absent, invalid or unreadable); read after `load()`, else it would load
    the pixels here and hand on a half-decoded image."""
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
    except _EXIF_ERRORS:
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def pil_to_rgb(im: Image.Image) -> np.ndarray:
    """A PIL image of any mode as uint8 [h, w, 3] RGB, C-contiguous and writable, converted as OpenCV's
    colour read converts it (module docstring); no EXIF orientation applied."""
    if im.mode in _SIXTEEN_BIT_MODES:
        grey = (np.clip(np.asarray(im, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if im.mode == "CMYK" and im.format == "JPEG":
        return _cmyk_jpeg_to_rgb(np.asarray(im), adobe="adobe" in im.info)
    return np.array(im.convert("RGB"))  # a copy: writable


def _cmyk_jpeg_to_rgb(cmyk: np.ndarray, adobe: bool) -> np.ndarray:
    """OpenCV's conversion of CMYK JPEG samples (uint8 [h, w, 4], inverted with an Adobe marker) to RGB: k -
    ((255 - s) * k >> 8) for each stored sample s of c, m, y."""
    raw = 255 - cmyk.astype(np.int32) if adobe else cmyk.astype(np.int32)
    k = raw[:, :, 3:4]
    return (k - (((255 - raw[:, :, :3]) * k) >> 8)).astype(np.uint8)


def apply_orientation(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Stored pixels [h, w, C] turned for display by an EXIF orientation (OpenCV's ApplyExifOrientation):
    [h, w, C] for 1-4, [w, h, C] for 5-8, unchanged for anything else; C-contiguous."""
    if orientation in (5, 6, 7, 8):
        pixels = pixels.transpose(1, 0, 2)
        orientation = {5: 1, 6: 2, 7: 3, 8: 4}[orientation]  # what is left to do after the transpose
    if orientation == 2:
        pixels = pixels[:, ::-1]
    elif orientation == 3:
        pixels = pixels[::-1, ::-1]
    elif orientation == 4:
        pixels = pixels[::-1]
    return np.ascontiguousarray(pixels)


def _size_message(where: str, got_hw, stored_hw, orientation: int, expect_hw) -> str:
    h, w = got_hw
    message = (f"image {where} decodes to {w}x{h} (w x h) but the annotation file says "
               f"{expect_hw[1]}x{expect_hw[0]}")
    if orientation == 1:
        return message
    turned = f"; its EXIF orientation {orientation} ({_ORIENTATIONS[orientation]}) is applied"
    if tuple(stored_hw) == tuple(expect_hw):
        turned += (f" to the stored {stored_hw[1]}x{stored_hw[0]} pixels, the size the annotation file "
                   f"gives, so its boxes were drawn on the unturned pixels: remove the orientation tag from "
                   f"the file or give the turned size and boxes in the annotation file")
    return message + turned


def load_record_image(record) -> np.ndarray:
    """`decode_image` of an ImageRecord (path, image_id, height, width), checked against its size."""
    return decode_image(record.path, record.image_id, (record.height, record.width))
