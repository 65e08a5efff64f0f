"""The training loop's bookkeeping: the schedule follows the epochs the run takes."""

import json
import os

import pytest

from retina_fn.engine import trainer
from tests.test_experiment import smoke_config


def test_performance_steps_keep_the_schedule_on_the_epochs_taken(tmp_path):
    """train.performance_steps=2 over 3 epochs with step decays after epochs 1 and 2: the lr of steps 1-2,
    3-4 and 5-6 is base, base/10 and base/100 (the schedule's epochs are the 2-step epochs the run takes, not
    the loader's full epochs)."""
    cfg = smoke_config(tmp_path / "data", **{
        "optim.name": "sgd", "optim.lr": 0.01, "optim.schedule": "step", "optim.step_epochs": (1, 2),
        "optim.epochs": 3, "optim.warmup_iters": 0, "train.performance_steps": 2, "train.log_every": 1,
        "train.validate": False})
    results = trainer.train_and_evaluate(cfg, str(tmp_path / "run"))
    assert results["steps"] == 6
    lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    lrs = [r["lr"] for r in lines if r["kind"] == "train"]
    assert lrs == pytest.approx([0.01, 0.01, 0.001, 0.001, 0.0001, 0.0001], rel=1e-6)


def test_a_resumed_run_reports_the_whole_run_and_each_of_its_segments(tmp_path):
    """3 steps, then (a second start: train.max_steps raised) 3 more. results.json reports both segments (steps,
    processes, accumulation, seconds, images/s), the whole run as their sums, and the seed's closing lines say
    the same; the first segment is what the first start reported, carried in the checkpoint's metadata. The first
    start also checkpoints by time (train.checkpoint_every_s far below a step's time: after every step), the second
    only at its end."""
    from retina_fn.engine import reporting
    from retina_fn import checkpoint

    settings = {"train.validate": False, "data.images_per_device": 2, "optim.epochs": 1, "data.workers": 0}
    workdir = tmp_path / "run"

    def saved_steps():
        return [int(os.path.basename(p)[5:14]) for p in checkpoint.list_checkpoints(str(workdir / "checkpoints"))]

    first = trainer.train_and_evaluate(
        smoke_config(tmp_path / "data", **settings, **{"train.max_steps": 3, "train.checkpoint_every_s": 1e-9}),
        str(workdir))
    assert saved_steps() == [3, 2, 1]
    carried = checkpoint.restore_latest(str(workdir / "checkpoints")).meta["segments"]
    trainer.train_and_evaluate(smoke_config(tmp_path / "data", **settings, **{"train.max_steps": 6}), str(workdir))
    assert saved_steps() == [6, 3, 2]
    results = json.load(open(workdir / "results.json"))
    one, two = results["segments"]
    assert (one["start_step"], one["end_step"], two["start_step"], two["end_step"]) == (0, 3, 3, 6)
    for segment in (one, two):
        assert (segment["world_size"], segment["accum_steps"], segment["global_batch"]) == (1, 1, 2)
        # 2 warm-up steps of the segment's first epoch are not measured: 1 step of 2 images is
        assert segment["measured_images"] == 2 and segment["images_per_s"] == segment["measured_images"] / segment[
            "measured_s"]
    # the first segment as its checkpoint recorded it, at the save of step 3 (the first start's own results, written
    # after that save, also count the save's seconds in its measured window and wall time)
    assert carried == [one]
    assert one["train_s"] == first["train_s"] and one["measured_images"] == first["segments"][0]["measured_images"]
    assert one["wall_s"] <= first["wall_s"]

    images_per_s = (one["measured_images"] + two["measured_images"]) / (one["measured_s"] + two["measured_s"])
    wall_s = one["wall_s"] + two["wall_s"]
    assert results["train_s"] == pytest.approx(one["train_s"] + two["train_s"], rel=1e-12)
    assert results["wall_s"] == pytest.approx(wall_s, rel=1e-12)
    assert results["train_images_per_s"] == pytest.approx(images_per_s, rel=1e-12)
    assert results["steps"] == 6 and results["world_size"] == 1
    assert reporting.seed_closing_lines(results) == [f"Final Performance images/sec : {images_per_s:.2f}",
                                                     "Final Train Accuracy : (not evaluated)",
                                                     f"E2E Training Duration sec : {round(wall_s)}"]
    stored = checkpoint.restore_latest(str(workdir / "checkpoints")).meta
    assert stored["segments"][0] == one and stored["segments"][1]["end_step"] == 6
    assert (stored["global_batch"], stored["accum_steps"], stored["world_size"]) == (2, 1, 1)
