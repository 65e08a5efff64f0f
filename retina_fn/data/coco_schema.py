"""The schema of a COCO-format annotation file: its bytes read as JSON and every entry checked once, errors
naming the file, the image or annotation id and what is wrong. The loader (`retina_fn.data.coco`) and the
evaluator (`retina_fn.eval.coco_backend`) both read the returned `GroundTruth`.

What a file must hold (anything else is a CocoFormatError, a `retina_fn.errors.UserError`):
- Text: UTF-8 with or without a byte-order mark, or UTF-16 / UTF-32 with one; JSON nested as deep as
  Python's reader allows, integers of at most `sys.get_int_max_str_digits()` digits.
- Integers (ids, width, height): JSON integers or numbers with a zero fraction (`3.0`), never booleans or
  strings. Ids lie in 0 .. 2**63 - 1 (evaluation batches mark padding with -1); width, height positive.
- `iscrowd`, `ignore`: 0 or 1 (`false` / `true` taken as 0 / 1); absent means 0. `bbox`: 4 finite numbers
  (not booleans) within float32's range; `area`, when present: a finite number (absent: w * h).
- `file_name`: a non-empty string of valid Unicode without NUL, relative to the image folder and not
  leaving it with '..'; category `name` (and `supercategory`, when present): valid Unicode strings.
Unknown keys are ignored."""

from __future__ import annotations

import codecs
import json
import os
import stat
import sys
from typing import Mapping, NamedTuple

import numpy as np

from retina_fn import errors

INT64_MAX = 2**63 - 1
FLOAT32_MAX = float(np.finfo(np.float32).max)
# Byte-order marks, UTF-32's first: its little-endian mark begins with UTF-16's.
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


class CocoFormatError(errors.InputFormatError):
    """An annotation file that cannot be used: names the file and the offending entry (a ValueError)."""


class GroundTruth(NamedTuple):
    """An annotation file's checked entries, in file order: source, the file (or 'coco_gt' for a dict);
    image_ids, heights, widths int64 [I]; file_names: I str; category_ids int64 [K]; names: K str;
    supercategories: K str or None; ann_ids, ann_image_ids, ann_category_ids int64 [N]; bboxes float64 [N, 4]
    xywh as in the file; areas float64 [N] (w * h where the file has none); iscrowd, ignore bool [N];
    has_annotations: False for an image-info file (no 'annotations' key, as COCO test-dev's)."""
    source: str
    image_ids: np.ndarray
    heights: np.ndarray
    widths: np.ndarray
    file_names: tuple[str, ...]
    category_ids: np.ndarray
    names: tuple[str, ...]
    supercategories: tuple[str | None, ...]
    ann_ids: np.ndarray
    ann_image_ids: np.ndarray
    ann_category_ids: np.ndarray
    bboxes: np.ndarray
    areas: np.ndarray
    iscrowd: np.ndarray
    ignore: np.ndarray
    has_annotations: bool


def read_json(ann_file: str) -> dict:
    """Reads an annotation file and checks its top level (`check_top_level`); returns the parsed dict.
    Raises:
        MissingFileError: (a FileNotFoundError) the file does not exist.
        CocoFormatError: not a readable regular file, not text in a supported encoding, bad JSON or top level."""
    text = decode_text(_read_bytes(ann_file), ann_file)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CocoFormatError(f"{ann_file}: malformed JSON: {e}") from None
    except RecursionError:
        raise CocoFormatError(f"{ann_file}: JSON nested deeper than Python's reader allows (about "
                              f"{sys.getrecursionlimit()} levels)") from None
    except ValueError as e:  # an integer over Python's digit limit (sys.get_int_max_str_digits)
        raise CocoFormatError(f"{ann_file}: unreadable JSON number: {e}") from None
    check_top_level(data, ann_file)
    return data


