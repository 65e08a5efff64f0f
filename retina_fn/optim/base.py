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
    """An optimiser: a pair of pure functions bound to its hyper-parameters.

    `inplace` is True only for the apex fused backend, whose update writes into `params` and keeps its
    momentum inside the apex object; callers must then not undo a step with `torch.where` afterwards.

    Attributes:
      init: init(params) -> opt_state.
      update: update(grads, opt_state, params, lr) -> (new_params, new_opt_state); lr is a float [] tensor
        and grads, params and new_params are trees with the same paths.
      inplace: whether `update` writes into `params` (default False).
    """

    init: Callable
    update: Callable
    inplace: bool = False


def rebuild(like: tree.Tree, leaves: list) -> tree.Tree:
    """A tree shaped like `like` holding `leaves`; see tree.unflatten_leaves.

    Args:
      like: the template tree.
      leaves: one value per leaf of `like`, in `tree.leaves(like)` order.

    Returns:
      A tree shaped like `like`.
    """
    return tree.unflatten_leaves(like, leaves)


def check_same_paths(name: str, a: tree.Tree, b: tree.Tree, what: str = "params") -> None:
    """Checks that two trees have the same leaf paths.

    Args:
      name: what `a` is called in the message.
      a: a tree.
      b: the reference tree.
      what: what `b` is called in the message.

    Returns:
      None.

    Raises:
      ValueError: the paths differ; the message counts the leaves and names up to 5 missing and 5
        unexpected paths.
    """
    pa, pb = tree.paths(a), tree.paths(b)
    if pa != pb:
        missing = sorted(set(pb) - set(pa))[:5]
        extra = sorted(set(pa) - set(pb))[:5]
        raise ValueError(
            f"{name} does not match the {what} tree: {len(pa)} vs {len(pb)} leaves; "
            f"missing {missing}, unexpected {extra}"
        )


def first_device(params: tree.Tree) -> torch.device:
    """The device of the first leaf of `params` (where scalar state such as the step count lives).

    Args:
      params: a non-empty tree of tensors.

    Returns:
      torch.device of the first leaf in `tree.leaves` order.

    Raises:
      ValueError: `params` has no leaves (nothing trainable?).
    """
    leaves = tree.leaves(params)
    if not leaves:
        raise ValueError("the optimiser was given an empty parameter tree (nothing trainable?)")
    return leaves[0].device
