"""retina_fn.nn.masked_group_norm: its values and hand-written gradients against independent references.

References: F.group_norm of each image's map cropped to its region (inside values), and the normalisation
written out per image with the crop's mean and variance, differentiated by autograd (values and gradients
everywhere), both in float64; torch.autograd.gradcheck on a small case."""

import pytest
import torch
import torch.nn.functional as F

from retina_fn.nn.masked_group_norm import masked_group_norm, masked_group_norm_maps

# (h, w) of each image's region on a 7 x 9 map: the full map, one pixel, one row, one column, a rectangle
EXTENTS = ((7, 9), (1, 1), (1, 9), (7, 1), (4, 6))
GROUPS = 4


def _inputs(channels=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(EXTENTS), channels, 7, 9, generator=g, dtype=dtype) * 3 + 1.5
    weight = torch.rand(channels, generator=g, dtype=dtype) + 0.5
    bias = torch.randn(channels, generator=g, dtype=dtype)
    mask = torch.zeros(len(EXTENTS), 1, 7, 9, dtype=dtype)
    for b, (h, w) in enumerate(EXTENTS):
        mask[b, :, :h, :w] = 1
    return x, weight, bias, mask


def _reference(x, weight, bias, relu=False, zero_outside=False, eps=1e-5):
    """Per image: the crop's group mean and biased variance, applied to the whole map (autograd-differentiable)."""
    outs = []
    for b, (h, w) in enumerate(EXTENTS):
        crop = x[b, :, :h, :w].reshape(GROUPS, -1)
        mean, var = crop.mean(dim=1), crop.var(dim=1, unbiased=False)
        grouped = x[b].reshape(GROUPS, -1)
        y = ((grouped - mean[:, None]) / torch.sqrt(var[:, None] + eps)).reshape(x.shape[1:])
        y = y * weight[:, None, None] + bias[:, None, None]
        y = torch.relu(y) if relu else y
        if zero_outside:
            inside = torch.zeros_like(y)
            inside[:, :h, :w] = 1
            y = y * inside
        outs.append(y)
    return torch.stack(outs)


def test_inside_values_equal_group_norm_of_the_cropped_map():
    x, weight, bias, mask = _inputs()
    y = masked_group_norm(x, weight, bias, mask, GROUPS)
    for b, (h, w) in enumerate(EXTENTS):
        crop = F.group_norm(x[b:b + 1, :, :h, :w], GROUPS, weight, bias, 1e-5)
        assert torch.allclose(y[b:b + 1, :, :h, :w], crop, rtol=0, atol=1e-12), (h, w)


def test_full_mask_equals_native_group_norm():
    x, weight, bias, _ = _inputs()
    y = masked_group_norm(x, weight, bias, torch.ones_like(x[:, :1]), GROUPS)
    assert torch.allclose(y, F.group_norm(x, GROUPS, weight, bias, 1e-5), rtol=0, atol=1e-12)


@pytest.mark.parametrize("relu, zero_outside", [(False, False), (True, False), (False, True), (True, True)])
def test_values_and_gradients_equal_the_written_out_reference(relu, zero_outside):
    x, weight, bias, mask = _inputs()
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    ref_leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    y = masked_group_norm(*leaves, mask, GROUPS, relu=relu, zero_outside=zero_outside)
    y_ref = _reference(*ref_leaves, relu=relu, zero_outside=zero_outside)
    assert torch.allclose(y, y_ref, rtol=0, atol=1e-12)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    grads = torch.autograd.grad(y, leaves, dy)
    ref_grads = torch.autograd.grad(y_ref, ref_leaves, dy)
    for name, g, r in zip(("x", "weight", "bias"), grads, ref_grads):
        assert torch.allclose(g, r, rtol=0, atol=1e-10), (name, float((g - r).abs().max()))


def test_gradcheck_and_torch_func_grad():
    x, weight, bias, mask = _inputs(channels=4)
    x, weight, bias, mask = x[:2, :, :3, :4], weight, bias, mask[:2, :, :3, :4]  # a small case: cheap gradcheck
    fn = lambda x, w, b: masked_group_norm(x, w, b, mask, 2, relu=True, zero_outside=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(t.clone().requires_grad_() for t in (x, weight, bias)))
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
    by_func = torch.func.grad(lambda x: (fn(x, weight, bias) * dy).sum())(x)
    xr = x.clone().requires_grad_()
    by_autograd, = torch.autograd.grad(fn(xr, weight, bias), xr, dy)
    assert torch.allclose(by_func, by_autograd, rtol=0, atol=1e-12)


