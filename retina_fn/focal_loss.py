"""Fused sigmoid focal loss over integer labels (no one-hot): the summed loss and its gradient in one forward pass.

Each anchor carries one integer code:

  0..K-1      a positive of that class (target 1 for that class, 0 for the others);
  IGNORE      weighs nothing, no loss and a zero gradient;
  any other   background (all K targets 0); BACKGROUND is the code to use.

The forward computes every element as if its target were 0, rewrites the one target-1 element per anchor and
saves the gradient, which the backward only scales. mmcv's values, in float32 (float64 stays float64); an
autograd.Function with `setup_context`, so `torch.func.grad` works; no vmap rule, no second derivative.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from retina_fn.precision import float32_region

BACKGROUND = -1
IGNORE = -2

# -log(FLT_MIN): mmcv's kernel floors the argument of each log at FLT_MIN, so one log term never
# exceeds this value (reached for logits beyond about +-87.3).
MAX_NLL = -math.log(float(np.finfo(np.float32).tiny))


def _focal_and_derivative(z: torch.Tensor, weight: float, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, d loss / dz), z's dtype and shape: weight * sigmoid(z)^gamma * min(softplus(z), MAX_NLL).

    z is the logit of the wrong answer (x for a target-0 element, -x for a target-1 one). With P = sigmoid(z),
    Q = sigmoid(-z) (not 1 - P, which cancels) and L the floored softplus, the derivative is
    weight * P^gamma * (gamma * Q * L + P), mmcv's backward. In place on its own temporaries only."""
    wrong = torch.sigmoid(z)
    nll = F.softplus(z).clamp_(max=MAX_NLL)
    derivative = torch.neg(z).sigmoid_().mul_(gamma).mul_(nll).add_(wrong)
    focal = wrong.pow_(gamma).mul_(weight)
    return nll.mul_(focal), derivative.mul_(focal)


def _loss_sums_and_grad(logits: torch.Tensor, labels: torch.Tensor, alpha: float,
                        gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """logits float [B, A, K], labels int64 [B, A] codes -> (per-image sums [B], gradient of their sum with
    respect to the logits [B, A, K]), both float32 (float64 for float64 logits)."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    num_classes = x.shape[-1]
    loss, grad = _focal_and_derivative(x, 1.0 - alpha, gamma)
    is_class = ((labels >= 0) & (labels < num_classes)).unsqueeze(-1)  # [B, A, 1]
    index = torch.where(is_class, labels.unsqueeze(-1), 0)
    target_loss, target_dz = _focal_and_derivative(x.gather(-1, index).neg_(), alpha, gamma)
    # Anchors without a class write back the value they already hold.
    loss.scatter_(-1, index, torch.where(is_class, target_loss, loss.gather(-1, index)))
    grad.scatter_(-1, index, torch.where(is_class, target_dz.neg_(), grad.gather(-1, index)))
    weight = (labels != IGNORE).to(x.dtype)  # [B, A]
    grad.mul_(weight.unsqueeze(-1))
    return (loss.sum(-1) * weight).sum(-1), grad


class _FocalLossSums(torch.autograd.Function):
    """Per-image focal loss sums whose backward scales the gradient saved by the forward pass."""

    @staticmethod
    def forward(logits, labels, alpha, gamma):
        return _loss_sums_and_grad(logits, labels, alpha, gamma)

    @staticmethod
    def setup_context(ctx, inputs, output):
        # The gradient is an output so that it can be saved here (setup_context sees no intermediates).
        _, grad = output
        ctx.mark_non_differentiable(grad)
        ctx.set_materialize_grads(False)  # no [B, A, K] of zeros for the gradient output's own gradient
        ctx.save_for_backward(grad)
        ctx.logits_dtype = inputs[0].dtype

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_sums, _grad_of_grad):
        (grad,) = ctx.saved_tensors
        return (grad * grad_sums[:, None, None]).to(ctx.logits_dtype), None, None, None


def sigmoid_focal_loss_sums(logits: torch.Tensor, labels: torch.Tensor, alpha: float = 0.25,
                            gamma: float = 2.0) -> torch.Tensor:
    """`losses.sigmoid_focal_loss` of the one-hot targets of `labels` times a 0/1 anchor weight, summed per image.

    Args:
      logits: float [B, A, K] (any float dtype); labels: integer [B, A] codes (module docstring).

    Returns:
      float32 [B] (float64 for float64 logits), autocast disabled; its gradient has logits' dtype.

    Raises:
      ValueError: logits not [B, A, K], or labels not an integer [B, A] tensor.
    """
    if logits.ndim != 3:
        raise ValueError(f"sigmoid_focal_loss_sums: logits must be [B, A, K], got {tuple(logits.shape)}")
    if tuple(labels.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"sigmoid_focal_loss_sums: labels must be [B, A] = {tuple(logits.shape[:2])}, "
                         f"got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"sigmoid_focal_loss_sums: labels must be an integer tensor, got {labels.dtype}")
    with float32_region(logits.device.type):
        sums, _ = _FocalLossSums.apply(logits, labels.to(torch.int64), alpha, gamma)
    return sums
