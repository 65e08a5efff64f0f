"""retina_fn.data.random_batch.config_batch: a config's batch padded as its loader pads."""

from configs import smoke
from retina_fn.data.random_batch import config_batch


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
