"""Gradient clipping by the global L2 norm, with torch.nn.utils.clip_grad_norm_'s arithmetic."""

from __future__ import annotations

import torch

from retina_fn import tree
from retina_fn.optim.base import rebuild

# clip_grad_norm_ adds this to the norm before dividing, so a zero norm never divides by zero.
NORM_EPS = 1e-6


@torch.no_grad()
def clip_by_global_norm(grads: tree.Tree, max_norm: float | torch.Tensor | None) -> tuple[tree.Tree, torch.Tensor]:
    """(grads * min(1, max_norm / (norm + 1e-6)), norm) with norm the float32 [] global L2 norm of `grads`.

    Every leaf is multiplied (by 1 when the norm is within bounds), so there is no Python branch on the
    norm. A non-finite norm gives a zero factor (non-finite grads stay non-finite), as in torch.
    `max_norm=None` returns `grads` unchanged with their norm, for logging.
    """
    norm = tree.global_norm(grads)
    if max_norm is None:
        return grads, norm
    if not isinstance(max_norm, torch.Tensor) and not max_norm > 0:
        raise ValueError(f"optim.clip_norm must be > 0 (or None for no clipping), got {max_norm}")
    factor = torch.clamp(max_norm / (norm + NORM_EPS), max=1.0)
    return rebuild(grads, torch._foreach_mul(tree.leaves(grads), factor)), norm
