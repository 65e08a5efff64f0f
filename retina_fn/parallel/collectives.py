"""Collectives over whole pytrees, on an explicit process group.

Leaves travel in a few coalesced flat buffers rather than one collective per tensor. Every rank walks the
leaves in the same fixed order (sorted '/'-joined paths, `retina_fn.tree`), groups them by (dtype, device)
in order of first appearance and cuts each group into buckets of at most `bucket_bytes` (a leaf larger than
that travels alone), so all ranks issue the same collectives in the same order, provided their trees have
the same structure. Results are fresh tensors; input trees are never written to.
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
    """Leaves that travel in one flat buffer.

    Attributes:
      dtype: the dtype of every leaf in the bucket.
      device: the device of every leaf in the bucket.
      indices: positions of the leaves in path order.
      numel: total elements, the length of the flat buffer.
    """

    dtype: torch.dtype
    device: torch.device
    indices: tuple[int, ...]
    numel: int


def plan_buckets(leaves: Sequence[torch.Tensor], bucket_bytes: int) -> list[Bucket]:
    """Cuts `leaves` into buckets for coalesced collectives.

    Per (dtype, device) group, in order of first appearance, consecutive leaves are packed while the bucket
    stays within `bucket_bytes`; an oversized leaf gets its own.

    Args:
      leaves: tensors, already in path order.
      bucket_bytes: the bucket size limit in bytes.

    Returns:
      list[Bucket] covering every leaf once.

    Raises:
      ValueError: bucket_bytes <= 0.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket size must be positive, got {bucket_bytes} bytes (dist.bucket_mb)")
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, leaf in enumerate(leaves):
        groups.setdefault((leaf.dtype, leaf.device), []).append(i)
    buckets = []
    for (dtype, device), members in groups.items():
        current: list[int] = []
        current_bytes = 0
        for i in members:
            nbytes = leaves[i].numel() * leaves[i].element_size()
            if current and current_bytes + nbytes > bucket_bytes:
                buckets.append(Bucket(dtype, device, tuple(current), sum(leaves[j].numel() for j in current)))
                current, current_bytes = [], 0
            current.append(i)
            current_bytes += nbytes
        if current:
            buckets.append(Bucket(dtype, device, tuple(current), sum(leaves[j].numel() for j in current)))
    return buckets


def pack(leaves: Sequence[torch.Tensor], bucket: Bucket) -> torch.Tensor:
    """A new flat buffer holding the bucket's leaves back to back (always a copy).

    Args:
      leaves: tensors in path order.
      bucket: which of them to pack.

    Returns:
      [bucket.numel] tensor of bucket.dtype on bucket.device.
    """
    return torch.cat([leaves[i].detach().reshape(-1) for i in bucket.indices])


def unpack(buffer: torch.Tensor, leaves: Sequence[torch.Tensor], bucket: Bucket, out: list) -> None:
    """Writes into `out[i]` views of `buffer` shaped like `leaves[i]`, for each leaf i of `bucket`.

    Args:
      buffer: [bucket.numel], as `pack` made it (after a collective).
      leaves: the tensors in path order, for their shapes.
      bucket: which leaves the buffer holds.
      out: list indexed like `leaves`; written in place.

    Returns:
      None.
    """
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
    """Checks that every leaf can be all-reduced with `op`.

    Args:
      tree: a tree of tensors.
      op: 'sum' | 'mean'.
      backend: the process group's backend; None or 'gloo' accept CPU tensors.

    Returns:
      None.

    Raises:
      TypeError: naming the first non-tensor, bool or complex leaf, or an integer leaf under 'mean' (the
        mean of integers is not an integer; reduce_sum them).
      ValueError: an unknown op, or a CPU leaf with an accelerator backend ('nccl', 'hccl').
    """
    if op not in ("sum", "mean"):
        raise ValueError(f"op must be 'sum' or 'mean', got {op!r}")
    paths, leaves = _tensor_leaves(tree, f"reduce_{op}")
    for path, leaf in zip(paths, leaves):
        if leaf.dtype == torch.bool or leaf.is_complex():
            raise TypeError(f"reduce_{op}: leaf {path!r} has dtype {leaf.dtype}, which cannot be all-reduced")
        if op == "mean" and not leaf.is_floating_point():
            raise TypeError(
                f"reduce_mean: leaf {path!r} has integer dtype {leaf.dtype}; cast it to float or use reduce_sum"
            )
        if backend not in (None, "gloo") and leaf.device.type == "cpu":
            raise ValueError(f"reduce_{op}: leaf {path!r} is on the CPU but backend {backend!r} needs device tensors")


