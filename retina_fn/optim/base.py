"""The optimiser shape shared by every optimiser here, and the leaf-list helpers they use.

An optimiser is a pair of pure functions bound to its hyper-parameters:

    opt = sgd(momentum=0.9, weight_decay=1e-4)
    opt_state = opt.init(params)
    params, opt_state = opt.update(grads, opt_state, params, lr)   # lr: 0-d float tensor

`update` returns new tensors and never writes into its arguments; it runs under `torch.no_grad()`, so no
autograd graph outlives the step even when `params` require grad. `lr` is a 0-d tensor because a Python
float that changes every step makes torch.compile trace a new graph each time.

Frozen parameters are simply not given to the optimiser: the train step differentiates and updates only
the trainable subtree (`tree.filter` / `tree.merge` split and rejoin the full parameter tree), so `init`,
`update`, `grads` and any mask all see that subtree.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from retina_fn import tree


class Optimizer(NamedTuple):
    """`init(params) -> opt_state`; `update(grads, opt_state, params, lr) -> (new_params, new_opt_state)`.

    `inplace` is True only for the apex fused backend, whose update writes into `params` and keeps its
    momentum inside the apex object; callers must then not undo a step with `torch.where` afterwards.
    """

    init: Callable
    update: Callable
    inplace: bool = False


def rebuild(like: tree.Tree, leaves: list) -> tree.Tree:
    """A tree shaped like `like` holding `leaves` (given in `tree.leaves` order); see tree.unflatten_leaves."""
    return tree.unflatten_leaves(like, leaves)


def check_same_paths(name: str, a: tree.Tree, b: tree.Tree, what: str = "params") -> None:
    """Raises ValueError when `a` (called `name`) and `b` (`what`) do not have the same leaf paths."""
    pa, pb = tree.paths(a), tree.paths(b)
    if pa != pb:
        missing = sorted(set(pb) - set(pa))[:5]
        extra = sorted(set(pa) - set(pb))[:5]
        raise ValueError(
            f"{name} does not match the {what} tree: {len(pa)} vs {len(pb)} leaves; "
            f"missing {missing}, unexpected {extra}"
        )


def first_device(params: tree.Tree) -> torch.device:
    """The device of the first leaf of `params` (where scalar state such as the step count lives)."""
    leaves = tree.leaves(params)
    if not leaves:
        raise ValueError("the optimiser was given an empty parameter tree (nothing trainable?)")
    return leaves[0].device
