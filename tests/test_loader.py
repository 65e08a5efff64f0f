import os

import pytest
import torch

from retina_fn import rng
from retina_fn.data.coco import ImageLoadError, load_coco
from retina_fn.data.loader import make_eval_loader, make_train_loader
from tests.coco_fixtures import small_dataset, tiny_data_config

# landscape (w > h) and portrait images; with scale (64, 48) they fit the 48x64 / 64x48 canvases
SIZES = [(30, 40), (40, 30), (24, 40), (36, 36), (30, 45), (45, 30), (20, 32), (32, 20), (33, 41)]
KEY = rng.key(11)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    return load_coco(*small_dataset(root, SIZES, boxes_per_image=6))


def _epoch(loader, epoch=0, start_step=0):
    loader.set_epoch(epoch, start_step)
    return list(loader)


def _by_index(batches):
    """{dataset index: (image, boxes, valid)} over all yielded slots."""
    out = {}
    for b in batches:
        for i in range(b["index"].shape[0]):
            out[int(b["index"][i])] = (b["image"][i], b["boxes"][i], b["box_valid"][i], bool(b["flipped"][i]))
    return out


def test_train_batches_static_and_grouped(coco):
    cfg = tiny_data_config()
    loader = make_train_loader(cfg, coco, rank=0, world_size=1, key=KEY)
    batches = _epoch(loader)
    assert len(batches) == loader.steps_per_epoch == 3 + 2  # 5 landscape, 4 portrait... in pairs
    canvases = set()
    for b in batches:
        assert b["image"].shape[:2] == (2, 3) and b["image"].dtype == torch.float32
        assert b["boxes"].shape == (2, 4, 4) and b["labels"].shape == (2, 4)
        assert b["ignore_boxes"].shape == (2, 2, 4)
        canvases.add(tuple(b["image"].shape[2:]))
        for i in range(2):
            h, w = SIZES[int(b["index"][i])]
            assert tuple(b["image"].shape[2:]) == ((48, 64) if w > h else (64, 48))
            assert tuple(b["orig_hw"][i].tolist()) == (h, w)
    assert canvases == {(48, 64), (64, 48)}
    # boxes beyond max_boxes (6 per image, 4 kept) are counted per yielded slot
    assert loader.totals["boxes_dropped"] == 2 * 2 * len(batches)
    assert loader.totals["images"] == 2 * len(batches)
    flips = [f for b in batches for f in b["flipped"].tolist()]
    assert any(flips) and not all(flips)


def test_same_pixels_with_0_and_2_workers(coco):
    a = _epoch(make_train_loader(tiny_data_config(workers=0), coco, rank=0, world_size=1, key=KEY), epoch=1)
    b = _epoch(make_train_loader(tiny_data_config(workers=2), coco, rank=0, world_size=1, key=KEY), epoch=1)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_same_augmentation_with_world_size_1_and_2(coco):
    cfg = tiny_data_config(images_per_device=1)
    single = _by_index(_epoch(make_train_loader(cfg, coco, rank=0, world_size=1, key=KEY), epoch=2))
    split = {}
    for rank in range(2):
        split.update(_by_index(_epoch(make_train_loader(cfg, coco, rank=rank, world_size=2, key=KEY), epoch=2)))
    assert set(single) == set(split) == set(range(len(SIZES)))
    for i in single:
        for u, v in zip(single[i], split[i]):
            assert torch.equal(torch.as_tensor(u), torch.as_tensor(v)), i


def test_eval_loader_each_image_once_and_unflipped(coco):
    cfg = tiny_data_config(eval_images_per_device=2)
    seen = []
    for rank in range(2):
        for b in _epoch(make_eval_loader(cfg, coco, rank=rank, world_size=2)):
            assert not b["flipped"].any()
            pad = b["image_id"] == -1
            assert (b["image"][pad] == 0).all() and not b["box_valid"][pad].any()
            seen += b["image_id"][~pad].tolist()
    assert sorted(seen) == [r.image_id for r in coco.records]


def test_resume_matches_tail_of_epoch(coco):
    cfg = tiny_data_config()
    full = _epoch(make_train_loader(cfg, coco, rank=0, world_size=1, key=KEY), epoch=1)
    resumed = make_train_loader(cfg, coco, rank=0, world_size=1, key=KEY, start_epoch=1, start_step=2)
    assert len(resumed) == len(full) - 2
    tail = list(resumed)
    for x, y in zip(full[2:], tail):
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_preload_gives_same_batches(coco):
    a = _epoch(make_train_loader(tiny_data_config(), coco, rank=0, world_size=1, key=KEY))
    b = _epoch(make_train_loader(tiny_data_config(preload=True), coco, rank=0, world_size=1, key=KEY))
    for x, y in zip(a, b):
        assert all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture
def coco_with_bad_image(tmp_path):
    ann, root = small_dataset(tmp_path, SIZES[:4], boxes_per_image=1)
    s = load_coco(ann, root)
    bad = s.records[2]  # landscape (24x40)
    data = open(bad.path, "rb").read()
    with open(bad.path, "wb") as f:
        f.write(data[: len(data) // 3])
    return s, bad


def test_bad_image_is_an_error_naming_file(coco_with_bad_image):
    coco, bad = coco_with_bad_image
    for loader in (make_train_loader(tiny_data_config(), coco, rank=0, world_size=1, key=KEY),
                   make_eval_loader(tiny_data_config(skip_bad_images=True), coco, rank=0, world_size=1)):
        with pytest.raises(ImageLoadError, match=f"{os.path.basename(bad.path)} \\(image id {bad.image_id}\\)"):
            _epoch(loader)


def test_bad_image_skipped_and_counted(coco_with_bad_image, caplog):
    coco, bad = coco_with_bad_image
    loader = make_train_loader(tiny_data_config(skip_bad_images=True), coco, rank=0, world_size=1, key=KEY)
    batches = _epoch(loader)
    assert loader.totals["images_replaced"] == 1
    slots = [(b, i) for b in batches for i in range(2) if b["replaced"][i]]
    assert len(slots) == 1
    b, i = slots[0]
    assert int(b["index"][i]) == 0  # the next landscape image, cycling: index 2 -> 0
    assert b["image"].shape[2:] == (48, 64)
    assert os.path.basename(bad.path) in caplog.text  # the warning names the file
