"""retina_fn/data/coco_schema.py: what an annotation file may hold, checked once when it is read, and the
evaluator scoring the same checked entries. The cases are a careless or hostile file's: flags that are
truthy but not 1, ids COCOeval mis-scores, numbers too large for int64, float32 or float(), nesting and
digits past Python's JSON reader, encodings pycocotools' own reader refuses, names the system cannot take."""

from __future__ import annotations

import codecs
import json
import os
import threading

import pytest

from retina_fn.data.coco import CocoFormatError, load_coco
from retina_fn.errors import UserError
from retina_fn.eval import coco_backend
from retina_fn.eval.coco_eval import evaluate
from tests.coco_fixtures import ann_entry, coco_dict, image_entry, write_json

BACKENDS = [False, pytest.param(True, marks=pytest.mark.skipif(coco_backend.faster_coco_eval_backend() is None,
                                                                reason="faster-coco-eval is not installed"))]


def _one_box(**fields) -> dict:
    """Image 1 (100 x 100) with annotation 1, a 20 x 20 box at (10, 10) in category 1, `fields` overriding."""
    return coco_dict([image_entry(1, 100, 100)], [dict(ann_entry(1, 1, [10, 10, 20, 20]), **fields)])


def _refused(tmp_path, data, pattern: str, name: str = "ann.json") -> str:
    """Loads `data` (a dict, or bytes written as they are) and returns the CocoFormatError's message, after
    checking that it names the file, matches `pattern` and is one line."""
    path = tmp_path / name
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        write_json(path, data)
    with pytest.raises(CocoFormatError, match=pattern) as err:
        load_coco(str(path), str(tmp_path))
    message = str(err.value)
    assert message.startswith(str(path)) and "\n" not in message and len(message) < 400, message
    return message


def _perfect(data: dict) -> list[dict]:
    """Every non-crowd box of `data` as a detection with score 1."""
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": 1.0}
            for a in data["annotations"] if not a.get("iscrowd")]


# ---------------------------------------------------------------------------------------------------
# Flags are 0 or 1, never a truthy value


@pytest.mark.parametrize("key, value", [("iscrowd", "0"), ("iscrowd", "1"), ("iscrowd", [0]), ("iscrowd", {}),
                                        ("iscrowd", None), ("iscrowd", 2), ("iscrowd", 0.5), ("ignore", "false"),
                                        ("ignore", "0"), ("ignore", -1)])
def test_iscrowd_and_ignore_must_be_0_or_1(tmp_path, key, value):
    _refused(tmp_path, _one_box(**{key: value}),
             rf"annotation id 1 \(image id 1\): '{key}' must be 0 or 1 \(or false / true\), got ")


@pytest.mark.parametrize("key, value, boxes, crowd", [
    ("iscrowd", 1, 0, 1), ("iscrowd", True, 0, 1), ("iscrowd", 1.0, 0, 1), ("iscrowd", False, 1, 0),
    ("iscrowd", 0, 1, 0), ("ignore", False, 1, 0), ("ignore", 0, 1, 0), ("ignore", True, 0, 0)])
def test_flags_of_0_1_false_true_mean_what_they_say(tmp_path, key, value, boxes, crowd):
    record = load_coco(write_json(tmp_path / "ann.json", _one_box(**{key: value})), str(tmp_path)).records[0]
    assert (len(record.boxes), len(record.ignore_boxes)) == (boxes, crowd)


# ---------------------------------------------------------------------------------------------------
# Ids


def test_a_negative_image_id_is_refused_since_minus_one_marks_padding(tmp_path):
    data = coco_dict([image_entry(-1, 100, 100)], [ann_entry(1, -1, [10, 10, 20, 20])])
    _refused(tmp_path, data, r"images\[0\]: 'id' is -1, but image ids must be >= 0 \(an evaluation batch marks "
                             r"padding with -1\)")


@pytest.mark.parametrize("use_faster", BACKENDS)
def test_image_id_0_and_annotation_id_0_score_like_any_other(tmp_path, use_faster):
    # enumerate() numbering: image ids and annotation ids from 0. COCOeval marks a match with the ground
    # truth's id and reads 0 as unmatched: scored with the file's own ids, a perfect detector would lose
    # the box with id 0 (0.81 here with faster-coco-eval); the evaluator numbers its ground truth 1..N.
    images = [image_entry(i, 100, 100) for i in range(10)]
    anns = [ann_entry(i, i, [10, 10, 30 + i, 30]) for i in range(10)]
    data = coco_dict(images, anns)
    path = write_json(tmp_path / "ann.json", data)
    assert [r.image_id for r in load_coco(path, str(tmp_path)).records] == list(range(10))
    metrics = evaluate(path, _perfect(data), use_faster=use_faster)
    assert metrics["bbox_mAP"] == pytest.approx(1.0) and metrics["AR_100"] == pytest.approx(1.0)


