"""data.box_buckets: ground truth padded per batch to the smallest bucket that holds it, with the same
assignment, loss and update as padding to data.max_boxes."""

import numpy as np
import pytest
import torch

from retina_fn import detector, rng, tree
from retina_fn.data.batching import bucket_sizes, collate, pad_ground_truth, padded_count
from retina_fn.data.coco import load_coco
from retina_fn.data.loader import make_train_loader
from retina_fn.train import build_optimizer, init_train_state, make_train_step
from tests.coco_fixtures import ann_entry, coco_dict, image_entry, tiny_data_config, write_dataset
from tests.model_fixtures import settings_of, spec_of, tiny_config

CANVAS = (64, 96)
BUCKETS = (2, 4, 8, 16, 128)


def test_bucket_sizes_clip_to_max_boxes_and_end_with_it():
    assert bucket_sizes((8, 16, 32, 64, 128), 100) == (8, 16, 32, 64, 100)
    assert bucket_sizes((64, 8, 8), 100) == (8, 64, 100)  # any order, repeats collapse
    assert bucket_sizes((), 100) == (100,)
    assert bucket_sizes((8, 16), 4) == (4,)
    assert [padded_count(n, (8, 16, 100)) for n in (0, 1, 8, 9, 16, 17, 100)] == [8, 8, 8, 16, 16, 100, 100]
    for bad in ((0, 8), (8, -1), (8, 2.5), (True,), ("8",)):
        with pytest.raises(ValueError, match="data.box_buckets must be positive ints"):
            bucket_sizes(bad, 100)


def _samples(counts, seed=0, canvas=CANVAS, crowd=(0, 1, 0, 2)):
    """Samples (see DetectionDataset) with the given box counts: random boxes, some of them repeated (exact IoU
    ties), a few crowd regions."""
    gen = np.random.default_rng(seed)
    h, w = canvas
    out = []
    for i, n in enumerate(counts):
        xy = gen.uniform(0, [w * 0.7, h * 0.7], size=(n, 2))
        wh = gen.uniform(6, [w * 0.5, h * 0.5], size=(n, 2))
        boxes = np.minimum(np.concatenate([xy, xy + wh], 1), [w, h, w, h]).astype(np.float32)
        if n >= 3:
            boxes[2] = boxes[0]  # a repeated box: later gts win mmdetection's low-quality ties
        ignore = np.array([[0, 0, w / 2, h / 2]] * crowd[i % len(crowd)], np.float32).reshape(-1, 4)
        out.append(dict(image=np.zeros((3, *canvas), np.float32), boxes=boxes,
                        labels=gen.integers(0, 3, size=n).astype(np.int64), ignore_boxes=ignore,
                        image_hw=np.array([h - 8 * (i % 2), w], np.int64), orig_hw=np.array(canvas, np.int64),
                        scale_factor=np.ones(2, np.float32), flipped=False, image_id=i + 1, index=i, replaced=False))
    return out


def test_collate_pads_to_the_smallest_bucket_holding_the_largest_count():
    samples = _samples((0, 3, 5, 1))
    plain = collate(samples, max_boxes=20, max_ignore_boxes=3)
    bucketed = collate(samples, max_boxes=20, max_ignore_boxes=3, box_buckets=BUCKETS)
    assert plain["boxes"].shape == (4, 20, 4) and bucketed["boxes"].shape == (4, 8, 4)
    for key in plain:
        if key in ("boxes", "labels", "box_valid"):
            assert torch.equal(bucketed[key], plain[key][:, :8]), key
            assert not plain[key][:, 8:].any(), key  # what the bucket leaves out is padding
        else:
            assert torch.equal(bucketed[key], plain[key]), key
    # an empty batch takes the smallest bucket; a full one max_boxes
    assert collate(_samples((0, 0)), 20, 3, BUCKETS)["boxes"].shape[1] == 2
    assert collate(_samples((2, 17)), 20, 3, BUCKETS)["boxes"].shape[1] == 20


def test_boxes_beyond_max_boxes_are_dropped_as_without_buckets():
    samples = _samples((3, 12))
    plain = collate(samples, max_boxes=10, max_ignore_boxes=3)
    bucketed = collate(samples, max_boxes=10, max_ignore_boxes=3, box_buckets=(4, 8, 16))
    assert bucketed["boxes"].shape[1] == 10  # the bucket 16 is clipped to max_boxes
    for key in plain:
        assert torch.equal(bucketed[key], plain[key]), key
    assert bucketed["boxes_dropped"].tolist() == [0, 2]


def test_pad_ground_truth_widens_with_padding_rows():
    batch = collate(_samples((1, 3)), max_boxes=20, max_ignore_boxes=3, box_buckets=BUCKETS)  # G = 4
    wide = pad_ground_truth(batch, 16)
    reference = collate(_samples((1, 3)), max_boxes=16, max_ignore_boxes=3)
    for key in reference:
        assert torch.equal(wide[key], reference[key]), key
    assert pad_ground_truth(batch, 4) is batch
    with pytest.raises(ValueError, match="cannot pad 4 ground-truth rows down to 2"):
        pad_ground_truth(batch, 2)


