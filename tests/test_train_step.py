"""The pure train step: purity, accumulation, non-finite handling, clipping, learning."""

import pytest
import torch

from retina_fn import rng, tree
from retina_fn.train import full_params, init_train_state, make_eval_step, make_train_step
from tests.model_fixtures import synthetic_batch, tiny_config


def build(cfg, batch_size=4):
    state = init_train_state(cfg, rng.key(0))
    return state, make_train_step(cfg, steps_per_epoch=100, global_batch=batch_size)


def test_step_is_pure():
    cfg = tiny_config()
    state, step = build(cfg)
    batch = synthetic_batch()
    state_copy, batch_copy = tree.map(torch.clone, state), {k: v.clone() for k, v in batch.items()}
    new_state, metrics = step(state, batch, rng.key(1))
    assert tree.all_equal(state, state_copy)
    assert all(torch.equal(batch[k], batch_copy[k]) for k in batch)
    assert int(new_state["step"]) == 1 and int(state["step"]) == 0
    assert not tree.all_equal(new_state["params"], state["params"])
    assert tree.all_equal(new_state["frozen"], state["frozen"])
    # the same inputs give the same outputs
    again, metrics_again = step(state, batch, rng.key(1))
    assert tree.all_equal(again, new_state)
    assert all(torch.equal(metrics[k], metrics_again[k]) for k in metrics)


def test_two_micro_batches_of_two_equal_one_batch_of_four():
    batch = synthetic_batch(num_boxes=(0, 2, 5, 1))
    one = tiny_config()
    one.optim.weight_decay = 1e-4
    two = tiny_config()
    two.optim.weight_decay = 1e-4
    two.optim.accum_steps = 2
    s1, step1 = build(one)
    s2, step2 = build(two)
    for i in range(2):
        s1, m1 = step1(s1, batch, rng.key(i))
        s2, m2 = step2(s2, batch, rng.key(i))
        assert torch.allclose(m1["loss"], m2["loss"], rtol=1e-5)
    for path, a in tree.flatten_by_path(s1["params"]).items():
        b = tree.flatten_by_path(s2["params"])[path]
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), path


def test_an_inf_gradient_skips_the_update_and_halves_the_loss_scale():
    cfg = tiny_config()
    cfg.train.precision = "fp16"
    state, step = build(cfg)
    batch = synthetic_batch()
    batch["image"][1, 0, 3, 3] = float("inf")
    new_state, metrics = step(state, batch, rng.key(0))
    assert float(metrics["finite"]) == 0.0
    assert tree.all_equal(new_state["params"], state["params"])
    assert tree.all_equal(new_state["opt"], state["opt"])
    assert float(new_state["loss_scale"].scale) == float(state["loss_scale"].scale) / 2
    assert int(new_state["nonfinite"]) == 1 and int(new_state["step"]) == 1
    # a clean step afterwards updates again and resets the streak
    clean = synthetic_batch()
    after, metrics = step(new_state, clean, rng.key(1))
    assert float(metrics["finite"]) == 1.0 and int(after["nonfinite"]) == 0
    assert not tree.all_equal(after["params"], new_state["params"])


def test_nonfinite_loss_in_fp32_never_touches_parameters():
    cfg = tiny_config()
    state, step = build(cfg)
    batch = synthetic_batch()
    batch["image"][0] = float("nan")
    new_state, metrics = step(state, batch, rng.key(0))
    assert not torch.isfinite(metrics["loss_cls"])
    assert tree.all_equal(new_state["params"], state["params"]) and int(new_state["nonfinite"]) == 1


def test_clipping_bounds_the_update():
    cfg = tiny_config()
    cfg.optim.momentum = 0.0
    cfg.optim.weight_decay = 0.0
    cfg.optim.clip_norm = 1e-3
    state, step = build(cfg)
    new_state, metrics = step(state, synthetic_batch(), rng.key(0))
    assert float(metrics["grad_norm"]) > 1e-3  # the reported norm is before clipping
    update = tree.map(lambda a, b: (a - b) / float(metrics["lr"]), new_state["params"], state["params"])
    assert float(tree.global_norm(update)) == pytest.approx(1e-3, rel=1e-3)


def test_twenty_steps_lower_the_loss():
    cfg = tiny_config()
    cfg.optim.lr = 0.02
    state, step = build(cfg)
    batch = synthetic_batch(num_boxes=(2, 3, 1, 4), seed=3)
    first = None
    for i in range(20):
        state, metrics = step(state, batch, rng.key(i))
        first = float(metrics["loss"]) if first is None else first
    assert float(metrics["loss"]) < 0.9 * first


def test_eval_step_returns_fixed_size_detections():
    cfg = tiny_config()
    state, _ = build(cfg)
    dets = make_eval_step(cfg)(full_params(state), synthetic_batch())
    assert dets.boxes.shape == (4, cfg.model.test.max_per_img, 4)
    assert dets.valid.dtype == torch.bool and dets.scores.shape == dets.labels.shape == (4, 100)
