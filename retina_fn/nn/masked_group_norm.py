"""GroupNorm whose statistics come from a region of each image only, at the cost of the native one.

Canvas-exact computation (retina_fn.extent) normalises each image over its own extent. Written with plain
tensor ops that takes about seven elementwise passes forward and as many again in autograd's backward;
here the forward is one pass for the masked sums of x and x squared and one fused affine pass, and the
backward is written by hand: two unmasked per-channel sums (of dy and dy * x) and one pass that assembles
dx. It is a `torch.autograd.Function` with `setup_context`, so `torch.func.grad` and torch.compile
compose with it (no vmap or vjp rule is needed on the training path).

The maths, per image b and group g with the mask m (1 inside the region), n = sum(m) * C / G:
  mean = sum(m * x) / n, var = sum(m * x^2) / n - mean^2, rstd = (var + eps)^-1/2
  y = (x - mean) * rstd * weight + bias                       (everywhere, inside and outside)
and, with P = sum(weight * dy) and Q = sum(weight * dy * xhat) over the group (all cells, not only the masked
ones: cells outside read the same statistics),
  dx = rstd * weight * dy - m * rstd / n * (P + xhat * Q)
because only cells inside the region move the mean and the variance.

The moments are summed in float32 (float64 inputs in float64). The one-pass variance loses relative precision
of about (mean / std)^2 * 1e-7 in float32; GroupNorm follows a convolution without bias, whose outputs have means
small against their spread, and the statistics are clamped at zero variance.
"""

from __future__ import annotations

import torch

from retina_fn.precision import float32_region


def _to_channels(t: torch.Tensor, channels: int) -> torch.Tensor:
    """float [B, G] (one value per group) -> [B, C, 1, 1], each group's value on its C / G channels."""
    b, g = t.shape
    return t[:, :, None].expand(b, g, channels // g).reshape(b, channels, 1, 1)


class _MaskedGroupNorm(torch.autograd.Function):
    # Per-channel quantities are [B, G, C / G] (views of [B, C]): group sums and per-channel products need
    # no copies.

    @staticmethod
    def forward(x, weight, bias, mask, num_groups, eps, relu, zero_outside):
        dtype = torch.promote_types(x.dtype, torch.float32)
        b, c = x.shape[:2]
        g, cg = num_groups, c // num_groups
        with float32_region(x.device.type):  # the statistics stay in float32 under autocast
            xf, m = x.to(dtype), mask.to(dtype)
            xm = xf * m
            s1 = xm.sum(dim=(2, 3)).view(b, g, cg)
            s2 = (xm * xf).sum(dim=(2, 3)).view(b, g, cg)
            count = (m.sum(dim=(1, 2, 3)) * cg).clamp_min(1.0)[:, None]  # [B, 1]
            mean = s1.sum(dim=2) / count  # [B, G]
            var = (s2.sum(dim=2) / count - mean * mean).clamp_min(0.0)
            rstd = torch.rsqrt(var + eps)
            scale = rstd[:, :, None] * weight.to(dtype).view(g, cg)  # [B, G, C / G]
            shift = bias.to(dtype).view(g, cg) - mean[:, :, None] * scale
            y = torch.addcmul(shift.view(b, c, 1, 1), xf, scale.view(b, c, 1, 1))
            if relu:
                y = y.relu_()
            if zero_outside:
                y = y.mul_(m)
        return y.to(x.dtype), mean, rstd, count

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, mask, num_groups, _, relu, zero_outside = inputs
        y, mean, rstd, count = output
        ctx.save_for_backward(x, weight, mask, mean, rstd, count, y if relu else None)
        ctx.num_groups, ctx.relu, ctx.zero_outside = num_groups, relu, zero_outside
        ctx.mark_non_differentiable(mean, rstd, count)

    @staticmethod
    def backward(ctx, dy, _dmean, _drstd, _dcount):
        x, weight, mask, mean, rstd, count, y = ctx.saved_tensors
        b, c = x.shape[:2]
        g, cg = ctx.num_groups, c // ctx.num_groups
        dtype = torch.promote_types(x.dtype, torch.float32)
        with float32_region(x.device.type):
            if ctx.relu:  # y is 0 wherever the ReLU or the mask zeroed it: one pass covers both
                dy = torch.ops.aten.threshold_backward(dy, y, 0)
            elif ctx.zero_outside:
                dy = dy * mask.to(dy.dtype)
            xf, dyf, m, wg = x.to(dtype), dy.to(dtype), mask.to(dtype), weight.to(dtype).view(g, cg)
            s_dy = dyf.sum(dim=(2, 3)).view(b, g, cg)
            s_dy_x = (dyf * xf).sum(dim=(2, 3)).view(b, g, cg)
            s_dy_xhat = rstd[:, :, None] * (s_dy_x - mean[:, :, None] * s_dy)  # sum(dy * xhat) per channel
            p = (wg * s_dy).sum(dim=2)  # [B, G]
            q = (wg * s_dy_xhat).sum(dim=2)
            u = -rstd * rstd * q / count  # dx = a * dy + m * (u * x + v)
            v = -rstd / count * (p - rstd * q * mean)
            a = rstd[:, :, None] * wg
            dx = torch.addcmul(_to_channels(v, c), xf, _to_channels(u, c))
            dx = dx.mul_(m).addcmul_(dyf, a.view(b, c, 1, 1))
            dweight = s_dy_xhat.sum(dim=0).view(c) if ctx.needs_input_grad[1] else None
            dbias = s_dy.sum(dim=0).view(c) if ctx.needs_input_grad[2] else None
        return (dx.to(x.dtype), None if dweight is None else dweight.to(weight.dtype),
                None if dbias is None else dbias.to(weight.dtype), None, None, None, None, None)


def masked_group_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor,
                      num_groups: int, eps: float = 1e-5, relu: bool = False,
                      zero_outside: bool = False) -> torch.Tensor:
    """GroupNorm with each image's statistics over the cells where `mask` is 1, optionally followed by a
    ReLU and by zeroing the cells outside the mask (what a canvas-exact 3x3 conv after it needs).

    Equal (to float rounding) to F.group_norm of each image's map cropped to its region where the mask is a
    rectangle; without zero_outside the affine is applied everywhere, so cells outside hold values
    normalised with the inside statistics (no cell inside depends on them).

    Args:
      x: float [B, C, H, W] (any memory format; float16 / bfloat16 are computed in float32).
      weight: float [C], the per-channel scale.
      bias: float [C], the per-channel shift.
      mask: float or bool [B, 1, H, W] of 0 / 1, at least one 1 per image (an image without one is
        normalised as if its mean were 0 and its variance 0).
      num_groups: G, dividing C.
      eps: added to the variance.
      relu: apply max(y, 0) to the normalised output (in the same pass; its backward is folded in).
      zero_outside: multiply the output by the mask.

    Returns:
      [B, C, H, W] in x's dtype. Differentiable in x, weight and bias (not in mask).
    """
    if x.shape[1] % num_groups:
        raise ValueError(f"group norm: {num_groups} groups do not divide {x.shape[1]} channels")
    return _MaskedGroupNorm.apply(x, weight, bias, mask, int(num_groups), float(eps), bool(relu),
                                  bool(zero_outside))[0]
