"""The pure train step: the generic engine on a toy objective, and RetinaNet's step built from a config
(purity, accumulation, non-finite handling, clipping, learning)."""

import pytest
import torch

from configs.common import train_config
from retina_fn import precision, rng, tree
from retina_fn.optim import sgd
from retina_fn.train import (build_optimizer, full_params, init_train_state, make_eval_step, make_train_step,
                             new_train_state, step)
from tests.model_fixtures import eval_step_of, settings_of, spec_of, synthetic_batch, tiny_config


def build(cfg, batch_size=4):
    optimizer = build_optimizer(settings_of(cfg))
    state = init_train_state(spec_of(cfg), settings_of(cfg), rng.key(0), optimizer)
    return state, make_train_step(spec_of(cfg), settings_of(cfg), optimizer, steps_per_epoch=100, global_batch=batch_size)


# ---- the generic engine on least squares -----------------------------------------------------------------


class LeastSquares:
    """loss = sum_i (x_i . w + b - y_i)^2 / N with N = the number of rows (prepare's normaliser)."""

    def prepare(self, batch):
        return {}, torch.tensor(float(batch["x"].shape[0]))

    def loss(self, params, batch, extras, normalizer):
        residual = batch["x"] @ params["w"] + params["frozen_b"] - batch["y"]
        loss = (residual ** 2).sum() / normalizer
        return loss, {"loss": loss.detach()}


def toy_problem():
    x = torch.tensor([[1.0, 2.0], [0.0, 1.0], [3.0, -1.0], [2.0, 2.0]], dtype=torch.float64)
    y = torch.tensor([1.0, -1.0, 2.0, 0.5], dtype=torch.float64)
    params = {"w": torch.tensor([0.5, -0.25], dtype=torch.float64)}
    frozen = {"frozen_b": torch.tensor(0.1, dtype=torch.float64)}
    return {"x": x, "y": y}, params, frozen


def toy_state(params, frozen, optimizer):
    return new_train_state(params, frozen, optimizer, rng.key(0), train_config().loss_scale)


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_generic_step_is_a_hand_computed_sgd_step(micro_batches):
    batch, params, frozen = toy_problem()
    lr = 0.05
    train_step = step.make_train_step(LeastSquares(), sgd(), lambda s: torch.tensor(lr, dtype=torch.float64),
                                      micro_batches=micro_batches)
    state = toy_state(params, frozen, sgd())
    new_state, metrics = train_step(state, batch)
    # By hand: r = x w + b - y = (-0.9, 0.85, -0.15, 0.1); grad = 2 x^T r / 4 = (-0.575, -0.3).
    x, y, w, b = batch["x"], batch["y"], params["w"], frozen["frozen_b"]
    r = [float(x[i, 0] * w[0] + x[i, 1] * w[1] + b - y[i]) for i in range(4)]
    assert r == pytest.approx([-0.9, 0.85, -0.15, 0.1])
    grad = [2 * sum(float(x[i, j]) * r[i] for i in range(4)) / 4 for j in range(2)]
    assert grad == pytest.approx([-0.575, -0.3])
    expected_w = [float(w[j]) - lr * grad[j] for j in range(2)]
    assert new_state["params"]["w"].tolist() == pytest.approx(expected_w, rel=1e-12)
    assert float(metrics["loss"]) == pytest.approx(sum(v * v for v in r) / 4, rel=1e-12)
    assert float(metrics["normalizer"]) == 4.0 and float(metrics["finite"]) == 1.0
    assert torch.equal(new_state["frozen"]["frozen_b"], frozen["frozen_b"]) and int(new_state["step"]) == 1


def rows(batch, which):
    return {k: v[which] for k, v in batch.items()}


@pytest.mark.parametrize("reduce_normalizer", [True, False])
def test_accumulating_loader_batches_by_hand(reduce_normalizer):
    """Rows {0} and {1, 2, 3} as two loader batches. 'global' divides every squared residual by the summed
    normaliser 4 (the same as one batch of 4); 'local' averages each batch's own mean: (r0^2 / 1 + (r1^2 +
    r2^2 + r3^2) / 3) / 2, mmdetection's per-GPU normaliser with its cumulative-gradient hook."""
    batch, params, frozen = toy_problem()
    lr = 0.05
    schedule = lambda s: torch.tensor(lr, dtype=torch.float64)  # noqa: E731
    train_step = step.make_train_step(LeastSquares(), sgd(), schedule, reduce_normalizer=reduce_normalizer)
    state = toy_state(params, frozen, sgd())
    new_state, metrics = train_step(state, (rows(batch, slice(0, 1)), rows(batch, slice(1, 4))))
    x, y, w, b = batch["x"], batch["y"], params["w"], frozen["frozen_b"]
    r = [float(x[i, 0] * w[0] + x[i, 1] * w[1] + b - y[i]) for i in range(4)]  # -0.9, 0.85, -0.15, 0.1
    weight = [1 / 4] * 4 if reduce_normalizer else [1 / 2, 1 / 6, 1 / 6, 1 / 6]  # d loss / d (r_i^2)
    grad = [sum(2 * weight[i] * r[i] * float(x[i, j]) for i in range(4)) for j in range(2)]
    expected = [float(w[j]) - lr * grad[j] for j in range(2)]
    assert new_state["params"]["w"].tolist() == pytest.approx(expected, rel=1e-12)
    assert float(metrics["loss"]) == pytest.approx(sum(weight[i] * r[i] ** 2 for i in range(4)), rel=1e-12)
    assert float(metrics["normalizer"]) == 4.0
    if reduce_normalizer:  # the same update as the four rows in one batch
        one, _ = train_step(state, batch)
        torch.testing.assert_close(one["params"]["w"], new_state["params"]["w"], rtol=1e-14, atol=0)


