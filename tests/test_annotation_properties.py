"""The annotation-file contract, on generated files (hypothesis): a file either loads, with every record
within the schema and equal to what mmdetection's rules make of the file (a reference written out here), and
a perfect detector then scores mAP 1.0 on it; or loading raises one CocoFormatError whose one-line message
names the file. Never another exception, a hang, or a value read differently from what the file says.

derandomize=True fixes Hypothesis's seed, but Hypothesis also draws, now and then, constants it finds in the
source of the project's modules already imported, so the cases a run tries can shift with what its test
worker imported before; every assertion here holds for any case.

Families: valid files (in every accepted encoding); the same files with one field given a value of the
wrong type or range, or an entry's structure broken (always refused); with a change that keeps the meaning
(integral floats, true / false flags, absent optional fields, unknown keys: the same records); in another
encoding or with bytes cut or flipped; with a value nested deep or an integer of thousands of digits.
`pytest --hypothesis-show-statistics` prints how each family's cases ended (events 'loaded', 'refused').
"""

from __future__ import annotations

import codecs
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from retina_fn.data.coco import CocoFormatError, load_coco
from retina_fn.eval import coco_backend
from retina_fn.eval.coco_eval import evaluate

INT64_MAX = 2**63 - 1
SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
FASTER = coco_backend.faster_coco_eval_backend() is not None


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("properties")


# ---------------------------------------------------------------------------------------------------
# Valid files

ids = st.integers(0, INT64_MAX)
numbers = st.one_of(st.integers(-100, 3000), st.floats(-100, 3000, allow_nan=False))
sizes = st.one_of(st.integers(1, 600), st.floats(0.1, 600))
flags = st.sampled_from([None, 0, 1])  # None: the key is absent


