"""GroupNorm whose statistics come from a region of each image only (canvas-exact computation, retina_fn.extent).

One forward pass for the masked sums of x and x^2 plus one fused affine pass, and a hand-written backward; an
autograd.Function with `setup_context`, so torch.func.grad and torch.compile compose with it. Each call has a
fixed Python cost under torch.func.grad, so `masked_group_norm_maps` takes several maps sharing weight and bias.

The maths, per image b and group g with the mask m (1 inside the region), n = sum(m) * C / G:
  mean = sum(m * x) / n, var = sum(m * x^2) / n - mean^2, rstd = (var + eps)^-1/2
  y = (x - mean) * rstd * weight + bias                       (everywhere, inside and outside)
and, with P = sum(weight * dy) and Q = sum(weight * dy * xhat) over all cells of the group,
  dx = rstd * weight * dy - m * rstd / n * (P + xhat * Q)   (only cells inside move the statistics)

Moments are summed in float32 (float64 stays float64); the one-pass variance (clamped at 0) loses about
(mean / std)^2 * 1e-7, small after a convolution without bias.
"""

from __future__ import annotations

import torch

from retina_fn.precision import float32_region


def _to_channels(t: torch.Tensor, channels: int) -> torch.Tensor:
    """float [B, G] -> [B, C, 1, 1], each group's value on its C / G channels."""
    b, g = t.shape
    return t[:, :, None].expand(b, g, channels // g).reshape(b, channels, 1, 1)


def _inside(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def _forward_one(x, weight, bias, mask, g: int, eps: float, relu: bool, zero_outside: bool):
    """One map: (y in x's dtype, mean [B, G], rstd [B, G], count [B, 1]); see the module docstring."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    b, c = x.shape[:2]
    cg = c // g
    inside = _inside(mask)
    xf = x.to(dtype)
    # Selects, not products with the mask: a non-finite value outside the region changes nothing inside.
    xm = torch.where(inside, xf, 0.0)
    s1 = xm.sum(dim=(2, 3)).view(b, g, cg)
    s2 = (xm * xm).sum(dim=(2, 3)).view(b, g, cg)
    count = (inside.sum(dim=(1, 2, 3)).to(dtype) * cg).clamp_min(1.0)[:, None]  # [B, 1]
    mean = s1.sum(dim=2) / count  # [B, G]
    var = (s2.sum(dim=2) / count - mean * mean).clamp_min(0.0)
    rstd = torch.rsqrt(var + eps)
    scale = rstd[:, :, None] * weight.to(dtype).view(g, cg)  # [B, G, C / G]
    shift = bias.to(dtype).view(g, cg) - mean[:, :, None] * scale
    y = torch.addcmul(shift.view(b, c, 1, 1), xf, scale.view(b, c, 1, 1))
    if relu:
        y = y.relu_()
    if zero_outside:
        y = y.masked_fill_(~inside, 0.0)
    return y.to(x.dtype), mean, rstd, count


def _backward_one(dy, x, weight, mask, mean, rstd, count, y, g: int, relu: bool, zero_outside: bool):
    """One map's (dx in x's dtype, dweight, dbias in weight's dtype); y is the output (read with relu only)."""
    b, c = x.shape[:2]
    cg = c // g
    dtype = torch.promote_types(x.dtype, torch.float32)
    inside = _inside(mask)
    if relu:  # y is 0 wherever the ReLU or the mask zeroed it: one pass covers both
        dy = torch.ops.aten.threshold_backward(dy, y, 0)
    elif zero_outside:
        dy = torch.where(inside, dy, 0.0)
    # With zero_outside, dy is 0 outside the region: x is read there as 0 so that a non-finite x cannot make 0 * x
    # a NaN in the sums.
    xf = torch.where(inside, x, 0.0).to(dtype) if zero_outside else x.to(dtype)
    dyf, wg = dy.to(dtype), weight.to(dtype).view(g, cg)
    s_dy = dyf.sum(dim=(2, 3)).view(b, g, cg)
    s_dy_x = (dyf * xf).sum(dim=(2, 3)).view(b, g, cg)
    s_dy_xhat = rstd[:, :, None] * (s_dy_x - mean[:, :, None] * s_dy)  # sum(dy * xhat) per channel
    p = (wg * s_dy).sum(dim=2)  # [B, G]
    q = (wg * s_dy_xhat).sum(dim=2)
    u = -rstd * rstd * q / count  # dx = a * dy + m * (u * x + v)
    v = -rstd / count * (p - rstd * q * mean)
    a = rstd[:, :, None] * wg
    dx = torch.addcmul(_to_channels(v, c), xf, _to_channels(u, c))
    dx = dx.masked_fill_(~inside, 0.0).addcmul_(dyf, a.view(b, c, 1, 1))
    dweight = s_dy_xhat.sum(dim=0).view(c).to(weight.dtype)
    dbias = s_dy.sum(dim=0).view(c).to(weight.dtype)
    return dx.to(x.dtype), dweight, dbias


class _MaskedGroupNorm(torch.autograd.Function):
    # Inputs: weight, bias, the four settings, then n maps and their n masks. Outputs: n results, then per map
    # its mean, rstd and count (non-differentiable, saved for backward). Per-channel values are [B, G, C / G].

    @staticmethod
    def forward(weight, bias, num_groups, eps, relu, zero_outside, *maps_and_masks):
        n = len(maps_and_masks) // 2
        with float32_region(maps_and_masks[0].device.type):  # the statistics stay in float32 under autocast
            outs = [_forward_one(x, weight, bias, m, num_groups, eps, relu, zero_outside)
                    for x, m in zip(maps_and_masks[:n], maps_and_masks[n:])]
        return tuple(o[0] for o in outs) + tuple(t for o in outs for t in o[1:])

    @staticmethod
    def setup_context(ctx, inputs, output):
        weight, _, num_groups, _, relu, zero_outside, *maps_and_masks = inputs
        n = len(maps_and_masks) // 2
        stats = output[n:]
        ctx.save_for_backward(weight, *maps_and_masks, *stats, *(output[:n] if relu else ()))
        ctx.n, ctx.num_groups, ctx.relu, ctx.zero_outside = n, num_groups, relu, zero_outside
        ctx.mark_non_differentiable(*stats)

    @staticmethod
    def backward(ctx, *grads):
        n, saved = ctx.n, ctx.saved_tensors
        weight, xs, masks, stats = saved[0], saved[1:n + 1], saved[n + 1:2 * n + 1], saved[2 * n + 1:5 * n + 1]
        ys = saved[5 * n + 1:] if ctx.relu else (None,) * n
        dxs, dweight, dbias = [None] * n, None, None
        with float32_region(xs[0].device.type):
            # The last map first, summing dweight and dbias in the order autograd's engine would if each map
            # had its own call: the results do not depend on how many maps share a call.
            for i in reversed(range(n)):
                mean, rstd, count = stats[3 * i:3 * i + 3]
                dxs[i], dw, db = _backward_one(grads[i], xs[i], weight, masks[i], mean, rstd, count, ys[i],
                                               ctx.num_groups, ctx.relu, ctx.zero_outside)
                dweight = dw if dweight is None else dweight + dw
                dbias = db if dbias is None else dbias + db
        return (dweight if ctx.needs_input_grad[0] else None, dbias if ctx.needs_input_grad[1] else None,
                None, None, None, None, *dxs, *([None] * n))


def masked_group_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor,
                      num_groups: int, eps: float = 1e-5, relu: bool = False,
                      zero_outside: bool = False) -> torch.Tensor:
    """GroupNorm with each image's statistics over the cells where `mask` is 1 (F.group_norm of the map cropped
    to a rectangular region), optionally a ReLU and zeroing outside the mask; else the affine applies everywhere.

    Args:
      x: float [B, C, H, W] (half types computed in float32), returned in its dtype; weight, bias: float [C].
      mask: bool (or 0 / 1 float) [B, 1, H, W], at least one True per image (else mean 0 and variance 0).
    """
    return masked_group_norm_maps([x], weight, bias, [mask], num_groups, eps, relu, zero_outside)[0]


def masked_group_norm_maps(xs: list[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor,
                           masks: list[torch.Tensor], num_groups: int, eps: float = 1e-5, relu: bool = False,
                           zero_outside: bool = False) -> list[torch.Tensor]:
    """`masked_group_norm` of n maps xs [B, C, H_i, W_i] (one dtype and device) with their masks
    [B, 1, H_i, W_i], sharing weight and bias, in one autograd call: the values and gradients of one call per map.
    """
    if not xs or len(xs) != len(masks):
        raise ValueError(f"group norm: {len(xs)} maps and {len(masks)} masks (one mask per map, at least one)")
    for x in xs:
        if x.shape[1] % num_groups:
            raise ValueError(f"group norm: {num_groups} groups do not divide {x.shape[1]} channels")
    out = _MaskedGroupNorm.apply(weight, bias, int(num_groups), float(eps), bool(relu), bool(zero_outside),
                                 *xs, *masks)
    return list(out[:len(xs)])