@pytest.mark.parametrize("low_quality,ignore_iof_thr", [("mmdet", -1.0), ("mmdet", 0.5), ("torchvision", -1.0)])
def test_assignment_is_bitwise_the_same(low_quality, ignore_iof_thr):
    cfg = tiny_config(canvas=CANVAS).model
    cfg.assigner.low_quality = low_quality
    cfg.assigner.ignore_iof_thr = ignore_iof_thr
    samples = _samples((0, 3, 7, 1), seed=1)
    plain = detector.Detector(cfg).targets(collate(samples, 100, 4))
    for buckets in ((8,), (16, 32)):
        bucketed = detector.Detector(cfg).targets(collate(samples, 100, 4, buckets))
        assert torch.equal(bucketed.anchor_valid, plain.anchor_valid)
        for name, a, b in zip(plain.assignment._fields, plain.assignment, bucketed.assignment):
            assert a.dtype == b.dtype and torch.equal(a.view(torch.int8 if a.dtype == torch.bool else a.dtype), b), name
        assert plain.assignment.positive.any() and plain.assignment.negative.any()


def test_loss_and_train_step_are_bitwise_the_same():
    # two accumulated loader batches of different G, each split into two micro-batches
    cfg = tiny_config(canvas=CANVAS)
    cfg.optim.micro_batches = 2
    samples = _samples((0, 3, 7, 1), seed=2)
    plain = (collate(samples[:2], 100, 4), collate(samples[2:], 100, 4))
    bucketed = (collate(samples[:2], 100, 4, BUCKETS), collate(samples[2:], 100, 4, BUCKETS))
    assert [b["boxes"].shape[1] for b in bucketed] == [4, 8]
    optimizer = build_optimizer(settings_of(cfg))
    state = init_train_state(spec_of(cfg), settings_of(cfg), rng.key(0), optimizer)
    step = make_train_step(spec_of(cfg), settings_of(cfg), optimizer, steps_per_epoch=10, global_batch=4)
    state_a, metrics_a = step(state, plain)  # the step is pure: `state` is not changed
    state_b, metrics_b = step(state, bucketed)
    assert metrics_a.keys() == metrics_b.keys() and float(metrics_a["num_pos"]) > 0
    for k in metrics_a:  # loss, loss_cls, loss_box, num_pos, normalizer, grad_norm, ...
        assert torch.equal(metrics_a[k], metrics_b[k]), k
    fa, fb = tree.flatten_by_path(state_a), tree.flatten_by_path(state_b)
    assert fa.keys() == fb.keys()
    for path in fa:
        assert torch.equal(fa[path], fb[path]), path


@pytest.fixture(scope="module")
def varied_coco(tmp_path_factory):
    """Nine landscape / portrait images with 1 to 6 boxes each."""
    root = tmp_path_factory.mktemp("coco_varied")
    gen = np.random.default_rng(5)
    sizes = [(30, 40), (40, 30), (24, 40), (36, 36), (30, 45), (45, 30), (20, 32), (32, 20), (33, 41)]
    images, anns = [], []
    for i, (h, w) in enumerate(sizes):
        images.append(image_entry(i + 1, h, w))
        for _ in range(1 + i % 6):
            bw, bh = gen.uniform(3, w / 2), gen.uniform(3, h / 2)
            x, y = gen.uniform(0, w - bw), gen.uniform(0, h - bh)
            anns.append(ann_entry(len(anns) + 1, i + 1, [x, y, bw, bh], category_id=int(gen.choice([1, 3]))))
    return load_coco(*write_dataset(root, coco_dict(images, anns)))


def test_loader_groups_one_g_per_step(varied_coco):
    cfg = tiny_data_config(max_boxes=6, images_per_device=1)
    key = rng.key(3)
    plain = make_train_loader(cfg, varied_coco, rank=0, world_size=1, key=key, accum_steps=2)
    cfg.box_buckets = (1, 2, 4)
    bucketed = make_train_loader(cfg, varied_coco, rank=0, world_size=1, key=key, accum_steps=2)
    groups = 0
    for group_a, group_b in zip(plain.updates(), bucketed.updates()):
        counts = [int(b["box_valid"].sum(1).max()) for b in group_a]
        g = padded_count(max(counts), (1, 2, 4, 6))
        assert [b["boxes"].shape[1] for b in group_b] == [g, g]
        for a, b in zip(group_a, group_b):
            for key_ in a:
                expected = a[key_][:, :g] if key_ in ("boxes", "labels", "box_valid") else a[key_]
                assert torch.equal(b[key_], expected), key_
        groups += 1
    assert groups == plain.steps_per_epoch > 0
