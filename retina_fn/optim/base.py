"""The optimiser shape shared by every optimiser here, and the leaf-list helpers they use.

`update(grads, opt_state, params, lr)` returns new tensors under `torch.no_grad()` and never writes into its
arguments; `lr` is a 0-d tensor so torch.compile does not retrace per step. Frozen parameters are not given to
the optimiser: it sees the trainable subtree only.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from retina_fn import tree


class Optimizer(NamedTuple):
    """An optimiser: a pair of pure functions bound to its hyper-parameters."""

    init: Callable  # init(params) -> opt_state
    update: Callable  # update(grads, opt_state, params, lr float []) -> (new_params, new_opt_state)
    inplace: bool = False  # only apex's fused backend writes into params: never undo its step with torch.where


def rebuild(like: tree.Tree, leaves: list) -> tree.Tree:
    """A tree shaped like `like` holding `leaves` (in `tree.leaves(like)` order)."""
    return tree.unflatten_leaves(like, leaves)


def check_same_paths(name: str, a: tree.Tree, b: tree.Tree, what: str = "params") -> None:
    """Raises ValueError (naming up to 5 missing and 5 unexpected paths) unless a (`name`) has the leaf paths of
    b (`what`)."""
    pa, pb = tree.paths(a), tree.paths(b)
    if pa != pb:
        missing = sorted(set(pb) - set(pa))[:5]
        extra = sorted(set(pa) - set(pb))[:5]
        raise ValueError(f"{name} does not match the {what} tree: {len(pa)} vs {len(pb)} leaves; "
                         f"missing {missing}, unexpected {extra}")


def first_device(params: tree.Tree) -> torch.device:
    """The device of the first leaf (where the step count lives); ValueError for an empty tree."""
    leaves = tree.leaves(params)
    if not leaves:
        raise ValueError("the optimiser was given an empty parameter tree (nothing trainable?)")
    return leaves[0].device
