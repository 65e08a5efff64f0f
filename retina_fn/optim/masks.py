"""Which leaves an option (such as weight decay) applies to: a tree of Python bools with the parameters' paths, or
a predicate `keep(path, leaf) -> bool` evaluated at each update. Masks are static, never tensors. Build bool trees
outside compiled code (dynamo fails rebuilding a tree of non-tensors); a predicate works inside.
"""

from __future__ import annotations

from typing import Callable, Union

import torch

from retina_fn import tree
from retina_fn.optim.base import check_same_paths

Predicate = Callable[[str, torch.Tensor], bool]
Mask = Union[tree.Tree, Predicate, None]


def mask_by_path(params: tree.Tree, keep: Predicate) -> tree.Tree:
    """A tree shaped like `params` of Python bools: `keep(path, leaf)` for every leaf."""
    return tree.map_with_path(lambda path, leaf: bool(keep(path, leaf)), params)


def decay_predicate(decay_norm_and_bias: bool) -> Predicate:
    """The weight-decay predicate: every leaf, or (False) only leaves with 2+ dims (not norms and biases)."""
    return lambda _path, leaf: decay_norm_and_bias or leaf.dim() > 1


def weight_decay_mask(params: tree.Tree, decay_norm_and_bias: bool) -> tree.Tree:
    """Bool tree of the leaves that get weight decay (`decay_predicate`)."""
    return mask_by_path(params, decay_predicate(decay_norm_and_bias))


def resolve_mask(mask: Mask, params: tree.Tree, name: str = "mask") -> list[bool]:
    """The mask (None: True everywhere) as one bool per leaf of `params`, in `tree.leaves` order.

    Raises:
      ValueError: a bool tree whose paths differ from the params'.
      TypeError: a bool tree with leaves that are not Python bools.
    """
    if mask is None:
        return [True] * len(tree.leaves(params))
    if callable(mask):
        return [bool(mask(path, leaf)) for path, leaf in tree.leaves_with_paths(params)]
    check_same_paths(name, mask, params)
    flags = tree.leaves(mask)
    bad = [p for p, f in zip(tree.paths(mask), flags) if not isinstance(f, bool)]
    if bad:
        raise TypeError(f"{name} leaves must be Python bools; not at {bad[:5]}")
    return flags
