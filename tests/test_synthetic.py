import json
import os

import numpy as np
import pytest
from PIL import Image

from retina_fn.data import synthetic


def _load(root, split):
    with open(os.path.join(root, "annotations", f"instances_{split}.json")) as f:
        return json.load(f)


def _all_files(root):
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    paths = synthetic.generate_synthetic(root, num_train=4, num_val=60, seed=3)
    return paths, _load(root, "val")


# ---------------------------------------------------------------------------------------------------
# The dataset


def test_category_ids_are_not_contiguous_indices():
    ids = synthetic.category_ids(5)
    assert ids == sorted(set(ids)) and len(ids) == 5
    assert ids != list(range(5)) and ids != list(range(1, 6))
    with pytest.raises(ValueError, match="num_classes"):
        synthetic.category_ids(len(synthetic.SHAPE_NAMES) + 1)


def test_annotations_are_sane(dataset):
    paths, coco = dataset
    images = {im["id"]: im for im in coco["images"]}
    assert len(images) == 60
    categories = {c["id"] for c in coco["categories"]}
    assert categories == set(synthetic.category_ids(5))
    ann_ids = [a["id"] for a in coco["annotations"]]
    assert len(set(ann_ids)) == len(ann_ids)
    for ann in coco["annotations"]:
        im = images[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        assert ann["category_id"] in categories
        assert w > 0 and h > 0
        assert x >= 0 and y >= 0 and x + w <= im["width"] + 1e-6 and y + h <= im["height"] + 1e-6
        if ann["iscrowd"]:
            assert 0 < ann["area"] <= w * h
        else:
            assert ann["iscrowd"] == 0
            assert ann["area"] == pytest.approx(w * h, abs=1e-3)
    for im in coco["images"]:
        with Image.open(paths.val_images / im["file_name"]) as pil:
            assert pil.format == "JPEG"
            assert pil.size == (im["width"], im["height"])


def test_dataset_covers_the_hard_cases(dataset):
    paths, coco = dataset
    lo, hi = synthetic.image_size_range(256)
    sizes = [(im["width"], im["height"]) for im in coco["images"]]
    assert all(lo <= w <= hi and lo <= h <= hi for w, h in sizes)
    landscape = sum(w > h for w, h in sizes)
    portrait = sum(w <= h for w, h in sizes)
    assert landscape > 0 and portrait > 0

    plain = [a for a in coco["annotations"] if not a["iscrowd"]]
    crowd = [a for a in coco["annotations"] if a["iscrowd"]]
    areas = np.array([a["area"] for a in plain])
    bins = (int((areas < 32**2).sum()), int(((areas >= 32**2) & (areas < 96**2)).sum()), int((areas >= 96**2).sum()))
    assert all(n > 0 for n in bins), bins
    aspects = np.array([a["bbox"][2] / a["bbox"][3] for a in plain])
    assert aspects.max() > 1.6 and aspects.min() < 1 / 1.6
    assert len({a["category_id"] for a in plain}) == 5
    annotated = {a["image_id"] for a in coco["annotations"]}
    empty = [im["id"] for im in coco["images"] if im["id"] not in annotated]
    assert len(empty) > 0 and len(crowd) > 0

    summary = paths.summary["val"]
    assert summary["objects_per_size"] == dict(zip(("small", "medium", "large"), bins))
    assert (summary["landscape_images"], summary["portrait_images"]) == (landscape, portrait)
    assert summary["empty_images"] == len(empty) and summary["crowd_regions"] == len(crowd)
    assert sum(summary["objects_per_class"].values()) == len(plain)


def test_jpeg_holds_the_rendered_image(dataset):
    paths, coco = dataset
    im = coco["images"][0]
    pixels, _ = synthetic.render_image(3, im["id"])
    decoded = np.asarray(Image.open(paths.val_images / im["file_name"]).convert("RGB"), dtype=np.float32)
    assert decoded.shape == pixels.shape
    assert np.abs(decoded - pixels).mean() < 8.0


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        synthetic.generate_synthetic(tmp_path / name, num_train=3, num_val=2, seed=seed)
    a, b, c = (_all_files(tmp_path / name) for name in "abc")
    assert sorted(a) == sorted(b) and len(a) == 3 + 2 + 2 + 1
    assert all(a[k] == b[k] for k in a)
    assert set(a) == set(c)
    assert all(a[k] != c[k] for k in a if k.endswith(".jpg") or k.endswith(".json"))


def test_images_do_not_depend_on_dataset_size(tmp_path):
    big = synthetic.generate_synthetic(tmp_path / "big", num_train=3, num_val=3, seed=1)
    small = synthetic.generate_synthetic(tmp_path / "small", num_train=1, num_val=2, seed=1)
    for split, count in (("train", 1), ("val", 2)):
        coco_big, coco_small = _load(big.root, split), _load(small.root, split)
        kept = {im["id"] for im in coco_small["images"]}
        assert len(kept) == count
        strip = lambda anns: [{k: v for k, v in a.items() if k != "id"} for a in anns if a["image_id"] in kept]
        assert strip(coco_big["annotations"]) == strip(coco_small["annotations"])
        for im in coco_small["images"]:
            folder = big.train_images if split == "train" else big.val_images
            other = small.train_images if split == "train" else small.val_images
            assert (folder / im["file_name"]).read_bytes() == (other / im["file_name"]).read_bytes()
    # Train and val ids never collide.
    train_ids = {im["id"] for im in _load(big.root, "train")["images"]}
    assert not train_ids & {im["id"] for im in _load(big.root, "val")["images"]}


def test_ensure_generates_once_and_regenerates_on_change(tmp_path):
    root = tmp_path / "data"
    first = synthetic.ensure_synthetic(root, 2, 2, seed=0)
    stamp = os.stat(first.val_ann).st_mtime_ns
    again = synthetic.ensure_synthetic(root, 2, 2, seed=0)
    assert os.stat(again.val_ann).st_mtime_ns == stamp
    assert again.summary == first.summary and again.val_ann == first.val_ann

    changed = synthetic.ensure_synthetic(root, 2, 3, seed=0)
    assert len(_load(root, "val")["images"]) == 3 and changed.summary["val"]["images"] == 3
    assert len(os.listdir(changed.val_images)) == 3

    os.remove(next(changed.train_images.iterdir()))  # damaged: regenerated
    repaired = synthetic.ensure_synthetic(root, 2, 3, seed=0)
    assert len(os.listdir(repaired.train_images)) == 2


def test_ensure_refuses_foreign_data(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "precious.jpg").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="refusing"):
        synthetic.ensure_synthetic(tmp_path, 1, 1, seed=0)
    assert (tmp_path / "train" / "precious.jpg").exists()


def test_bad_parameters_are_named(tmp_path):
    with pytest.raises(ValueError, match="num_val"):
        synthetic.generate_synthetic(tmp_path, 1, -1, seed=0)
    with pytest.raises(ValueError, match="image_size"):
        synthetic.generate_synthetic(tmp_path, 1, 1, seed=0, image_size=16)


def test_cli_writes_dataset_and_prints_summary(tmp_path, capsys):
    from experiments import make_synthetic

    out = tmp_path / "cli"
    rc = make_synthetic.main(["--out", str(out), "--num-train", "2", "--num-val", "1", "--seed", "4",
                              "--image-size", "128", "--num-classes", "7"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "crowd regions" in text and "per size" in text
    coco = _load(out, "train")
    assert len(coco["images"]) == 2 and len(coco["categories"]) == 7
    assert all(64 <= im["width"] <= 160 for im in coco["images"])
    assert len(os.listdir(out / "val")) == 1
    assert make_synthetic.main(["--out", str(out), "--num-train", "1", "--num-val", "1", "--seed", "0",
                                "--num-classes", "9"]) == 2
    assert "num_classes" in capsys.readouterr().err
