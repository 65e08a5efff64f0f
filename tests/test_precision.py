"""Precision settings, autocast dtypes, loss-scale transitions, overflow checks and the skip-step pieces."""

from __future__ import annotations


import pytest
import torch

from configs.common import train_config
from retina_fn import tree
from retina_fn.optim import sgd
from retina_fn.precision import (
    LossScaleState,
    autocast,
    init_loss_scale,
    LossScaleSettings,
    make_overflow_check,
    precision_from_name,
    scale_loss,
    select_tree,
    unscale_grads,
    update_loss_scale,
)

FINITE = torch.tensor(True)
OVERFLOW = torch.tensor(False)


def loss_scale_cfg(**overrides):
    fields = dict(train_config().loss_scale)
    fields.update(overrides)
    return LossScaleSettings(**fields)


# ---- settings -------------------------------------------------------------------------------------------


def test_precision_names():
    assert precision_from_name("fp32") == ("fp32", None, False)
    assert precision_from_name("fp16") == ("fp16", torch.float16, True)
    assert precision_from_name("bf16") == ("bf16", torch.bfloat16, False)
    with pytest.raises(ValueError, match="precision must be one of"):
        precision_from_name("fp8")


@pytest.mark.parametrize("name, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)])
def test_autocast_runs_matmul_and_conv_in_the_compute_dtype_on_cpu(name, dtype):
    x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
    a, b = torch.randn(4, 5), torch.randn(5, 6)
    with autocast(precision_from_name(name), "cpu"):
        assert (a @ b).dtype == dtype
        assert torch.nn.functional.conv2d(x, w).dtype == dtype
        assert torch.softmax(a, dim=-1).dtype == torch.float32  # kept in fp32 by autocast's lists
    assert (a @ b).dtype == torch.float32  # the context ends


# ---- loss scaling ---------------------------------------------------------------------------------------


def test_init_loss_scale_from_config():
    state = init_loss_scale(loss_scale_cfg())
    assert state.scale.dtype == torch.float32 and float(state.scale) == 65536.0
    assert state.good_steps.dtype == torch.int64 and int(state.good_steps) == 0


def test_overflow_halves_the_scale_and_resets_the_count():
    cfg = loss_scale_cfg()
    state = LossScaleState(torch.tensor(1024.0), torch.tensor(17))
    after = update_loss_scale(state, OVERFLOW, cfg)
    assert float(after.scale) == 512.0 and int(after.good_steps) == 0


def test_scale_doubles_after_growth_interval_clean_steps():
    cfg = loss_scale_cfg()  # growth_interval 2000, factor 2
    state = init_loss_scale(cfg)
    for _ in range(1999):
        state = update_loss_scale(state, FINITE, cfg)
    assert float(state.scale) == 65536.0 and int(state.good_steps) == 1999
    state = update_loss_scale(state, FINITE, cfg)
    assert float(state.scale) == 131072.0 and int(state.good_steps) == 0


def test_an_overflow_restarts_the_growth_count():
    cfg = loss_scale_cfg(growth_interval=3, factor=4.0)
    state = init_loss_scale(loss_scale_cfg(init=8.0))
    for finite in (True, True, False, True, True):
        state = update_loss_scale(state, torch.tensor(finite), cfg)
    assert float(state.scale) == 2.0 and int(state.good_steps) == 2  # 8 / 4, not yet grown again
    state = update_loss_scale(state, FINITE, cfg)
    assert float(state.scale) == 8.0 and int(state.good_steps) == 0


def test_scale_never_drops_below_one():
    cfg = loss_scale_cfg()
    state = LossScaleState(torch.tensor(1.5), torch.tensor(0))
    state = update_loss_scale(state, OVERFLOW, cfg)
    assert float(state.scale) == 1.0
    state = update_loss_scale(state, OVERFLOW, cfg)
    assert float(state.scale) == 1.0


def test_static_scale_never_changes():
    cfg = loss_scale_cfg(init=64.0, dynamic=False, growth_interval=1)  # the Ascend port's static 64
    state = init_loss_scale(cfg)
    for finite in (False, True, True, False):
        state = update_loss_scale(state, torch.tensor(finite), cfg)
    assert float(state.scale) == 64.0 and int(state.good_steps) == 0


def test_scale_and_unscale():
    state = init_loss_scale(loss_scale_cfg(init=64.0))
    assert float(scale_loss(torch.tensor(0.5), state)) == 32.0
    grads = {"a": torch.tensor([64.0, -128.0]), "b": torch.tensor([6.4], dtype=torch.float16)}
    out = unscale_grads(grads, state)
    assert torch.equal(out["a"], torch.tensor([1.0, -2.0]))
    assert out["b"].dtype == torch.float16 and float(out["b"]) == pytest.approx(0.1, rel=1e-3)
    assert torch.equal(grads["a"], torch.tensor([64.0, -128.0]))  # inputs untouched


def test_unscale_fp16_grads_with_a_scale_beyond_fp16_range():
    state = LossScaleState(torch.tensor(2.0**26), torch.tensor(0))  # 2**-26 is below fp16's smallest value
    out = unscale_grads({"g": torch.tensor([1024.0], dtype=torch.float16)}, state)
    assert out["g"].dtype == torch.float16 and float(out["g"]) == 2.0**-16
    half_loss = torch.tensor(2.0, dtype=torch.float16)
    assert float(scale_loss(half_loss, init_loss_scale(loss_scale_cfg()))) == 131072.0  # not inf


# ---- overflow checks ------------------------------------------------------------------------------------


def grads_with(value: float, dtype=torch.float32) -> dict:
    return {"w": torch.tensor([[0.5, -1.0], [2.0, 3.0]]), "b": torch.tensor([0.25, value], dtype=dtype)}


@pytest.mark.parametrize(
    "value, finite",
    [(1.0, True), (65504.0, True), (float("inf"), False), (float("-inf"), False), (float("nan"), False)],
)
def test_isfinite_check(value, finite):
    check = make_overflow_check("isfinite")
    assert bool(check(grads_with(value), torch.tensor(1.0))) is finite


@pytest.mark.parametrize(
    "scaled_value, usable",
    [
        (65472.0, True),  # the largest fp16 value below the maximum: a real gradient
        (65504.0, False),  # fp16 maximum: what a saturated overflow looks like on 910A
        (-65504.0, False),
        (float("inf"), False),
        (float("nan"), False),
    ],
)
@pytest.mark.parametrize("scale", [1.0, 64.0, 65536.0])
def test_saturation_check_on_unscaled_grads(scaled_value, usable, scale):
    """The check sees gradients after unscaling and multiplies them back by the scale."""
    scaled = tree.map(lambda g: g.float(), grads_with(scaled_value, dtype=torch.float16))  # fp16-origin grads
    state = LossScaleState(torch.tensor(scale), torch.tensor(0))
    unscaled = unscale_grads(scaled, state)
    assert bool(make_overflow_check("saturation")(unscaled, state.scale)) is usable


def test_saturation_check_handles_fp16_leaves():
    check = make_overflow_check("saturation")
    assert bool(check(grads_with(65504.0, dtype=torch.float16), None)) is False
    assert bool(check(grads_with(100.0, dtype=torch.float16), None)) is True


def test_custom_overflow_check_is_used_as_given():
    calls = []

    def hook(grads, scale):
        calls.append(scale)
        return torch.tensor(False)

    check = make_overflow_check(hook)
    assert bool(check(grads_with(1.0), torch.tensor(2.0))) is False and len(calls) == 1
    with pytest.raises(ValueError, match="overflow check must be one of"):
        make_overflow_check("sometimes")


def test_npu_is_not_resolved_by_the_engine():
    with pytest.raises(ValueError, match="retina_fn.accel.npu_flag_check"):
        make_overflow_check("npu")


# ---- the skip step --------------------------------------------------------------------------------------


def test_select_tree_picks_by_a_tensor_predicate():
    a = {"x": torch.tensor([1.0, 2.0]), "y": {"z": torch.tensor(3)}}
    b = {"x": torch.tensor([5.0, 6.0]), "y": {"z": torch.tensor(7)}}
    assert tree.all_equal(select_tree(torch.tensor(True), a, b), a)
    assert tree.all_equal(select_tree(torch.tensor(False), a, b), b)


@pytest.mark.slow
def test_compiled_skip_step_keeps_state_on_overflow_and_matches_eager():
    """unscale -> check -> update -> select -> new loss scale, compiled with fullgraph=True."""
    cfg = loss_scale_cfg(growth_interval=2)
    opt = sgd(momentum=0.9, weight_decay=1e-4)
    check = make_overflow_check("saturation")

    def step(params, opt_state, ls_state, scaled_grads, lr):
        grads = unscale_grads(scaled_grads, ls_state)
        finite = check(grads, ls_state.scale)
        new_params, new_opt = opt.update(grads, opt_state, params, lr)
        params, opt_state = select_tree(finite, (new_params, new_opt), (params, opt_state))
        return params, opt_state, update_loss_scale(ls_state, finite, cfg)

    params = {"conv": {"weight": torch.randn(2, 3), "bias": torch.randn(2)}}
    good = {"conv": {"weight": torch.full((2, 3), 8.0), "bias": torch.full((2,), -4.0)}}
    saturated = {"conv": {"weight": torch.full((2, 3), 65504.0), "bias": torch.full((2,), 1.0)}}
    compiled = torch.compile(step, fullgraph=True)
    lr = torch.tensor(0.1)
    eager = comp = (params, opt.init(params), init_loss_scale(loss_scale_cfg(init=4.0)))
    for grads in (good, saturated, good):
        before = comp
        eager = step(*eager, grads, lr)
        comp = compiled(*comp, grads, lr)
        if grads is saturated:
            assert tree.all_equal(comp[:2], before[:2])  # parameters and momentum kept
            assert float(comp[2].scale) == 2.0
    assert tree.all_equal(comp[2], eager[2])
    for a, b in zip(tree.leaves(comp[:2]), tree.leaves(eager[:2])):
        torch.testing.assert_close(a, b, rtol=0.0, atol=1e-6)
    # Two clean steps at scale 2 (the growth interval) would double it; one clean step after the skip does not.
    assert float(comp[2].scale) == 2.0 and int(comp[2].good_steps) == 1
    torch._dynamo.reset()
