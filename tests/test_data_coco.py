import json
import logging
import os

import numpy as np
import pytest

from retina_fn.data.coco import CocoFormatError, LabelMap, load_coco, load_split, resolve_image_path
from retina_fn.data.images import load_record_image
from tests.coco_fixtures import ann_entry, coco_dict, image_entry, tiny_data_config, write_dataset, write_json

CATS = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 5, "name": "airplane"}]


# ---------------------------------------------------------------------------------------------- LabelMap

def test_label_map_sorted_ids_and_round_trip():
    lm = LabelMap.from_categories(CATS)
    assert lm.category_ids == (1, 5, 90)
    assert lm.names == ("person", "airplane", "toothbrush")
    assert lm.num_classes == 3
    assert [lm.index_of(c) for c in (1, 5, 90)] == [0, 1, 2]
    assert [lm.category_id(i) for i in range(3)] == [1, 5, 90]
    back = LabelMap.from_dict(json.loads(json.dumps(lm.to_dict())))
    assert back == lm
    assert back.index_of(90) == 2
    with pytest.raises(ValueError, match="unknown category id 2"):
        lm.index_of(2)


def test_label_map_rejects_duplicates_and_missing_names():
    with pytest.raises(CocoFormatError, match="category id 1 appears twice"):
        LabelMap.from_categories([{"id": 1, "name": "a"}, {"id": 1, "name": "b"}], "f.json")
    with pytest.raises(CocoFormatError, match="f.json: category id 4 has no string 'name'"):
        LabelMap.from_categories([{"id": 4}], "f.json")


# ---------------------------------------------------------------------------------------------- parsing

def _write(tmp_path, images, anns, cats=CATS):
    return write_json(tmp_path / "ann.json", coco_dict(images, anns, cats)), str(tmp_path / "img")


def test_boxes_converted_labels_contiguous_crowd_to_ignore(tmp_path):
    images = [image_entry(7, 100, 200), image_entry(3, 50, 60)]
    anns = [
        ann_entry(1, 7, [10, 20, 30, 40], category_id=90),
        ann_entry(2, 7, [0.5, 1.5, 2.0, 3.25], category_id=1),
        ann_entry(3, 7, [50, 50, 20, 10], category_id=5, iscrowd=1),
        ann_entry(4, 3, [1, 2, 3, 4], category_id=5),
    ]
    s = load_coco(*_write(tmp_path, images, anns))
    assert [r.image_id for r in s.records] == [7, 3]  # file order
    r7 = s.records[0]
    np.testing.assert_array_equal(r7.boxes, np.array([[10, 20, 40, 60], [0.5, 1.5, 2.5, 4.75]], np.float32))
    assert r7.boxes.dtype == np.float32 and r7.labels.dtype == np.int64
    assert r7.labels.tolist() == [2, 0]
    np.testing.assert_array_equal(r7.ignore_boxes, [[50, 50, 70, 60]])
    assert (r7.height, r7.width, r7.num_annotations) == (100, 200, 3)
    assert r7.path == os.path.join(str(tmp_path / "img"), "000007.jpg")
    assert s.records[1].labels.tolist() == [1]
    assert s.counts["crowd"] == 1 and s.counts["boxes"] == 3


def test_mmdet_annotation_filters_are_counted(tmp_path, caplog):
    images = [image_entry(1, 100, 100)]
    anns = [
        ann_entry(1, 1, [10, 10, 20, 20]),                 # kept
        ann_entry(2, 1, [10, 10, 0.5, 20]),                # w < 1
        ann_entry(3, 1, [10, 10, -5, 20]),                 # negative width: no overlap (checked first)
        ann_entry(4, 1, [10, 10, 20, 20], area=0),         # area field 0
        ann_entry(5, 1, [100, 10, 20, 20]),                # starts at the right edge: no overlap
        ann_entry(6, 1, [-30, 10, 20, 20]),                # left of the image
        ann_entry(7, 1, [10, 10, 20, 20], ignore=1),       # ignore flag
        ann_entry(8, 1, [10, 10, 20, 0.9], iscrowd=1),     # crowd boxes are filtered the same way
        ann_entry(9, 1, [95, 95, 20, 20]),                 # partly outside: kept, not clipped here
    ]
    with caplog.at_level(logging.INFO, logger="retina_fn.data.coco"):
        s = load_coco(*_write(tmp_path, images, anns))
    r = s.records[0]
    np.testing.assert_array_equal(r.boxes, [[10, 10, 30, 30], [95, 95, 115, 115]])
    assert r.ignore_boxes.shape == (0, 4)
    assert s.counts["too_small"] == 2 and s.counts["zero_area"] == 1
    assert s.counts["outside_image"] == 3 and s.counts["ignore_flag"] == 1
    assert "7 annotations dropped" in caplog.text


