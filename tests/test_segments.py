"""A run's segments and its totals, against sums worked out by hand."""

import pytest

from retina_fn.engine import resume as segments


def seg(start, end, world, accum, train_s, wall_s, images, seconds):
    return segments.record(start_step=start, end_step=end, world_size=world, accum_steps=accum, global_batch=4,
                           train_s=train_s, wall_s=wall_s, measured_images=images, measured_s=seconds)


def test_the_whole_run_is_the_sum_of_its_segments():
    run = [seg(0, 4, 2, 1, 10.0, 15.0, 8, 2.0), seg(4, 10, 1, 2, 30.0, 32.5, 16, 8.0)]
    assert run[0]["images_per_s"] == 4.0 and run[1]["images_per_s"] == 2.0
    totals = segments.whole_run(run)
    # 24 measured images in 10 measured seconds: not the mean of the two rates (3.0)
    assert totals == {"train_s": 40.0, "wall_s": 47.5, "train_images_per_s": pytest.approx(2.4), "segments": 2}


def test_nothing_measured_is_zero_images_per_second():
    assert seg(3, 4, 1, 1, 0.5, 1.0, 0, 0.0)["images_per_s"] == 0.0
    assert segments.whole_run([seg(3, 4, 1, 1, 0.5, 1.0, 0, 0.0)])["train_images_per_s"] == 0.0


def test_earlier_segments_come_from_the_checkpoint_metadata():
    stored = [seg(0, 4, 2, 1, 10.0, 15.0, 8, 2.0)]
    assert segments.earlier_segments({"segments": stored}) == stored
    assert segments.earlier_segments({"world_size": 2}) == [] and segments.earlier_segments(None) == []


def test_describe_names_steps_processes_and_accumulation():
    text = segments.describe([seg(0, 4, 2, 1, 10.0, 15.0, 8, 2.0), seg(4, 10, 1, 2, 30.0, 32.5, 16, 8.0)])
    assert text.splitlines()[1] == ("  segment 2: steps 4..10 on 1 process(es) x accum 2 (global batch 4): 30.0 s "
                                    "training, 32.5 s wall, 2.0 img/s")