@st.composite
def coco_files(draw) -> dict:
    """A valid annotation file: 1-3 categories, 1-4 images, 0-10 annotations on them."""
    cat_ids = draw(st.lists(ids, min_size=1, max_size=3, unique=True))
    categories = []
    for cid in cat_ids:
        cat = {"id": cid, "name": draw(st.text(max_size=6))}
        supercategory = draw(st.one_of(st.none(), st.text(max_size=4)))
        if supercategory is not None:
            cat["supercategory"] = supercategory
        categories.append(cat)
    image_ids = draw(st.lists(ids, min_size=1, max_size=4, unique=True))
    images = [{"id": i, "height": draw(st.integers(1, 3000)), "width": draw(st.integers(1, 3000)),
               "file_name": draw(st.from_regex(r"\A[\w][\w.-]{0,10}\Z")), "license": 1} for i in image_ids]
    annotations = []
    for ann_id in draw(st.lists(ids, max_size=10, unique=True)):
        ann = {"id": ann_id, "image_id": draw(st.sampled_from(image_ids)),
               "category_id": draw(st.sampled_from(cat_ids)), "bbox": [draw(numbers), draw(numbers), draw(sizes),
                                                                         draw(sizes)]}
        area = draw(st.one_of(st.none(), st.floats(-10, 1e6)))
        for key, value in (("area", area), ("iscrowd", draw(flags)), ("ignore", draw(flags))):
            if value is not None:
                ann[key] = value
        if draw(st.booleans()):
            ann["segmentation"] = [[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]
        annotations.append(ann)
    return {"info": {"description": "generated"}, "images": images, "annotations": annotations,
            "categories": categories}


def expected_records(data: dict) -> dict:
    """What mmdetection's rules make of a valid file, one annotation at a time: {image id: (boxes, labels,
    crowd boxes)}, boxes float32 xyxy."""
    cat_index = {cid: k for k, cid in enumerate(sorted(c["id"] for c in data["categories"]))}
    images = {img["id"]: img for img in data["images"]}
    out = {i: ([], [], []) for i in images}
    for ann in data["annotations"]:
        x, y, w, h = (float(v) for v in ann["bbox"])
        img = images[ann["image_id"]]
        inter_w = max(0.0, min(x + w, img["width"]) - max(x, 0.0))
        inter_h = max(0.0, min(y + h, img["height"]) - max(y, 0.0))
        if ann.get("ignore", 0) or inter_w * inter_h == 0 or ann.get("area", w * h) <= 0 or w < 1 or h < 1:
            continue
        boxes, labels, crowd = out[ann["image_id"]]
        if ann.get("iscrowd", 0):
            crowd.append([x, y, x + w, y + h])
        else:
            boxes.append([x, y, x + w, y + h])
            labels.append(cat_index[ann["category_id"]])
    return {i: (np.array(b, np.float32).reshape(-1, 4), np.array(lab, np.int64), np.array(c, np.float32).reshape(-1, 4))
            for i, (b, lab, c) in out.items()}


def check_records(coco_set, data: dict) -> None:
    """Every record within the schema and equal to `expected_records`."""
    assert [r.image_id for r in coco_set.records] == [img["id"] for img in data["images"]]
    expected = expected_records(data)
    for record, img in zip(coco_set.records, data["images"]):
        assert type(record.image_id) is int and 0 <= record.image_id <= INT64_MAX
        assert (record.height, record.width, record.file_name) == (img["height"], img["width"], img["file_name"])
        boxes, labels, crowd = expected[record.image_id]
        assert record.boxes.dtype == np.float32 and np.isfinite(record.boxes).all()
        np.testing.assert_array_equal(record.boxes, boxes)
        np.testing.assert_array_equal(record.labels, labels)
        np.testing.assert_array_equal(record.ignore_boxes, crowd)
        assert ((record.labels >= 0) & (record.labels < coco_set.label_map.num_classes)).all()
    assert coco_set.ground_truth.ann_ids.tolist() == [a["id"] for a in data["annotations"]]


def write(folder, text: str | bytes, name: str = "ann.json") -> str:
    path = folder / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return str(path)


def outcome(path: str):
    """The loaded CocoSet, or the CocoFormatError (checked to name the file on one line); any other
    exception fails the test."""
    try:
        coco_set = load_coco(path, "images")
    except CocoFormatError as err:
        message = str(err)
        assert message.startswith(path) and "\n" not in message and len(message) < 600, message
        event("refused")
        return err
    event("loaded")
    return coco_set


ACCEPTED = {"utf-8": b"", "utf-8-sig": codecs.BOM_UTF8, "utf-16-le": codecs.BOM_UTF16_LE,
            "utf-16-be": codecs.BOM_UTF16_BE, "utf-32-le": codecs.BOM_UTF32_LE, "utf-32-be": codecs.BOM_UTF32_BE}


@settings(max_examples=120, **SETTINGS)
@given(data=coco_files(), encoding=st.sampled_from(sorted(ACCEPTED)), ascii_only=st.booleans())
def test_valid_files_load_as_mmdetection_reads_them_and_score_one(folder, data, encoding, ascii_only):
    text = json.dumps(data, ensure_ascii=ascii_only)
    path = write(folder, ACCEPTED[encoding] + text.encode(encoding.replace("-sig", "")))
    coco_set = outcome(path)
    assert not isinstance(coco_set, Exception), coco_set
    check_records(coco_set, data)
    detections = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": [float(v) for v in a["bbox"]],
                   "score": 1.0} for a in data["annotations"] if not a.get("iscrowd", 0)]
    counted = [a for a in data["annotations"] if not a.get("iscrowd", 0)
               and 0 <= a.get("area", float(a["bbox"][2]) * float(a["bbox"][3])) <= 1e10]
    if not counted:  # COCOeval ignores crowd boxes and those whose area is outside [0, 1e10]: mAP is -1
        event("not scored: no box COCOeval counts")
        return
    event("scored")
    for use_faster in (False, True) if FASTER else (False,):
        metrics = evaluate(coco_set, detections, use_faster=use_faster)
        assert metrics["bbox_mAP"] == pytest.approx(1.0, abs=1e-12), (use_faster, metrics)
    assert evaluate(path, detections, use_faster=False) == evaluate(coco_set, detections, use_faster=False)


# ---------------------------------------------------------------------------------------------------
# One field wrong

wrong_type = st.sampled_from(["0", "1", "", "abc", None, True, False, [], [1], {}, {"a": 1}])
wrong_number = st.sampled_from([0.5, -0.25, float("nan"), float("inf"), float("-inf")])
huge = st.sampled_from([-1, -(2**63), 2**63, 2**64, 10**30, 10**400])
WRONG = {  # field kind -> values the schema must refuse
    "id": st.one_of(wrong_type, wrong_number, huge),
    "size": st.one_of(wrong_type, wrong_number, huge, st.sampled_from([0, -3])),
    "flag": st.one_of(wrong_type.filter(lambda v: not isinstance(v, bool)), wrong_number,
                      st.sampled_from([2, -1, 10**400])),
    "bbox": st.one_of(wrong_type, st.sampled_from([[1, 2, 3], [1, 2, 3, 4, 5], "1,2,3,4"]),
                      st.builds(lambda k, v: [v if i == k else 1 for i in range(4)], st.integers(0, 3),
                                st.one_of(wrong_type, st.sampled_from([float("nan"), float("inf"), 1e39, -1e39,
                                                                       10**39, 10**400])))),
    "area": st.one_of(wrong_type, st.sampled_from([float("nan"), float("inf"), 10**400])),
    "file_name": st.sampled_from([None, 3, "", [], "a\x00b.jpg", "/abs.jpg", "../up.jpg", "a/../../up.jpg",
                                  "\\win.jpg", "x\ud800.jpg"]),
    "name": st.sampled_from([None, 3, [], {}, "x\udfff"]),
    "supercategory": st.sampled_from([3, [], {}, True, "y\ud834"]),
}
FIELDS = [("images", "id", "id"), ("images", "height", "size"), ("images", "width", "size"),
          ("images", "file_name", "file_name"), ("annotations", "id", "id"), ("annotations", "image_id", "id"),
          ("annotations", "category_id", "id"), ("annotations", "bbox", "bbox"), ("annotations", "area", "area"),
          ("annotations", "iscrowd", "flag"), ("annotations", "ignore", "flag"), ("categories", "id", "id"),
          ("categories", "name", "name"), ("categories", "supercategory", "supercategory")]


