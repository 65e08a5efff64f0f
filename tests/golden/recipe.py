"""Weights and images that two environments rebuild bit for bit from a few integers.

The golden files (tests/golden/*.npz) hold torchvision's outputs for a RetinaNet whose weights are too
large to store (34M values). Both the writer (run beside torchvision) and the tests (run without it)
rebuild those weights and the input images here, from integer seeds only: a SplitMix64 counter stream
in numpy uint64 arithmetic, which wraps identically on every platform and numpy version (no library
random generator, whose streams may change between releases). Only numpy and torch are imported.
"""

from __future__ import annotations

import hashlib
import zlib

import numpy as np
import torch

_GAMMA = np.uint64(0x9E3779B97F4A7C15)


def uniform(seed: int, n: int) -> np.ndarray:
    """n float64 draws in [0, 1) from SplitMix64 at counter 1..n of stream `seed`.

    Args:
      seed: a non-negative integer below 2**64.
      n: the number of draws.

    Returns:
      float64 [n].
    """
    with np.errstate(over="ignore"):
        z = (np.arange(1, n + 1, dtype=np.uint64) + np.uint64(seed) * _GAMMA) * _GAMMA
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def key_seed(name: str, seed: int) -> int:
    """A stream number for one tensor: crc32 of its state_dict key, offset by the recipe seed."""
    return zlib.crc32(name.encode()) + (seed << 32)


def _range(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """The uniform range of one torchvision RetinaNet v1 tensor (before calibration)."""
    leaf = name.rsplit(".", 1)[-1]
    in_backbone = name.startswith("backbone.body.")
    if leaf == "running_mean":
        return (-0.3, 0.3)
    if leaf == "running_var":
        return (0.5, 2.0)
    if in_backbone and len(shape) == 1:  # frozen BN affine
        return (0.5, 1.2) if leaf == "weight" else (-0.2, 0.2)
    if name == "head.classification_head.cls_logits.bias":
        return (-2.6, -2.4)  # many scores pass 0.05, few saturate
    if leaf == "bias":
        return (-0.1, 0.1)
    fan_in = int(np.prod(shape[1:]))
    bound = float(np.sqrt(6.0 / fan_in))  # He uniform: variance 2 / fan_in
    return (-bound, bound)


def synthesize(spec: list[tuple[str, tuple[int, ...]]], seed: int = 0) -> dict[str, torch.Tensor]:
    """A state_dict with every tensor of `spec` drawn from its own stream (see `_range`).

    Args:
      spec: (key, shape) of every tensor, e.g. from a torchvision model's state_dict.
      seed: the recipe seed.

    Returns:
      {key: float32 tensor of that shape}.
    """
    out = {}
    for name, shape in spec:
        lo, hi = _range(name, tuple(shape))
        n = int(np.prod(shape))
        values = lo + (hi - lo) * uniform(key_seed(name, seed), n)
        out[name] = torch.from_numpy(values.astype(np.float32).reshape(shape))
    return out


def calibrate(state: dict[str, torch.Tensor], factors: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Scales the calibrated convs: weight (and, when `factors` says so, bias) times the stored factor.

    Args:
      state: the `synthesize` output.
      factors: {key: float32 [] or [C_out]} for the tensors to scale.

    Returns:
      A new state_dict.
    """
    out = dict(state)
    for name, factor in factors.items():
        f = torch.from_numpy(np.asarray(factor, dtype=np.float32))
        t = out[name]
        out[name] = t * f.reshape(-1, *([1] * (t.dim() - 1))) if f.dim() else t * f
    return out


def image(seed: int, height: int, width: int) -> np.ndarray:
    """A test picture: random 8x8-pixel blocks of colour (nearest-upsampled) plus
    fine noise, uint8 [height, width, 3].

    Args:
      seed: the image's stream.
      height, width: its size.

    Returns:
      uint8 [height, width, 3].
    """
    bh, bw = -(-height // 8), -(-width // 8)
    blocks = uniform(seed * 2 + 1, bh * bw * 3).reshape(bh, bw, 3) * 200.0
    coarse = np.repeat(np.repeat(blocks, 8, axis=0), 8, axis=1)[:height, :width]
    noise = uniform(seed * 2 + 2, height * width * 3).reshape(height, width, 3) * 55.0
    return np.floor(coarse + noise).astype(np.uint8)


def digest(array: np.ndarray) -> str:
    """sha256 of an array's bytes (C order), to check that both sides rebuilt the same input."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