def _read_bytes(ann_file: str) -> bytes:
    """The file's bytes; anything but a regular file is refused before it is opened (a FIFO would block)."""
    try:
        if not stat.S_ISREG(os.stat(ann_file).st_mode):
            raise IsADirectoryError("not a regular file (a folder, FIFO, device or socket)")
        with open(ann_file, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise errors.MissingFileError(f"annotation file not found: {ann_file}") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise CocoFormatError(f"{ann_file}: cannot read the file: {e}") from None


def decode_text(raw: bytes, source: str) -> str:
    """The text of a file's bytes (module docstring); CocoFormatError for a byte that does not decode or a NUL."""
    encoding = next((name for bom, name in _BOMS if raw.startswith(bom)), "utf-8")
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        raise CocoFormatError(f"{source}: not {encoding} text (byte {e.start}: {raw[e.start:e.start + 4]!r}); "
                              f"save it as UTF-8") from None
    if "\x00" in text:
        raise CocoFormatError(f"{source}: NUL characters in the text (UTF-16 or UTF-32 without a byte-order "
                              f"mark?); save it as UTF-8")
    return text


def check_top_level(data, source: str) -> None:
    """CocoFormatError unless `data` is an object with 'images' (a list), 'categories', and optional 'annotations'
    (a list)."""
    if not isinstance(data, dict):
        raise CocoFormatError(f"{source}: the top level must be an object, got {type(data).__name__}")
    for key in ("images", "categories"):
        if key not in data:
            raise CocoFormatError(f"{source}: missing top-level key '{key}'")
    if not isinstance(data["images"], list):
        raise CocoFormatError(f"{source}: 'images' must be a list")
    if not isinstance(data.get("annotations", []), list):
        raise CocoFormatError(f"{source}: 'annotations' must be a list")


def parse_ground_truth(data: Mapping, source: str) -> GroundTruth:
    """Checks every entry of a parsed file (`read_json`) or COCO-format dict; `source` names it in errors.
    Raises:
        CocoFormatError: the first entry that breaks the schema, a duplicate id, or an annotation of an image
            or category the file does not list."""
    check_top_level(data, source)
    category_ids, names, supercategories = parse_categories(data["categories"], source)
    image_ids, heights, widths, file_names = parse_images(data["images"], source)
    known_images, known_categories = set(image_ids), set(category_ids)
    seen: dict[int, int] = {}  # annotation id -> its position in the list
    rows = [_annotation(ann, pos, source, known_images, known_categories, seen)
            for pos, ann in enumerate(data.get("annotations", []))]
    ann_ids, ann_images, ann_categories, bboxes, areas, iscrowd, ignore = zip(*rows) if rows else ((),) * 7
    i64 = np.int64
    return GroundTruth(source, np.asarray(image_ids, i64), np.asarray(heights, i64), np.asarray(widths, i64),
                       tuple(file_names), np.asarray(category_ids, i64), tuple(names), tuple(supercategories),
                       np.asarray(ann_ids, i64), np.asarray(ann_images, i64), np.asarray(ann_categories, i64),
                       np.asarray(bboxes, np.float64).reshape(-1, 4), np.asarray(areas, np.float64),
                       np.asarray(iscrowd, bool), np.asarray(ignore, bool), "annotations" in data)


def parse_categories(categories, source: str) -> tuple[list[int], list[str], list[str | None]]:
    """(ids, names, supercategories) of a 'categories' list of {'id', 'name', 'supercategory' (optional)}, in
    file order; CocoFormatError for an empty list, a bad or repeated id or a bad name."""
    if not isinstance(categories, (list, tuple)) or not categories:
        raise CocoFormatError(f"{source}: 'categories' must be a non-empty list")
    ids: dict[int, None] = {}  # insertion-ordered
    names, supercategories = [], []
    for pos, cat in enumerate(categories):
        if not isinstance(cat, Mapping):
            raise CocoFormatError(f"{source}: categories[{pos}] is not an object")
        cid = id_field(cat, "id", f"{source}: categories[{pos}]")
        where = f"{source}: category id {cid}"
        if not isinstance(cat.get("name"), str):
            raise CocoFormatError(f"{where} has no string 'name'")
        names.append(text_field(cat, "name", where))
        supercategories.append(text_field(cat, "supercategory", where) if cat.get("supercategory") is not None
                               else None)
        if cid in ids:
            raise CocoFormatError(f"{where} appears twice")
        ids[cid] = None
    return list(ids), names, supercategories


def parse_images(entries: list, source: str) -> tuple[list[int], list[int], list[int], list[str]]:
    """(ids, heights, widths, file_names) of an 'images' list of {'id', 'height', 'width', 'file_name'}, in file
    order; CocoFormatError naming the entry for anything the schema refuses."""
    ids: dict[int, None] = {}
    heights, widths, file_names = [], [], []
    for pos, img in enumerate(entries):
        where = f"{source}: images[{pos}]"
        if not isinstance(img, Mapping):
            raise CocoFormatError(f"{where} is not an object")
        image_id = id_field(img, "id", where, "image ids", " (an evaluation batch marks padding with -1)")
        where = f"{source}: image id {image_id}"
        if image_id in ids:
            raise CocoFormatError(f"{where} appears twice in 'images'")
        height, width = int_field(img, "height", where), int_field(img, "width", where)
        if height <= 0 or width <= 0:
            raise CocoFormatError(f"{where}: width and height must be positive, got {width}x{height}")
        if not isinstance(img.get("file_name"), str) or not img["file_name"]:
            raise CocoFormatError(f"{where}: missing or empty 'file_name'")
        file_name = text_field(img, "file_name", where)
        check_file_name(file_name, where)
        ids[image_id] = None
        heights.append(height)
        widths.append(width)
        file_names.append(file_name)
    return list(ids), heights, widths, file_names


def _annotation(ann, pos: int, source: str, images: set[int], categories: set[int], seen: dict[int, int]) -> tuple:
    where = f"{source}: annotations[{pos}]"
    if not isinstance(ann, Mapping):
        raise CocoFormatError(f"{where} is not an object")
    ann_id = id_field(ann, "id", where, "annotation ids")
    if ann_id in seen:
        raise CocoFormatError(f"{source}: annotation id {ann_id} appears twice in 'annotations' (at "
                              f"positions {seen[ann_id]} and {pos}); pycocotools would keep only one")
    seen[ann_id] = pos
    where = f"{source}: annotation id {ann_id}"
    image_id = id_field(ann, "image_id", where, "image ids")
    if image_id not in images:
        raise CocoFormatError(f"{where}: image_id {image_id} is not in 'images'")
    where = f"{where} (image id {image_id})"
    category_id = id_field(ann, "category_id", where, "category ids")
    if category_id not in categories:
        raise CocoFormatError(f"{where}: category_id {category_id} is not in 'categories' "
                              f"(known ids: {sorted(categories)})")
    bbox, area = bbox_field(ann, where), area_field(ann, where)
    return (ann_id, image_id, category_id, bbox, bbox[2] * bbox[3] if area is None else area,
            flag_field(ann, "iscrowd", where), flag_field(ann, "ignore", where))


def check_file_name(file_name: str, where: str) -> None:
    """CocoFormatError for a file name with a NUL, an absolute one, or one leaving the image folder with '..'."""
    prefix = f"{where}: " if where else ""
    if "\x00" in file_name:
        raise CocoFormatError(f"{prefix}file_name {_show(file_name)} holds a NUL character")
    if os.path.isabs(file_name) or file_name.startswith(("/", "\\")) or os.path.splitdrive(file_name)[0]:
        raise CocoFormatError(f"{prefix}file_name {_show(file_name)} is an absolute path; it must be relative "
                              f"to the image folder")
    normal = os.path.normpath(file_name.replace("\\", "/"))
    if normal == ".." or normal.startswith("../"):
        raise CocoFormatError(f"{prefix}file_name {_show(file_name)} escapes the image folder with '..'")


def resolve_image_path(image_root: str, file_name: str, where: str = "") -> str:
    """image_root/file_name, normalised; CocoFormatError as `check_file_name` (`where` names the entry)."""
    check_file_name(file_name, where)
    return os.path.join(image_root, os.path.normpath(file_name.replace("\\", "/")))


def _show(value) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int over Python's digit limit for str()
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    except RecursionError:  # a deeply nested list or object
        return f"a deeply nested {type(value).__name__}"
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


def int_field(entry: Mapping, key: str, where: str) -> int:
    """An integer field (a JSON integer or a number with a zero fraction) within int64; `where` names the entry."""
    if key not in entry:
        raise CocoFormatError(f"{where}: missing key '{key}'")
    value = entry[key]
    if type(value) is float and value.is_integer():
        value = int(value)
    elif type(value) is not int:  # bool, str, None, a fraction, NaN...
        raise CocoFormatError(f"{where}: '{key}' must be an integer, got {_show(value)}")
    if not -INT64_MAX - 1 <= value <= INT64_MAX:
        raise CocoFormatError(f"{where}: '{key}' must fit in int64, got {_show(value)}")
    return value


def id_field(entry: Mapping, key: str, where: str, what: str = "ids", why: str = "") -> int:
    """A non-negative `int_field`; the error for a negative one names `what` ('image ids') and `why`."""
    value = int_field(entry, key, where)
    if value < 0:
        raise CocoFormatError(f"{where}: '{key}' is {value}, but {what} must be >= 0{why}")
    return value


def flag_field(ann: Mapping, key: str, where: str) -> bool:
    """A 0 / 1 flag ('iscrowd', 'ignore'; absent: 0, false / true: 0 / 1); CocoFormatError otherwise."""
    value = ann.get(key, 0)
    if type(value) in (int, float, bool) and value in (0, 1):
        return bool(value)
    raise CocoFormatError(f"{where}: '{key}' must be 0 or 1 (or false / true), got {_show(value)}")


def _finite_float(value, limit: float) -> float | None:
    kind = type(value)  # exact types: bool is not int here
    if kind is float:
        return value if -limit <= value <= limit else None  # NaN fails both comparisons
    if kind is int:
        return float(value) if -limit <= value <= limit else None  # compared exactly: no overflow
    return None


def bbox_field(ann: Mapping, where: str) -> tuple[float, float, float, float]:
    """The 'bbox' as (x, y, w, h) floats; CocoFormatError unless 4 finite numbers within float32's range."""
    if "bbox" not in ann:
        raise CocoFormatError(f"{where}: missing key 'bbox'")
    bbox = ann["bbox"]
    values = [_finite_float(v, FLOAT32_MAX) for v in bbox] if isinstance(bbox, (list, tuple)) else []
    if len(values) != 4 or None in values:
        raise CocoFormatError(f"{where}: 'bbox' must be 4 finite numbers [x, y, w, h] within float32's range, "
                              f"got {_show(bbox)}")
    return tuple(values)


def area_field(ann: Mapping, where: str) -> float | None:
    """The optional 'area': a finite float, None when absent."""
    if "area" not in ann:
        return None
    area = _finite_float(ann["area"], sys.float_info.max)
    if area is None:
        raise CocoFormatError(f"{where}: 'area' must be a finite number, got {_show(ann['area'])}")
    return area


def text_field(entry: Mapping, key: str, where: str) -> str:
    """A string field of valid Unicode (written to files and logs, passed to the OS as a path)."""
    value = entry.get(key)
    if not isinstance(value, str):
        raise CocoFormatError(f"{where}: '{key}' must be a string, got {_show(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise CocoFormatError(f"{where}: '{key}' {_show(value)} is not valid Unicode (a lone surrogate escape)"
                              ) from None
    return value
