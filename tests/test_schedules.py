"""Learning-rate schedules: hand-computed values of mmdetection's 1x schedule, scaling rule, cosine."""

from __future__ import annotations

import math

import pytest
import torch

from configs.common import optim_config
from retina_fn.optim import base_learning_rate, make_lr_schedule


def lr_at(schedule, step: int) -> float:
    value = schedule(torch.tensor(step, dtype=torch.int64))
    assert value.dtype == torch.float32 and value.shape == ()
    return float(value)


@pytest.fixture
def one_x():
    """mmdetection 1x at the reference batch: base lr 0.01, 1000 steps per epoch."""
    return make_lr_schedule(optim_config(), steps_per_epoch=1000, global_batch=16)


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 1e-5),  # 0.01 * 0.001
        (1, 0.01 * (0.001 + 0.999 / 500)),  # 1.998e-5 + 1e-5
        (250, 0.005005),  # 0.01 * (1 - 0.5 * 0.999)
        (499, 0.00998002),  # 0.01 * (1 - 0.002 * 0.999)
        (500, 0.01),
        (501, 0.01),
    ],
)
def test_linear_warmup(one_x, step, expected):
    assert lr_at(one_x, step) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "step, expected",
    [
        (999, 0.01),
        (1000, 0.01),  # epoch 1
        (7999, 0.01),  # last step of epoch 7
        (8000, 0.001),  # first step of epoch 8
        (8001, 0.001),
        (10999, 0.001),
        (11000, 0.0001),  # first step of epoch 11
        (11999, 0.0001),  # last step of training
        (50000, 0.0001),  # beyond the end: stays at the last value
    ],
)
def test_step_decay_at_epoch_boundaries(one_x, step, expected):
    assert lr_at(one_x, step) == pytest.approx(expected, rel=1e-6)


def test_warmup_multiplies_the_decayed_rate():
    """mmcv applies the warmup factor to the regular (already decayed) lr."""
    cfg = optim_config()
    cfg.step_epochs = (2,)
    schedule = make_lr_schedule(cfg, steps_per_epoch=100, global_batch=16)
    assert lr_at(schedule, 199) == pytest.approx(0.01 * (0.001 + 0.999 * 199 / 500), rel=1e-6)
    assert lr_at(schedule, 250) == pytest.approx(0.001 * 0.5005, rel=1e-6)


def test_no_warmup():
    cfg = optim_config()
    cfg.warmup_iters = 0
    assert lr_at(make_lr_schedule(cfg, 1000, 16), 0) == pytest.approx(0.01, rel=1e-6)


@pytest.mark.parametrize("global_batch, expected", [(16, 0.01), (2, 0.00125), (8, 0.005), (64, 0.04)])
def test_linear_scaling_rule(global_batch, expected):
    cfg = optim_config()
    assert base_learning_rate(cfg, global_batch) == pytest.approx(expected)
    cfg.warmup_iters = 0
    assert lr_at(make_lr_schedule(cfg, 100, global_batch), 0) == pytest.approx(expected, rel=1e-6)


def test_explicit_lr_wins_over_the_scaling_rule():
    cfg = optim_config()
    cfg.lr = 0.04  # the Ascend single-device run: 8 images, lr 0.04
    assert base_learning_rate(cfg, 8) == 0.04
    schedule = make_lr_schedule(cfg, 1000, 8)
    assert lr_at(schedule, 500) == pytest.approx(0.04, rel=1e-6)
    assert lr_at(schedule, 0) == pytest.approx(0.04 * 0.001, rel=1e-6)


def test_cosine_falls_to_zero_over_training():
    cfg = optim_config()
    cfg.schedule = "cosine"
    cfg.warmup_iters = 0
    cfg.epochs = 4
    schedule = make_lr_schedule(cfg, steps_per_epoch=100, global_batch=16)  # 400 steps
    assert lr_at(schedule, 0) == pytest.approx(0.01, rel=1e-6)
    assert lr_at(schedule, 100) == pytest.approx(0.01 * (1 + math.sqrt(0.5)) / 2, rel=1e-6)
    assert lr_at(schedule, 200) == pytest.approx(0.005, rel=1e-6)
    assert lr_at(schedule, 400) == pytest.approx(0.0, abs=1e-9)
    assert lr_at(schedule, 600) == pytest.approx(0.0, abs=1e-9)


def test_cosine_with_warmup():
    cfg = optim_config()
    cfg.schedule = "cosine"
    cfg.epochs = 10
    schedule = make_lr_schedule(cfg, steps_per_epoch=100, global_batch=16)  # 1000 steps
    regular = 0.01 * (1 + math.cos(math.pi * 250 / 1000)) / 2
    assert lr_at(schedule, 250) == pytest.approx(regular * 0.5005, rel=1e-6)


def test_bad_sizes_are_named():
    with pytest.raises(ValueError, match="steps_per_epoch"):
        make_lr_schedule(optim_config(), 0, 16)
    with pytest.raises(ValueError, match="global batch"):
        make_lr_schedule(optim_config(), 10, 0)
