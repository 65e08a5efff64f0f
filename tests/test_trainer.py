"""The training loop's bookkeeping: the schedule follows the epochs the run takes."""

import json

import pytest

from experiments import trainer
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