@pytest.mark.parametrize("entry, pattern", [
    ({"images": [image_entry(2**63, 10, 10)]}, r"images\[0\]: 'id' must fit in int64, got 9223372036854775808"),
    ({"annotations": [ann_entry(2**64, 1, [1, 1, 2, 2])]}, r"annotations\[0\]: 'id' must fit in int64"),
    ({"annotations": [ann_entry(1, 1, [1, 1, 2, 2], category_id=-3)]}, r"'category_id' is -3, but category ids"),
    ({"images": [dict(image_entry(1, 10, 10), width=2**70)]}, r"image id 1: 'width' must fit in int64"),
    ({"images": [dict(image_entry(1, 10, 10), height=True)]}, r"image id 1: 'height' must be an integer, got True"),
    ({"annotations": [ann_entry(1, 1, [10**400, 1, 2, 2])]}, r"'bbox' must be 4 finite numbers .* within float32"),
    ({"annotations": [ann_entry(1, 1, [1e39, 1, 2, 2])]}, r"'bbox' must .* got \[1e\+39, 1, 2, 2\]"),
    ({"annotations": [ann_entry(1, 1, [1, 1, 2, True])]}, r"'bbox' must be 4 finite numbers"),
    ({"annotations": [ann_entry(1, 1, [1, 1, 2, 2], area=10**400)]}, r"'area' must be a finite number, got 1000"),
    ({"annotations": [ann_entry(1, 1, [1, 1, 2, 2], area="4")]}, r"'area' must be a finite number, got '4'"),
])
def test_numbers_outside_int64_or_float32_are_named_not_overflowed(tmp_path, entry, pattern):
    # float() of a 400-digit int raises OverflowError, and an int64 tensor cannot hold 2**63: the schema
    # compares the values first.
    data = dict(coco_dict([image_entry(1, 10, 10)], [ann_entry(1, 1, [1, 1, 2, 2])]), **entry)
    _refused(tmp_path, data, pattern)


# ---------------------------------------------------------------------------------------------------
# The file's text


def test_deep_nesting_and_huge_integers_end_in_one_line(tmp_path):
    deep = b'{"images": [], "categories": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    _refused(tmp_path, deep, r"JSON nested deeper than Python's reader allows", "deep.json")  # RecursionError
    digits = b'{"images": [{"id": ' + b"7" * 5000 + b'}], "categories": []}'
    _refused(tmp_path, digits, r"unreadable JSON number: .*4300 digits", "digits.json")  # json's ValueError
    message = _refused(tmp_path, _one_box(bbox=[int("9" * 4000), 1, 2, 2]), r"'bbox' must be 4 finite")
    assert "(4011 characters)" in message  # the value is cut, not printed whole: [ + 4000 digits + , 1, 2, 2]


@pytest.mark.parametrize("encoding, bom", [("utf-8", codecs.BOM_UTF8), ("utf-16-le", codecs.BOM_UTF16_LE),
                                           ("utf-16-be", codecs.BOM_UTF16_BE), ("utf-32-le", codecs.BOM_UTF32_LE),
                                           ("utf-32-be", codecs.BOM_UTF32_BE)])
def test_a_byte_order_mark_is_decoded_and_the_evaluator_scores_the_same_file(tmp_path, encoding, bom):
    data = coco_dict([image_entry(1, 100, 100, "café.jpg")], [ann_entry(1, 1, [10, 10, 20, 20])],
                     [{"id": 1, "name": "måke"}])
    path = tmp_path / "ann.json"
    path.write_bytes(bom + json.dumps(data, ensure_ascii=False).encode(encoding))
    plain = load_coco(write_json(tmp_path / "plain.json", data), str(tmp_path))
    coco_set = load_coco(str(path), str(tmp_path))
    assert coco_set.records[0].file_name == "café.jpg" and coco_set.label_map.names == ("måke",)
    assert coco_set.records[0].boxes.tolist() == plain.records[0].boxes.tolist()
    # pycocotools' own reader fails on a BOM (JSONDecodeError); the evaluator reads the loader's entries.
    assert evaluate(str(path), _perfect(data), use_faster=False)["bbox_mAP"] == pytest.approx(1.0)


