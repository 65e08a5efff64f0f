"""SGD with momentum, weight decay and optional Nesterov, as a pure (init, update) pair.

The update is torch.optim.SGD's (dampening 0), leaf by leaf:

    d   = g + wd * p            (wd = 0 on leaves the weight-decay mask excludes)
    buf = momentum * buf + d    (the first step gives buf = d)
    d   = d + momentum * buf    if nesterov, else d = buf
    p   = p - lr * d

The buffer starts at zero (torch: a copy of the first d); momentum * 0 + d is exactly d, so both agree.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from retina_fn import tree
from retina_fn.optim.base import Optimizer, check_same_paths, first_device, rebuild
from retina_fn.optim.masks import Mask, resolve_mask


class SGDState(NamedTuple):
    """State of `sgd`."""

    count: torch.Tensor  # int64 [], optimiser steps taken
    momentum: tree.Tree  # buffers shaped like params; {} when momentum is 0


def add_weight_decay(grads: list, params: list, weight_decay: float, decay: list[bool]) -> list:
    """Per leaf, g + weight_decay * p where `decay` holds, else g."""
    if weight_decay == 0.0 or not any(decay):
        return list(grads)
    idx = [i for i, flag in enumerate(decay) if flag]
    decayed = torch._foreach_add([grads[i] for i in idx], [params[i] for i in idx], alpha=weight_decay)
    out = list(grads)
    for i, value in zip(idx, decayed):
        out[i] = value
    return out


def sgd(momentum: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
        weight_decay_mask: Mask = None) -> Optimizer:
    """SGD bound to its hyper-parameters (the module docstring's update).

    Args:
      weight_decay_mask: bool tree or predicate(path, leaf) (`masks`) limiting decay; None: every leaf.

    Returns:
      Optimizer(init(params) -> SGDState, update(grads, state, params, lr float []) -> (params, state)).

    Raises:
      ValueError: momentum or weight_decay < 0, nesterov without momentum; from `update`, trees whose paths differ.
    """
    if momentum < 0.0:
        raise ValueError(f"momentum must be >= 0, got {momentum}")
    if weight_decay < 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if nesterov and momentum == 0.0:
        raise ValueError("nesterov needs momentum > 0")

    def init(params: tree.Tree) -> SGDState:
        count = torch.zeros((), dtype=torch.int64, device=first_device(params))
        buffers = tree.map(torch.zeros_like, params) if momentum != 0.0 else {}
        return SGDState(count=count, momentum=buffers)

    @torch.no_grad()
    def update(grads: tree.Tree, state: SGDState, params: tree.Tree, lr: torch.Tensor):
        check_same_paths("grads", grads, params)
        p = tree.leaves(params)
        d = add_weight_decay(tree.leaves(grads), p, weight_decay, resolve_mask(weight_decay_mask, params))
        buffers = state.momentum
        if momentum != 0.0:
            check_same_paths("SGD momentum state", state.momentum, params)
            buf = torch._foreach_add(torch._foreach_mul(tree.leaves(state.momentum), momentum), d)
            d = torch._foreach_add(d, buf, alpha=momentum) if nesterov else buf
            buffers = rebuild(params, buf)
        new_p = torch._foreach_sub(p, torch._foreach_mul(d, lr))
        return rebuild(params, new_p), SGDState(count=state.count + 1, momentum=buffers)

    return Optimizer(init=init, update=update)