@st.composite
def one_field_wrong(draw) -> tuple[dict, str, str]:
    """(a file, the list, the key): one entry of the list got a value the schema refuses."""
    data = draw(coco_files())
    section, key, kind = draw(st.sampled_from([f for f in FIELDS if data[f[0]]]))
    entry = draw(st.sampled_from(data[section]))
    entry[key] = draw(WRONG[kind])
    return data, section, key


@settings(max_examples=250, **SETTINGS)
@given(case=one_field_wrong())
def test_a_field_of_the_wrong_type_or_range_is_refused_naming_it(folder, case):
    data, section, key = case
    err = outcome(write(folder, json.dumps(data)))
    assert isinstance(err, CocoFormatError), (section, key)
    assert f"'{key}'" in str(err) or f"{key} " in str(err), (section, key, str(err))


@st.composite
def broken_structure(draw) -> dict:
    """A file with a duplicate id, a dangling reference, a missing key or a wrong container."""
    data = draw(coco_files())
    anns, images, cats = data["annotations"], data["images"], data["categories"]
    choices = ["no images", "images not a list", "no categories", "empty categories", "annotations not a list",
               "top level a list", "image not an object", "duplicate image id", "duplicate category id",
               "image missing key"]
    if anns:
        choices += ["duplicate annotation id", "unknown image", "unknown category", "annotation missing key",
                    "annotation not an object"]
    choice = draw(st.sampled_from(choices))
    if choice == "no images":
        del data["images"]
    elif choice == "images not a list":
        data["images"] = {str(i["id"]): i for i in images}
    elif choice == "no categories":
        del data["categories"]
    elif choice == "empty categories":
        data["categories"] = []
    elif choice == "annotations not a list":
        data["annotations"] = {"0": anns}
    elif choice == "top level a list":
        return [data]
    elif choice == "image not an object":
        images.append([1, 2, 3])
    elif choice in ("duplicate image id", "duplicate category id"):
        entries = images if choice.startswith("duplicate image") else cats
        entries.append(dict(draw(st.sampled_from(entries))))
    elif choice == "image missing key":
        del draw(st.sampled_from(images))[draw(st.sampled_from(["id", "height", "width", "file_name"]))]
    elif choice == "duplicate annotation id":
        anns.append(dict(draw(st.sampled_from(anns))))
    elif choice == "unknown image":
        draw(st.sampled_from(anns))["image_id"] = draw(ids.filter(lambda i: i not in {im["id"] for im in images}))
    elif choice == "unknown category":
        draw(st.sampled_from(anns))["category_id"] = draw(ids.filter(lambda i: i not in {c["id"] for c in cats}))
    elif choice == "annotation missing key":
        del draw(st.sampled_from(anns))[draw(st.sampled_from(["id", "image_id", "category_id", "bbox"]))]
    else:
        anns.insert(draw(st.integers(0, len(anns))), "not an object")
    return data


@settings(max_examples=150, **SETTINGS)
@given(data=broken_structure())
def test_a_broken_structure_is_refused(folder, data):
    assert isinstance(outcome(write(folder, json.dumps(data))), CocoFormatError)


# ---------------------------------------------------------------------------------------------------
# Changes that keep the meaning


@st.composite
def same_meaning(draw) -> tuple[dict, dict]:
    """(a valid file, the same file rewritten): integral floats for integers, false / true for 0 / 1 flags,
    absent 0 flags, an explicit area = w * h where there was none, unknown keys."""
    data = draw(coco_files())
    changed = json.loads(json.dumps(data))
    as_float = lambda v: float(v) if abs(v) <= 2**53 and draw(st.booleans()) else v  # noqa: E731
    for entry in changed["images"] + changed["categories"] + changed["annotations"]:
        for key in ("id", "image_id", "category_id", "height", "width"):
            if key in entry:
                entry[key] = as_float(entry[key])
        for key in ("iscrowd", "ignore"):
            if key in entry:
                entry[key] = draw(st.sampled_from([bool(entry[key])] + ([] if entry[key] else ["absent"])))
                if entry[key] == "absent":
                    del entry[key]
        if "bbox" in entry and "area" not in entry and draw(st.booleans()):
            entry["area"] = float(entry["bbox"][2]) * float(entry["bbox"][3])
        if draw(st.booleans()):
            entry[draw(st.sampled_from(["extra", "attributes", "occluded"]))] = draw(st.sampled_from([None, "x", [1]]))
    return data, changed