def test_text_that_is_not_utf_8_or_has_no_byte_order_mark_is_refused(tmp_path):
    text = json.dumps(_one_box())
    _refused(tmp_path, text.encode("utf-16-le"), r"NUL characters in the text \(UTF-16 or UTF-32 without a "
                                                 r"byte-order mark\?\); save it as UTF-8")
    latin1 = json.dumps(coco_dict([image_entry(1, 10, 10, "caf\xe9.jpg")], []), ensure_ascii=False)
    _refused(tmp_path, latin1.encode("latin-1"), r"not utf-8 text \(byte \d+: b'\\xe9")


@pytest.mark.parametrize("entry, pattern", [
    (image_entry(1, 10, 10, "a\x00.jpg"), r"image id 1: file_name 'a\\x00.jpg' holds a NUL character"),
    (image_entry(1, 10, 10, "a\ud800.jpg"), r"image id 1: 'file_name' 'a\\ud800.jpg' is not valid Unicode"),
    (dict(image_entry(1, 10, 10), file_name=7), r"image id 1: missing or empty 'file_name'"),
])
def test_file_names_the_system_cannot_take_are_refused(tmp_path, entry, pattern):
    # No path with a NUL byte reaches the operating system (os.stat raises ValueError on one).
    _refused(tmp_path, coco_dict([entry], []), pattern)


def test_category_names_must_be_valid_unicode(tmp_path):
    # A lone surrogate would stop the run when per_class.md is written, after training.
    _refused(tmp_path, coco_dict([image_entry(1, 10, 10)], [], [{"id": 1, "name": "x\udc80"}]),
             r"category id 1: 'name' 'x\\udc80' is not valid Unicode")
    _refused(tmp_path, coco_dict([image_entry(1, 10, 10)], [], [{"id": 1, "name": "x", "supercategory": 3}]),
             r"category id 1: 'supercategory' must be a string, got 3")


def test_an_annotation_file_that_is_a_fifo_or_a_folder_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "ann.json"
    os.mkfifo(fifo)
    outcome: list = []
    reader = threading.Thread(target=lambda: outcome.append(_error_of(load_coco, str(fifo), str(tmp_path))),
                              daemon=True)
    reader.start()
    reader.join(30)
    if reader.is_alive():  # blocked in open(): a writer lets it go, then the test fails
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(30)
    assert outcome and isinstance(outcome[0], CocoFormatError), outcome
    assert "not a regular file" in str(outcome[0])
    os.mkdir(tmp_path / "dir.json")
    with pytest.raises(CocoFormatError, match=r"dir\.json: cannot read the file: not a regular file"):
        load_coco(str(tmp_path / "dir.json"), str(tmp_path))


def _error_of(fn, *args):
    try:
        fn(*args)
    except Exception as e:  # the test looks at which one it was
        return e
    return None


# ---------------------------------------------------------------------------------------------------
# The evaluator scores the loader's entries


@pytest.mark.parametrize("use_faster", BACKENDS)
def test_the_evaluator_scores_what_the_loader_accepted(tmp_path, use_faster):
    # No 'area' (pycocotools' COCOeval indexes it: KeyError), a crowd flag given as true, an integral float
    # id: all accepted by the loader, so all scored.
    data = coco_dict([image_entry(1, 100, 100), image_entry(2, 100, 100)],
                     [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]},
                      {"id": 2.0, "image_id": 1, "category_id": 3, "bbox": [50, 50, 30, 30], "iscrowd": True},
                      {"id": 3, "image_id": 2, "category_id": 3, "bbox": [5, 5, 40, 40], "iscrowd": False}])
    path = write_json(tmp_path / "ann.json", data)
    load_coco(path, str(tmp_path))
    detections = _perfect(data)
    assert [d["image_id"] for d in detections] == [1, 2]
    assert evaluate(path, detections, use_faster=use_faster)["bbox_mAP"] == pytest.approx(1.0)
    # A detection on the crowd region is neither a true nor a false positive.
    on_crowd = dict(detections[1], image_id=1, bbox=[50, 50, 30, 30], score=0.99)
    assert evaluate(path, detections + [on_crowd], use_faster=use_faster)["bbox_mAP"] == pytest.approx(1.0)


def test_the_evaluator_refuses_what_the_loader_refuses(tmp_path):
    data = _one_box(iscrowd="0")
    path = write_json(tmp_path / "ann.json", data)
    for ground_truth in (path, data):
        with pytest.raises(CocoFormatError, match=r"'iscrowd' must be 0 or 1") as err:
            evaluate(ground_truth, [])
        assert isinstance(err.value, UserError)
