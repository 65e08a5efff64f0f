"""Pure optimisers against torch.optim, weight-decay masks, purity, clipping, and compiled parity."""

from __future__ import annotations

import sys

import pytest
import torch

from configs.common import base_config, optim_config
from retina_fn import accel, tree
from retina_fn.train import build_optimizer
from retina_fn.optim import (
    AdamWState,
    SGDState,
    adamw,
    clip_by_global_norm,
    make_lr_schedule,
    make_optimizer,
    decay_predicate,
    mask_by_path,
    sgd,
    weight_decay_mask,
)
from tests.model_fixtures import settings_of

LRS = (0.1, 0.05, 0.2, 0.01, 0.1)  # one per step: lr changes between steps, as under a schedule


def make_params(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "backbone": {
            "conv": {"weight": torch.randn(4, 3, 3, 3, generator=g)},
            "bn": {"bias": torch.randn(4, generator=g)},
        },
        "head": {"fc": {"weight": torch.randn(5, 4, generator=g), "bias": torch.randn(5, generator=g)}},
    }


def make_grads(params: dict, steps: int, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [tree.map(lambda p: torch.randn(p.shape, generator=g), params) for _ in range(steps)]


def run_reference(params: dict, grads: list[dict], build_torch, decay_paths=None, lrs=LRS) -> dict:
    """Runs a torch.optim optimiser on copies of `params` fed with `grads`; returns the final tree.

    decay_paths: when given, the paths in it form a group with weight decay and the rest a group without.
    """
    flat = {p: x.clone().requires_grad_(True) for p, x in tree.flatten_by_path(params).items()}
    if decay_paths is None:
        groups = [{"params": list(flat.values())}]
    else:
        groups = [
            {"params": [x for p, x in flat.items() if p in decay_paths]},
            {"params": [x for p, x in flat.items() if p not in decay_paths], "weight_decay": 0.0},
        ]
    opt = build_torch(groups)
    for lr, grad_tree in zip(lrs, grads):
        for group in opt.param_groups:
            group["lr"] = lr
        g_flat = tree.flatten_by_path(grad_tree)
        for p, x in flat.items():
            x.grad = g_flat[p].clone()
        opt.step()
    return tree.unflatten_by_path({p: x.detach() for p, x in flat.items()})


def run_pure(opt, params: dict, grads: list[dict], lrs=LRS) -> tuple[dict, object]:
    state = opt.init(params)
    for lr, g in zip(lrs, grads):
        params, state = opt.update(g, state, params, torch.tensor(lr))
    return params, state


def assert_trees_close(a: dict, b: dict, atol: float = 1e-6) -> None:
    fa, fb = tree.flatten_by_path(a), tree.flatten_by_path(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        torch.testing.assert_close(fa[k], fb[k], rtol=0.0, atol=atol, msg=f"leaf {k}")


@pytest.mark.parametrize(
    "momentum, weight_decay, nesterov",
    [(0.9, 1e-4, False), (0.9, 1e-4, True), (0.0, 1e-4, False), (0.9, 0.0, False)],
)
def test_sgd_matches_torch_sgd_over_five_steps(momentum, weight_decay, nesterov):
    params = make_params()
    grads = make_grads(params, 5)
    ours, state = run_pure(sgd(momentum, weight_decay, nesterov), params, grads)
    ref = run_reference(
        params,
        grads,
        lambda g: torch.optim.SGD(g, lr=0.1, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov),
    )
    assert_trees_close(ours, ref)
    assert int(state.count) == 5
    # The update must have moved the parameters, or the comparison proves nothing.
    assert not torch.allclose(ours["head"]["fc"]["weight"], params["head"]["fc"]["weight"])


def test_sgd_momentum_buffer_after_first_step_is_the_decayed_gradient():
    params = make_params()
    (g,) = make_grads(params, 1)
    opt = sgd(momentum=0.9, weight_decay=0.5)
    _, state = opt.update(g, opt.init(params), params, torch.tensor(0.1))
    expected = tree.map(lambda gi, pi: gi + 0.5 * pi, g, params)
    assert_trees_close(state.momentum, expected, atol=0.0)


@pytest.mark.parametrize("weight_decay", [1e-2, 0.0])
def test_adamw_matches_torch_adamw_over_five_steps(weight_decay):
    params = make_params()
    grads = make_grads(params, 5)
    lrs = (1e-2, 5e-3, 2e-2, 1e-3, 1e-2)
    ours, state = run_pure(adamw(betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay), params, grads, lrs)
    ref = run_reference(
        params,
        grads,
        lambda g: torch.optim.AdamW(g, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay),
        lrs=lrs,
    )
    assert_trees_close(ours, ref)
    assert isinstance(state, AdamWState) and int(state.count) == 5


def test_weight_decay_mask_excludes_one_dimensional_leaves():
    params = make_params()
    mask = tree.flatten_by_path(weight_decay_mask(params, decay_norm_and_bias=False))
    assert mask == {
        "backbone/bn/bias": False,
        "backbone/conv/weight": True,
        "head/fc/bias": False,
        "head/fc/weight": True,
    }
    assert all(tree.leaves(weight_decay_mask(params, decay_norm_and_bias=True)))


def test_mask_by_path_sees_paths():
    mask = mask_by_path(make_params(), lambda path, _leaf: path.startswith("head/"))
    assert tree.flatten_by_path(mask) == {
        "backbone/bn/bias": False,
        "backbone/conv/weight": False,
        "head/fc/bias": True,
        "head/fc/weight": True,
    }


@pytest.mark.parametrize("mask_form", ["predicate", "tree"])
@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_masked_weight_decay_matches_torch_param_groups(name, mask_form):
    params = make_params()
    grads = make_grads(params, 4)
    decayed = {"backbone/conv/weight", "head/fc/weight"}
    mask_fn = decay_predicate(False) if mask_form == "predicate" else weight_decay_mask(params, False)
    if name == "sgd":
        opt = sgd(momentum=0.9, weight_decay=0.05, weight_decay_mask=mask_fn)
        build = lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, weight_decay=0.05)  # noqa: E731
    else:
        opt = adamw(weight_decay=0.05, weight_decay_mask=mask_fn)
        build = lambda g: torch.optim.AdamW(g, lr=0.1, weight_decay=0.05)  # noqa: E731
    ours, _ = run_pure(opt, params, grads)
    assert_trees_close(ours, run_reference(params, grads, build, decay_paths=decayed))
    # And decay on every leaf would differ on the biases: the mask is what makes the match.
    unmasked = run_reference(params, grads, build)
    assert not torch.allclose(ours["head"]["fc"]["bias"], unmasked["head"]["fc"]["bias"], atol=1e-6)


def test_mask_given_as_tree_is_checked_against_params():
    params = make_params()
    bad_mask = {"head": {"fc": {"weight": True, "bias": False}}}
    opt = sgd(momentum=0.9, weight_decay=1e-4, weight_decay_mask=bad_mask)
    (g,) = make_grads(params, 1)
    with pytest.raises(ValueError, match="mask does not match"):
        opt.update(g, opt.init(params), params, torch.tensor(0.1))


@pytest.mark.parametrize("opt", [sgd(0.9, 1e-4, nesterov=True), adamw(weight_decay=1e-2)], ids=["sgd", "adamw"])
def test_update_never_mutates_its_inputs(opt):
    params = make_params()
    grads = make_grads(params, 2)
    state = opt.init(params)
    params, state = opt.update(grads[0], state, params, torch.tensor(0.1))  # non-zero buffers
    before = [tree.map(torch.clone, x) for x in (grads[1], state, params)]
    lr = torch.tensor(0.1)
    new_params, new_state = opt.update(grads[1], state, params, lr)
    for original, copy in zip((grads[1], state, params), before):
        assert tree.all_equal(original, copy)
    assert float(lr) == pytest.approx(0.1)
    # New tensors, not the inputs handed back.
    assert all(a is not b for a, b in zip(tree.leaves(new_params), tree.leaves(params)))
    assert all(a is not b for a, b in zip(tree.leaves(new_state), tree.leaves(state)))


def test_update_keeps_no_autograd_graph():
    params = tree.map(lambda x: x.requires_grad_(True), make_params())
    (g,) = make_grads(params, 1)
    opt = sgd(0.9, 1e-4)
    new_params, new_state = opt.update(g, opt.init(params), params, torch.tensor(0.1))
    assert all(x.grad_fn is None and not x.requires_grad for x in tree.leaves((new_params, new_state)))


def test_grads_with_other_paths_are_rejected():
    params = make_params()
    grads = {"head": make_grads(params, 1)[0]["head"]}
    opt = sgd(0.9)
    with pytest.raises(ValueError, match="grads does not match"):
        opt.update(grads, opt.init(params), params, torch.tensor(0.1))


def test_bad_hyper_parameters_are_named():
    with pytest.raises(ValueError, match="nesterov"):
        sgd(momentum=0.0, nesterov=True)
    with pytest.raises(ValueError, match="momentum"):
        sgd(momentum=-0.1)
    with pytest.raises(ValueError, match=r"betas\[1\]"):
        adamw(betas=(0.9, 1.0))


@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clip_by_global_norm_matches_clip_grad_norm(max_norm):
    grads = make_grads(make_params(), 1)[0]
    clipped, norm = clip_by_global_norm(grads, max_norm)
    flat = tree.flatten_by_path(grads)
    copies = {k: torch.nn.Parameter(torch.zeros_like(v)) for k, v in flat.items()}
    for k, p in copies.items():
        p.grad = flat[k].clone()
    ref_norm = torch.nn.utils.clip_grad_norm_(list(copies.values()), max_norm)
    torch.testing.assert_close(norm, ref_norm, rtol=1e-6, atol=0.0)
    assert_trees_close(clipped, tree.unflatten_by_path({k: p.grad for k, p in copies.items()}), atol=1e-7)
    if max_norm > float(norm):
        assert tree.all_equal(clipped, grads)  # within bounds: multiplied by exactly 1
    else:
        assert float(tree.global_norm(clipped)) == pytest.approx(max_norm, rel=1e-5)


def test_clip_by_global_norm_hand_computed_and_pure():
    grads = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[4.0]])}  # norm 5
    copy = tree.map(torch.clone, grads)
    clipped, norm = clip_by_global_norm(grads, 1.0)
    assert float(norm) == 5.0
    factor = 1.0 / (5.0 + 1e-6)
    torch.testing.assert_close(clipped["a"], torch.tensor([3.0 * factor, 0.0]))
    torch.testing.assert_close(clipped["b"], torch.tensor([[4.0 * factor]]))
    assert tree.all_equal(grads, copy)
    same, norm_only = clip_by_global_norm(grads, None)
    assert same is grads and float(norm_only) == 5.0
    with pytest.raises(ValueError, match="max_norm"):
        clip_by_global_norm(grads, 0.0)


