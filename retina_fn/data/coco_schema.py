"""The structure of a COCO-format annotation file: reading the JSON and checking its entries, with errors
that name the file, the image id or the annotation id and what is wrong (`retina_fn.data.coco` applies
mmdetection's rules on top).
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping

from retina_fn import errors


class CocoFormatError(errors.InputFormatError):
    """An annotation file that cannot be used: names the file and the offending entry (a ValueError)."""


def read_json(ann_file: str) -> dict:
    """Reads an annotation file and checks its top level.

    Args:
        ann_file: the JSON file.

    Returns:
        The parsed dict, with 'images' (a list), 'categories' and, if any, 'annotations' (a list).
        MissingFileError (a FileNotFoundError) for a missing file, CocoFormatError for malformed JSON or a
        bad top level.
    """
    try:
        with open(ann_file, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise errors.MissingFileError(f"annotation file not found: {ann_file}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CocoFormatError(f"{ann_file}: malformed JSON: {e}") from None
    if not isinstance(data, dict):
        raise CocoFormatError(f"{ann_file}: the top level must be an object, got {type(data).__name__}")
    for key in ("images", "categories"):
        if key not in data:
            raise CocoFormatError(f"{ann_file}: missing top-level key '{key}'")
    if not isinstance(data["images"], list):
        raise CocoFormatError(f"{ann_file}: 'images' must be a list")
    if not isinstance(data.get("annotations", []), list):
        raise CocoFormatError(f"{ann_file}: 'annotations' must be a list")
    return data


def parse_images(entries: list, ann_file: str, image_root: str) -> dict[int, tuple[str, int, int, str]]:
    """Checks the 'images' list.

    Args:
        entries: the file's 'images' list of {'id', 'height', 'width', 'file_name', ...}.
        ann_file: the file, named in errors.
        image_root: the folder file names are relative to.

    Returns:
        {image id: (file_name, height, width, resolved path)} in file order. CocoFormatError naming the
        entry for a duplicate id, a missing or non-integer field, a non-positive size or an unsafe name.
    """
    images: dict[int, tuple[str, int, int, str]] = {}
    for pos, img in enumerate(entries):
        where = f"{ann_file}: images[{pos}]"
        if not isinstance(img, Mapping):
            raise CocoFormatError(f"{where} is not an object")
        image_id = int_field(img, "id", where)
        where = f"{ann_file}: image id {image_id}"
        if image_id in images:
            raise CocoFormatError(f"{where} appears twice in 'images'")
        height = int_field(img, "height", where)
        width = int_field(img, "width", where)
        if height <= 0 or width <= 0:
            raise CocoFormatError(f"{where}: width and height must be positive, got {width}x{height}")
        file_name = img.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            raise CocoFormatError(f"{where}: missing or empty 'file_name'")
        images[image_id] = (file_name, height, width, resolve_image_path(image_root, file_name, where))
    return images


def resolve_image_path(image_root: str, file_name: str, where: str = "") -> str:
    """Joins an image folder and a file name of the annotation file, safely.

    Args:
        image_root: the image folder.
        file_name: the file's 'file_name', relative to the folder.
        where: the entry, named in errors.

    Returns:
        image_root/file_name (normalised). CocoFormatError for an absolute name or one that climbs out of
        the folder with '..'.
    """
    prefix = f"{where}: " if where else ""
    if os.path.isabs(file_name) or file_name.startswith(("/", "\\")) or os.path.splitdrive(file_name)[0]:
        raise CocoFormatError(f"{prefix}file_name {file_name!r} is an absolute path; it must be relative "
                              f"to the image folder")
    normal = os.path.normpath(file_name.replace("\\", "/"))
    if normal == ".." or normal.startswith("../"):
        raise CocoFormatError(f"{prefix}file_name {file_name!r} escapes the image folder with '..'")
    return os.path.join(image_root, normal)


def int_field(entry: Mapping, key: str, where: str) -> int:
    """An integer field of an entry.

    Args:
        entry: an image, annotation or category object.
        key: the field.
        where: the entry, named in errors.

    Returns:
        The value as int (an integral float is accepted). CocoFormatError when missing or not an integer.
    """
    if key not in entry:
        raise CocoFormatError(f"{where}: missing key '{key}'")
    value = entry[key]
    integral = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not integral:
        raise CocoFormatError(f"{where}: '{key}' must be an integer, got {value!r}")
    return int(value)


def bbox_field(ann: Mapping, where: str) -> tuple[float, float, float, float]:
    """The 'bbox' field of an annotation.

    Args:
        ann: the annotation object.
        where: the annotation, named in errors.

    Returns:
        (x, y, w, h) floats. CocoFormatError unless it is 4 finite numbers.
    """
    if "bbox" not in ann:
        raise CocoFormatError(f"{where}: missing key 'bbox'")
    bbox = ann["bbox"]
    if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
            or not all(math.isfinite(v) for v in bbox)):
        raise CocoFormatError(f"{where}: 'bbox' must be 4 finite numbers [x, y, w, h], got {bbox!r}")
    return tuple(float(v) for v in bbox)
