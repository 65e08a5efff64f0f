"""experiments.benchmark.assign_buckets and loader_speed: what they report (their speeds are not checked)."""

import torch

from configs import smoke
from experiments.benchmark import assign_buckets, loader_speed
from tests.model_fixtures import tiny_config


def test_assignment_timed_for_max_boxes_and_each_bucket_that_holds_the_boxes():
    cfg = tiny_config(canvas=(64, 96))
    cfg.data.box_buckets = (2, 4, 8, 64)
    result = assign_buckets.measure_assignment(cfg, batch=2, canvas=(64, 96), boxes=[3, 1], iters=1, warmup=0,
                                               device=torch.device("cpu"))
    assert [r["g"] for r in result["rows"]] == [100, 4, 8, 64]  # 2 cannot hold 3 boxes
    assert all(r["identical"] for r in result["rows"]) and result["rows"][0]["speedup"] == 1.0
    assert result["boxes"] == [3, 1] and result["anchors"] > 0
    assert "identical" in assign_buckets.format_table(result)


def test_loader_speed_reports_both_canvas_dtypes():
    cfg = smoke.get_config()
    result = loader_speed.measure_loader_speed(cfg, batch=2, workers=[0], iters=1, warmup=1, image_size=64,
                                               stage_images=4)
    rows = {r["canvas_dtype"]: r for r in result["loader"]}
    assert set(rows) == {"float32", "uint8"} and all(r["workers"] == 0 and r["images_per_s"] > 0 for r in rows.values())
    assert rows["float32"]["canvas_mb"] == 4 * rows["uint8"]["canvas_mb"]
    for name in ("float32", "uint8"):
        stage = result["stages"][name]
        assert stage["total_ms"] > stage["transform_ms"] > 0
        assert (stage["pin_ms"] is None) == (not torch.cuda.is_available())
    assert "img/s" in loader_speed.format_table(result)
