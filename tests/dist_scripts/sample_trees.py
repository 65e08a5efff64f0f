"""Rank-dependent pytrees shared by the distributed test scripts and the tests that check their output."""

from __future__ import annotations

import collections

import torch

Moments = collections.namedtuple("Moments", ["mean", "var"])

# Every leaf is 1024 bytes, so bucket counts can be worked out by hand: a 4096-byte bucket holds 4 leaves.
LEAF_BYTES = 1024
FLOAT32_LEAVES = 24
FLOAT64_LEAVES = 6
FLOAT16_LEAVES = 4
BFLOAT16_LEAVES = 4
INT64_LEAVES = 4
SHAPES = ((16, 16), (256,), (4, 8, 8), (2, 128))  # 256 elements each, float32


def sample_tree(rank: int) -> dict:
    """A nested tree (dicts and a NamedTuple) of float32/float64/float16/bfloat16/int64 leaves whose values
    depend on `rank`; every leaf holds LEAF_BYTES bytes."""
    g = torch.Generator().manual_seed(1000 + rank)

    def normal(shape, dtype):
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)

    layers = {f"layer{i:02d}": {"weight": normal(SHAPES[i % 4], torch.float32)} for i in range(FLOAT32_LEAVES - 4)}
    head = Moments(mean=normal((256,), torch.float32), var=normal((8, 32), torch.float32))
    return {
        "backbone": layers,
        "head": {"moments": head, "extra": {"a": normal((256,), torch.float32), "b": normal((16, 16), torch.float32)}},
        "precise": {f"p{i}": normal((128,), torch.float64) for i in range(FLOAT64_LEAVES)},
        "half": {f"h{i}": normal((512,), torch.float16) for i in range(FLOAT16_LEAVES)},
        "brain": {f"b{i}": normal((32, 16), torch.bfloat16) for i in range(BFLOAT16_LEAVES)},
        "counts": {
            f"c{i}": torch.randint(-50, 50, (128,), generator=g, dtype=torch.int64) for i in range(INT64_LEAVES)
        },
    }


def float_part(tree: dict) -> dict:
    """The tree without its integer leaves (what reduce_mean accepts)."""
    return {k: v for k, v in tree.items() if k != "counts"}