def test_training_filters_follow_mmdetection(tmp_path):
    images = [image_entry(1, 100, 100), image_entry(2, 100, 100), image_entry(3, 100, 100),
              image_entry(4, 20, 100), image_entry(5, 100, 100)]
    anns = [ann_entry(1, 1, [1, 1, 10, 10]),
            ann_entry(2, 3, [1, 1, 10, 10], iscrowd=1),  # crowd only: mmdetection keeps it
            ann_entry(3, 4, [1, 1, 10, 10]),             # short side 20 < 32
            ann_entry(4, 5, [1, 1, 0.2, 10])]            # only a degenerate box: kept (has an annotation)
    paths = _write(tmp_path, images, anns)
    train = load_coco(*paths, filter_empty_gt=True, min_size=32)
    assert [r.image_id for r in train.records] == [1, 3, 5]
    assert train.counts["images_empty"] == 1 and train.counts["images_small"] == 1
    assert [r.image_id for r in load_coco(*paths, filter_empty_gt=False, min_size=32).records] == [1, 2, 3, 5]
    assert [r.image_id for r in load_coco(*paths).records] == [1, 2, 3, 4, 5]


def test_load_split_reads_config_paths(tmp_path):
    os.makedirs(tmp_path / "annotations")
    write_json(tmp_path / "annotations" / "t.json",
               coco_dict([image_entry(1, 10, 10), image_entry(2, 50, 50)], [ann_entry(1, 2, [1, 1, 5, 5])], CATS))
    cfg = tiny_data_config(root=str(tmp_path), train_ann="annotations/t.json", val_ann="annotations/t.json",
                           min_size=32)
    assert [r.image_id for r in load_split(cfg, "train").records] == [2]
    assert [r.image_id for r in load_split(cfg, "val").records] == [1, 2]
    assert load_split(cfg, "val").records[0].path == os.path.join(str(tmp_path), "val2017", "000001.jpg")


# ---------------------------------------------------------------------------------------------- bad input

def test_malformed_json_names_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [ {"id": 1,, } ]}')
    with pytest.raises(CocoFormatError, match=r"broken\.json: malformed JSON: .*line 1"):
        load_coco(str(path), str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_coco(str(tmp_path / "nope.json"), str(tmp_path))


def test_missing_keys_name_the_entry(tmp_path):
    with pytest.raises(CocoFormatError, match="missing top-level key 'categories'"):
        load_coco(write_json(tmp_path / "a.json", {"images": []}), str(tmp_path))
    img = image_entry(4, 10, 10)
    del img["height"]
    with pytest.raises(CocoFormatError, match="image id 4: missing key 'height'"):
        load_coco(*_write(tmp_path, [img], []))
    ann = ann_entry(12, 1, [1, 1, 2, 2])
    del ann["bbox"]
    with pytest.raises(CocoFormatError, match="annotation id 12 .*image id 1.*missing key 'bbox'"):
        load_coco(*_write(tmp_path, [image_entry(1, 10, 10)], [ann]))
    with pytest.raises(CocoFormatError, match=r"annotation id 3 .*'bbox' must be 4 finite numbers"):
        load_coco(*_write(tmp_path, [image_entry(1, 10, 10)], [dict(ann_entry(3, 1, [1, 2, 3, 4]), bbox=[1, 2, 3])]))
    with pytest.raises(CocoFormatError, match="annotation id 5: image_id 99 is not in 'images'"):
        load_coco(*_write(tmp_path, [image_entry(1, 10, 10)], [ann_entry(5, 99, [1, 1, 2, 2])]))
    with pytest.raises(CocoFormatError, match="image id 2 appears twice"):
        load_coco(*_write(tmp_path, [image_entry(2, 10, 10), image_entry(2, 5, 5)], []))


def test_unknown_category_is_an_error_naming_ids(tmp_path):
    anns = [ann_entry(1, 1, [1, 1, 5, 5], category_id=1), ann_entry(42, 1, [1, 1, 5, 5], category_id=2)]
    with pytest.raises(CocoFormatError, match=r"annotation id 42 \(image id 1\): category_id 2 is not in"):
        load_coco(*_write(tmp_path, [image_entry(1, 10, 10)], anns))


@pytest.mark.parametrize("name, message", [
    ("/etc/passwd", "absolute path"),
    ("../outside.jpg", "escapes the image folder"),
    ("a/../../outside.jpg", "escapes the image folder"),
    ("..\\outside.jpg", "escapes the image folder"),
])
def test_unsafe_file_names_refused(tmp_path, name, message):
    with pytest.raises(CocoFormatError, match=f"image id 8: file_name .*{message}"):
        load_coco(*_write(tmp_path, [image_entry(8, 10, 10, file_name=name)], []))


def test_safe_relative_names_resolve_under_root():
    assert resolve_image_path("root", "sub/../x.jpg") == os.path.join("root", "x.jpg")
    assert resolve_image_path("root", "sub/x.jpg") == os.path.join("root", "sub", "x.jpg")


def test_written_dataset_decodes(tmp_path):
    ann, root = write_dataset(tmp_path, coco_dict([image_entry(1, 12, 16)], [ann_entry(1, 1, [1, 1, 4, 4])], CATS))
    s = load_coco(ann, root)
    assert load_record_image(s.records[0]).shape == (12, 16, 3)
