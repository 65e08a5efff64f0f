"""An image-info annotation file (images and categories, no 'annotations' key, as COCO test-dev's): loaded for
evaluation, refused for training, and refused by the scorer with a message that says why."""

import pytest

from retina_fn.data.coco import CocoFormatError, load_coco, load_split
from retina_fn.eval import coco_eval
from tests.coco_fixtures import ann_entry, coco_dict, image_entry, tiny_data_config, write_json


def _files(tmp_path):
    images = [image_entry(1, 48, 64), image_entry(2, 64, 48)]
    info = {"images": images, "categories": [{"id": 1, "name": "a"}, {"id": 3, "name": "b"}]}
    write_json(tmp_path / "info.json", info)
    write_json(tmp_path / "train.json", coco_dict(images, [ann_entry(1, 1, [2, 2, 10, 10])]))
    return tmp_path / "info.json"


def test_image_info_file_loads_for_evaluation(tmp_path):
    info = _files(tmp_path)
    coco_set = load_coco(str(info), str(tmp_path / "images"))
    assert not coco_set.has_annotations
    assert [r.image_id for r in coco_set.records] == [1, 2]
    assert all(len(r.boxes) == 0 and r.num_annotations == 0 for r in coco_set.records)
    assert coco_set.label_map.category_ids == (1, 3)
    assert load_coco(str(tmp_path / "train.json"), str(tmp_path)).has_annotations
    cfg = tiny_data_config(root=str(tmp_path), val_ann="info.json", train_ann="info.json")
    assert not load_split(cfg, "val").has_annotations


def test_training_on_an_image_info_file_is_refused(tmp_path):
    _files(tmp_path)
    cfg = tiny_data_config(root=str(tmp_path), train_ann="info.json", filter_empty_gt=False)
    with pytest.raises(CocoFormatError, match=r"info.json: no 'annotations' list .*nothing to train on"):
        load_split(cfg, "train")
    assert load_split(tiny_data_config(root=str(tmp_path), train_ann="train.json"), "train").has_annotations


def test_scoring_against_an_image_info_file_says_why_it_cannot(tmp_path):
    info = _files(tmp_path)
    result = {"image_id": 1, "category_id": 3, "bbox": [1.0, 1.0, 5.0, 5.0], "score": 0.5}
    for use_faster in (False, True):
        with pytest.raises(ValueError, match=r"info.json: the ground truth has no 'annotations' list \(an image-info"):
            coco_eval.evaluate(str(info), [result], use_faster=use_faster)
