"""retina_fn.data.random_batch: batches in the conventions' layout, and a config's batch padded as its loader
pads (config_batch)."""

import torch

from configs import smoke
from retina_fn import tree
from retina_fn.data.random_batch import config_batch, random_batch
from tests.model_fixtures import tiny_config


def test_a_random_batch_follows_the_conventions():
    cfg = tiny_config()

    def build(seed):
        return random_batch(batch_size=3, canvas=(256, 384), max_boxes=8, max_ignore_boxes=cfg.data.max_ignore_boxes,
                            num_classes=cfg.model.num_classes, seed=seed, device=torch.device("cpu"))

    b = build(1)
    assert b["image"].shape == (3, 3, 256, 384) and b["boxes"].shape == (3, 8, 4)
    assert b["ignore_boxes"].shape == (3, cfg.data.max_ignore_boxes, 4) and not bool(b["ignore_valid"].any())
    counts = b["box_valid"].sum(1)
    assert bool(((counts >= 3) & (counts <= 6)).all())
    real = b["boxes"][b["box_valid"]]
    assert bool((real[:, 2:] > real[:, :2]).all()) and bool((real[:, 2] <= 384).all() & (real[:, 3] <= 256).all())
    assert bool((b["boxes"][~b["box_valid"]] == 0).all()) and int(b["labels"].max()) < cfg.model.num_classes
    assert tree.all_equal(b, build(1)) and not torch.equal(b["image"], build(2)["image"])


def test_the_batch_is_padded_to_its_box_bucket():
    cfg = smoke.get_config()
    cfg.data.images_per_device = 3
    cfg.data.landscape_canvas = (64, 96)
    cfg.data.box_buckets = ()
    plain = config_batch(cfg, 3)
    assert plain["boxes"].shape == (3, cfg.data.max_boxes, 4) and plain["image"].shape == (3, 3, 64, 96)
    cfg.data.box_buckets = (8, 16, 32, 64)
    bucketed = config_batch(cfg, 3)
    counts = bucketed["box_valid"].sum(1)
    assert counts.tolist() == plain["box_valid"].sum(1).tolist() and 3 <= int(counts.max()) <= 6
    assert bucketed["boxes"].shape == (3, 8, 4)  # the smallest bucket holding 6 boxes
