"""AdamW (decoupled weight decay) as a pure (init, update) pair, with torch.optim.AdamW's update.

Per leaf, with t the step count after this step (t = 1 on the first step):

    p  = p * (1 - lr * wd)                  (wd = 0 on leaves the weight-decay mask excludes)
    m  = lerp(m, g, 1 - beta1)
    v  = beta2 * v + (1 - beta2) * g * g
    p  = p - (lr / (1 - beta1**t)) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

The step count is an int64 tensor in the state (no per-step Python number). No amsgrad.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from retina_fn import tree
from retina_fn.optim.base import Optimizer, check_same_paths, first_device, rebuild
from retina_fn.optim.masks import Mask, resolve_mask


class AdamWState(NamedTuple):
    """State of `adamw`."""

    count: torch.Tensor  # int64 [], optimiser steps taken
    mu: tree.Tree  # first moments, shaped like params
    nu: tree.Tree  # second moments, shaped like params


def bias_correction(beta: float, count: torch.Tensor) -> torch.Tensor:
    """float32 []: 1 - beta**count (int64 []) as -expm1(count * log(beta)), which keeps the digits float32
    1 - pow loses for small counts; exactly 1 for beta 0."""
    if beta == 0.0:
        return torch.ones((), dtype=torch.float32, device=count.device)
    return -torch.expm1(count.to(torch.float32) * math.log(beta))


def adamw(betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
          weight_decay_mask: Mask = None) -> Optimizer:
    """AdamW bound to its hyper-parameters (the module docstring's update).

    Args:
      weight_decay_mask: bool tree or predicate(path, leaf) (`masks`) limiting decay; None: every leaf.

    Returns:
      Optimizer(init(params) -> AdamWState, update(grads, state, params, lr float []) -> (params, state)).

    Raises:
      ValueError: a beta outside [0, 1), or eps or weight_decay < 0; from `update`, trees whose paths differ.
    """
    beta1, beta2 = (float(b) for b in betas)
    for name, beta in (("betas[0]", beta1), ("betas[1]", beta2)):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {beta}")
    if eps < 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if weight_decay < 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")

    def init(params: tree.Tree) -> AdamWState:
        count = torch.zeros((), dtype=torch.int64, device=first_device(params))
        return AdamWState(count=count, mu=tree.map(torch.zeros_like, params), nu=tree.map(torch.zeros_like, params))

    @torch.no_grad()
    def update(grads: tree.Tree, state: AdamWState, params: tree.Tree, lr: torch.Tensor):
        check_same_paths("grads", grads, params)
        check_same_paths("AdamW mu state", state.mu, params)
        check_same_paths("AdamW nu state", state.nu, params)
        g, p = tree.leaves(grads), tree.leaves(params)
        count = state.count + 1

        decay = resolve_mask(weight_decay_mask, params)
        if weight_decay != 0.0 and any(decay):
            idx = [i for i, flag in enumerate(decay) if flag]
            shrunk = torch._foreach_mul([p[i] for i in idx], 1.0 - lr * weight_decay)
            p = list(p)
            for i, value in zip(idx, shrunk):
                p[i] = value

        mu = torch._foreach_lerp(tree.leaves(state.mu), g, 1.0 - beta1)
        nu = torch._foreach_addcmul(torch._foreach_mul(tree.leaves(state.nu), beta2), g, g, value=1.0 - beta2)

        step_size = lr / bias_correction(beta1, count)
        root_correction2 = bias_correction(beta2, count).sqrt()
        denom = torch._foreach_add(torch._foreach_div(torch._foreach_sqrt(nu), root_correction2), eps)
        new_p = torch._foreach_sub(p, torch._foreach_mul(torch._foreach_div(mu, denom), step_size))
        return rebuild(params, new_p), AdamWState(count=count, mu=rebuild(params, mu), nu=rebuild(params, nu))

    return Optimizer(init=init, update=update)