def all_reduce_tree(tree: Tree, op: str, *, group=None, bucket_bytes: int) -> Tree:
    """The leafwise sum ('sum') or mean ('mean') of `tree` over the ranks of `group`, as new tensors.

    For 'mean' each buffer is divided by the group size before the sum (as DDP does), which keeps
    half-precision sums in range.

    Args:
      tree: a tree of tensors, any shapes; floating for 'mean', floating or integer for 'sum'.
      op: 'sum' | 'mean'.
      group: the process group (None: the default group).
      bucket_bytes: the coalescing bucket size.

    Returns:
      A tree with the structure, shapes and dtypes of `tree`.

    Raises:
      TypeError, ValueError: as `check_reducible`.
    """
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
    """[(path, shape, dtype name)] of every leaf, in path order.

    Args:
      tree: a tree of tensors.

    Returns:
      list of (str, tuple[int, ...], str).

    Raises:
      TypeError: a leaf that is not a tensor.
    """
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
    """Checks that every rank's tree has rank `src`'s (path, shape, dtype) signature; one all_gather_object.

    Args:
      tree: this rank's tree of tensors.
      src: the reference rank.
      group: the process group (None: the default group).

    Returns:
      None.

    Raises:
      ReplicaMismatch: on every rank alike, naming the first differing rank and path.
    """
    signatures: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(signatures, tree_signature(tree), group=group)
    for rank, signature in enumerate(signatures):
        difference = _first_signature_difference(signatures[src], signature)
        if difference is not None:
            raise ReplicaMismatch(f"tree structure differs between ranks: on rank {rank}, {difference} (vs rank {src})")


def broadcast_tree(tree: Tree, src: int = 0, *, group=None, bucket_bytes: int) -> Tree:
    """Rank `src`'s values of `tree` on every rank, as new tensors.

    Args:
      tree: this rank's tree of tensors; only its structure matters off rank `src`.
      src: the rank whose values are sent.
      group: the process group (None: the default group).
      bucket_bytes: the coalescing bucket size.

    Returns:
      A tree with the structure, shapes, dtypes and devices of `tree`.

    Raises:
      ReplicaMismatch: on every rank, when the structures differ (checked first).
    """
    check_same_structure(tree, src=src, group=group)
    leaves = tree_lib.leaves(tree)
    out: list = [None] * len(leaves)
    for bucket in plan_buckets(leaves, bucket_bytes):
        buffer = pack(leaves, bucket)
        dist.broadcast(buffer, src=src, group=group)
        unpack(buffer, leaves, bucket, out)
    return optree.tree_unflatten(optree.tree_structure(tree), out)


class LeafChecksum(NamedTuple):
    """A leaf's fingerprint. Leaves count as equal when shape, dtype and digest agree (`same_leaf`); the
    sum only makes messages readable, since its last bits depend on the summation order of the machine.

    Attributes:
      shape: the tensor's shape.
      dtype: the dtype's name.
      total: float64 sum of the values (nan for complex tensors).
      digest: 16-byte blake2b hex digest of the raw bytes.
    """

    shape: tuple[int, ...]
    dtype: str
    total: float
    digest: str


def same_leaf(a: LeafChecksum, b: LeafChecksum) -> bool:
    """True when two checksums describe bitwise-identical tensors.

    Args:
      a: a LeafChecksum.
      b: a LeafChecksum.

    Returns:
      bool: shape, dtype and digest agree.
    """
    return (a.shape, a.dtype, a.digest) == (b.shape, b.dtype, b.digest)


def leaf_checksum(leaf: torch.Tensor) -> LeafChecksum:
    """The LeafChecksum of one tensor (copies it to the host).

    Args:
      leaf: a tensor, any shape, dtype and device.

    Returns:
      LeafChecksum.
    """
    host = leaf.detach().reshape(-1).cpu().contiguous()
    digest = hashlib.blake2b(host.view(torch.uint8).numpy().tobytes(), digest_size=16).hexdigest()
    total = float("nan") if host.is_complex() else float(host.to(torch.float64).sum())
    return LeafChecksum(tuple(leaf.shape), str(leaf.dtype), total, digest)


def tree_checksum(tree: Tree) -> dict[str, LeafChecksum]:
    """{path: LeafChecksum} for every leaf of `tree`, in path order. Host-side; for start-up checks.

    Args:
      tree: a tree of tensors.

    Returns:
      dict[str, LeafChecksum].

    Raises:
      TypeError: a leaf that is not a tensor.
    """
    paths, leaves = _tensor_leaves(tree, "tree_checksum")
    return {p: leaf_checksum(x) for p, x in zip(paths, leaves)}


def first_checksum_difference(checksums: Sequence[dict[str, LeafChecksum]]) -> str | None:
    """Compares per-rank checksums.

    Args:
      checksums: one `tree_checksum` result per rank (index = rank).

    Returns:
      A message naming the first path (sorted order) whose checksum differs between ranks, or None when
      all agree.
    """
    reference = checksums[0]
    all_paths = sorted(set().union(*(c.keys() for c in checksums)))
    for path in all_paths:
        for rank, mine in enumerate(checksums):
            if path not in mine or path not in reference:
                holder = 0 if path in reference else rank
                lacking = rank if path in reference else 0
                return f"{path!r} exists on rank {holder} but not on rank {lacking}"
            a, b = reference[path], mine[path]
            if not same_leaf(a, b):
                return (
                    f"first differing path {path!r}: rank 0 has {a.shape} {a.dtype} sum={a.total!r}, "
                    f"rank {rank} has {b.shape} {b.dtype} sum={b.total!r}"
                )
    return None


def verify_same(tree: Tree, *, group=None) -> None:
    """Checks that `tree` is bitwise identical on all ranks of `group`.

    One all_gather_object of per-leaf checksums.

    Args:
      tree: this rank's tree of tensors.
      group: the process group (None: the default group).

    Returns:
      None.

    Raises:
      ReplicaMismatch: on every rank alike, naming the first differing path.
    """
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, tree_checksum(tree), group=group)
    difference = first_checksum_difference(gathered)
    if difference is not None:
        raise ReplicaMismatch(f"tree differs between ranks: {difference}")
