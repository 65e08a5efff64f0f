"""The project's one pytree wrapper, over optree.

Containers are dicts and NamedTuples only: both optree and torch's own pytree (used by torch.func) know
them, so a tree built here passes through `torch.func.grad` unchanged. Dict keys are visited in sorted
order, which gives every flat view (checkpoints, coalesced all-reduce buffers) one fixed order on every
process. Paths are '/'-joined keys (NamedTuple fields by name), e.g. 'backbone/layer1/0/conv1/weight'.
"""

from __future__ import annotations

from typing import Any, Callable

import optree
import torch

Tree = Any
SEP = "/"


def map(fn: Callable, tree: Tree, *rest: Tree) -> Tree:  # noqa: A001 - mirrors jax.tree.map
    """fn(leaf, *leaves_of_rest) for every leaf, in a tree shaped like `tree` (`rest`: same structure)."""
    return optree.tree_map(fn, tree, *rest)


def leaves(tree: Tree) -> list:
    """The leaves of `tree` in the fixed (sorted-key) order."""
    return optree.tree_leaves(tree)


def _entry_name(entry) -> str:
    field = getattr(entry, "field", None)
    return str(field if field is not None else entry.entry)


def paths(tree: Tree) -> list[str]:
    """The path of every leaf, in `leaves` order."""
    return [SEP.join(_entry_name(e) for e in acc) for acc in optree.tree_accessors(tree)]


def leaves_with_paths(tree: Tree) -> list[tuple[str, Any]]:
    """[(path, leaf)] in `leaves` order."""
    return list(zip(paths(tree), leaves(tree)))


def map_with_path(fn: Callable[[str, Any], Any], tree: Tree) -> Tree:
    """Like `map`, but `fn(path, leaf)` also sees the leaf's path."""
    values = [fn(p, x) for p, x in leaves_with_paths(tree)]
    return optree.tree_unflatten(optree.tree_structure(tree), values)


def flatten_by_path(tree: Tree) -> dict[str, Any]:
    """A flat {path: leaf} dict in `leaves` order (what checkpoints store)."""
    return dict(leaves_with_paths(tree))


def unflatten_by_path(flat: dict[str, Any]) -> dict:
    """Inverse of `flatten_by_path` into nested dicts, {'a/b': x} -> {'a': {'b': x}} (no NamedTuples:
    `unflatten_like`); ValueError for a path through another's leaf or given twice."""
    out: dict = {}
    for path, leaf in flat.items():
        *parents, last = path.split(SEP)
        node = out
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"path {path!r} runs through the leaf at {key!r}")
        if last in node:
            raise ValueError(f"path {path!r} given twice")
        node[last] = leaf
    return out


def filter(tree: dict, keep: Callable[[str, Any], bool]) -> dict:  # noqa: A001
    """The nested-dict subtree of the leaves for which `keep(path, leaf)` holds (empty branches dropped)."""
    return unflatten_by_path({p: x for p, x in leaves_with_paths(tree) if keep(p, x)})


def merge(*trees: dict) -> dict:
    """Deep union of nested-dict trees with disjoint leaves (ValueError otherwise); inverse of `filter`. Plain
    dict recursion, which torch.compile traces inside a compiled step."""
    out: dict = {}
    for t in trees:
        out = _merge_two(out, t)
    return out


def _merge_two(a: dict, b: dict, prefix: str = "") -> dict:
    merged = dict(a)
    for key, value in b.items():
        if key not in a:
            merged[key] = value
        elif isinstance(value, dict) and isinstance(a[key], dict):
            merged[key] = _merge_two(a[key], value, f"{prefix}{key}{SEP}")
        else:
            raise ValueError(f"leaf {prefix}{key!r} is in more than one tree")
    return merged


def global_norm(tree: Tree) -> torch.Tensor:
    """float32 [], sqrt(sum of squares) over the floating leaves, with no host sync (zeros(()) on the default
    device when there is no floating leaf)."""
    sq = [torch.sum(torch.square(x.float())) for x in leaves(tree) if torch.is_floating_point(x)]
    if not sq:
        return torch.zeros(())
    return torch.sqrt(torch.stack(sq).sum())


def cast(tree: Tree, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Tree:
    """Every tensor leaf moved to `device` and, floating leaves only, cast to `dtype` (None: unchanged);
    non-tensor leaves pass through."""

    def one(x):
        if not isinstance(x, torch.Tensor):
            return x
        target = dtype if (dtype is not None and torch.is_floating_point(x)) else x.dtype
        return x.to(device=device, dtype=target)

    return map(one, tree)


def all_equal(a: Tree, b: Tree) -> bool:
    """Whether both trees have the same paths and bitwise-equal tensor leaves (a host sync per leaf)."""
    fa, fb = flatten_by_path(a), flatten_by_path(b)
    return fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)


def unflatten_like(like: Tree, flat: dict[str, Any]) -> Tree:
    """A tree with the structure of `like` (NamedTuples included) whose leaf at each path is flat[path] (extra
    entries ignored); KeyError naming the first path that `flat` lacks."""
    values = []
    for p in paths(like):
        if p not in flat:
            raise KeyError(f"no value for {p!r}")
        values.append(flat[p])
    return optree.tree_unflatten(optree.tree_structure(like), values)


def unflatten_leaves(like: Tree, leaves: list) -> Tree:
    """A tree shaped like `like` holding `leaves`, given in `leaves(like)` order.

    Built from the tree structure, never by pulling leaves from an iterator inside `map`: under
    torch.compile a traced map visits dicts in insertion order while `leaves` sorts keys."""
    return optree.tree_unflatten(optree.tree_structure(like), list(leaves))
