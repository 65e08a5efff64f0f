"""The run's global batch across restarts: kept from the checkpoint, the accumulation derived for the processes
present, refusals that name what would work. Each expectation is worked out by hand in the test."""

import pytest

from configs import common
from retina_fn.engine import global_batch
from retina_fn.engine.global_batch import BatchPlan, GlobalBatchError


def cfg_with(images_per_device=2, accum_steps=1, configured=None):
    return common.override(common.base_config(), **{"data.images_per_device": images_per_device,
                                                     "optim.accum_steps": accum_steps,
                                                     "optim.global_batch": configured})


def meta(global_batch, world_size=2):
    return {"global_batch": global_batch, "world_size": world_size}


def test_first_start_fixes_images_per_device_times_processes_times_accumulation():
    assert global_batch.plan(cfg_with(2, 3), 4) == BatchPlan(24, 2, 4, 3)
    assert global_batch.plan(cfg_with(2, "auto"), 4) == BatchPlan(8, 2, 4, 1)  # auto alone: no accumulation
    assert global_batch.plan(cfg_with(2, "auto", 16), 4) == BatchPlan(16, 2, 4, 2)


@pytest.mark.parametrize("world, accum", [(1, 8), (2, 4), (4, 2), (8, 1)])
def test_auto_keeps_the_checkpoints_global_batch_on_any_dividing_world(world, accum):
    assert global_batch.plan(cfg_with(2, "auto"), world, meta(16), "ckpt") == BatchPlan(16, 2, world, accum)


def test_an_explicit_accumulation_must_make_the_checkpoints_global_batch():
    assert global_batch.plan(cfg_with(2, 2), 1, meta(4), "ckpt") == BatchPlan(4, 2, 1, 2)
    with pytest.raises(GlobalBatchError) as refused:
        global_batch.plan(cfg_with(2, 2), 2, meta(4, world_size=1), "run/ckpt_000000002.pt")
    message = str(refused.value)
    assert "run/ckpt_000000002.pt was trained with a global batch of 4 images per step (1 process(es))" in message
    assert "this run has 8 (2 per device x 2 x optim.accum_steps=2)" in message
    assert "--config.optim.accum_steps=1 (or =auto)" in message
    assert "\n" not in message


def test_an_indivisible_global_batch_names_the_counts_and_what_would_work():
    """6 images per step cannot be made by 2 processes x 2 images (6 is not a multiple of 4). With 2 images per
    device: 1 or 3 processes (accumulating 3, 1); with 2 processes: 1 or 3 images per device (accumulating 3, 1)."""
    with pytest.raises(GlobalBatchError) as refused:
        global_batch.plan(cfg_with(2, "auto"), 2, meta(6, world_size=3), "run/ckpt_000000004.pt")
    message = str(refused.value)
    assert message.startswith("run/ckpt_000000004.pt was trained with a global batch of 6 images per step "
                              "(3 process(es)), which 2 process(es) x 2 image(s) per device cannot make (6 is not a "
                              "multiple of 4)")
    assert "with 2 image(s) per device run 1 or 3 process(es) (accum_steps 3, 1)" in message
    assert "with 2 process(es) set --config.data.images_per_device to 1 or 3 (accum_steps 3, 1)" in message
    assert "\n" not in message


def test_a_world_that_no_images_per_device_fits_says_so():
    """5 images per step on 2 processes: 5 is odd, so no images per device works with 2 processes; with 1 image
    per device, 1 or 5 processes."""
    with pytest.raises(GlobalBatchError) as refused:
        global_batch.plan(cfg_with(1, "auto", 5), 2)
    message = str(refused.value)
    assert message.startswith("optim.global_batch=5, which 2 process(es) x 1 image(s) per device cannot make")
    assert "with 1 image(s) per device run 1 or 5 process(es) (accum_steps 5, 1)" in message
    assert "no images per device works with 2 processes" in message


def test_a_configured_global_batch_cannot_change_a_running_run():
    with pytest.raises(GlobalBatchError, match="a run keeps its global batch"):
        global_batch.plan(cfg_with(2, "auto", 32), 2, meta(16), "ckpt")
    assert global_batch.plan(cfg_with(2, "auto", 16), 2, meta(16), "ckpt").accum_steps == 4


def test_checkpoints_from_before_the_field_count_images_per_device_times_processes():
    old = {"world_size": 4, "config": {"data": {"images_per_device": 2}}}
    assert global_batch.stored_global_batch(old, images_per_device=8) == 8
    assert global_batch.stored_global_batch({"world_size": 4}, images_per_device=3) == 12
    assert global_batch.plan(cfg_with(2, "auto"), 1, old, "ckpt").accum_steps == 4


@pytest.mark.parametrize("value", [0, -1, "two", 1.5, True])
def test_malformed_accumulation_is_refused(value):
    with pytest.raises(ValueError, match="optim.accum_steps must be an int >= 1 or 'auto'"):
        global_batch.plan(cfg_with(2, value), 1)
