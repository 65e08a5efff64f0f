"""Per-parameter options by path: which leaves an option (such as weight decay) applies to.

An optimiser takes a mask in one of two forms:
- a tree of Python bools with the parameters' structure (`mask_by_path`, `weight_decay_mask`), or
- a predicate `keep(path, leaf) -> bool`, evaluated on the parameters given to each update (handy when
  the optimiser is built before the parameters exist).
Masks are static: they choose leaves and are never tensors, so compiled code sees them as constants.
Build bool trees outside compiled code: under torch.compile (2.13) rebuilding a tree whose leaves are
not tensors fails inside dynamo, while a predicate works there.
"""

from __future__ import annotations

from typing import Callable, Union

import torch

from retina_fn import tree
from retina_fn.optim.base import check_same_paths

Predicate = Callable[[str, torch.Tensor], bool]
Mask = Union[tree.Tree, Predicate, None]


def mask_by_path(params: tree.Tree, keep: Predicate) -> tree.Tree:
    """A bool tree shaped like `params`: `keep(path, leaf)` for every leaf.

    Args:
      params: a tree of tensors.
      keep: predicate on ('/'-joined path, leaf).

    Returns:
      A tree shaped like `params` whose leaves are Python bools.
    """
    return tree.map_with_path(lambda path, leaf: bool(keep(path, leaf)), params)


def decay_predicate(decay_norm_and_bias: bool) -> Predicate:
    """The weight-decay predicate keep(path, leaf).

    1-D (and 0-d) leaves are norm scales/shifts and biases; convolution kernels are 4-D.

    Args:
      decay_norm_and_bias: True: decay every leaf; False: only leaves with 2+ dims.

    Returns:
      Predicate (path, leaf) -> bool.
    """
    return lambda _path, leaf: decay_norm_and_bias or leaf.dim() > 1


def weight_decay_mask(params: tree.Tree, decay_norm_and_bias: bool) -> tree.Tree:
    """Bool tree of the leaves that get weight decay (see `decay_predicate`).

    Args:
      params: a tree of tensors.
      decay_norm_and_bias: as for `decay_predicate`.

    Returns:
      A tree shaped like `params` whose leaves are Python bools.
    """
    return mask_by_path(params, decay_predicate(decay_norm_and_bias))


def resolve_mask(mask: Mask, params: tree.Tree, name: str = "mask") -> list[bool]:
    """The mask as one bool per leaf of `params`.

    Args:
      mask: a bool tree with the params' paths, a predicate (path, leaf) -> bool, or None (True everywhere).
      params: the tree the mask applies to.
      name: what the mask is called in error messages.

    Returns:
      list[bool] in `tree.leaves(params)` order.

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
