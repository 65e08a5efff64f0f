"""Collectives over whole pytrees, on an explicit process group.

Leaves travel in a few coalesced flat buffers. Every rank walks the leaves in the same order (sorted '/'-joined
paths, `retina_fn.tree`), groups them by (dtype, device) in order of first appearance and cuts each group into
buckets of at most `bucket_bytes` (a larger leaf travels alone), so all ranks issue the same collectives in the
same order when their trees have the same structure. Results are fresh tensors; inputs are never written to.
"""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple, Sequence

import optree
import torch
import torch.distributed as dist

from retina_fn import tree as tree_lib

Tree = Any


class ReplicaMismatch(ValueError):
    """Ranks hold trees that should be identical but differ (structure or values)."""


class Bucket(NamedTuple):
    """Leaves that travel in one flat buffer: their dtype, device, indices in path order and total numel."""

    dtype: torch.dtype
    device: torch.device
    indices: tuple[int, ...]
    numel: int


def plan_buckets(leaves: Sequence[torch.Tensor], bucket_bytes: int) -> list[Bucket]:
    """Cuts `leaves` (in path order) into buckets of at most `bucket_bytes` > 0 (module docstring)."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket size must be positive, got {bucket_bytes} bytes (dist.bucket_mb)")
    groups: dict[tuple[torch.dtype, torch.device], list[list[int]]] = {}
    filled: dict[tuple[torch.dtype, torch.device], int] = {}  # bytes in each group's last bucket
    for i, leaf in enumerate(leaves):
        key, nbytes = (leaf.dtype, leaf.device), leaf.numel() * leaf.element_size()
        runs = groups.setdefault(key, [[]])
        if runs[-1] and filled[key] + nbytes > bucket_bytes:
            runs.append([])
            filled[key] = 0
        runs[-1].append(i)
        filled[key] = filled.get(key, 0) + nbytes
    return [Bucket(dtype, device, tuple(run), sum(leaves[j].numel() for j in run))
            for (dtype, device), runs in groups.items() for run in runs]


def pack(leaves: Sequence[torch.Tensor], bucket: Bucket) -> torch.Tensor:
    """A new flat buffer [bucket.numel] holding the bucket's leaves back to back."""
    return torch.cat([leaves[i].detach().reshape(-1) for i in bucket.indices])


def unpack(buffer: torch.Tensor, leaves: Sequence[torch.Tensor], bucket: Bucket, out: list) -> None:
    """Writes into `out[i]` views of `buffer` shaped like `leaves[i]`, for each leaf i of `bucket`."""
    pieces = buffer.split([leaves[i].numel() for i in bucket.indices])
    for i, piece in zip(bucket.indices, pieces):
        out[i] = piece.view(leaves[i].shape)


def _tensor_leaves(tree: Tree, what: str) -> tuple[list[str], list[torch.Tensor]]:
    pairs = tree_lib.leaves_with_paths(tree)
    for path, leaf in pairs:
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"{what}: leaf {path!r} is a {type(leaf).__name__}, not a tensor")
    return [p for p, _ in pairs], [x for _, x in pairs]


def check_reducible(tree: Tree, op: str, backend: str | None = None) -> None:
    """Checks that every leaf of `tree` can be all-reduced with `op` ('sum' | 'mean') on `backend`: TypeError
    naming a non-tensor, bool or complex leaf, or an integer one under 'mean'; ValueError for an unknown op or a CPU
    leaf with an accelerator backend."""
    if op not in ("sum", "mean"):
        raise ValueError(f"op must be 'sum' or 'mean', got {op!r}")
    paths, leaves = _tensor_leaves(tree, f"reduce_{op}")
    for path, leaf in zip(paths, leaves):
        if leaf.dtype == torch.bool or leaf.is_complex():
            raise TypeError(f"reduce_{op}: leaf {path!r} has dtype {leaf.dtype}, which cannot be all-reduced")
        if op == "mean" and not leaf.is_floating_point():
            raise TypeError(f"reduce_mean: leaf {path!r} has integer dtype {leaf.dtype}; cast it to float or use "
                            "reduce_sum")
        if backend not in (None, "gloo") and leaf.device.type == "cpu":
            raise ValueError(f"reduce_{op}: leaf {path!r} is on the CPU but backend {backend!r} needs device tensors")


def all_reduce_tree(tree: Tree, op: str, *, group=None, bucket_bytes: int) -> Tree:
    """The leafwise sum or mean of `tree` over `group`'s ranks, as new tensors; for 'mean' each buffer is divided
    by the group size first (as DDP does), keeping half-precision sums in range. Raises as `check_reducible`."""
    check_reducible(tree, op, dist.get_backend(group))
    leaves = tree_lib.leaves(tree)
    size = dist.get_world_size(group)
    out: list = [None] * len(leaves)
    for bucket in plan_buckets(leaves, bucket_bytes):
        buffer = pack(leaves, bucket)
        if op == "mean":
            buffer.div_(size)
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
        unpack(buffer, leaves, bucket, out)
    return optree.tree_unflatten(optree.tree_structure(tree), out)


