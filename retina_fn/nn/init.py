"""Initialisers: functions of (key: rng key int64 [2], shape) returning a new float32 tensor on the CPU.

Numbers come from retina_fn.rng (the same weights on every platform); normal draws use Box-Muller.
"""

from __future__ import annotations

import math

import torch

from retina_fn import rng


def _fans(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) < 2:
        raise ValueError(f"fans need a weight of rank >= 2, got shape {shape}")
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def standard_normal(key: rng.Key, shape: tuple[int, ...]) -> torch.Tensor:
    """N(0, 1) samples (Box-Muller)."""
    u1, u2 = rng.uniform_pair(key, shape)
    u1 = 1.0 - u1  # (0, 1]: the log is finite
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)).to(torch.float32)


def normal(key: rng.Key, shape: tuple[int, ...], std: float = 0.01, mean: float = 0.0) -> torch.Tensor:
    """N(mean, std^2) samples (RetinaNet's head init uses std 0.01)."""
    return standard_normal(key, shape) * std + mean


def kaiming_normal_fan_out(key: rng.Key, shape: tuple[int, ...]) -> torch.Tensor:
    """He normal, fan_out mode (torchvision's ResNet init): std = sqrt(2 / fan_out) for a weight shape
    [C_out, C_in, *kernel]; ValueError for rank < 2."""
    _, fan_out = _fans(shape)
    return standard_normal(key, shape) * math.sqrt(2.0 / fan_out)


def xavier_uniform(key: rng.Key, shape: tuple[int, ...], gain: float = 1.0) -> torch.Tensor:
    """Glorot uniform U(-a, a), a = gain * sqrt(6 / (fan_in + fan_out)) (mmdetection's FPN init), for a weight
    shape [C_out, C_in, *kernel]; ValueError for rank < 2."""
    fan_in, fan_out = _fans(shape)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return (rng.uniform(key, shape, torch.float64) * 2.0 - 1.0).to(torch.float32) * bound


def constant(shape: tuple[int, ...], value: float = 0.0) -> torch.Tensor:
    """A tensor filled with `value`."""
    return torch.full(shape, float(value), dtype=torch.float32)


def prior_prob_bias(shape: tuple[int, ...], prior: float = 0.01) -> torch.Tensor:
    """Bias with sigmoid(bias) = prior: -log((1 - prior) / prior); ValueError for a prior outside (0, 1)."""
    if not 0.0 < prior < 1.0:
        raise ValueError(f"prior probability must be in (0, 1), got {prior}")
    return constant(shape, -math.log((1.0 - prior) / prior))


def conv(key: rng.Key, c_out: int, c_in: int, k: int, weight_init: str = "kaiming_fan_out",
         bias: bool = False, std: float = 0.01, bias_value: float = 0.0) -> dict[str, torch.Tensor]:
    """{'weight': float32 [c_out, c_in, k, k], 'bias': [c_out] (only when `bias`)} of a k x k conv; weight_init
    'kaiming_fan_out' | 'xavier_uniform' | 'normal' (with `std`), else ValueError."""
    shape = (c_out, c_in, k, k)
    draws = {"kaiming_fan_out": kaiming_normal_fan_out, "xavier_uniform": xavier_uniform,
             "normal": lambda key_, shape_: normal(key_, shape_, std)}
    if weight_init not in draws:
        raise ValueError(f"unknown weight_init {weight_init!r}")
    if key.device.type == "meta":  # a shapes-only template (interop): no values to draw
        w = torch.empty(shape, dtype=torch.float32, device="meta")
    else:
        w = draws[weight_init](key, shape)
    p = {"weight": w}
    if bias:
        p["bias"] = constant((c_out,), bias_value)
    return p


def batch_norm(channels: int) -> dict[str, torch.Tensor]:
    """Identity batch norm: {'weight': ones, 'bias': zeros, 'running_mean': zeros, 'running_var': ones}, float32 [C]."""
    return {"weight": constant((channels,), 1.0), "bias": constant((channels,), 0.0),
            "running_mean": constant((channels,), 0.0), "running_var": constant((channels,), 1.0)}