def test_make_optimizer_follows_the_config():
    params = make_params()
    (g,) = make_grads(params, 1)
    cfg = optim_config()
    cfg.decay_norm_and_bias = False
    cfg.weight_decay = 0.5
    opt = make_optimizer(cfg)
    new, state = opt.update(g, opt.init(params), params, torch.tensor(0.1))
    assert isinstance(state, SGDState) and not opt.inplace
    # First SGD step: p - lr * (g + wd * p) on conv weights, p - lr * g on biases.
    torch.testing.assert_close(new["head"]["fc"]["bias"], params["head"]["fc"]["bias"] - 0.1 * g["head"]["fc"]["bias"])
    w, gw = params["head"]["fc"]["weight"], g["head"]["fc"]["weight"]
    torch.testing.assert_close(new["head"]["fc"]["weight"], w - 0.1 * (gw + 0.5 * w))
    cfg.name = "adamw"
    assert isinstance(make_optimizer(cfg).init(params), AdamWState)


def test_make_optimizer_apex_backend_without_apex_explains(monkeypatch):
    monkeypatch.setitem(sys.modules, "apex", None)
    accel.clear_probe_cache()
    cfg = base_config()
    cfg.optim.backend = "apex"
    try:
        with pytest.raises(ValueError, match="needs the fused SGD builder passed in"):
            make_optimizer(cfg.optim)  # the engine never probes: the builder comes from retina_fn.accel
        with pytest.raises(accel.AcceleratorUnavailable, match="unrelated web"):
            build_optimizer(settings_of(cfg))
    finally:
        accel.clear_probe_cache()