class InPlaceSGD:
    """Plain SGD writing into the parameter tensors it is given (what apex's fused SGD does)."""

    inplace = True

    def __init__(self):
        self.calls = 0

    def init(self, params):
        return {"count": torch.zeros((), dtype=torch.int64)}

    def update(self, grads, opt_state, params, lr):
        self.calls += 1
        with torch.no_grad():
            for p, g in zip(tree.leaves(params), tree.leaves(grads)):
                p.sub_(lr * g)
        return params, {"count": opt_state["count"] + 1}


def test_an_in_place_optimiser_is_not_called_on_a_non_finite_step():
    batch, params, frozen = toy_problem()
    optimizer = InPlaceSGD()
    train_step = step.make_train_step(LeastSquares(), optimizer, lambda s: torch.tensor(0.05, dtype=torch.float64))
    state = toy_state({"w": params["w"].clone()}, frozen, optimizer)
    owned, before = state["params"]["w"], state["params"]["w"].clone()
    bad = dict(batch, y=batch["y"].clone().index_fill_(0, torch.tensor([2]), float("nan")))
    skipped, metrics = train_step(state, bad)
    assert float(metrics["finite"]) == 0.0 and optimizer.calls == 0
    assert skipped["params"]["w"] is owned and torch.equal(owned, before)  # bitwise unchanged, same storage
    assert torch.equal(skipped["opt"]["count"], state["opt"]["count"])
    updated, metrics = train_step(skipped, batch)
    assert float(metrics["finite"]) == 1.0 and optimizer.calls == 1
    assert updated["params"]["w"] is owned and not torch.equal(owned, before)  # written in place
    pure, _ = step.make_train_step(LeastSquares(), sgd(), lambda s: torch.tensor(0.05, dtype=torch.float64))(
        toy_state(params, frozen, sgd()), batch)
    torch.testing.assert_close(owned, pure["params"]["w"], rtol=1e-14, atol=0)


def test_generic_step_skips_a_nan_batch_and_averages_over_replicas():
    batch, params, frozen = toy_problem()
    state = toy_state(params, frozen, sgd())
    halves = []
    train_step = step.make_train_step(LeastSquares(), sgd(), lambda s: torch.tensor(0.1, dtype=torch.float64),
                                      reduce=lambda t: (halves.append(t), tree.map(lambda v: v / 2, t))[1])
    bad = dict(batch, y=batch["y"].clone().index_fill_(0, torch.tensor([2]), float("nan")))
    new_state, metrics = train_step(state, bad)
    assert float(metrics["finite"]) == 0.0 and int(new_state["nonfinite"]) == 1
    assert torch.equal(new_state["params"]["w"], params["w"])
    assert len(halves) == 3  # the normaliser, the gradients and the metrics went through `reduce`


def test_generic_step_checks_its_arguments():
    with pytest.raises(ValueError, match="pass loss_scale"):
        step.make_train_step(LeastSquares(), sgd(), lambda s: s, precision=precision.precision_from_name("fp16"))
    with pytest.raises(ValueError, match="micro_batches=3"):
        step.split_micro_batches({"x": torch.zeros(4, 2)}, 3)
    parts = step.split_micro_batches({"x": torch.arange(4), "y": {"z": torch.arange(8).reshape(4, 2)}}, 2)
    assert parts[1]["x"].tolist() == [2, 3] and parts[1]["y"]["z"].tolist() == [[4, 5], [6, 7]]


# ---- RetinaNet's step from a config ----------------------------------------------------------------------