def test_channels_last_float32_keeps_its_layout_and_values():
    x, weight, bias, mask = _inputs()
    x32 = x.float().contiguous(memory_format=torch.channels_last)
    y = masked_group_norm(x32, weight.float(), bias.float(), mask.float(), GROUPS, relu=True)
    assert y.dtype == torch.float32 and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(y.double(), _reference(x, weight, bias, relu=True), rtol=0, atol=2e-5)


def test_bfloat16_input_is_normalised_in_float32_under_autocast():
    x, weight, bias, mask = _inputs()
    xb = x.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = masked_group_norm(xb, weight.float(), bias.float(), mask.float(), GROUPS)
    assert y.dtype == torch.bfloat16
    expected = _reference(xb.double(), weight, bias).to(torch.bfloat16)  # the same input, exact statistics
    assert torch.allclose(y.double(), expected.double(), rtol=1e-2, atol=1e-2)


def test_groups_must_divide_channels():
    x, weight, bias, mask = _inputs()
    with pytest.raises(ValueError, match="3 groups do not divide 8 channels"):
        masked_group_norm(x, weight, bias, mask, 3)


def test_several_maps_in_one_call_equal_one_call_per_map():
    """A head's levels share one call: outputs and gradients (torch.func.grad, float32, channels_last) are
    bitwise those of one call per map, including weight and bias, whose per-map parts are summed in the
    order autograd sums them across separate calls."""
    x, weight, bias, mask = (t.float() for t in _inputs())
    maps = [x, x[:, :, :4, :5] * 0.5 - 1, x[:, :, 2:5, 3:6].flip(0)]
    maps = [m.contiguous(memory_format=torch.channels_last) for m in maps]
    masks = [mask, mask[:, :, :4, :5], mask[:, :, :3, :3]]
    dys = [torch.randn(m.shape, generator=torch.Generator().manual_seed(i)) for i, m in enumerate(maps)]

    def loss(params, together):
        xs, w, b = params
        if together:
            ys = masked_group_norm_maps(xs, w, b, masks, GROUPS, relu=True, zero_outside=True)
        else:
            ys = [masked_group_norm(xi, w, b, mi, GROUPS, relu=True, zero_outside=True) for xi, mi in zip(xs, masks)]
        return sum((y * dy).sum() for y, dy in zip(ys, dys)), ys

    grads_1, (_, ys_1) = torch.func.grad_and_value(loss, has_aux=True)((maps, weight, bias), True)
    grads_n, (_, ys_n) = torch.func.grad_and_value(loss, has_aux=True)((maps, weight, bias), False)
    assert all(torch.equal(a, b) for a, b in zip(ys_1, ys_n))
    assert all(torch.equal(a, b) for a, b in zip(grads_1[0], grads_n[0]))
    assert torch.equal(grads_1[1], grads_n[1]) and torch.equal(grads_1[2], grads_n[2])
    first_only = torch.func.grad(lambda w: (masked_group_norm(maps[0], w, bias, masks[0], GROUPS, relu=True,
                                                              zero_outside=True) * dys[0]).sum())(weight)
    assert not torch.allclose(grads_1[1], first_only)  # every map's part is in the sum


def test_one_mask_per_map():
    x, weight, bias, mask = _inputs()
    with pytest.raises(ValueError, match="2 maps and 1 masks"):
        masked_group_norm_maps([x, x], weight, bias, [mask], GROUPS)


@pytest.mark.parametrize("relu", [False, True])
def test_non_finite_values_outside_the_region_change_nothing_inside(relu):
    # With zero_outside (what a canvas-exact 3x3 conv after it needs), cells outside each image's region may hold
    # anything, an fp16 overflow included: the values inside, the zeros outside and the gradients are those of
    # the same map with finite values there.
    x, weight, bias, mask = _inputs()
    outside = mask == 0
    poisoned = torch.where(outside.expand_as(x), torch.full_like(x, float("inf")), x)
    poisoned[:, :, -1, -1] = torch.where(outside[:, 0, -1, -1], float("nan"), x[:, :, -1, -1].T).T
    clean = torch.where(outside.expand_as(x), torch.zeros_like(x), x)
    results = []
    for source in (poisoned, clean):
        leaves = [t.clone().requires_grad_() for t in (source, weight, bias)]
        y = masked_group_norm(*leaves, mask.bool(), GROUPS, relu=relu, zero_outside=True)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=y.dtype)
        grads = torch.autograd.grad(y, leaves, dy)
        results.append((y, grads))
    (y, grads), (y_clean, grads_clean) = results
    assert torch.isfinite(y).all() and torch.equal(y, y_clean)
    for name, g, r in zip(("x", "weight", "bias"), grads, grads_clean):
        assert torch.isfinite(g).all() and torch.allclose(g, r, rtol=0, atol=1e-12), name
