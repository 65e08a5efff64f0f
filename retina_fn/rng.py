"""Explicit random keys in the JAX manner.

A key is an int64 tensor [2] holding two 32-bit words. Keys are derived from each other by integer hashing
written with plain tensor ops (xor, shifts, multiplies by constants below 2**31 so no product overflows int64),
so the same key gives the same numbers on every process, platform and device, eagerly or compiled. Nothing
here touches torch's or numpy's global generators. Every function keeps the key's device.
"""

from __future__ import annotations

import math

import numpy as np
import torch

Key = torch.Tensor  # int64[..., 2], each word in [0, 2**32)

_M32 = 0xFFFFFFFF
_SPLIT_TAG = 0x5BD1E995
_FOLD_TAG = 0x1B873593
_BITS_TAG = 0x68E31DA4


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche hash (xorshift-multiply) of x in [0, 2**32), x unchanged. In place on one new
    tensor: a model's initialisation hashes tens of millions of words."""
    y = x >> 16
    y ^= x
    y *= 0x45D9F3B
    y &= _M32
    y ^= y >> 16
    y *= 0x45D9F3B
    y &= _M32
    y ^= y >> 16
    return y


def _hash(key: Key, data: torch.Tensor, tag: int) -> Key:
    """Mixes `data` (int64, broadcastable with key[..., 0]) into `key` -> new key words."""
    if key.device.type == "meta":  # shapes only (a parameter template): nothing to mix, and most meta ops
        # run Python reference code whose first use imports torch._dynamo (torch.broadcast_shapes: sympy)
        shape = np.broadcast_shapes(tuple(key.shape[:-1]), tuple(data.shape))
        return torch.empty((*shape, 2), dtype=torch.int64, device="meta")
    k0, k1 = key[..., 0], key[..., 1]
    d = data & _M32
    a = _mix32(k0 ^ _mix32(d ^ tag))
    b = _mix32(k1 ^ _mix32((a + d) & _M32))
    a = _mix32(a ^ _mix32((b + tag) & _M32))
    return torch.stack([a, b], dim=-1)


def key(seed: int) -> Key:
    """A root key (int64 [2] on the CPU) from a seed in [0, 2**64), else ValueError."""
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    raw = torch.tensor([seed & _M32, (seed >> 32) & _M32], dtype=torch.int64)
    return _hash(raw, torch.tensor(0, dtype=torch.int64), _FOLD_TAG)


def split(key: Key, num: int = 2) -> Key:
    """`num` new independent keys from key int64 [2]: int64 [num, 2]. Unpack with `a, b = split(k)`."""
    if key.device.type == "meta":  # shapes only, see _hash (arange on 'meta' is Python reference code too)
        return torch.empty((num, 2), dtype=torch.int64, device=key.device)
    idx = torch.arange(num, dtype=torch.int64, device=key.device)
    return _hash(key.unsqueeze(0).expand(num, 2), idx, _SPLIT_TAG)


def fold_in(key: Key, data: int | torch.Tensor) -> Key:
    """A new key, key's shape (int64 [..., 2]), from `key` and an integer (a step, an image index, a rank): an int
    in [0, 2**63) or a 0-d int64 tensor (no host sync); ValueError for a negative int or a tensor not 0-d."""
    if isinstance(data, int) and data < 0:
        raise ValueError(f"fold_in data must be non-negative, got {data}")
    d = torch.as_tensor(data, dtype=torch.int64, device=key.device)
    if d.ndim != 0:
        raise ValueError("fold_in takes one integer; use split for several keys")
    return _hash(_hash(key, d, _FOLD_TAG), d >> 32, _FOLD_TAG)


def _words(key: Key, n: int) -> torch.Tensor:
    """[n, 2] independent 32-bit words (as int64) from counters 0..n-1."""
    counter = torch.arange(n, dtype=torch.int64, device=key.device)
    return _hash(key.unsqueeze(0).expand(n, 2), counter, _BITS_TAG)


def bits(key: Key, shape: tuple[int, ...]) -> torch.Tensor:
    """Uniform 32-bit words, a pure function of the key: int64 `shape`, values in [0, 2**32)."""
    n = math.prod(shape)
    return _words(key, (n + 1) // 2).reshape(-1)[:n].reshape(shape)


def uniform(key: Key, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform floats in [0, 1), `dtype` `shape`, from the top 24 bits of `bits` (exact in float32)."""
    return ((bits(key, shape) >> 8).to(torch.float64) / float(1 << 24)).to(dtype)


def uniform_pair(key: Key, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent uniform float64 `shape` tensors in [0, 1) on a 2**-24 grid, from the two words of one
    hash per element."""
    w = _words(key, math.prod(shape)) >> 8
    u = w.to(torch.float64) / float(1 << 24)
    return u[:, 0].reshape(shape), u[:, 1].reshape(shape)


def numpy_generator(key: Key) -> np.random.Generator:
    """A numpy Generator (PCG64) seeded with the key's two words, for host-side data augmentation."""
    k0, k1 = (int(v) for v in key.reshape(2).tolist())
    return np.random.Generator(np.random.PCG64([k0, k1]))
