"""Gradient clipping by the global L2 norm, with torch.nn.utils.clip_grad_norm_'s arithmetic."""

from __future__ import annotations

import torch

from retina_fn import tree
from retina_fn.optim.base import rebuild

# clip_grad_norm_ adds this to the norm before dividing, so a zero norm never divides by zero.
NORM_EPS = 1e-6


@torch.no_grad()
def clip_by_global_norm(grads: tree.Tree, max_norm: float | torch.Tensor | None) -> tuple[tree.Tree, torch.Tensor]:
    """(grads scaled by min(1, max_norm / (norm + 1e-6)), norm float32 [] before clipping), no Python branch on
    the norm. max_norm: a positive number, a float [] tensor (unchecked), or None (grads unchanged).

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