def test_step_is_pure():
    cfg = tiny_config()
    state, step = build(cfg)
    batch = synthetic_batch()
    state_copy, batch_copy = tree.map(torch.clone, state), {k: v.clone() for k, v in batch.items()}
    new_state, metrics = step(state, batch)
    assert tree.all_equal(state, state_copy)
    assert all(torch.equal(batch[k], batch_copy[k]) for k in batch)
    assert int(new_state["step"]) == 1 and int(state["step"]) == 0
    assert not tree.all_equal(new_state["params"], state["params"])
    assert tree.all_equal(new_state["frozen"], state["frozen"])
    # the same inputs give the same outputs
    again, metrics_again = step(state, batch)
    assert tree.all_equal(again, new_state)
    assert all(torch.equal(metrics[k], metrics_again[k]) for k in metrics)


@pytest.mark.parametrize("split", ["micro_batches", "accumulated"])
def test_two_micro_batches_or_loader_batches_of_two_equal_one_batch_of_four(split):
    # dist.normalizer='global': every loader batch divides by the step's whole normaliser, so two accumulated
    # halves are one batch of four ('local' divides each half by its own: the next test).
    batch = synthetic_batch(num_boxes=(0, 2, 5, 1))
    halves = ({k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()})
    one = tiny_config()
    one.optim.weight_decay = 1e-4
    two = tiny_config()
    two.optim.weight_decay = 1e-4
    two.dist.normalizer = one.dist.normalizer = "global"
    if split == "micro_batches":
        two.optim.micro_batches = 2
    s1, step1 = build(one)
    s2, step2 = build(two)
    for i in range(2):
        s1, m1 = step1(s1, batch)
        s2, m2 = step2(s2, batch if split == "micro_batches" else halves)
        assert torch.allclose(m1["loss"], m2["loss"], rtol=1e-5)
    for path, a in tree.flatten_by_path(s1["params"]).items():
        b = tree.flatten_by_path(s2["params"])[path]
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), path


def test_with_the_local_normaliser_accumulation_averages_each_batchs_own_loss():
    # mmdetection 2.9's cumulative-gradient hook: each loader batch's loss divided by its own normaliser, the
    # update the mean over the batches (what k replicas with dist.normalizer='local' average).
    batch = synthetic_batch(num_boxes=(0, 2, 5, 1))
    halves = ({k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()})
    cfg = tiny_config()
    assert cfg.dist.normalizer == "local"
    state, step = build(cfg)
    _, accumulated = step(state, halves)
    own = [step(state, half)[1]["loss"] for half in halves]
    assert torch.allclose(accumulated["loss"], (own[0] + own[1]) / 2, rtol=1e-6)
    assert not torch.allclose(own[0], own[1])  # the halves differ, so the mean is a real check


def test_an_inf_gradient_skips_the_update_and_halves_the_loss_scale():
    cfg = tiny_config()
    cfg.train.precision = "fp16"
    state, step = build(cfg)
    batch = synthetic_batch()
    batch["image"][1, 0, 3, 3] = float("inf")
    new_state, metrics = step(state, batch)
    assert float(metrics["finite"]) == 0.0
    assert tree.all_equal(new_state["params"], state["params"])
    assert tree.all_equal(new_state["opt"], state["opt"])
    assert float(new_state["loss_scale"].scale) == float(state["loss_scale"].scale) / 2
    assert int(new_state["nonfinite"]) == 1 and int(new_state["step"]) == 1
    # a clean step afterwards updates again and resets the streak
    clean = synthetic_batch()
    after, metrics = step(new_state, clean)
    assert float(metrics["finite"]) == 1.0 and int(after["nonfinite"]) == 0
    assert not tree.all_equal(after["params"], new_state["params"])


def test_nonfinite_loss_in_fp32_never_touches_parameters():
    cfg = tiny_config()
    state, step = build(cfg)
    batch = synthetic_batch()
    batch["image"][0] = float("nan")
    new_state, metrics = step(state, batch)
    assert not torch.isfinite(metrics["loss_cls"])
    assert tree.all_equal(new_state["params"], state["params"]) and int(new_state["nonfinite"]) == 1


def test_clipping_bounds_the_update():
    cfg = tiny_config()
    cfg.optim.momentum = 0.0
    cfg.optim.weight_decay = 0.0
    cfg.optim.clip_norm = 1e-3
    state, step = build(cfg)
    new_state, metrics = step(state, synthetic_batch())
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
        state, metrics = step(state, batch)
        first = float(metrics["loss"]) if first is None else first
    assert float(metrics["loss"]) < 0.9 * first


def test_eval_step_returns_fixed_size_detections():
    cfg = tiny_config()
    state, _ = build(cfg)
    dets = eval_step_of(cfg)(full_params(state), synthetic_batch())
    assert dets.boxes.shape == (4, cfg.model.test.max_per_img, 4)
    assert dets.valid.dtype == torch.bool and dets.scores.shape == dets.labels.shape == (4, 100)