@settings(max_examples=100, **SETTINGS)
@given(case=same_meaning())
def test_changes_that_keep_the_meaning_load_the_same_records(folder, case):
    data, changed = case
    coco_set = outcome(write(folder, json.dumps(changed)))
    assert not isinstance(coco_set, Exception), coco_set
    check_records(coco_set, data)


# ---------------------------------------------------------------------------------------------------
# Encodings and damaged bytes


def check_within_schema(coco_set) -> None:
    """What any loaded file gives: int ids within int64, positive sizes, finite float32 boxes, labels in range."""
    for r in coco_set.records:
        assert type(r.image_id) is int and 0 <= r.image_id <= INT64_MAX and r.height > 0 and r.width > 0
        assert r.boxes.dtype == np.float32 and np.isfinite(r.boxes).all() and np.isfinite(r.ignore_boxes).all()
        assert ((r.labels >= 0) & (r.labels < coco_set.label_map.num_classes)).all()


DAMAGES = ("utf-16 without a mark", "utf-32 without a mark", "latin-1", "cut", "nul", "flipped byte")


@st.composite
def damaged_bytes(draw, damage: str) -> tuple[bytes, bool]:
    """(the bytes of a valid file after one `damage` of DAMAGES, whether it must be refused)."""
    text = json.dumps(draw(coco_files()), ensure_ascii=draw(st.booleans()))
    raw = text.encode("utf-8")
    if damage.endswith("without a mark"):  # ASCII characters become NUL-padded
        return text.encode(damage.split()[0] + "-" + draw(st.sampled_from(["le", "be"]))), True
    if damage == "latin-1":  # mojibake of non-ASCII characters may still be UTF-8: either outcome
        return text.encode("latin-1", errors="replace"), False
    at = draw(st.integers(0, len(raw) - 1))
    if damage == "cut":  # no strict prefix of a JSON object is JSON
        return raw[:at], True
    if damage == "nul":  # JSON text never holds a raw NUL
        return raw[:at] + b"\x00" + raw[at:], True
    return raw[:at] + bytes([draw(st.integers(0, 255))]) + raw[at + 1:], False  # a digit may change: either


@pytest.mark.parametrize("damage", DAMAGES)
@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
def test_other_encodings_and_damaged_bytes_load_within_the_schema_or_are_refused(folder, damage, data):
    raw, must_refuse = data.draw(damaged_bytes(damage))
    result = outcome(write(folder, raw))
    if must_refuse:
        assert isinstance(result, CocoFormatError)
    elif not isinstance(result, Exception):
        check_within_schema(result)


# ---------------------------------------------------------------------------------------------------
# Deep nesting and huge integers

RAW = "@@raw@@"


VALUES = ("nested", "nested deeper than Python reads", "huge integer", "more digits than Python reads")


@st.composite
def nested_or_huge(draw, value: str) -> str:
    """The text of a valid file with one field's value replaced by nested lists or objects (1 to 50 levels, or
    900 to 5000) or by an integer too large for it (20 to 4300 digits, from 40 for a bbox number and 310 for
    an area; or 4301 to 6000 digits, past what Python reads)."""
    data = draw(coco_files())
    section, key, kind = draw(st.sampled_from([f for f in FIELDS if data[f[0]]]))
    entry = draw(st.sampled_from(data[section]))
    if value.startswith("nested"):
        depth = draw(st.integers(1, 50) if value == "nested" else st.integers(900, 5000))
        raw = "[" * depth + "]" * depth if draw(st.booleans()) else '{"a": ' * depth + "1" + "}" * depth
    else:
        low = {"bbox": 40, "area": 310}.get(kind, 20)
        digits = draw(st.integers(low, 4300) if value == "huge integer" else st.integers(4301, 6000))
        raw = draw(st.sampled_from(["", "-"])) + "9" * digits
    entry[key] = [1, 1, RAW, 2] if kind == "bbox" and draw(st.booleans()) else RAW
    return json.dumps(data).replace(f'"{RAW}"', raw)


@pytest.mark.parametrize("value", VALUES)
@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
def test_deep_nesting_and_huge_integers_are_refused(folder, value, data):
    assert isinstance(outcome(write(folder, data.draw(nested_or_huge(value)))), CocoFormatError)
