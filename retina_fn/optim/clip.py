"""Gradient clipping by the global L2 norm, with torch.nn.utils.clip_grad_norm_'s arithmetic."""

from __future__ import annotations

import torch

from retina_fn import tree
from retina_fn.optim.base import rebuild

# clip_grad_norm_ adds this to the norm before dividing, so a zero norm never divides by zero.
NORM_EPS = 1e-6


@torch.no_grad()
def clip_by_global_norm(grads: tree.Tree, max_norm: float | torch.Tensor | None) -> tuple[tree.Tree, torch.Tensor]:
    """Scales gradients so that their global L2 norm is at most `max_norm`.

    Every leaf is multiplied by min(1, max_norm / (norm + 1e-6)) (by 1 when the norm is within bounds), so
    there is no Python branch on the norm. A non-finite norm gives a zero factor (non-finite grads stay
    non-finite), as in torch.

    Args:
      grads: a tree of floating tensors.
      max_norm: a positive number, a float [] tensor (not checked), or None: `grads` come back unchanged
        with their norm, for logging.

    Returns:
      (clipped grads, a tree shaped like `grads`; norm, float32 [], the global L2 norm before clipping).

    Raises:
      ValueError: a Python max_norm that is not > 0.
    """
    norm = tree.global_norm(grads)
    if max_norm is None:
        return grads, norm
    if not isinstance(max_norm, torch.Tensor) and not max_norm > 0:
        raise ValueError(f"max_norm must be > 0 (or None for no clipping), got {max_norm}")
    factor = torch.clamp(max_norm / (norm + NORM_EPS), max=1.0)
    return rebuild(grads, torch._foreach_mul(tree.leaves(grads), factor)), norm
