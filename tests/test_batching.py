import numpy as np
import pytest
import torch

from retina_fn.data.batching import Collate, collate, keep_largest

# (dtype, shape) per key with B=3 images, canvas 4x6, G=3, Gi=2, written out from docs/conventions.md
EXPECTED = {
    "image": (torch.float32, (3, 3, 4, 6)),
    "image_hw": (torch.int64, (3, 2)),
    "boxes": (torch.float32, (3, 3, 4)),
    "labels": (torch.int64, (3, 3)),
    "box_valid": (torch.bool, (3, 3)),
    "ignore_boxes": (torch.float32, (3, 2, 4)),
    "ignore_valid": (torch.bool, (3, 2)),
    "scale_factor": (torch.float32, (3, 2)),
    "orig_hw": (torch.int64, (3, 2)),
    "flipped": (torch.bool, (3,)),
    "image_id": (torch.int64, (3,)),
    "index": (torch.int64, (3,)),
    "boxes_dropped": (torch.int64, (3,)),
    "replaced": (torch.bool, (3,)),
}


def _sample(boxes, labels, ignore=(), image_id=1, index=0, canvas=(4, 6)):
    return dict(image=np.full((3, *canvas), float(index), np.float32),
                boxes=np.asarray(boxes, np.float32).reshape(-1, 4), labels=np.asarray(labels, np.int64),
                ignore_boxes=np.asarray(ignore, np.float32).reshape(-1, 4), image_hw=np.array([4, 5]),
                orig_hw=np.array([8, 10]), scale_factor=np.array([0.5, 0.5], np.float32), flipped=index == 1,
                image_id=image_id, index=index, replaced=False)


def test_shapes_dtypes_and_padding():
    samples = [
        _sample([[0, 0, 1, 1], [1, 1, 3, 3]], [2, 0], ignore=[[0, 0, 2, 2]], image_id=11, index=0),
        _sample([], [], image_id=12, index=1),
        _sample([[0, 0, 2, 1]], [1], image_id=-1, index=2),
    ]
    batch = collate(samples, max_boxes=3, max_ignore_boxes=2)
    assert set(batch) == set(EXPECTED)
    for key, (dtype, shape) in EXPECTED.items():
        assert batch[key].dtype == dtype, key
        assert tuple(batch[key].shape) == shape, key
    assert batch["box_valid"].tolist() == [[True, True, False], [False] * 3, [True, False, False]]
    assert batch["labels"].tolist() == [[2, 0, 0], [0, 0, 0], [1, 0, 0]]
    assert torch.equal(batch["boxes"][0, :2], torch.tensor([[0.0, 0, 1, 1], [1, 1, 3, 3]]))
    assert (batch["boxes"][~batch["box_valid"]] == 0).all()
    assert batch["ignore_valid"].tolist() == [[True, False], [False, False], [False, False]]
    assert batch["image_id"].tolist() == [11, 12, -1]
    assert batch["flipped"].tolist() == [False, True, False]
    assert batch["boxes_dropped"].tolist() == [0, 0, 0]
    assert [float(batch["image"][i].mean()) for i in range(3)] == [0.0, 1.0, 2.0]


def _largest_reference(boxes, limit):
    """Keep the `limit` largest by area, ties to the earlier box, in original order (brute force)."""
    areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]
    kept = []
    for _ in range(min(limit, len(boxes))):
        best = None
        for i, a in enumerate(areas):
            if i not in kept and (best is None or a > areas[best]):
                best = i
        kept.append(best)
    return sorted(kept)


def test_more_boxes_than_max_keeps_largest_and_counts():
    gen = np.random.default_rng(0)
    xy = gen.uniform(0, 50, size=(9, 2))
    wh = gen.integers(1, 6, size=(9, 2)).astype(float)  # integer sizes: ties happen
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    labels = np.arange(9)
    batch = collate([_sample(boxes, labels, ignore=boxes[:5])], max_boxes=4, max_ignore_boxes=3)
    expect = _largest_reference(boxes.tolist(), 4)
    assert batch["labels"][0].tolist() == expect  # labels are the original positions
    assert torch.equal(batch["boxes"][0], torch.from_numpy(boxes[expect]))
    assert batch["boxes_dropped"].tolist() == [5]
    assert batch["box_valid"].all()
    expect_ign = _largest_reference(boxes[:5].tolist(), 3)
    assert torch.equal(batch["ignore_boxes"][0], torch.from_numpy(boxes[:5][expect_ign]))


def test_keep_largest_under_limit_keeps_all():
    boxes = np.array([[0, 0, 1, 1], [0, 0, 5, 5]], np.float32)
    assert keep_largest(boxes, 2).tolist() == [0, 1]
    assert keep_largest(boxes, 1).tolist() == [1]


def test_mixed_canvases_refused():
    with pytest.raises(ValueError, match="share a canvas"):
        collate([_sample([], []), _sample([], [], canvas=(6, 4))], 2, 2)


def test_collate_object_is_picklable_and_validates():
    import pickle
    fn = pickle.loads(pickle.dumps(Collate(2, 1)))
    assert fn([_sample([[0, 0, 1, 1]], [0])])["boxes"].shape == (1, 2, 4)
    with pytest.raises(ValueError, match="max_boxes"):
        Collate(0, 1)