@pytest.mark.slow
def test_compiled_update_matches_eager_and_compiles_once():
    """Schedule + clipping + masked Nesterov SGD and AdamW in one fullgraph-compiled step."""
    params = make_params()
    grads = make_grads(params, 3)
    cfg = optim_config()
    schedule = make_lr_schedule(cfg, steps_per_epoch=2, global_batch=16)
    mask_fn = decay_predicate(False)
    opt_sgd = sgd(0.9, 1e-4, nesterov=True, weight_decay_mask=mask_fn)
    opt_adamw = adamw(weight_decay=1e-2, weight_decay_mask=mask_fn)

    def step(p_sgd, s_sgd, p_adamw, s_adamw, g, count):
        lr = schedule(count)
        g, norm = clip_by_global_norm(g, 1.0)
        p_sgd, s_sgd = opt_sgd.update(g, s_sgd, p_sgd, lr)
        p_adamw, s_adamw = opt_adamw.update(g, s_adamw, p_adamw, lr)
        return p_sgd, s_sgd, p_adamw, s_adamw, norm

    compiled = torch.compile(step, fullgraph=True)
    params_adamw = tree.map(torch.clone, params)  # distinct tensors: aliasing would be guarded on
    eager_args = (params, opt_sgd.init(params), params_adamw, opt_adamw.init(params_adamw))
    comp_args = eager_args
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i, g in enumerate(grads):  # the count (and so lr) changes every call: no recompilation
            count = torch.tensor(i * 700, dtype=torch.int64)
            eager_out = step(*eager_args, g, count)
            comp_out = compiled(*comp_args, g, count)
            eager_args, comp_args = eager_out[:4], comp_out[:4]
    assert_trees_close(comp_out, eager_out, atol=1e-6)
    torch._dynamo.reset()