def tree_signature(tree: Tree) -> list[tuple[str, tuple[int, ...], str]]:
    """[(path, shape, dtype name)] of every leaf, in path order (TypeError for a non-tensor leaf)."""
    paths, leaves = _tensor_leaves(tree, "tree_signature")
    return [(p, tuple(x.shape), str(x.dtype)) for p, x in zip(paths, leaves)]


def _first_signature_difference(reference: list, other: list) -> str | None:
    ref = {p: (s, d) for p, s, d in reference}
    mine = {p: (s, d) for p, s, d in other}
    for path in sorted(ref.keys() | mine.keys()):
        if path not in mine:
            return f"{path!r} is missing"
        if path not in ref:
            return f"{path!r} is extra"
        if ref[path] != mine[path]:
            return f"{path!r} is {mine[path][0]} {mine[path][1]} instead of {ref[path][0]} {ref[path][1]}"
    return None


def check_same_structure(tree: Tree, *, src: int = 0, group=None) -> None:
    """Checks that every rank's tree has rank `src`'s (path, shape, dtype) signature (ReplicaMismatch)."""
    signatures: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(signatures, tree_signature(tree), group=group)
    for rank, signature in enumerate(signatures):
        difference = _first_signature_difference(signatures[src], signature)
        if difference is not None:
            raise ReplicaMismatch(f"tree structure differs between ranks: on rank {rank}, {difference} (vs rank {src})")


def broadcast_tree(tree: Tree, src: int = 0, *, group=None, bucket_bytes: int) -> Tree:
    """Rank `src`'s values of `tree` on every rank, as new tensors; ReplicaMismatch when structures differ."""
    check_same_structure(tree, src=src, group=group)
    leaves = tree_lib.leaves(tree)
    out: list = [None] * len(leaves)
    for bucket in plan_buckets(leaves, bucket_bytes):
        buffer = pack(leaves, bucket)
        dist.broadcast(buffer, src=src, group=group)
        unpack(buffer, leaves, bucket, out)
    return optree.tree_unflatten(optree.tree_structure(tree), out)


class LeafChecksum(NamedTuple):
    """A leaf's fingerprint: shape, dtype name, float64 sum (nan for complex) and a 16-byte blake2b hex digest
    of the bytes. Leaves are equal when shape, dtype and digest agree; the sum only makes messages readable."""

    shape: tuple[int, ...]
    dtype: str
    total: float
    digest: str


def same_leaf(a: LeafChecksum, b: LeafChecksum) -> bool:
    """True when two checksums describe bitwise-identical tensors."""
    return (a.shape, a.dtype, a.digest) == (b.shape, b.dtype, b.digest)


def leaf_checksum(leaf: torch.Tensor) -> LeafChecksum:
    """The LeafChecksum of one tensor (copies it to the host)."""
    host = leaf.detach().reshape(-1).cpu().contiguous()
    digest = hashlib.blake2b(host.view(torch.uint8).numpy().tobytes(), digest_size=16).hexdigest()
    total = float("nan") if host.is_complex() else float(host.to(torch.float64).sum())
    return LeafChecksum(tuple(leaf.shape), str(leaf.dtype), total, digest)


def tree_checksum(tree: Tree) -> dict[str, LeafChecksum]:
    """{path: LeafChecksum} of every leaf, in path order (TypeError for a non-tensor leaf)."""
    paths, leaves = _tensor_leaves(tree, "tree_checksum")
    return {p: leaf_checksum(x) for p, x in zip(paths, leaves)}


def first_checksum_difference(checksums: Sequence[dict[str, LeafChecksum]]) -> str | None:
    """The first path (sorted) whose checksum differs between ranks (index = rank), as a message; else None."""
    reference = checksums[0]
    for path in sorted(set().union(*(c.keys() for c in checksums))):
        for rank, mine in enumerate(checksums):
            if path not in mine or path not in reference:
                holder = 0 if path in reference else rank
                lacking = rank if path in reference else 0
                return f"{path!r} exists on rank {holder} but not on rank {lacking}"
            a, b = reference[path], mine[path]
            if not same_leaf(a, b):
                return (f"first differing path {path!r}: rank 0 has {a.shape} {a.dtype} sum={a.total!r}, "
                        f"rank {rank} has {b.shape} {b.dtype} sum={b.total!r}")
    return None


def verify_same(tree: Tree, *, group=None) -> None:
    """Checks that `tree` is bitwise identical on all ranks; ReplicaMismatch (on all) names the first difference."""
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, tree_checksum(tree), group=group)
    difference = first_checksum_difference(gathered)
    if difference is not None:
        raise ReplicaMismatch(f"tree differs between ranks: {difference}")
